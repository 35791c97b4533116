//! The deploy host's dashboard, its JSON API and Prometheus metrics, served
//! by `scap serve` beside the object service.
//!
//! The server learns host state by polling the agents itself (bounded
//! concurrency, every few seconds) and serves the cached readings with
//! their age, so the page is right even when no deploy is running and
//! keeps working with half the fleet down. Everything the page needs is
//! embedded in the binary: the fleet's network is closed.
//!
//! | path | what |
//! |---|---|
//! | `/` | the dashboard (HTML, CSS and JS inline) |
//! | `/api/v1/fleet` | `scap status --json`, plus `polled_at` and per-host `reading_age_seconds` |
//! | `/api/v1/history?limit=N` | the audit log, newest first (N 1-1000, default 50) |
//! | `/api/v1/versions` | version records with labels, newest first |
//! | `/api/v1/diff?from=A&to=B` | changed paths and totals between two versions (names, IDs, prefixes) |
//! | `/metrics` | Prometheus text format |

use std::collections::HashMap;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::fleet::agents::Agents;
use crate::fleet::history;
use crate::fleet::inventory::Member;
use crate::fleet::poll::{FleetPoll, Reading, poll};
use crate::fleet::status::fleet_status;
use crate::metrics::Exposition;
use crate::store::Store;
use crate::store::diff::{Change, DiffStat, diff};
use crate::time::unix_now;

const PAGE: &str = include_str!("dashboard.html");
/// Most changes one diff answer lists (the totals count them all).
const DIFF_LIST_MAX: usize = 5000;

/// Writes the object service's own counters into the dashboard's
/// `/metrics` (`scap serve` gives `net::server`'s).
pub type ServerMetrics = Arc<dyn Fn(&mut Exposition) + Send + Sync>;

pub struct Web {
    /// The deploy host's store (versions, trains, diffs).
    store: Store,
    server_metrics: ServerMetrics,
    state: crate::fleet::state::DeployState,
    members: Vec<Member>,
    /// How the dashboard reads agents (the server's certificate).
    agents: Agents,
    poll_interval: Duration,
    snapshot: RwLock<Snapshot>,
    /// Diffs walk whole versions: a few at a time, the rest get 429.
    diffs: Arc<tokio::sync::Semaphore>,
    /// Fresh polls asked for (`/v1/fleet/poll`): one runs at a time, and
    /// its result (with its number) answers every request that arrived
    /// before it started.
    fresh: tokio::sync::Mutex<Option<(u64, Arc<FleetPoll>)>>,
    /// Fresh polls started so far.
    fresh_started: std::sync::atomic::AtomicU64,
}

/// Diffs computed at once.
const DIFFS_AT_ONCE: usize = 2;

/// Hosts a fresh poll (`/v1/fleet/poll`) reads at once: what `scap status`
/// polling by itself would.
const FRESH_CONCURRENCY: usize = 64;

#[derive(Default)]
struct Snapshot {
    readings: Vec<Reading>,
    /// Per host: when it last answered.
    last_good: Vec<Option<u64>>,
    polled_at: Option<u64>,
}

