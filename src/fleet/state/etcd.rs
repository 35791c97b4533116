//! etcd's v3 API, through its JSON gateway (`POST /v3/kv/range`, ...): the
//! calls the deploy state needs (read, read a prefix, a transaction, put,
//! and leases), on any member of a cluster.
//!
//! The gateway speaks JSON over HTTP/1.1 on the client port of every etcd
//! from 3.4 on (3.3 served it under `/v3beta`; Debian's etcd-server is 3.4), so scap needs neither gRPC
//! nor protobuf code. Keys and values are base64 in it, 64-bit numbers are
//! strings, and fields left at their default are left out (hence every
//! `#[serde(default)]`).
//!
//! **Which member.** A call goes to the member that answered last, and on
//! a transport failure, a timeout or an "unavailable" answer (no leader, a
//! leader changing, a member stopping) to the next one, round the list
//! twice within [`Etcd::timeout`] x 3; one that names an error of the
//! request itself (a compare that is malformed, a lease not found) is not
//! retried. A write that failed in transport may still have been applied:
//! callers make every write a transaction whose compare tells (the value
//! already there is the one they wrote).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

use super::http::{self, Endpoint};

/// Largest answer read from etcd: a range over the history prefix is the
/// biggest (its reads are bounded by a limit), etcd's own request limit
/// is 1.5 MiB.
const MAX_ANSWER: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(
        "etcd did not answer at any of {endpoints} ({why}): the deploy state is there, so nothing was changed; check that cluster (etcdctl endpoint health), or the [state] etcd URLs in scap.toml"
    )]
    Unreachable { endpoints: String, why: String },
    #[error("etcd at {endpoint}: {why}")]
    Refused { endpoint: String, why: String },
}

/// A key and its value, as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// What a transaction compares.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key's create revision (0: it does not exist).
    Created(Vec<u8>, i64),
    /// The key's last modification revision (0: it does not exist).
    Modified(Vec<u8>, i64),
}

/// What a transaction does.
#[derive(Clone, Debug)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    Get(Vec<u8>),
    Delete(Vec<u8>),
}

/// A transaction's outcome: whether the compares held, and what each
/// `Op::Get` of the branch taken read (`None` for other ops).
#[derive(Debug)]
pub struct TxnOutcome {
    pub succeeded: bool,
    pub revision: i64,
    pub reads: Vec<Option<Kv>>,
}

/// A client for one etcd cluster.
pub struct Etcd {
    endpoints: Vec<Endpoint>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// One request's deadline.
    pub timeout: Duration,
    /// The member that answered last.
    preferred: AtomicUsize,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints_text())
            .finish()
    }
}

fn b64(b: &[u8]) -> String {
    B64.encode(b)
}

fn num(n: i64) -> String {
    n.to_string()
}

/// A 64-bit number as the gateway writes it: a string (or a number).
fn de_i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        N(i64),
    }
    match N::deserialize(d)? {
        N::S(s) => s.parse().map_err(serde::de::Error::custom),
        N::N(n) => Ok(n),
    }
}

#[derive(Deserialize, Default)]
struct Header {
    #[serde(default, deserialize_with = "de_i64")]
    revision: i64,
}

#[derive(Deserialize)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "de_i64")]
    create_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    lease: i64,
}

#[derive(Deserialize, Default)]
struct RangeAnswer {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<RawKv>,
}

#[derive(Deserialize, Default)]
struct OpAnswer {
    #[serde(default)]
    response_range: Option<RangeAnswer>,
}

#[derive(Deserialize, Default)]
struct TxnAnswer {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<OpAnswer>,
}

#[derive(Deserialize)]
struct LeaseAnswer {
    #[serde(rename = "ID", default, deserialize_with = "de_i64")]
    id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "de_i64")]
    ttl: i64,
}

#[derive(Deserialize)]
struct KeepAliveAnswer {
    result: Option<LeaseAnswer>,
}

#[derive(Deserialize, Default)]
struct ErrorAnswer {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: i64,
}

