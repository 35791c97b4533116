//! Health gates run after each rollout step, on that step's hosts: HTTP
//! probes (a URL template with `{host}` and an expected status) and
//! commands (e.g. a script comparing the canaries' error rate in the log
//! system with a threshold, like scap's logstash check).

use std::time::Duration;

use futures_util::StreamExt;

use super::inventory::Host;
use crate::store::VersionId;

/// How long a probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a check command may run before it is killed (and fails).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Default)]
pub struct Gates {
    /// PromQL gates (`fleet::prom`).
    pub prometheus: Vec<super::prom::PromGate>,
    /// (URL template with `{host}` (the host's name) or `{addr}` (its
    /// agent's host:port), expected HTTP status)
    pub probes: Vec<(String, u16)>,
    /// Shell commands; exit 0 passes. They get SCAP_VERSION, SCAP_HOSTS
    /// (space-separated) and SCAP_PERCENT in their environment.
    pub commands: Vec<String>,
}

impl Gates {
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty() && self.commands.is_empty() && self.prometheus.is_empty()
    }

    /// How many gates there are.
    pub fn len(&self) -> usize {
        self.probes.len() + self.commands.len() + self.prometheus.len()
    }

    /// Runs every gate; the failures, each naming the host or command.
    /// Probes use `http` (the controller's client: it trusts the site CA
    /// and presents the controller's certificate).
    /// `rest` is the baseline for comparison gates: the hosts not on the
    /// version.
    pub async fn run(
        &self,
        http: &reqwest::Client,
        hosts: &[Host],
        rest: &[Host],
        version: &VersionId,
        percent: &str,
    ) -> GateResult {
        let mut failures = Vec::new();
        let mut measurements = Vec::new();
        if !self.prometheus.is_empty() {
            let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
            let rest: Vec<String> = rest.iter().map(|h| h.name.clone()).collect();
            // The controller's client: it trusts the site CA, as an
            // internal Prometheus behind TLS would use.
            for g in &self.prometheus {
                match g.run(http, &names, &rest, version).await {
                    Ok(m) => {
                        if !m.passed {
                            failures.push(match m.baseline {
                                Some(b) => format!(
                                    "{}: {} on the step's hosts, more than {} (the rest: {b}, ratio {})",
                                    m.query,
                                    m.value,
                                    m.limit,
                                    g.ratio.unwrap_or(0.0)
                                ),
                                None => format!("{}: {}, more than {}", m.query, m.value, m.limit),
                            });
                        }
                        measurements.push(m);
                    }
                    Err(e) => failures.push(e),
                }
            }
        }
        for (template, want) in &self.probes {
            let results: Vec<Option<String>> = futures_util::stream::iter(hosts)
                .map(|h| {
                    let url = template
                        .replace("{host}", &h.to_string())
                        .replace("{addr}", &h.authority());
                    async move {
                        match http.get(&url).timeout(PROBE_TIMEOUT).send().await {
                            Ok(r) if r.status().as_u16() == *want => None,
                            Ok(r) => Some(format!(
                                "{h}: {url} answered {}, expected {want}",
                                r.status().as_u16()
                            )),
                            Err(e) => Some(format!("{h}: {url}: {e}")),
                        }
                    }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            failures.extend(results.into_iter().flatten());
        }
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        for cmd in &self.commands {
            let env = vec![
                ("SCAP_VERSION", version.to_hex()),
                ("SCAP_HOSTS", names.join(" ")),
                ("SCAP_PERCENT", percent.to_string()),
            ];
            let c = cmd.clone();
            let r = tokio::task::spawn_blocking(move || {
                crate::hooks::run(&c, &env, CHECK_TIMEOUT, &crate::cancel::Cancel::new())
            })
            .await;
            match r {
                Ok(Ok(())) => {}
                Ok(Err(f)) => failures.push(format!(
                    "check {:?} failed ({}): {}",
                    crate::text::clip(cmd, 200),
                    f.status,
                    crate::text::clip(&f.output, 500)
                )),
                Err(e) => failures.push(format!("check {cmd:?} did not run: {e}")),
            }
        }
        GateResult {
            failures,
            measurements,
        }
    }
}

/// What the gates said: failures (each naming the host, URL, command or
/// query) and what the Prometheus gates measured.
#[derive(Clone, Debug, Default)]
pub struct GateResult {
    pub failures: Vec<String>,
    pub measurements: Vec<super::prom::Measurement>,
}
