//! The load balancer's pools, as conftool keeps them in etcd: the truth
//! about which hosts take traffic, and how much.
//!
//! Layout (conftool's): `/conftool/v1/pools/<dc>/<cluster>/<service>/<host>`
//! holds JSON like `{"pooled": "yes", "weight": 10}`, `pooled` one of
//! `yes`, `no` (depooled: takes no traffic), `inactive` (out of service).
//!
//! We speak etcd's **v2 keys API** (plain HTTP+JSON under `/v2/keys`),
//! because that is where conftool writes: conftool (python-etcd) uses the
//! v2 API, and etcd keeps v2 and v3 key spaces apart, so a v3 client would
//! see no pools at all. etcd 3.4 serves v2 with `--enable-v2`.
//!
//! A host's traffic share is its weight if pooled, else none. Depooling
//! and repooling (for restarts) are compare-and-swap writes on the host's
//! key (`prevIndex`), so a change made meanwhile by someone else (a
//! conftool command, another tool) is never overwritten: the write fails
//! and is reported.
//!
//! **Invariant:** nothing here guesses. An etcd that does not answer, a
//! value that does not parse, a weight of 0 on a pooled host are errors
//! that name the key; the caller refuses to start or stops between steps.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::inventory::{DEFAULT_AGENT_PORT, Host, Member};

/// How long one etcd request may take.
const ETCD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read from etcd (the pools of a big site are ~100 KB).
const MAX_ETCD_BYTES: usize = 16 << 20;

pub use super::inventory::Pooled;

/// One host's entry in the pools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PoolEntry {
    pub host: String,
    pub dc: String,
    pub cluster: String,
    pub service: String,
    pub pooled: Pooled,
    pub weight: u64,
    /// The etcd key, and its modification index (for compare-and-swap).
    pub key: String,
    pub index: u64,
}

impl PoolEntry {
    /// The traffic it takes: its weight when pooled, else none.
    pub fn traffic(&self) -> u64 {
        if self.pooled == Pooled::Yes {
            self.weight
        } else {
            0
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "etcd at {url} did not answer ({why}): the pools are the truth about traffic, and scap does not guess them; fix etcd (or the [pools] etcd URL in scap.toml) and run again"
    )]
    Unreachable { url: String, why: String },
    #[error("etcd at {url}: {key}: {why}")]
    Bad {
        url: String,
        key: String,
        why: String,
    },
    #[error(
        "etcd key {key} changed while scap was changing it (someone else pooled or depooled the host): left as it is; check it with conftool"
    )]
    Changed { key: String },
}

pub use crate::config::PoolsConfig;

/// The etcd v2 node as JSON.
#[derive(Debug, Deserialize)]
struct Node {
    key: String,
    #[serde(default)]
    dir: bool,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(rename = "modifiedIndex", default)]
    modified_index: u64,
}

#[derive(Debug, Deserialize)]
struct Answer {
    node: Node,
}

#[derive(Debug, Deserialize)]
struct EtcdError {
    #[serde(rename = "errorCode", default)]
    code: u32,
    #[serde(default)]
    message: String,
}

/// The value conftool writes.
#[derive(Debug, Deserialize, Serialize)]
struct Value {
    pooled: String,
    weight: serde_json::Value,
}

/// A client for conftool's pools in etcd.
#[derive(Clone)]
pub struct Pools {
    http: reqwest::Client,
    cfg: PoolsConfig,
}

