//! The agent's HTTP API (request and response types in [`crate::proto`]).
//!
//! | method | path          | who (TLS) | what |
//! |--------|---------------|-----------|------|
//! | GET    | /v1/health    | anyone    | 200 with the live version, 503 if none |
//! | GET    | /metrics      | anyone    | Prometheus text |
//! | GET    | /v1/state     | a client certificate from the site CA | state file, slots, busy flag, last drift check |
//! | GET    | /v1/verify    | a deployer | drift: live tree re-hashed (one at a time; 429 if one runs) |
//! | POST   | /v1/sync      | a deployer | fetch, prepare, switch |
//! | POST   | /v1/rollback  | a deployer | switch back; pre-empts whatever runs |
//! | POST   | /v1/promote   | a deployer | record the live version as stable |
//! | POST   | /v1/cancel    | a deployer | stop whatever runs; the host stays as it was |
//! | POST   | /v1/stage     | a deployer | fetch a version and prepare its release, no switch (background: a sync waits for it, a rollback stops it) |
//! | POST   | /v1/restart   | a deployer | run the restart command (the live code runs) |
//! | POST   | /v1/pull      | a deployer | converge to the deploy host's desired state now |
//!
//! A deployer is a client whose certificate (signed by the site CA) has one
//! of the names given with `--deployer` as a subject alternative DNS name,
//! exactly (no wildcard). With `--insecure-http` (a lab), "a client
//! certificate" and "a deployer" both mean a request with the bearer
//! token, compared in constant time. On the agent's local socket
//! (`--socket`, mode 0600), root (or the agent's own user) is a deployer:
//! that is how `scap pull` on the host reaches its agent.
//!
//! The `by` a request body carries is ignored: the host's history records
//! who the caller is (the deployer name its certificate has, the local
//! user, or the token's holder and address).
//!
//! One changing operation at a time: a sync or promote arriving while
//! another runs gets 409; one arriving during the work after a switch waits
//! for it, and so does a pull arriving during the agent's own pull at
//! start. A rollback never waits behind other work: it cancels what runs
//! (a fetch, writing a slot, a hook, the work after a switch; each stops at
//! its next check, well under a second), then runs, and requests arriving
//! while it waits get 409.
//!
//! A pull asks the deploy host (`--source`) what this host should run and
//! syncs to it, if that is a target the deploy key signed for this host
//! and newer than every order it took (see [`Agent::desired`]). It needs a
//! deployer, like a sync: it takes the operation lock, and a flood of them
//! from any certificate would make deploys fail with 409.
//! At start the agent watches its release slots, then pulls once by itself
//! ([`at_start`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use super::{Agent, AgentError};
use crate::cancel::Cancel;
use crate::metrics::Exposition;
use crate::net::server::Caller;
use crate::proto::{
    CancelOutcome, CancelRequest, ErrorResponse, HealthResponse, MAX_REQUEST_BYTES, MAX_SOURCES,
    PromoteRequest, PullOutcome, PullRequest, RestartRequest, RollbackRequest, RollbackTarget,
    StateResponse, SyncRequest,
};
use crate::store::VersionId;

/// Who may do what on this agent.
pub enum Auth {
    /// TLS: deployers are clients whose certificates name one of these
    /// exactly (a DNS name in the certificate's subject alternative names;
    /// see [`crate::net::tls::cert_has_name`]).
    Certificates { deployers: Vec<String> },
    /// `--insecure-http`: the bearer token.
    Token(String),
}

impl Auth {
    /// Deployers named by `names` (`--deployer`): each one host's DNS
    /// name, never a wildcard, which would make every certificate the CA
    /// issued under that domain a deployer.
    pub fn deployers(names: Vec<String>) -> Result<Auth, String> {
        for n in &names {
            if n.contains('*') {
                return Err(format!(
                    "--deployer {n:?}: a wildcard is never a deployer's name (every host under it would be one): give the deploy host's own DNS name, as its certificate's subject alternative names spell it"
                ));
            }
            if !crate::proto::valid_host_name(n) {
                return Err(format!(
                    "--deployer {:?}: not a DNS name: give the deploy host's name, as its certificate's subject alternative names spell it",
                    crate::text::clip(n, 100)
                ));
            }
        }
        Ok(Auth::Certificates { deployers: names })
    }
}

/// What a request needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Any client certificate from the site CA (reads).
    Reader,
    /// A deployer's (changes, and the heavy drift check).
    Deployer,
}

