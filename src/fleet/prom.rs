//! Health gates that read Prometheus: PromQL over its HTTP API
//! (`/api/v1/query`), with the step's hosts (`$HOSTS`) and the rest of the
//! fleet (`$REST`) substituted into the query as regular expressions for a
//! `host=~"..."` matcher, and `$VERSION` as the version ID.
//!
//! Two kinds, as a deployer asks:
//! - **absolute**: the query (about the step's hosts) must be at most
//!   `max`: today's scap check, "10 errors in 20 s", is
//!   `sum(increase(errors_total{host=~"$HOSTS"}[20s]))` with `max = 10`;
//! - **comparison**: the same query about the step's hosts against the
//!   rest (the baseline, `$HOSTS` replaced by them): the canary value must
//!   be at most `ratio` times the baseline's, or under `floor` (a rate of
//!   0.01 against 0 is no regression).
//!
//! A query must return exactly one series (wrap it in `sum(...)`); no
//! series, several, a value that is not a number, or a Prometheus that
//! does not answer fails the gate (closed), naming the query.
//!
//! Joining a host's application metrics to the version it runs: every agent
//! exports `scap_agent_version_info{host, version} 1`, so
//! `sum by (version) (rate(errors_total[1m]) * on (host) group_left (version) scap_agent_version_info)`
//! is the error rate per version.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::VersionId;

const QUERY_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_ANSWER: usize = 1 << 20;

pub use crate::config::PromGate;

/// What a Prometheus gate measured, for history and the dashboard.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    pub query: String,
    /// The step's hosts' value.
    pub value: f64,
    /// The rest's value (comparison gates).
    pub baseline: Option<f64>,
    /// The most the value could be and pass.
    pub limit: f64,
    pub passed: bool,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

impl PromGate {
    /// Checks the settings; the error names the gate.
    pub fn check(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("prometheus {:?}: give an http(s) URL", self.url));
        }
        if self.max.is_some() == self.ratio.is_some() {
            return Err(format!(
                "prometheus gate {:?}: give either max (an absolute threshold) or ratio (against the rest of the fleet)",
                self.query
            ));
        }
        if !self.query.contains("$HOSTS") {
            return Err(format!(
                "prometheus gate {:?}: the query must select the step's hosts with $HOSTS, e.g. host=~\"$HOSTS\"",
                self.query
            ));
        }
        Ok(())
    }

    /// Runs the gate for `hosts` (the step's) against `rest`.
    pub async fn run(
        &self,
        http: &reqwest::Client,
        hosts: &[String],
        rest: &[String],
        version: &VersionId,
    ) -> Result<Measurement, String> {
        let q = fill(&self.query, hosts, rest, version);
        let value = query(http, &self.url, &q).await?;
        match (self.max, self.ratio) {
            (Some(max), _) => Ok(Measurement {
                query: q,
                value,
                baseline: None,
                limit: max,
                passed: value <= max,
            }),
            (None, Some(ratio)) => {
                if rest.is_empty() {
                    return Err(format!(
                        "{q}: no baseline: every host is in the step, nothing to compare it with"
                    ));
                }
                let bq = fill(&self.query, rest, hosts, version);
                let baseline = query(http, &self.url, &bq).await?;
                let limit = (ratio * baseline).max(self.floor.unwrap_or(0.0));
                Ok(Measurement {
                    query: q,
                    value,
                    baseline: Some(baseline),
                    limit,
                    passed: value <= limit,
                })
            }
            (None, None) => Err("a prometheus gate needs max or ratio".into()),
        }
    }
}

/// `$HOSTS`, `$REST` and `$VERSION` substituted. Host names are letters,
/// digits, `.`, `-` and `_`; a `.` is escaped for the regular expression
/// (inside a PromQL string, so `\\.`).
pub fn fill(q: &str, hosts: &[String], rest: &[String], version: &VersionId) -> String {
    let re = |hs: &[String]| {
        if hs.is_empty() {
            // Matches no host name.
            return "^$".to_string();
        }
        hs.iter()
            .map(|h| h.replace('.', "\\\\."))
            .collect::<Vec<_>>()
            .join("|")
    };
    q.replace("$HOSTS", &re(hosts))
        .replace("$REST", &re(rest))
        .replace("$VERSION", &version.to_hex())
}

/// One instant query; its single value.
pub async fn query(http: &reqwest::Client, url: &str, q: &str) -> Result<f64, String> {
    let endpoint = format!("{}/api/v1/query", url.trim_end_matches('/'));
    let resp = http
        .get(&endpoint)
        .query(&[("query", q)])
        .timeout(QUERY_TIMEOUT)
        .send()
        .await
        .map_err(|e| {
            format!("{q}: Prometheus at {url} did not answer ({e}): the gate fails closed")
        })?;
    let status = resp.status();
    let mut body = Vec::new();
    let mut resp = resp;
    while let Some(c) = resp
        .chunk()
        .await
        .map_err(|e| format!("{q}: Prometheus at {url}: {e}"))?
    {
        if body.len() + c.len() > MAX_ANSWER {
            return Err(format!("{q}: answer larger than {MAX_ANSWER} bytes"));
        }
        body.extend_from_slice(&c);
    }
    let a: Answer = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "{q}: Prometheus at {url} answered HTTP {status} that is not its API's JSON ({e}): {}",
            crate::text::clip(String::from_utf8_lossy(&body).trim(), 200)
        )
    })?;
    if a.status != "success" {
        return Err(format!(
            "{q}: Prometheus refused the query: {}",
            crate::text::clip(a.error.as_deref().unwrap_or("no reason given"), 300)
        ));
    }
    let data = a
        .data
        .ok_or_else(|| format!("{q}: no data in the answer"))?;
    let value = match data.result_type.as_str() {
        "scalar" => data.result.get(1).cloned(),
        "vector" => {
            let series = data.result.as_array().cloned().unwrap_or_default();
            match series.len() {
                0 => {
                    return Err(format!(
                        "{q}: returned no series (nothing scraped for these hosts, or a wrong metric name): the gate fails closed"
                    ));
                }
                1 => series[0].get("value").and_then(|v| v.get(1)).cloned(),
                n => {
                    return Err(format!(
                        "{q}: returned {n} series where one was expected: aggregate it, e.g. sum(...)"
                    ));
                }
            }
        }
        other => {
            return Err(format!(
                "{q}: returned a {other}; a gate needs one number (an instant vector of one series, or a scalar)"
            ));
        }
    };
    let v: f64 = value
        .as_ref()
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{q}: the value is not a number"))?;
    if v.is_nan() {
        return Err(format!(
            "{q}: the value is NaN (a division by zero?): the gate fails closed"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution() {
        let v = VersionId::new(crate::store::ObjectKind::Tree.hash(b"v"));
        let q = fill(
            "sum(x{host=~\"$HOSTS\"}) / sum(x{host=~\"$REST\"})",
            &["mw1001.eqiad".into()],
            &[],
            &v,
        );
        assert_eq!(
            q,
            "sum(x{host=~\"mw1001\\\\.eqiad\"}) / sum(x{host=~\"^$\"})"
        );
        let g = PromGate {
            url: "http://p:9090".into(),
            query: "sum(x)".into(),
            max: Some(1.0),
            ratio: None,
            floor: None,
        };
        assert!(g.check().unwrap_err().contains("$HOSTS"));
    }
}
