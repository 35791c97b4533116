//! Talking to agents: a typed client for the agent API
//! ([`crate::proto`]) and the one fan-out that every fleet command
//! uses to reach many hosts at once.
//!
//! Answers are read with a size cap ([`MAX_RESPONSE_BYTES`]) and parsed
//! into the protocol's types; an answer that does not parse is an error
//! that names the host, never a panic or a guess.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::inventory::Host;
use crate::net::tls::{TlsError, Transport};
use crate::proto::state::{HostState, STATE_FORMAT};
use crate::proto::{
    CancelOutcome, CancelRequest, ErrorResponse, HealthResponse, MAX_RESPONSE_BYTES, Outcome,
    PromoteRequest, PullOutcome, PullRequest, RestartOutcome, RestartRequest, RollbackRequest,
    RollbackTarget, StateResponse, SyncRequest,
};
use crate::store::VersionId;
use crate::store::signature::SignedOrder;
use crate::text::clip;

/// Seconds to wait for a state reading: short, so that one hung host never
/// stalls a step (the sync itself has its own, long, timeout).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call to an agent failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("{host}: unreachable (connection refused or timed out): is the agent running?")]
    Unreachable { host: String },
    #[error("{host}: no answer within {seconds} s")]
    TimedOut { host: String, seconds: u64 },
    #[error("{host}: HTTP {status}: {message}")]
    Http {
        host: String,
        status: u16,
        message: String,
    },
    #[error("{host}: bad answer: {why}")]
    BadAnswer { host: String, why: String },
    #[error("{host}: TLS: {why}")]
    Tls { host: String, why: String },
    /// What `scap serve` said of a host it polled for this command
    /// (`GET /v1/fleet/poll`): its message names the host.
    #[error("{message}")]
    Relayed { host: String, message: String },
}

impl CallError {
    /// The call may have reached the agent and still be running there.
    pub fn maybe_running(&self) -> bool {
        matches!(
            self,
            CallError::TimedOut { .. } | CallError::BadAnswer { .. }
        )
    }
}

/// An authenticated client for agents' APIs: TLS with the controller's
/// certificate, or (lab) plain HTTP with the bearer token.
#[derive(Clone)]
pub struct Agents {
    http: reqwest::Client,
    transport: Transport,
    /// How long a changing call (a sync) may take.
    op_timeout: Duration,
    /// Signs a deploy order into every sync, stage and rollback of a
    /// version (none: requests go without, as from an older scap).
    orders: Option<std::sync::Arc<super::orders::Orders>>,
    /// Each agent's own name (its `--host`, from its state), which its
    /// orders must name.
    names: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Host, String>>>,
    /// The rollout or change these calls belong to, sent as
    /// [`crate::proto::ROLLOUT_HEADER`] for the agents' logs.
    rollout: Option<String>,
}

/// How long `scap status` waits for `scap serve`'s poll of the fleet
/// before polling every host itself.
const FLEET_POLL_TIMEOUT: Duration = Duration::from_secs(10);

