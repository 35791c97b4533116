//! The agent's HTTP API.
//!
//! | method | path          | auth | what |
//! |--------|---------------|------|------|
//! | GET    | /v1/state     | no   | state file, slots, busy flag |
//! | GET    | /v1/health    | no   | 200 with the live version, 503 if none |
//! | GET    | /v1/verify    | no   | drift: live tree re-hashed against its version |
//! | POST   | /v1/sync      | yes  | `{"version", "sources": [...], "by"}` |
//! | POST   | /v1/rollback  | yes  | `{"to": "previous"\|"stable"\|<id>, "by"}` |
//! | POST   | /v1/promote   | yes  | `{"version", "by"}`: record as stable |
//!
//! Changing requests need `Authorization: Bearer <token>`; the token is
//! compared in constant time. One change at a time: a second gets 409.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{Agent, AgentError, SyncRequest};
use crate::store::VersionId;

pub struct AgentState {
    pub agent: Agent,
    token: String,
    /// Held while a sync, rollback or promote runs, and while the work
    /// after a switch runs in the background.
    busy: Arc<tokio::sync::Mutex<Option<String>>>,
    /// True while that background work holds `busy`: a request then waits
    /// for it instead of being refused.
    background: std::sync::atomic::AtomicBool,
}

#[derive(Deserialize)]
struct RollbackRequest {
    to: String,
    #[serde(default = "super::unknown")]
    by: String,
}

#[derive(Deserialize)]
struct PromoteRequest {
    version: VersionId,
    #[serde(default = "super::unknown")]
    by: String,
}

pub fn router(agent: Agent, token: String) -> (Router, Arc<AgentState>) {
    let st = Arc::new(AgentState {
        agent,
        token,
        busy: Arc::new(tokio::sync::Mutex::new(None)),
        background: std::sync::atomic::AtomicBool::new(false),
    });
    let app = Router::new()
        .route("/v1/state", get(get_state))
        .route("/v1/health", get(health))
        .route("/v1/verify", get(verify))
        .route("/v1/sync", post(sync))
        .route("/v1/rollback", post(rollback))
        .route("/v1/promote", post(promote))
        .route("/metrics", get(metrics))
        .with_state(st.clone());
    (app, st)
}

fn json_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// `None` when the request carries the right token, else the 401 to send.
fn unauthorized(st: &AgentState, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(st.token.as_bytes())) && !st.token.is_empty() {
        None
    } else {
        Some(json_error(
            StatusCode::UNAUTHORIZED,
            format!(
                "host {}: missing or wrong bearer token: pass the fleet's --token-file",
                st.agent.cfg.host
            ),
        ))
    }
}

async fn get_state(State(st): State<Arc<AgentState>>) -> Response {
    let busy = st
        .busy
        .try_lock()
        .map(|_| None)
        .unwrap_or_else(|_| Some(true));
    Json(serde_json::json!({
        "state": st.agent.state(),
        "slots": st.agent.slots(),
        "busy": busy.is_some(),
        "drift": st.agent.last_drift(),
    }))
    .into_response()
}

async fn health(State(st): State<Arc<AgentState>>) -> Response {
    let s = st.agent.state();
    match s.current {
        Some(cur) => {
            Json(serde_json::json!({ "ok": true, "host": s.host, "version": cur.version }))
                .into_response()
        }
        None => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("host {}: no version is live", s.host),
        ),
    }
}