impl Web {
    pub fn new(
        store: Store,
        server_metrics: ServerMetrics,
        state: crate::fleet::state::DeployState,
        members: Vec<Member>,
        agents: Agents,
        poll_interval: Duration,
    ) -> Arc<Web> {
        let n = members.len();
        Arc::new(Web {
            store,
            server_metrics,
            state,
            members,
            agents,
            poll_interval,
            snapshot: RwLock::new(Snapshot {
                last_good: vec![None; n],
                ..Default::default()
            }),
            diffs: Arc::new(tokio::sync::Semaphore::new(DIFFS_AT_ONCE)),
            fresh: tokio::sync::Mutex::new(None),
            fresh_started: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Every host's state from a poll started after this call (over the
    /// connections the dashboard's polls keep): requests arriving while
    /// one runs share the next, so a flood of them polls the fleet back
    /// to back at most. The dashboard's snapshot takes it too.
    pub async fn poll_now(&self) -> Arc<FleetPoll> {
        use std::sync::atomic::Ordering;
        let arrived = self.fresh_started.load(Ordering::SeqCst);
        let mut last = self.fresh.lock().await;
        if let Some((n, answer)) = &*last
            && *n > arrived
        {
            return answer.clone();
        }
        let n = self.fresh_started.fetch_add(1, Ordering::SeqCst) + 1;
        let polled_at = unix_now();
        let readings = poll(&self.agents, &self.members, FRESH_CONCURRENCY).await;
        let answer = Arc::new(FleetPoll::of(&readings, polled_at));
        self.keep(readings, polled_at);
        *last = Some((n, answer.clone()));
        answer
    }

    /// Makes `readings`, from a poll started at `polled_at`, the
    /// dashboard's snapshot.
    fn keep(&self, readings: Vec<Reading>, polled_at: u64) {
        let now = unix_now();
        let mut s = self.snapshot.write().expect("not poisoned");
        for (i, r) in readings.iter().enumerate() {
            if r.view.is_ok() {
                s.last_good[i] = Some(now);
            }
        }
        s.readings = readings;
        s.polled_at = Some(polled_at);
    }

    /// Polls the agents forever (until the runtime stops).
    pub async fn poll_forever(self: Arc<Web>) {
        if self.members.is_empty() {
            return;
        }
        loop {
            let started = unix_now();
            let readings = poll(&self.agents, &self.members, 32).await;
            self.keep(readings, started);
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// The fleet's status as JSON. It reads the deploy state (etcd, with
    /// deadlines): call it off the runtime ([`Web::fleet_json_blocking`]).
    fn fleet_json(&self) -> serde_json::Value {
        // A copy of the readings: the poller is not held up meanwhile.
        let (readings, last_good, polled_at) = {
            let s = self.snapshot.read().expect("not poisoned");
            (s.readings.clone(), s.last_good.clone(), s.polled_at)
        };
        let now = unix_now();
        let ages: Vec<Option<u64>> = last_good
            .iter()
            .map(|t| t.map(|t| now.saturating_sub(t)))
            .collect();
        let trains = crate::fleet::trains::Trains::load(&self.store).unwrap_or_default();
        let mut v = fleet_status(&self.members, &readings, &trains, &self.state, &ages);
        v["polled_at"] = polled_at.into();
        v["poll_interval_seconds"] = self.poll_interval.as_secs().into();
        v["configured_hosts"] = self.members.len().into();
        v
    }

    /// [`Web::fleet_json`] on a blocking thread.
    async fn fleet_json_blocking(self: &Arc<Self>) -> serde_json::Value {
        let web = self.clone();
        tokio::task::spawn_blocking(move || web.fleet_json())
            .await
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }
}

/// The dashboard's routes, answering only requests whose `Host` is one of
/// `names` ([`HostNames`]).
pub fn routes(web: Arc<Web>, names: HostNames) -> Router {
    let names = Arc::new(names);
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/api/v1/fleet", get(fleet))
        .route("/api/v1/history", get(history_api))
        .route("/api/v1/versions", get(versions))
        .route("/api/v1/diff", get(diff_api))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn(move |req, next| {
            check_host(names.clone(), req, next)
        }))
        .with_state(web)
}

/// `GET /v1/fleet/poll` on the object service (TLS): a fresh poll of the
/// fleet for `scap status`, for a deployer's certificate only (one
/// request makes the server call every agent). Not on the dashboard's
/// plain-HTTP port: its answer is what a deployer acts on, so it comes
/// over a connection whose server the command authenticates.
pub fn poll_routes(web: Arc<Web>, deployers: Vec<String>) -> Router {
    Router::new()
        .route("/v1/fleet/poll", get(fresh_poll))
        .with_state((web, Arc::new(deployers)))
}

async fn fresh_poll(
    State((web, deployers)): State<(Arc<Web>, Arc<Vec<String>>)>,
    caller: crate::net::server::Caller,
) -> Response {
    if caller.named(&deployers).is_none() {
        return json_error(
            StatusCode::FORBIDDEN,
            format!(
                "a fresh poll of the fleet needs a deployer's certificate (one named {}: scap serve --deployer)",
                deployers.join(", ")
            ),
        );
    }
    if web.members.is_empty() {
        return json_error(
            StatusCode::NOT_FOUND,
            "this scap serve has no fleet to poll: start it with --hosts or --inventory",
        );
    }
    axum::Json(web.poll_now().await.as_ref()).into_response()
}

/// The names a browser may call the dashboard by (its `Host` header, the
/// port aside): loopback, the address it listens on, this host's name and
/// those given with `--dashboard-name` (an authenticating proxy's). Any
/// other name is a page on another site that had its name resolve to this
/// address (DNS rebinding through a deployer's tunnel), and is refused.
#[derive(Clone, Debug)]
pub struct HostNames(Vec<String>);

impl HostNames {
    pub fn new(listen: std::net::SocketAddr, extra: &[String]) -> HostNames {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if !listen.ip().is_unspecified() {
            names.push(listen.ip().to_string());
        }
        names.push(crate::sys::hostname());
        names.extend(extra.iter().cloned());
        for n in &mut names {
            n.make_ascii_lowercase();
        }
        names.sort();
        names.dedup();
        HostNames(names)
    }

    /// Whether `host` (a `Host` header: a name or address, maybe a port)
    /// is one of these names.
    pub fn allows(&self, host: &str) -> bool {
        let name = if let Some(rest) = host.strip_prefix('[') {
            // [v6]:port
            match rest.split_once(']') {
                Some((v6, "")) => v6,
                Some((v6, port))
                    if port
                        .strip_prefix(':')
                        .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())) =>
                {
                    v6
                }
                _ => "",
            }
        } else {
            host.rsplit_once(':').map_or(host, |(n, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    n
                } else {
                    host
                }
            })
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        !name.is_empty() && self.0.contains(&name)
    }
}

async fn check_host(
    names: Arc<HostNames>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !names.allows(host) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "the dashboard answers to {} only, not Host {:?}: reach it by one of those names (an SSH tunnel to localhost), or start scap serve with --dashboard-name NAME for the name your proxy uses\n",
                names.0.join(", "),
                crate::text::clip(host, 100)
            ),
        )
            .into_response();
    }
    next.run(req).await
}