impl Agents {
    pub fn new(transport: Transport, op_timeout: Duration) -> Result<Agents, TlsError> {
        let http = crate::net::tls::http_client(
            &transport,
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true),
        )?;
        Ok(Agents {
            http,
            transport,
            op_timeout,
            orders: None,
            names: Default::default(),
            rollout: None,
        })
    }

    /// Every call names rollout `id` (one that is not a valid ID, which
    /// no record makes, is not sent).
    pub fn with_rollout(mut self, id: Option<&str>) -> Agents {
        self.rollout = id
            .filter(|id| crate::proto::rollout_id_ok(id))
            .map(str::to_string);
        self
    }

    /// Every sync, stage and rollback to a version carries a deploy order
    /// from `orders`.
    pub fn with_orders(mut self, orders: super::orders::Orders) -> Agents {
        self.orders = Some(std::sync::Arc::new(orders));
        self
    }

    /// The orders this client gives (none without a deploy key): the
    /// desired state's targets are signed from the same block.
    pub fn orders(&self) -> Option<&super::orders::Orders> {
        self.orders.as_deref()
    }

    /// An order for `host` to `action` `version`, if this client gives
    /// orders: the agent's own name is the one it last reported (asked
    /// now if it has not).
    async fn order(
        &self,
        host: &Host,
        version: VersionId,
        action: &str,
    ) -> Result<Option<SignedOrder>, CallError> {
        let Some(orders) = &self.orders else {
            return Ok(None);
        };
        let known = self.names.lock().expect("not poisoned").get(host).cloned();
        let name = match known {
            Some(n) => n,
            None => self.state(host).await?.state.host,
        };
        orders
            .sign(&name, version, action)
            .map(Some)
            .map_err(|e| CallError::Http {
                host: host.to_string(),
                status: 0,
                message: e.to_string(),
            })
    }

    /// The client (for health probes that use the same transport).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        host: &Host,
        path: &str,
        body: Option<&Req>,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        self.call_json(host, path, body, timeout, MAX_RESPONSE_BYTES)
            .await
    }

    /// [`Agents::call`] with a size cap of `cap` bytes.
    async fn call_json<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        host: &Host,
        path: &str,
        body: Option<&Req>,
        timeout: Duration,
        cap: usize,
    ) -> Result<Resp, CallError> {
        let bytes = self.call_capped(host, path, body, timeout, cap).await?;
        serde_json::from_slice(&bytes).map_err(|e| CallError::BadAnswer {
            host: host.to_string(),
            why: clip(&e.to_string(), 200),
        })
    }

    /// The body of a successful answer, at most `MAX_RESPONSE_BYTES`.
    async fn call_raw<Req: Serialize>(
        &self,
        host: &Host,
        path: &str,
        body: Option<&Req>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        self.call_capped(host, path, body, timeout, MAX_RESPONSE_BYTES)
            .await
    }

    /// `GET /v1/fleet/poll` of `scap serve` at `serve`: every host of its
    /// fleet, polled now over the connections it keeps.
    pub async fn fleet_poll(&self, serve: &Host) -> Result<super::poll::FleetPoll, CallError> {
        self.call_json::<(), _>(
            serve,
            "/v1/fleet/poll",
            None,
            FLEET_POLL_TIMEOUT,
            super::poll::MAX_FLEET_POLL_BYTES,
        )
        .await
    }

    /// [`Agents::call_raw`] with a size cap of `cap` bytes.
    async fn call_capped<Req: Serialize>(
        &self,
        host: &Host,
        path: &str,
        body: Option<&Req>,
        timeout: Duration,
        cap: usize,
    ) -> Result<Vec<u8>, CallError> {
        let url = format!("{}://{}{path}", self.transport.scheme(), host.authority());
        let name = host.to_string();
        let mut req = match body {
            Some(b) => self.http.post(&url).json(b),
            None => self.http.get(&url),
        };
        if let Transport::Insecure { token } = &self.transport {
            req = req.bearer_auth(token.as_str());
        }
        req = req.header(crate::proto::RELEASE_HEADER, crate::proto::RELEASE);
        if let Some(id) = &self.rollout {
            req = req.header(crate::proto::ROLLOUT_HEADER, id.as_str());
        }
        let send = async {
            let resp = req.send().await.map_err(|e| describe(&name, &e, timeout))?;
            let status = resp.status();
            let theirs = resp
                .headers()
                .get(crate::proto::RELEASE_HEADER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            if let Some(why) = crate::proto::release_mismatch(theirs.as_deref(), "controller") {
                return Err(CallError::Http {
                    host: name.clone(),
                    status: 426,
                    message: why.replace("this app server", &format!("host {name}")),
                });
            }
            let bytes = read_capped(resp, &name, timeout, cap).await?;
            if status.is_success() {
                Ok(bytes)
            } else {
                let message = serde_json::from_slice::<ErrorResponse>(&bytes)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
                Err(CallError::Http {
                    host: name.clone(),
                    status: status.as_u16(),
                    message: clip(message.trim(), 1000),
                })
            }
        };
        match tokio::time::timeout(timeout, send).await {
            Ok(r) => r,
            Err(_) => Err(CallError::TimedOut {
                host: name,
                seconds: timeout.as_secs(),
            }),
        }
    }

    /// `GET /v1/state`, with the short state timeout. A state format
    /// newer than this scap knows is refused by name, not misread.
    pub async fn state(&self, host: &Host) -> Result<StateResponse, CallError> {
        let bytes = self
            .call_raw::<()>(host, "/v1/state", None, STATE_TIMEOUT)
            .await?;
        #[derive(serde::Deserialize)]
        struct Head {
            state: Format,
        }
        #[derive(serde::Deserialize)]
        struct Format {
            format: u32,
        }
        if let Ok(h) = serde_json::from_slice::<Head>(&bytes)
            && h.state.format > STATE_FORMAT
        {
            return Err(CallError::BadAnswer {
                host: host.to_string(),
                why: format!(
                    "state file is format v{}, this scap reads up to v{STATE_FORMAT}: upgrade scap on the deploy host",
                    h.state.format
                ),
            });
        }
        let st: StateResponse =
            serde_json::from_slice(&bytes).map_err(|e| CallError::BadAnswer {
                host: host.to_string(),
                why: clip(&e.to_string(), 200),
            })?;
        self.names
            .lock()
            .expect("not poisoned")
            .insert(host.clone(), st.state.host.clone());
        Ok(st)
    }

    pub async fn sync(&self, host: &Host, req: &SyncRequest) -> Result<Outcome, CallError> {
        let mut req = req.clone();
        if req.order.is_none() {
            req.order = self.order(host, req.version, "sync").await?;
        }
        self.call(host, "/v1/sync", Some(&req), self.op_timeout)
            .await
    }

    pub async fn rollback(&self, host: &Host, req: &RollbackRequest) -> Result<Outcome, CallError> {
        let mut req = req.clone();
        if let (None, RollbackTarget::Version(v)) = (&req.order, req.to) {
            req.order = self.order(host, v, "rollback").await?;
        }
        self.call(host, "/v1/rollback", Some(&req), self.op_timeout)
            .await
    }

    pub async fn promote(&self, host: &Host, req: &PromoteRequest) -> Result<HostState, CallError> {
        self.call(host, "/v1/promote", Some(req), STATE_TIMEOUT)
            .await
    }

    /// `POST /v1/stage`: fetch and prepare `req.version`, no switch.
    pub async fn stage(&self, host: &Host, req: &SyncRequest) -> Result<Outcome, CallError> {
        let mut req = req.clone();
        if req.order.is_none() {
            req.order = self.order(host, req.version, "stage").await?;
        }
        self.call(host, "/v1/stage", Some(&req), self.op_timeout)
            .await
    }

    /// `POST /v1/restart`: runs the host's restart command.
    pub async fn restart(&self, host: &Host, by: &str) -> Result<RestartOutcome, CallError> {
        let req = RestartRequest { by: by.to_string() };
        self.call(host, "/v1/restart", Some(&req), self.op_timeout)
            .await
    }

    /// `GET /v1/health`: the version the host serves.
    pub async fn health(&self, host: &Host) -> Result<HealthResponse, CallError> {
        self.call::<(), _>(host, "/v1/health", None, STATE_TIMEOUT)
            .await
    }

    /// `POST /v1/pull`: the host asks the deploy host what to run, and
    /// goes there.
    pub async fn pull(&self, host: &Host, by: &str) -> Result<PullOutcome, CallError> {
        let req = PullRequest { by: by.to_string() };
        self.call(host, "/v1/pull", Some(&req), self.op_timeout)
            .await
    }

    pub async fn cancel(&self, host: &Host, by: &str) -> Result<CancelOutcome, CallError> {
        let req = CancelRequest { by: by.to_string() };
        self.call(host, "/v1/cancel", Some(&req), STATE_TIMEOUT)
            .await
    }
}