async fn verify(State(st): State<Arc<AgentState>>) -> Response {
    let st2 = st.clone();
    match tokio::task::spawn_blocking(move || st2.agent.verify_live()).await {
        Ok(Ok(d)) => Json(d).into_response(),
        Ok(Err(e)) => error_response(e),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn error_response(e: AgentError) -> Response {
    let status = match &e {
        AgentError::Refused(_) => StatusCode::CONFLICT,
        // A local failure (full disk) while fetching is ours, not the source's.
        AgentError::Fetch { source, .. }
            if matches!(**source, crate::net::client::FetchError::Store(_)) =>
        {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        AgentError::Fetch { .. } => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_error(status, e.to_string())
}

/// Runs one changing operation at a time, on a blocking thread; when
/// `switched` says it changed the live release, runs the after-switch work
/// in the background, still holding the lock.
async fn exclusive<T: serde::Serialize + Send + 'static>(
    st: Arc<AgentState>,
    what: String,
    op: impl FnOnce(&Agent, &tokio::runtime::Handle) -> Result<T, AgentError> + Send + 'static,
    switched: fn(&T) -> bool,
) -> Response {
    let mut guard = match st.busy.clone().try_lock_owned() {
        Ok(g) => g,
        Err(_) if st.background.load(Ordering::SeqCst) => st.busy.clone().lock_owned().await,
        Err(_) => {
            return json_error(
                StatusCode::CONFLICT,
                format!(
                    "host {}: busy with another operation; try again when it ends",
                    st.agent.cfg.host
                ),
            );
        }
    };
    *guard = Some(what);
    // The operation runs in its own task, which owns the lock: if the
    // client goes away (and axum drops this handler), the operation still
    // finishes under the lock, and no second one can start beside it.
    let st2 = st.clone();
    let task = tokio::spawn(async move {
        let handle = tokio::runtime::Handle::current();
        let st3 = st2.clone();
        let result = tokio::task::spawn_blocking(move || op(&st3.agent, &handle)).await;
        if let Ok(Ok(v)) = &result
            && switched(v)
        {
            *guard = Some("after-switch work".into());
            st2.background.store(true, Ordering::SeqCst);
            let st4 = st2.clone();
            tokio::spawn(async move {
                let st5 = st4.clone();
                let r = tokio::task::spawn_blocking(move || st5.agent.after_switch()).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!("after-switch work failed: {e}");
                }
                // Unlock first: a request arriving meanwhile still sees
                // `background` and waits instead of being refused.
                *guard = None;
                drop(guard);
                st4.background.store(false, Ordering::SeqCst);
            });
        } else {
            *guard = None;
            drop(guard);
        }
        result
    });
    match task.await {
        Ok(Ok(Ok(v))) => Json(v).into_response(),
        Ok(Ok(Err(e))) => error_response(e),
        Ok(Err(e)) | Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn sync(
    State(st): State<Arc<AgentState>>,
    headers: HeaderMap,
    Json(req): Json<SyncRequest>,
) -> Response {
    if let Some(r) = unauthorized(&st, &headers) {
        return r;
    }
    if req.sources.is_empty() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "sync: no sources given: pass at least one source URL",
        );
    }
    let what = format!("sync to {} by {}", req.version.short(), req.by);
    exclusive(st, what, move |agent, rt| agent.sync(&req, rt), |o| !o.noop).await
}

async fn rollback(
    State(st): State<Arc<AgentState>>,
    headers: HeaderMap,
    Json(req): Json<RollbackRequest>,
) -> Response {
    if let Some(r) = unauthorized(&st, &headers) {
        return r;
    }
    let what = format!("rollback to {} by {}", req.to, req.by);
    exclusive(
        st,
        what,
        move |agent, _| agent.rollback(&req.to, &req.by),
        |o| !o.noop,
    )
    .await
}

async fn promote(
    State(st): State<Arc<AgentState>>,
    headers: HeaderMap,
    Json(req): Json<PromoteRequest>,
) -> Response {
    if let Some(r) = unauthorized(&st, &headers) {
        return r;
    }
    let what = format!("promote {} by {}", req.version.short(), req.by);
    exclusive(
        st,
        what,
        move |agent, _| agent.promote(&req.version, &req.by),
        |_| false,
    )
    .await
}

/// Prometheus text format: what this host runs and what its syncs cost.
async fn metrics(State(st): State<Arc<AgentState>>) -> Response {
    let s = st.agent.state();
    let c = &st.agent.counters;
    let host = crate::web::label_value(&s.host);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{value}\n"
        ));
    };
    if let Some(cur) = &s.current {
        metric(
            "scap_agent_version_info",
            "gauge",
            "The version this host runs (value 1).",
            format!(
                "scap_agent_version_info{{host=\"{host}\",version=\"{}\"}} 1",
                cur.version
            ),
        );
    }
    if let Some(stable) = &s.stable {
        metric(
            "scap_agent_stable_version_info",
            "gauge",
            "This host's last stable version (value 1).",
            format!(
                "scap_agent_stable_version_info{{host=\"{host}\",version=\"{}\"}} 1",
                stable.version
            ),
        );
    }
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    metric(
        "scap_agent_syncs_total",
        "counter",
        "Syncs and rollbacks run since the agent started.",
        format!("scap_agent_syncs_total {}", n(&c.syncs)),
    );
    metric(
        "scap_agent_sync_failures_total",
        "counter",
        "Syncs and rollbacks that failed.",
        format!("scap_agent_sync_failures_total {}", n(&c.failures)),
    );
    metric(
        "scap_agent_fetched_bytes_total",
        "counter",
        "Bytes received from sources.",
        format!("scap_agent_fetched_bytes_total {}", n(&c.fetched_bytes)),
    );
    metric(
        "scap_agent_fetched_objects_total",
        "counter",
        "Objects received from sources.",
        format!("scap_agent_fetched_objects_total {}", n(&c.fetched_objects)),
    );
    metric(
        "scap_agent_last_sync_duration_seconds",
        "gauge",
        "How long the last successful sync or rollback took.",
        format!(
            "scap_agent_last_sync_duration_seconds {}",
            n(&c.last_sync_ms) as f64 / 1000.0
        ),
    );
    metric(
        "scap_agent_last_success_timestamp_seconds",
        "gauge",
        "When the last sync or rollback succeeded (Unix time; 0 if none since start).",
        format!(
            "scap_agent_last_success_timestamp_seconds {}",
            n(&c.last_success)
        ),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