fn bad_request(msg: impl Into<String>) -> Response {
    json_error(StatusCode::BAD_REQUEST, msg)
}

/// An error answer: `{"error": msg}` with `status`.
fn json_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": msg.into() })),
    )
        .into_response()
}

async fn fleet(State(web): State<Arc<Web>>) -> Response {
    axum::Json(web.fleet_json_blocking().await).into_response()
}

async fn history_api(
    State(web): State<Arc<Web>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 50,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return bad_request("limit must be a whole number from 1 to 1000"),
    };
    if let Some(k) = q.keys().find(|k| *k != "limit") {
        return bad_request(format!(
            "unknown parameter {k:?}: this endpoint takes limit"
        ));
    }
    let state = web.state.clone();
    let read = tokio::task::spawn_blocking(move || history::recent(&state, limit))
        .await
        .unwrap_or_else(|e| {
            Err(crate::fleet::state::StateError::Io {
                path: "(the history)".into(),
                source: std::io::Error::other(e.to_string()),
            })
        });
    match read {
        Ok(mut h) => {
            h.reverse();
            h.truncate(limit);
            let trains = crate::fleet::trains::Trains::load(&web.store).unwrap_or_default();
            axum::Json(history::named(&h, &trains)).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn versions(State(web): State<Arc<Web>>) -> Response {
    let store = &web.store;
    let labels = store.labels().unwrap_or_default();
    match store.records() {
        Ok(records) => {
            let list: Vec<serde_json::Value> = records
                .iter()
                .map(|r| {
                    let names: Vec<&str> = labels.iter().filter(|(_, v)| *v == r.version).map(|(l, _)| l.as_str()).collect();
                    serde_json::json!({
                        "version": r.version, "labels": names, "time": r.time, "author": r.author,
                        "message": r.message, "files": r.files, "bytes": r.bytes, "parent": r.parent,
                    })
                })
                .collect();
            axum::Json(list).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn diff_api(
    State(web): State<Arc<Web>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let (Some(from), Some(to)) = (q.get("from"), q.get("to")) else {
        return bad_request("give from= and to= (version labels, IDs or ID prefixes)");
    };
    let (from, to) = (from.clone(), to.clone());
    let Ok(permit) = web.diffs.clone().try_acquire_owned() else {
        return json_error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{DIFFS_AT_ONCE} diffs are being computed already: try again in a moment"),
        );
    };
    let web2 = web.clone();
    let r = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let store = &web2.store;
        let a = store.resolve(&from)?;
        let b = store.resolve(&to)?;
        let mut stat = DiffStat::default();
        let mut changes: Vec<Change> = Vec::new();
        diff(store, &a.root(), &b.root(), &mut |c| {
            stat.add(&c);
            changes.push(c);
            Ok(())
        })?;
        (stat.fetch_chunks, stat.fetch_bytes) =
            crate::store::diff::fetch_cost(store, &a.root(), &changes)?;
        let total = changes.len();
        let list: Vec<serde_json::Value> = changes
            .iter()
            .take(DIFF_LIST_MAX)
            .map(|c| {
                serde_json::json!({
                    "status": c.status.letter().to_string(),
                    "path": String::from_utf8_lossy(&c.path),
                    "old_size": c.old.as_ref().map(|x| x.size()),
                    "new_size": c.new.as_ref().map(|x| x.size()),
                })
            })
            .collect();
        Ok::<_, crate::store::StoreError>(serde_json::json!({
            "from": a, "to": b, "stat": stat, "changes": list, "total": total,
            "truncated": total > DIFF_LIST_MAX,
        }))
    })
    .await;
    match r {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(
            e @ (crate::store::StoreError::UnknownVersion(_)
            | crate::store::StoreError::Ambiguous { .. }
            | crate::store::StoreError::BadId(_)),
        )) => json_error(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn metrics(State(web): State<Arc<Web>>) -> Response {
    let st = web.fleet_json_blocking().await;
    let mut m = Exposition::new();
    (web.server_metrics)(&mut m);
    let versions: Vec<&serde_json::Value> =
        st["versions"].as_array().into_iter().flatten().collect();
    let labels = |v: &serde_json::Value| {
        (
            v["version"].as_str().unwrap_or("").to_string(),
            v["label"].as_str().unwrap_or("").to_string(),
        )
    };
    m.family(
        "scap_fleet_hosts",
        "gauge",
        "Hosts running each version (at the last poll).",
    );
    for v in &versions {
        let (id, label) = labels(v);
        m.sample(
            "scap_fleet_hosts",
            &[("version", &id), ("label", &label)],
            v["hosts"].as_array().map_or(0, Vec::len),
        );
    }
    m.family(
        "scap_fleet_traffic_share_ratio",
        "gauge",
        "Share of traffic weight on each version, 0 to 1.",
    );
    for v in &versions {
        let (id, label) = labels(v);
        m.sample(
            "scap_fleet_traffic_share_ratio",
            &[("version", &id), ("label", &label)],
            v["share"].as_f64().unwrap_or(0.0) / 100.0,
        );
    }
    m.single(
        "scap_fleet_unreachable_hosts",
        "gauge",
        "Hosts that did not answer the last poll.",
        st["unreachable"]["hosts"].as_array().map_or(0, Vec::len),
    );
    m.single(
        "scap_fleet_last_poll_timestamp_seconds",
        "gauge",
        "When the agents were last polled.",
        st["polled_at"].as_u64().unwrap_or(0),
    );
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        m.finish(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::HostNames;

    #[test]
    fn the_dashboard_answers_to_its_own_names_only() {
        let names = HostNames::new(
            "127.0.0.1:8468".parse().unwrap(),
            &["scap.wikimedia.org".into()],
        );
        for ok in [
            "localhost:8468",
            "LOCALHOST:9000",
            "127.0.0.1:8468",
            "[::1]:8468",
            "scap.wikimedia.org",
            "scap.wikimedia.org.:443",
        ] {
            assert!(names.allows(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example:8468",
            "localhost.evil.example:8468",
            "127.0.0.1.nip.io:8468",
            "[::1",
            "scap.wikimedia.org:x",
        ] {
            assert!(!names.allows(bad), "{bad}");
        }
    }
}
