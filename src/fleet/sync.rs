//! `scap sync --hosts GROUP --version V`: tell each agent to sync, in
//! parallel with a limit, and report per host.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;

use super::inventory::Host;
use crate::store::VersionId;

/// The result for one host.
#[derive(Clone, Debug, Serialize)]
pub struct HostResult {
    pub host: String,
    pub ok: bool,
    pub seconds: f64,
    /// The agent's answer (an `Outcome`) when it succeeded.
    pub outcome: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// An authenticated client for agents' APIs.
#[derive(Clone)]
pub struct Agents {
    http: reqwest::Client,
    token: Arc<String>,
}

impl Agents {
    pub fn new(token: String, timeout: Duration) -> Agents {
        Agents {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(timeout)
                .build()
                .expect("a TLS-free client builds"),
            token: Arc::new(token),
        }
    }

    /// POSTs `body` to `path` on `host`; the agent's JSON answer or an error
    /// that names the host.
    pub async fn post(
        &self,
        host: &Host,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let url = format!("{}{path}", host.base_url());
        let resp = self
            .http
            .post(&url)
            .bearer_auth(self.token.as_str())
            .json(body)
            .send()
            .await
            .map_err(|e| format!("{host}: {}", describe(&e)))?;
        answer(host, resp).await
    }

    pub async fn get(&self, host: &Host, path: &str) -> Result<serde_json::Value, String> {
        let url = format!("{}{path}", host.base_url());
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{host}: {}", describe(&e)))?;
        answer(host, resp).await
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "unreachable (connection refused or timed out): is the agent running?".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        e.to_string()
    }
}

async fn answer(host: &Host, resp: reqwest::Response) -> Result<serde_json::Value, String> {
    let status = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| format!("{host}: bad answer: {e}"))?;
    if status.is_success() {
        Ok(body)
    } else {
        let msg = body["error"].as_str().unwrap_or("no message").to_string();
        Err(format!("{host}: HTTP {}: {msg}", status.as_u16()))
    }
}

/// Syncs `hosts` to `version`, at most `concurrency` at once; calls
/// `progress` after each host finishes.
/// What to tell each host.
pub struct SyncJob<'a> {
    pub version: &'a VersionId,
    pub sources: &'a [String],
    pub by: &'a str,
    pub concurrency: usize,
    /// Once set (Ctrl-C), hosts not yet started are not started.
    pub interrupted: Option<&'a std::sync::atomic::AtomicBool>,
}

pub async fn sync_hosts(
    agents: &Agents,
    hosts: &[Host],
    job: &SyncJob<'_>,
    progress: &(dyn Fn(&HostResult) + Sync),
) -> Vec<HostResult> {
    let body = serde_json::json!({ "version": job.version, "sources": job.sources, "by": job.by });
    let mut results: Vec<HostResult> = futures_util::stream::iter(hosts)
        .map(|host| {
            let body = &body;
            async move {
                let started = Instant::now();
                let stop = job
                    .interrupted
                    .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst));
                let r = if stop {
                    Err(format!("{host}: not started (interrupted)"))
                } else {
                    agents.post(host, "/v1/sync", body).await
                };
                let result = HostResult {
                    host: host.to_string(),
                    ok: r.is_ok(),
                    seconds: started.elapsed().as_secs_f64(),
                    error: r.as_ref().err().cloned(),
                    outcome: r.ok(),
                };
                progress(&result);
                result
            }
        })
        .buffer_unordered(job.concurrency.max(1))
        .collect()
        .await;
    let order: std::collections::HashMap<String, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.to_string(), i))
        .collect();
    results.sort_by_key(|r| order.get(&r.host).copied());
    results
}