pub struct AgentState {
    pub agent: Agent,
    auth: Auth,
    /// Held while a changing operation runs, and while the work after a
    /// switch runs in the background.
    op: Arc<tokio::sync::Mutex<()>>,
    /// What holds `op`, and how to stop it.
    running: std::sync::Mutex<Option<Running>>,
    /// Rollbacks waiting for `op`: other requests are refused meanwhile.
    rollbacks_waiting: AtomicUsize,
    /// Drift checks re-hash the whole live tree: one at a time.
    verify_gate: Arc<tokio::sync::Semaphore>,
    /// Set on SIGTERM ([`AgentState::stop`]): changing requests get 503.
    stopping: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
struct Running {
    what: String,
    /// The work after a switch (a request waits for it rather than 409).
    background: bool,
    cancel: Cancel,
}

pub fn router(agent: Agent, auth: Auth) -> (Router, Arc<AgentState>) {
    let st = Arc::new(AgentState {
        agent,
        auth,
        op: Arc::new(tokio::sync::Mutex::new(())),
        running: std::sync::Mutex::new(None),
        rollbacks_waiting: AtomicUsize::new(0),
        verify_gate: Arc::new(tokio::sync::Semaphore::new(1)),
        stopping: Default::default(),
    });
    let app = Router::new()
        .route("/v1/state", get(get_state))
        .route("/v1/health", get(health))
        .route("/v1/verify", get(verify))
        .route("/v1/sync", post(sync))
        .route("/v1/rollback", post(rollback))
        .route("/v1/promote", post(promote))
        .route("/v1/cancel", post(cancel))
        .route("/v1/pull", post(pull))
        .route("/v1/restart", post(restart))
        .route("/v1/stage", post(stage))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(st.clone(), gate))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(st.clone());
    (app, st)
}

tokio::task_local! {
    /// The rollout the request being answered belongs to (the
    /// controller's [`crate::proto::ROLLOUT_HEADER`]), for the operation's
    /// log lines.
    static ROLLOUT: Option<String>;
}

/// Who may make each request, checked in this one place, before anything
/// else and before a body is read: a body is read only from a deployer,
/// so nobody else can hold a connection busy by sending one slowly. A
/// route not listed here needs a deployer.
async fn gate(
    State(st): State<Arc<AgentState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let need = match (req.method(), req.uri().path()) {
        (&axum::http::Method::GET, "/v1/health" | "/metrics") => None,
        (&axum::http::Method::GET, "/v1/state") => Some(Need::Reader),
        _ => Some(Need::Deployer),
    };
    if let Some(need) = need
        && let Some(r) = st.refuse(&Caller::of(req.extensions()), req.headers(), need)
    {
        return r;
    }
    // A cancel still goes through: it only shortens the stop.
    if need == Some(Need::Deployer)
        && req.uri().path() != "/v1/cancel"
        && st.stopping.load(Ordering::SeqCst)
    {
        let mut r = json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "host {}: the agent is stopping (a restart, or an upgrade of scap); nothing was done: try again in a few seconds",
                st.agent.cfg.host
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(5));
        return r;
    }
    let theirs = req
        .headers()
        .get(crate::proto::RELEASE_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let rollout = match req.headers().get(crate::proto::ROLLOUT_HEADER) {
        None => None,
        Some(v) => match v.to_str() {
            Ok(id) if crate::proto::rollout_id_ok(id) => Some(id.to_string()),
            _ => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "host {}: a {} header of {:?} is not a rollout ID (1 to 64 of A-Z a-z 0-9 . _ : -)",
                        st.agent.cfg.host,
                        crate::proto::ROLLOUT_HEADER,
                        crate::text::clip(&String::from_utf8_lossy(v.as_bytes()), 80)
                    ),
                );
            }
        },
    };
    let mut resp = match crate::proto::release_mismatch(theirs.as_deref(), "agent") {
        Some(why) if need.is_some() => json_error(
            StatusCode::UPGRADE_REQUIRED,
            format!("host {}: {why}", st.agent.cfg.host),
        ),
        _ => ROLLOUT.scope(rollout, next.run(req)).await,
    };
    resp.headers_mut().insert(
        crate::proto::RELEASE_HEADER,
        axum::http::HeaderValue::from(crate::proto::RELEASE),
    );
    resp
}

fn json_error(status: StatusCode, msg: impl Into<String>) -> Response {
    ApiError(status, msg.into()).into_response()
}

/// An error answer: a status and a message that names the host.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorResponse { error: self.1 })).into_response()
    }
}

impl AgentState {
    fn host(&self) -> &str {
        &self.agent.cfg.host
    }