fn describe(host: &str, e: &reqwest::Error, timeout: Duration) -> CallError {
    if let Some(why) = crate::net::tls::explain(e) {
        return CallError::Tls {
            host: host.to_string(),
            why,
        };
    }
    if e.is_connect() {
        CallError::Unreachable {
            host: host.to_string(),
        }
    } else if e.is_timeout() {
        CallError::TimedOut {
            host: host.to_string(),
            seconds: timeout.as_secs(),
        }
    } else {
        CallError::BadAnswer {
            host: host.to_string(),
            why: clip(&e.to_string(), 300),
        }
    }
}

async fn read_capped(
    mut resp: reqwest::Response,
    host: &str,
    timeout: Duration,
    cap: usize,
) -> Result<Vec<u8>, CallError> {
    let too_big = || CallError::BadAnswer {
        host: host.to_string(),
        why: format!("answer larger than {cap} bytes"),
    };
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_big());
    }
    let mut out = Vec::new();
    while let Some(piece) = resp
        .chunk()
        .await
        .map_err(|e| describe(host, &e, timeout))?
    {
        if out.len() + piece.len() > cap {
            return Err(too_big());
        }
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// One call to one host, boxed: every fan-out takes the same shape of
/// future (and stays `Send`, which closures returning `async` blocks that
/// borrow would not be, in today's compiler).
pub type Call<'a, T> = futures_util::future::BoxFuture<'a, Result<T, CallError>>;

/// What one host did in a fan-out.
#[derive(Clone, Debug)]
pub struct HostResult<T> {
    pub host: Host,
    pub seconds: f64,
    pub result: Result<T, CallError>,
}

/// As JSON: `{"host", "ok", "seconds", "outcome", "error"}`.
impl<T: Serialize> Serialize for HostResult<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("HostResult", 5)?;
        st.serialize_field("host", &self.host.to_string())?;
        st.serialize_field("ok", &self.ok())?;
        st.serialize_field("seconds", &self.seconds)?;
        st.serialize_field("outcome", &self.result.as_ref().ok())?;
        st.serialize_field("error", &self.result.as_ref().err().map(|e| e.to_string()))?;
        st.end()
    }
}