impl RawKv {
    fn decode(self, endpoint: &str) -> Result<Kv, EtcdError> {
        let bad = |what: &str, e: base64::DecodeError| EtcdError::Refused {
            endpoint: endpoint.to_string(),
            why: format!("a {what} that is not base64 in its answer: {e}"),
        };
        Ok(Kv {
            key: B64.decode(&self.key).map_err(|e| bad("key", e))?,
            value: B64.decode(&self.value).map_err(|e| bad("value", e))?,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            lease: self.lease,
        })
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    /// A client for the members at `urls`; `tls` for https ones.
    pub fn new(
        urls: &[String],
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Result<Etcd, String> {
        if urls.is_empty() {
            return Err("no etcd URL: give etcd = [\"http://HOST:2379\", ...]".into());
        }
        let endpoints = urls
            .iter()
            .map(|u| Endpoint::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(e) = endpoints
            .iter()
            .find(|e| e.is_tls())
            .filter(|_| tls.is_none())
        {
            return Err(format!(
                "{} is https: give [state] ca (and cert and key, if etcd asks for a client certificate)",
                e.url
            ));
        }
        Ok(Etcd {
            endpoints,
            tls,
            timeout,
            preferred: AtomicUsize::new(0),
        })
    }

    pub fn endpoints_text(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One call, to whichever member answers (see the module's notes).
    fn call<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, EtcdError> {
        self.call_within(path, body, self.timeout * 3)
    }

    /// [`Etcd::call`], all of it within `total`.
    fn call_within<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
        total: Duration,
    ) -> Result<T, EtcdError> {
        let body = serde_json::to_vec(body).expect("serializes");
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let deadline = Instant::now() + total.min(self.timeout * 3);
        let mut why = Vec::new();
        for attempt in 0..2 * n {
            let i = (start + attempt) % n;
            let ep = &self.endpoints[i];
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if attempt == n {
                // Round two: give an election a moment.
                std::thread::sleep(Duration::from_millis(300).min(left));
            }
            let timeout = self.timeout.min(left);
            match http::post(ep, path, &body, timeout, self.tls.as_ref(), MAX_ANSWER) {
                Err(e) => why.push(format!("{}: {e}", ep.url)),
                Ok((200, answer)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return serde_json::from_slice(&answer).map_err(|e| EtcdError::Refused {
                        endpoint: ep.url.clone(),
                        why: format!(
                            "not an etcd v3 answer to {path} ({e}): is this etcd 3.4 or later?"
                        ),
                    });
                }
                Ok((status, answer)) => {
                    let err: ErrorAnswer = serde_json::from_slice(&answer).unwrap_or_default();
                    let text = if err.message.is_empty() {
                        err.error
                    } else {
                        err.message
                    };
                    let text = crate::text::clip(&text, 300);
                    // gRPC codes: 4 deadline exceeded, 14 unavailable (no
                    // leader, a leader changing, a member stopping).
                    let transient = matches!(err.code, 4 | 14) || status >= 502;
                    if transient {
                        why.push(format!("{}: HTTP {status}: {text}", ep.url));
                        continue;
                    }
                    return Err(EtcdError::Refused {
                        endpoint: ep.url.clone(),
                        why: format!("{path}: HTTP {status}: {text}"),
                    });
                }
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints_text(),
            why: why.join("; "),
        })
    }

    /// The key, if it exists (a linearizable read).
    pub fn get(&self, key: &[u8]) -> Result<Option<Kv>, EtcdError> {
        let a: RangeAnswer = self.call("/v3/kv/range", &serde_json::json!({ "key": b64(key) }))?;
        let endpoint = self.endpoints_text();
        a.kvs
            .into_iter()
            .next()
            .map(|k| k.decode(&endpoint))
            .transpose()
    }

    /// Keys under `prefix`, by key, the last `limit` of them (0: all).
    pub fn list(&self, prefix: &[u8], limit: i64) -> Result<Vec<Kv>, EtcdError> {
        let mut req = serde_json::json!({
            "key": b64(prefix),
            "range_end": b64(&prefix_end(prefix)),
            "sort_order": "DESCEND",
            "sort_target": "KEY",
        });
        if limit > 0 {
            req["limit"] = num(limit).into();
        }
        let a: RangeAnswer = self.call("/v3/kv/range", &req)?;
        let endpoint = self.endpoints_text();
        let mut out = a
            .kvs
            .into_iter()
            .map(|k| k.decode(&endpoint))
            .collect::<Result<Vec<_>, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// The key's last modification revision (0: it does not exist),
    /// without its value.
    pub fn mod_revision(&self, key: &[u8]) -> Result<i64, EtcdError> {
        let a: RangeAnswer = self.call(
            "/v3/kv/range",
            &serde_json::json!({ "key": b64(key), "keys_only": true }),
        )?;
        Ok(a.kvs.first().map_or(0, |k| k.mod_revision))
    }

    /// The cluster's revision now.
    pub fn revision(&self) -> Result<i64, EtcdError> {
        let a: RangeAnswer = self.call(
            "/v3/kv/range",
            &serde_json::json!({ "key": b64(b"\0"), "count_only": true }),
        )?;
        Ok(a.header.revision)
    }

    /// If every compare holds, `success`, else `failure`: atomically.
    pub fn txn(
        &self,
        compare: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> Result<TxnOutcome, EtcdError> {
        let cmp: Vec<serde_json::Value> = compare
            .iter()
            .map(|c| match c {
                Compare::Created(k, r) => serde_json::json!({
                    "key": b64(k), "result": "EQUAL", "target": "CREATE", "create_revision": num(*r)
                }),
                Compare::Modified(k, r) => serde_json::json!({
                    "key": b64(k), "result": "EQUAL", "target": "MOD", "mod_revision": num(*r)
                }),
            })
            .collect();
        let ops = |ops: &[Op]| -> Vec<serde_json::Value> {
            ops.iter()
                .map(|o| match o {
                    Op::Put { key, value, lease } => {
                        let mut p = serde_json::json!({ "key": b64(key), "value": b64(value) });
                        if *lease != 0 {
                            p["lease"] = num(*lease).into();
                        }
                        serde_json::json!({ "request_put": p })
                    }
                    Op::Get(k) => serde_json::json!({ "request_range": { "key": b64(k) } }),
                    Op::Delete(k) => {
                        serde_json::json!({ "request_delete_range": { "key": b64(k) } })
                    }
                })
                .collect()
        };
        let a: TxnAnswer = self.call(
            "/v3/kv/txn",
            &serde_json::json!({ "compare": cmp, "success": ops(success), "failure": ops(failure) }),
        )?;
        let endpoint = self.endpoints_text();
        let reads = a
            .responses
            .into_iter()
            .map(|r| {
                r.response_range
                    .and_then(|rr| rr.kvs.into_iter().next())
                    .map(|k| k.decode(&endpoint))
                    .transpose()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TxnOutcome {
            succeeded: a.succeeded,
            revision: a.header.revision,
            reads,
        })
    }

    /// A new lease of `ttl` seconds; its ID.
    pub fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let a: LeaseAnswer =
            self.call("/v3/lease/grant", &serde_json::json!({ "TTL": num(ttl) }))?;
        if a.id == 0 {
            return Err(EtcdError::Refused {
                endpoint: self.endpoints_text(),
                why: "granted lease 0".into(),
            });
        }
        Ok(a.id)
    }

    /// Renews a lease, within `total`; its TTL now (0: it has expired or
    /// was revoked).
    pub fn keep_alive(&self, id: i64, total: Duration) -> Result<i64, EtcdError> {
        let a: KeepAliveAnswer = self.call_within(
            "/v3/lease/keepalive",
            &serde_json::json!({ "ID": num(id) }),
            total,
        )?;
        Ok(a.result.map_or(0, |r| r.ttl.max(0)))
    }

    /// Seconds a lease has left (-1 or 0: it has expired).
    pub fn time_to_live(&self, id: i64) -> Result<i64, EtcdError> {
        let a: LeaseAnswer = self.call(
            "/v3/lease/timetolive",
            &serde_json::json!({ "ID": num(id) }),
        )?;
        Ok(a.ttl)
    }

    /// Ends a lease and deletes its keys. A lease already gone is fine.
    pub fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        match self
            .call::<serde_json::Value>("/v3/lease/revoke", &serde_json::json!({ "ID": num(id) }))
        {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused { why, .. }) if why.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/scap/"), b"/scap0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn answers_with_numbers_as_strings_or_numbers_and_defaults_left_out() {
        let a: TxnAnswer = serde_json::from_str(
            r#"{"header":{"revision":"12"},"responses":[{"response_range":{"header":{},"kvs":[{"key":"YQ==","create_revision":"3","mod_revision":5,"value":"Yg=="}]}},{"response_put":{}}]}"#,
        )
        .unwrap();
        assert!(!a.succeeded);
        assert_eq!(a.header.revision, 12);
        let kv = a
            .responses
            .into_iter()
            .next()
            .unwrap()
            .response_range
            .unwrap()
            .kvs
            .remove(0);
        let kv = kv.decode("x").unwrap();
        assert_eq!(
            (
                kv.key,
                kv.value,
                kv.create_revision,
                kv.mod_revision,
                kv.lease
            ),
            (b"a".to_vec(), b"b".to_vec(), 3, 5, 0)
        );
        assert!(
            serde_json::from_str::<RawKv>(r#"{"key":"!!"}"#)
                .unwrap()
                .decode("x")
                .is_err()
        );
        assert!(serde_json::from_str::<Header>(r#"{"revision":"x"}"#).is_err());
    }

    #[test]
    fn no_urls_or_https_without_a_ca_is_refused_naming_what_to_give() {
        assert!(
            Etcd::new(&[], None, Duration::from_secs(1))
                .unwrap_err()
                .contains("etcd = [")
        );
        let e = Etcd::new(
            &["https://conf1001:2379".into()],
            None,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.contains("[state] ca"), "{e}");
    }
}