    /// `None` when the caller may do what `need` says, else the 401/403.
    /// The message never contains a token.
    fn refuse(&self, caller: &Caller, headers: &HeaderMap, need: Need) -> Option<Response> {
        let host = self.host();
        if let Some(uid) = caller.local() {
            // The local socket is mode 0600: only root (or the agent's own
            // user) can connect; the kernel says who did.
            let me = rustix::process::geteuid().as_raw();
            return (uid != 0 && uid != me).then(|| {
                json_error(
                    StatusCode::FORBIDDEN,
                    format!(
                        "host {host}: local user {} may not change this host: run scap pull as root",
                        crate::sys::user_name(uid)
                    ),
                )
            });
        }
        match &self.auth {
            Auth::Token(token) => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                let ok = !token.is_empty() && bool::from(given.as_bytes().ct_eq(token.as_bytes()));
                (!ok).then(|| {
                    json_error(
                        StatusCode::UNAUTHORIZED,
                        format!("host {host}: missing or wrong bearer token: pass the fleet's --token-file"),
                    )
                })
            }
            Auth::Certificates { deployers } => {
                if !caller.has_cert() {
                    return Some(json_error(
                        StatusCode::UNAUTHORIZED,
                        format!(
                            "host {host}: this needs a client certificate from the site CA: configure the controller's --cert and --key (or [tls] in scap.toml)"
                        ),
                    ));
                }
                if need == Need::Deployer && caller.named(deployers).is_none() {
                    return Some(json_error(
                        StatusCode::FORBIDDEN,
                        format!(
                            "host {host}: your certificate is not a deployer's here (this host accepts changes from {}): use a deployer's certificate, or add its name with --deployer",
                            deployers.join(", ")
                        ),
                    ));
                }
                None
            }
        }
    }

    /// Who the caller is, for the host's history: the local user on the
    /// local socket, the deployer name its certificate has, or (a lab)
    /// the bearer token's holder at its address. Never what the request
    /// body says.
    fn who(&self, caller: &Caller) -> String {
        let Some(peer) = &caller.0 else {
            return "unknown".into();
        };
        if let Some(uid) = peer.local_uid {
            return format!("{} (local)", crate::sys::user_name(uid));
        }
        match &self.auth {
            Auth::Certificates { deployers } => match caller.named(deployers) {
                Some(name) => name.to_string(),
                None => format!("a site certificate at {}", peer.addr.ip()),
            },
            Auth::Token(_) => format!("the bearer token at {}", peer.addr.ip()),
        }
    }

    /// A request body as `T`, or a 400 that says what is wrong with it.
    fn body<T: DeserializeOwned>(
        &self,
        what: &str,
        body: Result<Json<T>, JsonRejection>,
    ) -> Result<T, ApiError> {
        body.map(|Json(b)| b).map_err(|e| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "host {}: bad {what} request: {}",
                    self.host(),
                    crate::text::clip(&e.body_text(), 300)
                ),
            )
        })
    }

    /// Every operation's prologue (the caller passed [`gate`]): the body
    /// parses, and the sources it names (if `sources` says how many may
    /// be given) are https URLs (http in a lab). With the request, who the
    /// caller is ([`AgentState::who`]). The error is the answer to send.
    fn admit<T: DeserializeOwned>(
        &self,
        caller: &Caller,
        what: &str,
        body: Result<Json<T>, JsonRejection>,
        sources: impl FnOnce(&T) -> Option<(&[String], bool)>,
    ) -> Result<(T, String), Box<Response>> {
        let req = self
            .body(what, body)
            .map_err(|e| Box::new(e.into_response()))?;
        if let Some((given, may_be_empty)) = sources(&req)
            && let Err(why) =
                check_sources(given, may_be_empty, matches!(self.auth, Auth::Token(_)))
        {
            return Err(Box::new(json_error(
                StatusCode::BAD_REQUEST,
                format!("host {}: {what}: {why}", self.host()),
            )));
        }
        Ok((req, self.who(caller)))
    }

    fn running(&self) -> Option<Running> {
        self.running.lock().expect("not poisoned").clone()
    }

    fn set_running(&self, r: Option<Running>) {
        *self.running.lock().expect("not poisoned") = r;
    }

    /// Records background work starting (a request arriving waits for
    /// it, a rollback cancels it); the caller holds the operation lock.
    fn begin_background(&self, what: &str) -> Cancel {
        let cancel = Cancel::new();
        self.set_running(Some(Running {
            what: what.into(),
            background: true,
            cancel: cancel.clone(),
        }));
        cancel
    }

    /// Records background work ending: logs how, and clears it.
    fn end_background(&self, what: &str, r: Result<Result<(), AgentError>, String>) {
        match r {
            Ok(Err(e)) if e.is_cancelled() => tracing::info!("{what} stopped: {e}"),
            Ok(Err(e)) => tracing::warn!("{what} failed: {e}"),
            Err(e) => tracing::warn!("{what} failed: {e}"),
            Ok(Ok(())) => {}
        }
        self.set_running(None);
    }

    fn busy(&self, what: &str) -> ApiError {
        ApiError(
            StatusCode::CONFLICT,
            format!(
                "host {}: busy with {what}; try again when it ends (or roll back, which stops it)",
                self.host()
            ),
        )
    }

    /// SIGTERM (`systemctl stop`, or the restart a package upgrade does):
    /// changing requests get 503 from now on; work in the background
    /// stops at once (the next start checks again what it would have);
    /// the operation in flight finishes, so a restart falls between two
    /// syncs, never inside one, unless it outlasts `grace`: then it is
    /// cancelled at its next safe point and the host stays on the version
    /// it ran. Returns once nothing runs.
    pub async fn stop(&self, grace: std::time::Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        let (mut waiting, mut cut) = (false, false);
        loop {
            match self.running() {
                Some(r) if r.background => r.cancel.cancel("the agent is stopping"),
                Some(r) if tokio::time::Instant::now() >= deadline => {
                    if !cut {
                        tracing::warn!(
                            "stopping: {} still runs after {}s (--stop-grace): cancelling it; the host stays on the version it ran",
                            r.what,
                            grace.as_secs()
                        );
                        cut = true;
                    }
                    r.cancel
                        .cancel("the agent is stopping (--stop-grace passed)");
                }
                Some(r) if !waiting => {
                    tracing::info!("stopping: letting {} finish first", r.what);
                    waiting = true;
                }
                _ => {}
            }
            // Free once nothing runs and nothing holds the lock (an
            // operation's last step is to release it).
            if self.running().is_none()
                && let Ok(g) = self.op.clone().try_lock_owned()
            {
                drop(g);
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Takes the operation lock for an ordinary request: waits for the
    /// work after a switch, refuses (409) when another operation runs or a
    /// rollback waits.
    async fn enter(&self) -> Result<tokio::sync::OwnedMutexGuard<()>, ApiError> {
        if self.rollbacks_waiting.load(Ordering::SeqCst) > 0 {
            return Err(self.busy("a rollback"));
        }
        if let Ok(g) = self.op.clone().try_lock_owned() {
            return Ok(g);
        }
        match self.running() {
            Some(r) if !r.background => Err(self.busy(&r.what)),
            // The work after a switch, or an operation just ending. Its
            // tail (gc, the trash) only frees space: stopped, not waited
            // for.
            _ => {
                let lock = self.op.clone().lock_owned();
                tokio::pin!(lock);
                loop {
                    if let Some(r) = self.running()
                        && r.background
                        && self.agent.yields_to_deploys()
                    {
                        r.cancel.cancel("a deploy arrived");
                    }
                    tokio::select! {
                        g = &mut lock => return Ok(g),
                        () = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
                    }
                }
            }
        }
    }

    /// [`AgentState::enter`] for a pull: one arriving while the agent's
    /// own pull at start runs (the same question, asked a moment earlier)
    /// waits for it, then asks again, rather than 409.
    async fn enter_pull(&self) -> Result<tokio::sync::OwnedMutexGuard<()>, ApiError> {
        if self.rollbacks_waiting.load(Ordering::SeqCst) == 0
            && self.running().is_some_and(|r| r.what == PULL_AT_START)
        {
            return Ok(self.op.clone().lock_owned().await);
        }
        self.enter().await
    }

    /// Takes the operation lock for a rollback: cancels whatever holds it
    /// and waits the moment it takes to stop.
    async fn enter_first(&self, by: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.rollbacks_waiting.fetch_add(1, Ordering::SeqCst);
        if let Some(r) = self.running() {
            r.cancel.cancel(&format!("a rollback by {by} stopped it"));
            if !r.background {
                self.agent.record_cancel(&r.what, by);
            }
        }
        let g = self.op.clone().lock_owned().await;
        self.rollbacks_waiting.fetch_sub(1, Ordering::SeqCst);
        g
    }
}

/// What `/v1/state` says runs while the agent's own pull at start does.
const PULL_AT_START: &str = "a pull at start";

/// What `/v1/state` says runs while the work after a switch does.
const AFTER_SWITCH: &str = "the work after a switch";

fn error_response(e: AgentError) -> Response {
    let status = match &e {
        AgentError::Refused(_) => StatusCode::CONFLICT,
        AgentError::Signature { .. } => StatusCode::FORBIDDEN,
        _ if e.is_cancelled() => StatusCode::CONFLICT,
        // A local failure (full disk) while fetching is ours, not the source's.
        AgentError::Fetch { source, .. }
            if matches!(**source, crate::net::client::FetchError::Store(_)) =>
        {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        AgentError::Fetch { .. } | AgentError::FetchTimeout { .. } => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    json_error(status, e.to_string())
}

/// Runs one changing operation on a blocking thread, holding `guard`; when
/// `switched` says it changed the live release, runs the after-switch work
/// in the background, still holding it.
async fn run_op<T: serde::Serialize + Send + 'static>(
    st: Arc<AgentState>,
    guard: tokio::sync::OwnedMutexGuard<()>,
    what: String,
    version: Option<VersionId>,
    op: impl FnOnce(&Agent, &tokio::runtime::Handle, &Cancel) -> Result<T, AgentError> + Send + 'static,
    switched: fn(&T) -> bool,
) -> Response {
    run_op_as(st, guard, what, version, false, op, switched).await
}

/// [`run_op`], saying whether the operation is background work (staging):
/// a request arriving meanwhile waits for it rather than getting 409.
async fn run_op_as<T: serde::Serialize + Send + 'static>(
    st: Arc<AgentState>,
    guard: tokio::sync::OwnedMutexGuard<()>,
    what: String,
    version: Option<VersionId>,
    background: bool,
    op: impl FnOnce(&Agent, &tokio::runtime::Handle, &Cancel) -> Result<T, AgentError> + Send + 'static,
    switched: fn(&T) -> bool,
) -> Response {
    let cancel = Cancel::new();
    // Every log line of the operation names the host and what it does
    // (`op{host=mw1001 what=a sync to 3f9a1c2e4b5d by deploy1002}`): one
    // line per event, fields a journal can filter on.
    let span = tracing::info_span!(
        "op",
        host = %st.agent.cfg.host,
        rollout = tracing::field::Empty,
        version = tracing::field::Empty,
        what = %what
    );
    if let Ok(Some(id)) = ROLLOUT.try_with(|r| r.clone()) {
        span.record("rollout", tracing::field::display(&id));
    }
    if let Some(v) = version {
        span.record("version", tracing::field::display(v));
    }
    let started = std::time::Instant::now();
    st.set_running(Some(Running {
        what,
        background,
        cancel: cancel.clone(),
    }));
    // The operation runs in its own task, which owns the lock: if the
    // client goes away (and axum drops this handler), the operation still
    // finishes under the lock, and no second one can start beside it.
    let st2 = st.clone();
    let task = tokio::spawn(async move {
        let handle = tokio::runtime::Handle::current();
        let st3 = st2.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _in = span.enter();
            let r = op(&st3.agent, &handle, &cancel);
            match &r {
                Ok(_) => tracing::info!(seconds = started.elapsed().as_secs_f64(), "done"),
                // Someone asked for it (a rollback, a cancel, a stop).
                Err(e) if e.is_cancelled() => tracing::info!("{e}"),
                Err(e) => tracing::warn!("failed: {e}"),
            }
            r
        })
        .await;
        // A rollback waiting gets the lock at once: the work after this
        // switch would only be cancelled by it.
        if let Ok(Ok(v)) = &result
            && switched(v)
            && st2.rollbacks_waiting.load(Ordering::SeqCst) == 0
        {
            let bg = st2.begin_background(AFTER_SWITCH);
            let st4 = st2.clone();
            tokio::spawn(async move {
                let st5 = st4.clone();
                let r = on_own_thread(move || st5.agent.after_switch(&bg)).await;
                st4.end_background(AFTER_SWITCH, r);
                drop(guard);
            });
        } else {
            st2.set_running(None);
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

async fn get_state(State(st): State<Arc<AgentState>>) -> Response {
    let running = st.running();
    Json(StateResponse {
        state: st.agent.state(),
        slots: st.agent.slots(),
        busy: running.is_some() || st.op.try_lock().is_err(),
        changing: running.as_ref().is_some_and(|r| !r.background),
        operation: running.map(|r| r.what),
        drift: st.agent.last_drift(),
    })
    .into_response()
}

async fn health(State(st): State<Arc<AgentState>>) -> Response {
    let s = st.agent.state();
    match s.current {
        Some(cur) => Json(HealthResponse {
            ok: true,
            host: s.host,
            version: cur.version,
        })
        .into_response(),
        None => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("host {}: no version is live", s.host),
        ),
    }
}

async fn verify(State(st): State<Arc<AgentState>>) -> Response {
    let Ok(permit) = st.verify_gate.clone().try_acquire_owned() else {
        return json_error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "host {}: a drift check is already running: wait for it",
                st.host()
            ),
        );
    };
    let st2 = st.clone();
    let r = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        st2.agent.verify_live(&Cancel::new())
    })
    .await;
    match r {
        Ok(Ok(d)) => Json(d).into_response(),
        Ok(Err(e)) => error_response(e),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn sync(
    State(st): State<Arc<AgentState>>,
    caller: Caller,
    body: Result<Json<SyncRequest>, JsonRejection>,
) -> Response {
    let req = match st.admit(&caller, "sync", body, |r| {
        Some((r.sources.as_slice(), false))
    }) {
        Ok((mut r, who)) => {
            r.by = who;
            r
        }
        Err(r) => return *r,
    };
    let guard = match st.enter().await {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let what = format!(
        "a sync to {} by {}",
        req.version.short(),
        crate::text::clip(&req.by, 64)
    );
    run_op(
        st,
        guard,
        what,
        Some(req.version),
        move |agent, rt, cancel| agent.sync(&req, rt, cancel),
        |o| !o.noop,
    )
    .await
}

/// Sources must be https URLs (http too when `plain` allows it: a lab's
/// `--insecure-http`), 1 (0 if `may_be_empty`) to `MAX_SOURCES` of them.
/// A host that talks TLS never fetches over plain HTTP: its signatures
/// would hold, but what it asks for, and the desired state's freshness,
/// would be anyone's to read and delay.
pub fn check_sources(sources: &[String], may_be_empty: bool, plain: bool) -> Result<(), String> {
    if sources.is_empty() && !may_be_empty {
        return Err("no sources given: pass at least one source URL".into());
    }
    if sources.len() > MAX_SOURCES {
        return Err(format!("{} sources: at most {MAX_SOURCES}", sources.len()));
    }
    for s in sources {
        if s.starts_with("http://") && !plain {
            return Err(format!(
                "source {}: plain http:// with TLS on: use https:// (a lab without TLS runs everything with --insecure-http)",
                crate::text::clip(s, 100)
            ));
        }
        let ok = (s.starts_with("http://") || s.starts_with("https://"))
            && s.len() <= 2048
            && reqwest::Url::parse(s).is_ok();
        if !ok {
            return Err(format!(
                "source {:?} is not an http:// or https:// URL",
                crate::text::clip(s, 100)
            ));
        }
    }
    Ok(())
}

async fn rollback(
    State(st): State<Arc<AgentState>>,
    caller: Caller,
    body: Result<Json<RollbackRequest>, JsonRejection>,
) -> Response {
    let req = match st.admit(&caller, "rollback", body, |r| {
        Some((r.sources.as_slice(), true))
    }) {
        Ok((mut r, who)) => {
            r.by = who;
            r
        }
        Err(r) => return *r,
    };
    let guard = st.enter_first(&req.by).await;
    let what = format!(
        "a rollback to {} by {}",
        req.to,
        crate::text::clip(&req.by, 64)
    );
    run_op(
        st,
        guard,
        what,
        match req.to {
            RollbackTarget::Version(v) => Some(v),
            _ => None,
        },
        move |agent, rt, cancel| agent.rollback(&req, rt, cancel),
        |o| !o.noop,
    )
    .await
}

async fn stage(
    State(st): State<Arc<AgentState>>,
    caller: Caller,
    body: Result<Json<SyncRequest>, JsonRejection>,
) -> Response {
    let req = match st.admit(&caller, "stage", body, |r| {
        Some((r.sources.as_slice(), false))
    }) {
        Ok((mut r, who)) => {
            r.by = who;
            r
        }
        Err(r) => return *r,
    };
    let guard = match st.enter().await {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let what = format!("staging {}", req.version.short());
    run_op_as(
        st,
        guard,
        what,
        Some(req.version),
        true,
        move |agent, rt, cancel| agent.stage(&req, rt, cancel),
        |_| false,
    )
    .await
}

async fn restart(
    State(st): State<Arc<AgentState>>,
    caller: Caller,
    body: Result<Json<RestartRequest>, JsonRejection>,
) -> Response {
    let req = match st.admit(&caller, "restart", body, |_| None) {
        Ok((mut r, who)) => {
            r.by = who;
            r
        }
        Err(r) => return *r,
    };
    let guard = match st.enter().await {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let by = crate::text::clip(&req.by, 64);
    run_op(
        st,
        guard,
        format!("a restart by {by}"),
        None,
        move |agent, _, cancel| agent.restart(&by, cancel),
        |_| false,
    )
    .await
}

async fn pull(
    State(st): State<Arc<AgentState>>,
    caller: Caller,
    body: Result<Json<PullRequest>, JsonRejection>,
) -> Response {
    let req = match st.admit(&caller, "pull", body, |_| None) {
        Ok((mut r, who)) => {
            r.by = who;
            r
        }
        Err(r) => return *r,
    };
    let guard = match st.enter_pull().await {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let by = crate::text::clip(&req.by, 64);
    run_op(
        st,
        guard,
        format!("a pull by {by}"),
        None,
        move |agent, rt, cancel| pull_now(agent, &by, rt, cancel),
        |o| o.outcome.as_ref().is_some_and(|o| !o.noop),
    )
    .await
}

/// Asks the deploy host what this host should run, and goes there if
/// that is newer than the newest order this host took.
fn pull_now(
    agent: &Agent,
    by: &str,
    rt: &tokio::runtime::Handle,
    cancel: &Cancel,
) -> Result<PullOutcome, AgentError> {
    let host = agent.cfg.host.clone();
    let d = agent.desired(rt, cancel)?;
    let current = agent.state().current.map(|c| c.version);
    let skipped = if d.skipped.is_empty() {
        String::new()
    } else {
        format!(" (ignored: {})", d.skipped.join("; "))
    };
    let Some(target) = d.answer.version else {
        return Ok(PullOutcome {
            host,
            target: None,
            outcome: None,
            message: format!(
                "the deploy host has no target for this host: it keeps what it runs{skipped}"
            ),
        });
    };
    let why = if d.answer.why.is_empty() {
        String::new()
    } else {
        format!(" ({})", crate::text::clip(&d.answer.why, 100))
    };
    if let Some(seq) = d.seq
        && !agent.take_desired(seq)?
        && current != Some(target)
    {
        let newest = agent.state().switch_seq;
        return Ok(PullOutcome {
            host,
            target: Some(target),
            outcome: None,
            message: format!(
                "keeps what it runs ({}): the desired state from {} ({}, order #{seq}) is older than the newest order this host took (#{newest}){skipped}",
                current.map_or_else(|| "nothing".into(), |c| c.short()),
                d.source,
                target.short()
            ),
        });
    }
    let o = agent.converge(target, &agent.cfg.sources, by, rt, cancel)?;
    let message = if o.noop {
        format!("already on its target {}{why}{skipped}", target.short())
    } else {
        // No controller restarts a host that catches up by itself: it
        // restarts itself (recorded in its history like any restart).
        let restarted = match &agent.cfg.restart {
            None => String::new(),
            Some(_) => match agent.restart(&format!("{by} (after catching up)"), cancel) {
                Ok(r) if r.ok => format!("; restarted in {:.1}s", r.seconds),
                Ok(r) => format!(
                    "; RESTART FAILED ({}): {}",
                    r.status,
                    crate::text::clip(&r.output, 200)
                ),
                Err(e) => format!("; RESTART FAILED: {e}"),
            },
        };
        format!(
            "caught up: {} -> {}{why}{skipped}{restarted}",
            current.map_or_else(|| "nothing".into(), |c| c.short()),
            target.short()
        )
    };
    Ok(PullOutcome {
        host,
        target: Some(target),
        outcome: Some(o),
        message,
    })
}

/// Runs the work after a switch, or maintenance, on a thread of its own
/// ([`crate::sys::BACKGROUND_THREAD`]), so that what no operation waits
/// for (the first's tail, the second whole) can drop to the lowest CPU
/// priority short of idle ([`crate::sys::lower_background_priority`]) for
/// good. `Err`: the thread could not start, or panicked.
async fn on_own_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(crate::sys::BACKGROUND_THREAD.into())
        .spawn(move || {
            // A panic drops `tx`: the receiver says so.
            let _ = tx.send(f());
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    rx.await
        .map_err(|_| "its thread panicked (see the log above)".to_string())
}

/// What an agent does by itself at start, in the background: watch its
/// release slots (so that the first deploy checks only what changed in
/// them: [`crate::host::watch`]), then [`pull_at_start`].
pub async fn at_start(st: Arc<AgentState>) {
    let guard = st.op.clone().lock_owned().await;
    let what = "watching the release slots";
    let bg = st.begin_background(what);
    let st2 = st.clone();
    let r = tokio::task::spawn_blocking(move || st2.agent.watch_slots(&bg))
        .await
        .map_err(|e| e.to_string());
    st.end_background(what, r);
    drop(guard);
    tokio::spawn(maintain(st.clone()));
    pull_at_start(st).await;
}

const MAINTENANCE: &str = "re-hashing the live release for drift";

/// The agent's scheduled work ([`Agent::maintain`]): once after start, then
/// every `--verify-every`. Never in a deploy's way: it waits for the
/// operation lock, and a request arriving cancels it (background work); it
/// is then tried again a minute later.
async fn maintain(st: Arc<AgentState>) {
    let every = st.agent.cfg.verify_every;
    // Busy, or stopped by a request: again in a minute (or sooner, if it
    // is due more often than that).
    let retry = every.map_or(std::time::Duration::from_secs(60), |e| {
        e.min(std::time::Duration::from_secs(60))
    });
    // A host catching up at start (`pull_at_start`) goes first.
    let first = std::time::Duration::from_secs(10);
    tokio::time::sleep(every.map_or(first, |e| e.min(first))).await;
    loop {
        let Ok(guard) = st.op.clone().try_lock_owned() else {
            tokio::time::sleep(retry).await;
            continue;
        };
        // Nothing new starts once the agent is stopping.
        if st.stopping.load(Ordering::SeqCst) {
            return;
        }
        let bg = st.begin_background(MAINTENANCE);
        let st2 = st.clone();
        let r = on_own_thread(move || st2.agent.maintain(&bg)).await;
        // Stopped by a request: again soon. Done, or failed (logged):
        // at the next time it is due.
        let stopped = matches!(&r, Ok(Err(e)) if e.is_cancelled());
        st.end_background(MAINTENANCE, r);
        drop(guard);
        match every {
            _ if stopped => tokio::time::sleep(retry).await,
            Some(every) => tokio::time::sleep(every).await,
            None => return,
        }
    }
}

/// At start, an agent with `--source` asks the deploy host what it should
/// run and converges (a reimaged host, or one that was down during a
/// step). If the deploy host does not answer, it asks again with backoff
/// (5 s doubling to 5 min) until it does; a request from a controller
/// meanwhile goes first.
pub async fn pull_at_start(st: Arc<AgentState>) {
    if st.agent.cfg.sources.is_empty() {
        return;
    }
    let mut delay = std::time::Duration::from_secs(5);
    loop {
        let Ok(guard) = st.op.clone().try_lock_owned() else {
            // A controller is at work: it decides; ask again later.
            tokio::time::sleep(delay).await;
            continue;
        };
        let cancel = Cancel::new();
        st.set_running(Some(Running {
            what: PULL_AT_START.into(),
            background: false,
            cancel: cancel.clone(),
        }));
        let st2 = st.clone();
        let handle = tokio::runtime::Handle::current();
        let r = tokio::task::spawn_blocking(move || {
            pull_now(&st2.agent, "scap agent (start)", &handle, &cancel)
        })
        .await;
        st.set_running(None);
        match r {
            Ok(Ok(o)) => {
                tracing::info!("pull at start: {}", o.message);
                let switched = o.outcome.as_ref().is_some_and(|o| !o.noop);
                if switched {
                    let st3 = st.clone();
                    let bg = st.begin_background(AFTER_SWITCH);
                    let r = on_own_thread(move || st3.agent.after_switch(&bg)).await;
                    st.end_background(AFTER_SWITCH, r);
                }
                drop(guard);
                return;
            }
            Ok(Err(e)) if e.is_cancelled() => {
                drop(guard);
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!("pull at start: {e}; asking again in {}s", delay.as_secs());
            }
            Err(e) => tracing::warn!("pull at start: {e}"),
        }
        drop(guard);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(300));
    }
}

async fn promote(
    State(st): State<Arc<AgentState>>,
    caller: Caller,
    body: Result<Json<PromoteRequest>, JsonRejection>,
) -> Response {
    let req = match st.admit(&caller, "promote", body, |_| None) {
        Ok((mut r, who)) => {
            r.by = who;
            r
        }
        Err(r) => return *r,
    };
    let guard = match st.enter().await {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let what = format!("a promote of {}", req.version.short());
    run_op(
        st,
        guard,
        what,
        Some(req.version),
        move |agent, _, _| agent.promote(&req.version, &req.by),
        |_| false,
    )
    .await
}

async fn cancel(
    State(st): State<Arc<AgentState>>,
    caller: Caller,
    body: Result<Json<CancelRequest>, JsonRejection>,
) -> Response {
    let req = match st.admit(&caller, "cancel", body, |_| None) {
        Ok((mut r, who)) => {
            r.by = who;
            r
        }
        Err(r) => return *r,
    };
    let running = st.running();
    if let Some(r) = &running {
        r.cancel
            .cancel(&format!("cancelled by {}", crate::text::clip(&req.by, 64)));
        if !r.background {
            st.agent.record_cancel(&r.what, &req.by);
        }
    }
    Json(CancelOutcome {
        host: st.host().to_string(),
        cancelled: running.map(|r| r.what),
    })
    .into_response()
}

/// Prometheus text format: what this host runs and what its syncs cost.
async fn metrics(State(st): State<Arc<AgentState>>) -> Response {
    let s = st.agent.state();
    let c = &st.agent.counters;
    let mut m = Exposition::new();
    if let Some(cur) = &s.current {
        let v = cur.version.to_hex();
        m.family(
            "scap_agent_version_info",
            "gauge",
            "The version this host runs (value 1).",
        )
        .sample(
            "scap_agent_version_info",
            &[("host", &s.host), ("version", &v)],
            1,
        );
    }
    if let Some(stable) = &s.stable {
        let v = stable.version.to_hex();
        m.family(
            "scap_agent_stable_version_info",
            "gauge",
            "This host's last stable version (value 1).",
        )
        .sample(
            "scap_agent_stable_version_info",
            &[("host", &s.host), ("version", &v)],
            1,
        );
    }
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    m.single(
        "scap_agent_syncs_total",
        "counter",
        "Syncs and rollbacks run since the agent started.",
        n(&c.syncs),
    );
    m.single(
        "scap_agent_sync_failures_total",
        "counter",
        "Syncs and rollbacks that failed.",
        n(&c.failures),
    );
    m.single(
        "scap_agent_fetched_bytes_total",
        "counter",
        "Bytes received from sources.",
        n(&c.fetched_bytes),
    );
    m.single(
        "scap_agent_fetched_objects_total",
        "counter",
        "Objects received from sources.",
        n(&c.fetched_objects),
    );
    m.single(
        "scap_agent_last_sync_duration_seconds",
        "gauge",
        "How long the last successful sync or rollback took.",
        n(&c.last_sync_ms) as f64 / 1000.0,
    );
    m.single(
        "scap_agent_last_success_timestamp_seconds",
        "gauge",
        "When the last sync or rollback succeeded (Unix time; 0 if none since start).",
        n(&c.last_success),
    );
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        m.finish(),
    )
        .into_response()
}