impl<T> HostResult<T> {
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }

    pub fn error(&self) -> Option<&CallError> {
        self.result.as_ref().err()
    }
}

/// Calls `f` for every host, at most `concurrency` at once, calling
/// `progress` as each finishes; results in the order of `hosts`. Once
/// `interrupted` is set (Ctrl-C), hosts not yet started are not started:
/// their result says so.
pub async fn fan_out<'a, 'b, T: Send + 'b, F>(
    hosts: &'a [Host],
    concurrency: usize,
    interrupted: Option<&'b AtomicBool>,
    f: F,
    progress: &'b (dyn Fn(&HostResult<T>) + Sync),
) -> Vec<HostResult<T>>
where
    'a: 'b,
    F: Fn(&'a Host) -> Call<'a, T> + Sync + 'b,
{
    let f = &f;
    // Collected first (a concrete list of boxed futures): closures inside
    // stream combinators lose their lifetimes in the compiler's `Send`
    // check, and spawned callers need `Send`.
    let calls: Vec<futures_util::future::BoxFuture<'_, (usize, HostResult<T>)>> = hosts
        .iter()
        .enumerate()
        .map(
            |(i, host)| -> futures_util::future::BoxFuture<'_, (usize, HostResult<T>)> {
                Box::pin(async move {
                    let started = Instant::now();
                    let stop = interrupted.is_some_and(|flag| flag.load(Ordering::SeqCst));
                    let result = if stop {
                        Err(CallError::Http {
                            host: host.to_string(),
                            status: 0,
                            message: "not started (interrupted)".into(),
                        })
                    } else {
                        f(host).await
                    };
                    let r = HostResult {
                        host: host.clone(),
                        seconds: started.elapsed().as_secs_f64(),
                        result,
                    };
                    progress(&r);
                    (i, r)
                })
            },
        )
        .collect();
    let mut results: Vec<(usize, HostResult<T>)> = futures_util::stream::iter(calls)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}