impl Pools {
    pub fn new(cfg: PoolsConfig) -> Result<Pools, PoolError> {
        if cfg.etcd.is_empty() {
            return Err(PoolError::Bad {
                url: String::new(),
                key: "[pools] etcd".into(),
                why: "no etcd URL: give etcd = [\"http://HOST:2379\"]".into(),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(ETCD_TIMEOUT)
            .connect_timeout(ETCD_TIMEOUT)
            .build()
            .map_err(|e| PoolError::Unreachable {
                url: cfg.etcd.join(", "),
                why: e.to_string(),
            })?;
        Ok(Pools { http, cfg })
    }

    pub fn config(&self) -> &PoolsConfig {
        &self.cfg
    }

    fn url(&self, base: &str, key: &str) -> String {
        format!("{}/v2/keys{}", base.trim_end_matches('/'), key)
    }

    /// GETs `key` from the first etcd that answers.
    async fn get(&self, key: &str, query: &str) -> Result<(String, Vec<u8>, u16), PoolError> {
        let mut last = String::new();
        for base in &self.cfg.etcd {
            let url = format!("{}{query}", self.url(base, key));
            match self.http.get(&url).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body = read_capped(r, &url).await?;
                    return Ok((base.clone(), body, status));
                }
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(PoolError::Unreachable {
            url: self.cfg.etcd.join(", "),
            why: last,
        })
    }

    /// Every host's entry, read now. Errors name the key.
    pub async fn read(&self) -> Result<Vec<PoolEntry>, PoolError> {
        let prefix = self.cfg.prefix.trim_end_matches('/').to_string();
        let (base, body, status) = self.get(&prefix, "?recursive=true&sorted=true").await?;
        if status == 404 {
            return Err(PoolError::Bad {
                url: base,
                key: prefix,
                why: "no pools there: check [pools] prefix in scap.toml (conftool's is /conftool/v1/pools)".into(),
            });
        }
        if status != 200 {
            return Err(etcd_error(&base, &prefix, status, &body));
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| PoolError::Bad {
            url: base.clone(),
            key: prefix.clone(),
            why: format!("not an etcd v2 answer ({e}): is this etcd, with --enable-v2?"),
        })?;
        let mut out = Vec::new();
        let mut by_host: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        walk(&answer.node, &prefix, &base, &mut out)?;
        for (i, e) in out.iter().enumerate() {
            by_host.entry(e.host.clone()).or_default().push(i);
        }
        // One entry per host: the configured service's, or its only one.
        let mut keep = Vec::new();
        for (host, ix) in by_host {
            let chosen: Vec<usize> = match &self.cfg.service {
                Some(s) => ix
                    .iter()
                    .copied()
                    .filter(|&i| &out[i].service == s)
                    .collect(),
                None => ix.clone(),
            };
            match chosen.len() {
                0 => {}
                1 => keep.push(chosen[0]),
                _ => {
                    let services: Vec<String> = chosen
                        .iter()
                        .map(|&i| format!("{}/{}", out[i].cluster, out[i].service))
                        .collect();
                    return Err(PoolError::Bad {
                        url: base,
                        key: format!("{prefix}/*/*/*/{host}"),
                        why: format!(
                            "host {host} is in several pools ({}): say which service counts with [pools] service in scap.toml",
                            services.join(", ")
                        ),
                    });
                }
            }
        }
        keep.sort();
        Ok(keep.into_iter().map(|i| out[i].clone()).collect())
    }

    /// Sets a host's `pooled` (keeping its weight), only if its key is
    /// still at `entry.index`; returns the entry as written.
    pub async fn set_pooled(
        &self,
        entry: &PoolEntry,
        pooled: Pooled,
    ) -> Result<PoolEntry, PoolError> {
        let value =
            serde_json::json!({ "pooled": pooled.to_string(), "weight": entry.weight }).to_string();
        let mut last = String::new();
        for base in &self.cfg.etcd {
            let url = self.url(base, &entry.key);
            let form = [
                ("value", value.as_str()),
                ("prevIndex", &entry.index.to_string()),
            ];
            match self.http.put(&url).form(&form).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let body = read_capped(r, &url).await?;
                    if status == 412 {
                        return Err(PoolError::Changed {
                            key: entry.key.clone(),
                        });
                    }
                    if !(200..300).contains(&status) {
                        return Err(etcd_error(base, &entry.key, status, &body));
                    }
                    let a: Answer = serde_json::from_slice(&body).map_err(|e| PoolError::Bad {
                        url: base.clone(),
                        key: entry.key.clone(),
                        why: e.to_string(),
                    })?;
                    let mut e = entry.clone();
                    e.pooled = pooled;
                    e.index = a.node.modified_index;
                    return Ok(e);
                }
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(PoolError::Unreachable {
            url: self.cfg.etcd.join(", "),
            why: last,
        })
    }

    /// The current entry of one host (for a fresh index before a change).
    pub async fn entry(&self, e: &PoolEntry) -> Result<PoolEntry, PoolError> {
        let (base, body, status) = self.get(&e.key, "").await?;
        if status != 200 {
            return Err(etcd_error(&base, &e.key, status, &body));
        }
        let a: Answer = serde_json::from_slice(&body).map_err(|err| PoolError::Bad {
            url: base.clone(),
            key: e.key.clone(),
            why: err.to_string(),
        })?;
        let mut v = Vec::new();
        let prefix = self.cfg.prefix.trim_end_matches('/');
        walk(&a.node, prefix, &base, &mut v)?;
        v.pop().ok_or_else(|| PoolError::Bad {
            url: base,
            key: e.key.clone(),
            why: "not a pool entry".into(),
        })
    }
}

fn etcd_error(base: &str, key: &str, status: u16, body: &[u8]) -> PoolError {
    let why = match serde_json::from_slice::<EtcdError>(body) {
        Ok(e) => format!(
            "HTTP {status}, etcd error {}: {}",
            e.code,
            crate::text::clip(&e.message, 200)
        ),
        Err(_) => format!(
            "HTTP {status}: {}",
            crate::text::clip(String::from_utf8_lossy(body).trim(), 200)
        ),
    };
    PoolError::Bad {
        url: base.to_string(),
        key: key.to_string(),
        why,
    }
}

async fn read_capped(mut r: reqwest::Response, url: &str) -> Result<Vec<u8>, PoolError> {
    let mut out = Vec::new();
    loop {
        match r.chunk().await {
            Ok(Some(c)) => {
                if out.len() + c.len() > MAX_ETCD_BYTES {
                    return Err(PoolError::Bad {
                        url: url.into(),
                        key: String::new(),
                        why: format!("answer larger than {MAX_ETCD_BYTES} bytes"),
                    });
                }
                out.extend_from_slice(&c);
            }
            Ok(None) => return Ok(out),
            Err(e) => {
                return Err(PoolError::Unreachable {
                    url: url.into(),
                    why: e.to_string(),
                });
            }
        }
    }
}

/// Collects every leaf `<prefix>/<dc>/<cluster>/<service>/<host>`.
fn walk(node: &Node, prefix: &str, base: &str, out: &mut Vec<PoolEntry>) -> Result<(), PoolError> {
    if node.dir {
        for n in &node.nodes {
            walk(n, prefix, base, out)?;
        }
        return Ok(());
    }
    let bad = |why: String| PoolError::Bad {
        url: base.to_string(),
        key: node.key.clone(),
        why,
    };
    let rest = node
        .key
        .strip_prefix(prefix)
        .map(|r| r.trim_start_matches('/'))
        .ok_or_else(|| bad(format!("not under {prefix}")))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [dc, cluster, service, host] = parts[..] else {
        return Err(bad(format!(
            "expected {prefix}/<dc>/<cluster>/<service>/<host>"
        )));
    };
    if !crate::proto::valid_host_name(host) {
        return Err(bad(format!("{host:?} is not a host name")));
    }
    let raw = node.value.as_deref().unwrap_or("");
    let v: Value = serde_json::from_str(raw).map_err(|e| {
        bad(format!(
            "value {:?} is not conftool's {{\"pooled\": \"yes|no|inactive\", \"weight\": N}} ({e})",
            crate::text::clip(raw, 100)
        ))
    })?;
    let pooled = match v.pooled.as_str() {
        "yes" => Pooled::Yes,
        "no" => Pooled::No,
        "inactive" => Pooled::Inactive,
        other => {
            return Err(bad(format!(
                "pooled is {:?}: expected yes, no or inactive",
                crate::text::clip(other, 40)
            )));
        }
    };
    let weight = match &v.weight {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| bad(format!("weight {} is not a whole number", v.weight)))?;
    if weight == 0 && pooled == Pooled::Yes {
        return Err(bad(
            "pooled with weight 0: it would take no traffic while counted as pooled; depool it or give it a weight".into(),
        ));
    }
    out.push(PoolEntry {
        host: host.to_string(),
        dc: dc.to_string(),
        cluster: cluster.to_string(),
        service: service.to_string(),
        pooled,
        weight,
        key: node.key.clone(),
        index: node.modified_index,
    });
    Ok(())
}

/// The fleet from the load balancer's pools (conftool in etcd), joined by
/// host name with the static sources, which may give a host's agent
/// address and mark it canary. Returns the members and what a person should
/// know: agents in no pool (they take no traffic, and get the version at
/// 100%).
pub async fn fleet_from_pools(
    pools: &Pools,
    statics: &[Member],
) -> Result<(Vec<Member>, Vec<String>), PoolError> {
    let entries = pools.read().await?;
    let port = pools.config().agent_port.unwrap_or(DEFAULT_AGENT_PORT);
    let mut notes = Vec::new();
    let mut members: Vec<Member> = entries
        .iter()
        .map(|e| {
            let known = statics.iter().find(|m| m.host.name == e.host);
            Member {
                host: match known {
                    Some(m) => m.host.clone(),
                    None => Host {
                        name: e.host.clone(),
                        port,
                        addr: None,
                    },
                },
                weight: e.traffic(),
                dc: e.dc.clone(),
                cluster: e.cluster.clone(),
                canary: known.is_some_and(|m| m.canary),
                pooled: Some(e.pooled),
            }
        })
        .collect();
    for m in statics {
        if !entries.iter().any(|e| e.host == m.host.name) {
            notes.push(format!(
                "{}: its agent is in no pool: it takes no traffic, and gets a version only when a rollout reaches 100%",
                m.host
            ));
            members.push(Member {
                weight: 0,
                pooled: None,
                ..m.clone()
            });
        }
    }
    if members.is_empty() {
        return Err(PoolError::Bad {
            url: pools.config().etcd.join(", "),
            key: pools.config().prefix.clone(),
            why: "no host in the pools".into(),
        });
    }
    Ok((members, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(key: &str, value: &str) -> Node {
        Node {
            key: key.into(),
            dir: false,
            value: Some(value.into()),
            nodes: vec![],
            modified_index: 7,
        }
    }

    #[test]
    fn conftool_values() {
        let p = "/conftool/v1/pools";
        let mut out = Vec::new();
        walk(
            &leaf(
                "/conftool/v1/pools/eqiad/appserver/apache2/mw1001",
                r#"{"pooled": "yes", "weight": 10}"#,
            ),
            p,
            "e",
            &mut out,
        )
        .unwrap();
        assert_eq!(out[0].traffic(), 10);
        assert_eq!(out[0].cluster, "appserver");
        walk(
            &leaf(
                "/conftool/v1/pools/eqiad/api_appserver/apache2/mw1002",
                r#"{"pooled": "no", "weight": "5"}"#,
            ),
            p,
            "e",
            &mut out,
        )
        .unwrap();
        assert_eq!(out[1].traffic(), 0, "depooled takes no traffic");
        for (key, value, why) in [
            (
                "/conftool/v1/pools/eqiad/appserver/apache2/mw1",
                r#"{"pooled": "maybe", "weight": 1}"#,
                "pooled is",
            ),
            (
                "/conftool/v1/pools/eqiad/appserver/apache2/mw1",
                r#"{"pooled": "yes", "weight": 0}"#,
                "weight 0",
            ),
            (
                "/conftool/v1/pools/eqiad/appserver/apache2/mw1",
                r#"{"pooled": "yes", "weight": -3}"#,
                "whole number",
            ),
            (
                "/conftool/v1/pools/eqiad/appserver/apache2/mw1",
                "not json",
                "not conftool",
            ),
            (
                "/conftool/v1/pools/eqiad/appserver/mw1",
                r#"{"pooled": "yes", "weight": 1}"#,
                "expected",
            ),
        ] {
            let e = walk(&leaf(key, value), p, "e", &mut Vec::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why) && e.contains(key), "{e}");
        }
    }
}
