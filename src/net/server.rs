//! `scap serve`: a store over HTTP.
//!
//! Objects are immutable, so every object response carries a strong ETag
//! (the ID) and `Cache-Control: immutable`: any HTTP cache (nginx on a
//! cache host, say) can sit between hosts and the deploy host. The server
//! takes an already-bound listener and a shutdown future (mini-redis
//! style), and `router()` can be tested without sockets.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ratelimit::RateLimit;
use super::tls::{Listener, Peer};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use std::io::Write;

use super::{
    BATCH_MAGIC, FRAME_HEADER, MAX_BATCH_IDS, STREAM_ZSTD_LEVEL, encode_end, encode_frame_header,
};
use crate::store::disk::VersionRecord;
use crate::store::id::{ID_LEN, ObjectId};
use crate::store::object;
use crate::store::{Store, StoreError, VersionId};

/// Requests handled at once; more wait in the accept queue.
pub const DEFAULT_CONCURRENCY: usize = 256;
/// Objects read from disk per blocking task in a batch response.
const READ_GROUP: usize = 64;

/// Counters, for logs and /metrics.
#[derive(Default, Debug)]
pub struct ServerStats {
    pub requests: AtomicU64,
    pub objects_served: AtomicU64,
    pub bytes_served: AtomicU64,
    pub packs_served: AtomicU64,
    /// Packs built ahead of any request, and the builds ahead that failed.
    pub packs_built_ahead: AtomicU64,
    pub packs_ahead_failed: AtomicU64,
}

impl ServerStats {
    /// The service's counters, in Prometheus' text format.
    pub fn expose(&self, m: &mut crate::metrics::Exposition) {
        m.single(
            "scap_http_requests_total",
            "counter",
            "Requests served by scap serve.",
            self.requests.load(Ordering::Relaxed),
        );
        m.single(
            "scap_objects_served_total",
            "counter",
            "Objects sent to hosts one by one or in batches (packs are counted apart).",
            self.objects_served.load(Ordering::Relaxed),
        );
        m.single(
            "scap_packs_served_total",
            "counter",
            "Delta packs (or ranges of them) sent to hosts and caches.",
            self.packs_served.load(Ordering::Relaxed),
        );
        m.single(
            "scap_packs_built_ahead_total",
            "counter",
            "Delta packs of new versions built before any host asked for them.",
            self.packs_built_ahead.load(Ordering::Relaxed),
        );
        m.single(
            "scap_packs_ahead_failed_total",
            "counter",
            "Builds of packs ahead that failed (the first host to ask builds the pack).",
            self.packs_ahead_failed.load(Ordering::Relaxed),
        );
        m.single(
            "scap_served_bytes_total",
            "counter",
            "Object bytes sent to hosts (after stream compression).",
            self.bytes_served.load(Ordering::Relaxed),
        );
    }
}

pub struct ServerState {
    pub store: Store,
    pub stats: ServerStats,
    access: Access,
    /// `--max-rate`: every response body is paced by it.
    limit: Option<Arc<RateLimit>>,
    builds: super::pack::Builds,
    /// What each client may have built on its requests.
    budgets: Arc<super::pack::Budgets>,
    /// What new versions' packs are built from, ahead of requests.
    ahead: super::pack::Ahead,
    /// `--access-log`: one line per request.
    log: Option<std::sync::Mutex<std::fs::File>>,
    /// The desired state as last read, for every agent's poll.
    desired: DesiredCache,
}

/// The desired state parsed once per version of it (a file replaced whole
/// by a rename: a new inode, size or time; an etcd key's revision), not
/// once per request: with a signed order per host, it is hundreds of
/// kilobytes at the fleet's size, and every agent polls it.
struct DesiredCache {
    state: crate::fleet::state::DeployState,
    last: std::sync::Mutex<Option<(String, Arc<crate::fleet::desired::Desired>)>>,
}

impl DesiredCache {
    fn get(
        &self,
    ) -> Result<Arc<crate::fleet::desired::Desired>, crate::fleet::desired::DesiredError> {
        use crate::fleet::state::Doc;
        let stamp = match self.state.stamp(Doc::Desired) {
            Ok(s) => s,
            // etcd not answering: the copy last read, if any (a target
            // is a signed order: an old copy can only be older, and an
            // agent ignores it if it took a newer order).
            Err(e) => {
                if let Some((_, d)) = self.last.lock().expect("not poisoned").as_ref() {
                    tracing::debug!("serving the desired state last read: {e}");
                    return Ok(d.clone());
                }
                return Err(e.into());
            }
        };
        let mut last = self.last.lock().expect("not poisoned");
        if let (Some(stamp), Some((was, d))) = (&stamp, last.as_ref())
            && stamp == was
        {
            return Ok(d.clone());
        }
        let d = Arc::new(crate::fleet::desired::Desired::load(&self.state)?);
        *last = stamp.map(|s| (s, d.clone()));
        Ok(d)
    }
}

/// How `scap serve` runs, beside its store.
#[derive(Default)]
pub struct ServeOptions {
    pub concurrency: usize,
    /// Bytes per second for every response body together.
    pub max_rate: Option<u64>,
    pub access_log: Option<std::path::PathBuf>,
    /// Sources each new version's packs are built from ahead of requests
    /// ([`build_ahead`]); 0 builds nothing ahead.
    pub packs_ahead: usize,
    /// What one client may have built on its requests.
    pub pack_budget: super::pack::Budget,
    /// Where the desired state is read from for `/v1/desired/HOST`
    /// (default: the files beside the store).
    pub state: Option<crate::fleet::state::DeployState>,
}

/// Who may read the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone with a client certificate the site CA signed (hosts, the
    /// deploy host, caches); `/health` is open.
    ClientCert,
    /// Anyone (`--insecure-http`, a lab).
    Open,
}

pub fn router(store: Store, concurrency: usize, access: Access) -> (Router, Arc<ServerState>) {
    router_with(
        store,
        access,
        ServeOptions {
            concurrency,
            ..ServeOptions::default()
        },
    )
    .expect("no access log to open")
}

pub fn router_with(
    store: Store,
    access: Access,
    opts: ServeOptions,
) -> std::io::Result<(Router, Arc<ServerState>)> {
    let log = match &opts.access_log {
        Some(p) => Some(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        )),
        None => None,
    };
    let ahead = super::pack::Ahead::new(&store, opts.packs_ahead);
    let desired_state = opts
        .state
        .clone()
        .unwrap_or_else(|| crate::fleet::state::DeployState::files(&store.root().join("fleet")));
    let state = Arc::new(ServerState {
        store,
        stats: ServerStats::default(),
        access,
        limit: opts.max_rate.map(|r| Arc::new(RateLimit::new(r))),
        builds: super::pack::Builds::default(),
        budgets: Arc::new(super::pack::Budgets::new(opts.pack_budget)),
        ahead,
        log,
        desired: DesiredCache {
            state: desired_state,
            last: Default::default(),
        },
    });
    let app = Router::new()
        .route("/objects/{fan}/{rest}", get(object))
        .route("/versions/{file}", get(record))
        .route("/refs/labels/{label}", get(label))
        .route("/refs/logs/labels/{label}", get(label_log))
        .route("/v1/catalogue", get(catalogue))
        .route("/batch", post(batch))
        .route(
            &format!("/v1/pack{}/{{from}}/{{to}}", super::pack::PACK_FORMAT),
            get(pack),
        )
        .route("/v1/desired/{host}", get(desired))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .route("/health", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BATCH_IDS * ID_LEN))
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            opts.concurrency.max(1),
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access_log,
        ))
        .with_state(state.clone());
    Ok((app, state))
}

/// One line per request in `--access-log`: time, peer, method, path,
/// status, length (when known).
async fn access_log(
    State(st): State<Arc<ServerState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if st.log.is_none() {
        return next.run(req).await;
    }
    let peer = Caller::of(req.extensions())
        .0
        .map_or_else(|| "-".to_string(), |p| p.describe());
    let line_head = format!("{} {}", req.method(), req.uri().path());
    let resp = next.run(req).await;
    let len = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    if let Some(log) = &st.log {
        let line = format!(
            "{} {peer} {line_head} {} {len}\n",
            crate::time::unix_now(),
            resp.status().as_u16()
        );
        let mut f = log.lock().expect("not poisoned");
        let _ = f.write_all(line.as_bytes());
    }
    resp
}

/// `GET /v1/pack4/<from>/<to>`: the delta pack, built on first request,
/// with ranges, a strong ETag and `immutable` (see `net::pack`).
async fn pack(
    State(st): State<Arc<ServerState>>,
    Path((from, to)): Path<(String, String)>,
    caller: Caller,
    headers: HeaderMap,
) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    let parse = |s: &str| s.parse::<VersionId>().ok();
    let (Some(to_v), Some(from_v)) = (
        parse(&to),
        if from == "empty" {
            Some(None)
        } else {
            parse(&from).map(Some)
        },
    ) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "/v1/pack{}/{}/{}: expected /v1/pack{0}/<version ID or empty>/<version ID>",
                super::pack::PACK_FORMAT,
                crate::text::clip(&from, 80),
                crate::text::clip(&to, 80)
            ),
        );
    };
    let etag = super::pack::etag(from_v.as_ref(), &to_v);
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    // Only between versions this deploy host recorded (and `empty`): a
    // pack between any two trees (a subdirectory, say) would be work and
    // disk anyone with a site certificate could ask for.
    let store = st.store.clone();
    let recorded = tokio::task::spawn_blocking(move || -> Result<Option<VersionId>, StoreError> {
        for v in from_v.iter().chain(std::iter::once(&to_v)) {
            if store.record(v)?.is_none() {
                return Ok(Some(*v));
            }
        }
        Ok(None)
    })
    .await;
    match recorded {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(v))) => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "no pack from {from} to {to}: {v} is not a version this deploy host recorded (packs are built only between recorded versions; ask for objects instead)"
                ),
            );
        }
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    let pack_path = super::pack::path(&st.store, from_v.as_ref(), &to_v);
    let client = caller
        .0
        .as_ref()
        .map(|p| super::conns::peer_key(p.addr.ip()));
    // A pack not built yet is built on this request, within the client's
    // budget.
    let budget = if pack_path.exists() {
        None
    } else {
        match st.budgets.start(client) {
            Ok(b) => Some(b),
            Err(why) => {
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "no pack from {from} to {to} for {}: {why} (fetch objects instead, or ask again later)",
                        client.map_or_else(|| "this client".to_string(), |c| c.to_string())
                    ),
                );
            }
        }
    };
    // The build runs to its end even if this client hangs up, and holds
    // the client's place in its budget until then.
    let st2 = st.clone();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let streams = range.is_none() && budget.is_some();
    let build = tokio::spawn(async move {
        let built = st2.builds.build(st2.store.clone(), from_v, to_v).await;
        if let (Some(b), Ok(p)) = (budget, &built) {
            b.charge(std::fs::metadata(p).map_or(0, |m| m.len()));
        }
        built
    });
    // The whole pack asked for while it is built (the first fresh host of
    // a version): sent as it is written, not after.
    if streams {
        st.ahead.served(to_v);
        st.stats.packs_served.fetch_add(1, Ordering::Relaxed);
        let dir = pack_path.parent().expect("packs/").to_path_buf();
        let prefix = super::pack::building_prefix(from_v.as_ref(), &to_v);
        let body = growing_stream(st.clone(), pack_path, dir, prefix, build);
        let mut resp = Response::new(Body::from_stream(body));
        pack_headers(resp.headers_mut(), &etag);
        return resp;
    }
    let built = build.await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            path: pack_path.clone(),
            source: std::io::Error::other(e),
        })
    });
    let path = match built {
        Ok(p) => p,
        Err(StoreError::UnknownVersion(v)) => {
            return error(
                StatusCode::NOT_FOUND,
                format!(
                    "no pack from {from} to {to}: {v} is not in this store (ask for objects instead)"
                ),
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    st.ahead.served(to_v);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", path.display()),
            );
        }
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (status, start, end) = match super::pack::range(range, len) {
        Ok(None) => (StatusCode::OK, 0, len.saturating_sub(1)),
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Err(super::pack::Unsatisfiable) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response();
        }
    };
    st.stats.packs_served.fetch_add(1, Ordering::Relaxed);
    let body = file_stream(st.clone(), file, start, end + 1 - start.min(end + 1));
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    pack_headers(h, &etag);
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(if len == 0 { 0 } else { end + 1 - start }),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")).expect("digits"),
        );
    }
    resp
}

/// What every answer with a pack (or a range of it) says of it: what it
/// is, that it never changes, its strong ETag, that ranges are served.
fn pack_headers(h: &mut HeaderMap, etag: &str) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-scap-pack"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    h.insert(
        header::ETAG,
        HeaderValue::from_str(etag).expect("hex is a valid header"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// `n` bytes of `file` from `start`, in 256 KiB pieces, paced by the
/// server's rate limit.
fn file_stream(
    st: Arc<ServerState>,
    file: tokio::fs::File,
    start: u64,
    n: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    futures_util::stream::unfold(
        (file, start, n, false),
        move |(mut file, at, left, seeked)| {
            let st = st.clone();
            async move {
                if left == 0 {
                    return None;
                }
                if !seeked && let Err(e) = file.seek(std::io::SeekFrom::Start(at)).await {
                    return Some((Err(e), (file, at, 0, true)));
                }
                let mut buf = vec![0u8; (256 << 10).min(left as usize)];
                match file.read(&mut buf).await {
                    Ok(0) => Some((
                        Err(std::io::Error::other("pack file shorter than it was")),
                        (file, at, 0, true),
                    )),
                    Ok(k) => {
                        buf.truncate(k);
                        if let Some(l) = &st.limit {
                            l.take(k).await;
                        }
                        st.stats.bytes_served.fetch_add(k as u64, Ordering::Relaxed);
                        Some((
                            Ok(Bytes::from(buf)),
                            (file, at + k as u64, left - k as u64, true),
                        ))
                    }
                    Err(e) => Some((Err(e), (file, at, 0, true))),
                }
            }
        },
    )
}

/// A pack while it is built, from the first byte to the last, as the
/// build writes it: the file in place if it is done, else the temp file
/// this process writes it into (found by `prefix` in `dir`), read as it
/// grows; it ends once the pack is in place (renamed after its last byte
/// is written and synced, so the open file then has it all). A build that
/// fails cuts the stream with an error: the client takes that as a source
/// failing mid-way (it fetches by objects, or resumes elsewhere).
fn growing_stream(
    st: Arc<ServerState>,
    path: std::path::PathBuf,
    dir: std::path::PathBuf,
    prefix: String,
    build: tokio::task::JoinHandle<Result<std::path::PathBuf, StoreError>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    use tokio::io::AsyncReadExt;
    struct Growing {
        file: Option<tokio::fs::File>,
        /// The pack is in place: the open file has every byte.
        complete: bool,
        build: tokio::task::JoinHandle<Result<std::path::PathBuf, StoreError>>,
        ended: bool,
    }
    impl Growing {
        /// The stream's last item: the error that cuts it.
        fn fail(
            mut self,
            path: &std::path::Path,
            why: String,
        ) -> (std::io::Result<Bytes>, Growing) {
            self.ended = true;
            tracing::warn!(
                "{}: the pack's build failed while it was sent: {why}",
                path.display()
            );
            (Err(std::io::Error::other(why)), self)
        }
    }
    const WAIT: std::time::Duration = std::time::Duration::from_millis(20);
    let find_tmp = move |dir: &std::path::Path| -> Option<std::path::PathBuf> {
        std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            (n.starts_with(&prefix) && n.ends_with(".tmp")).then(|| e.path())
        })
    };
    let state = Growing {
        file: None,
        complete: false,
        build,
        ended: false,
    };
    futures_util::stream::unfold(state, move |mut g| {
        let (st, path, dir, find_tmp) = (st.clone(), path.clone(), dir.clone(), find_tmp.clone());
        async move {
            if g.ended {
                return None;
            }
            loop {
                if g.file.is_none() {
                    if let Ok(f) = tokio::fs::File::open(&path).await {
                        g.file = Some(f);
                        g.complete = true;
                    } else if let Some(tmp) = find_tmp(&dir)
                        && let Ok(f) = tokio::fs::File::open(&tmp).await
                    {
                        g.file = Some(f);
                    } else if g.build.is_finished() && !path.exists() {
                        let why = match (&mut g.build).await {
                            Ok(Err(e)) => e.to_string(),
                            Ok(Ok(_)) => "the pack is gone".into(),
                            Err(e) => e.to_string(),
                        };
                        return Some(g.fail(&path, why));
                    } else {
                        tokio::time::sleep(WAIT).await;
                        continue;
                    }
                }
                let mut buf = vec![0u8; 256 << 10];
                let read = g.file.as_mut().expect("opened above").read(&mut buf).await;
                match read {
                    Ok(0) if g.complete => return None,
                    Ok(0) => {
                        // Which file the one being read is now: the pack in
                        // place (renamed whole), or a temp file a failed
                        // build removed (another build writes a new one).
                        // Only the first ends the answer as whole; anything
                        // else cuts it, so that no cache keeps a pack cut
                        // short as if it were the pack.
                        use std::os::unix::fs::MetadataExt;
                        let ours = g.file.as_ref().expect("opened above").metadata().await;
                        let placed = std::fs::metadata(&path);
                        if let (Ok(o), Ok(p)) = (&ours, &placed) {
                            if (o.dev(), o.ino()) != (p.dev(), p.ino()) {
                                return Some(g.fail(&path, "the build whose temp file was being sent failed; another built the pack".into()));
                            }
                            g.complete = true;
                        } else if ours.as_ref().is_ok_and(|o| o.nlink() == 0) {
                            return Some(g.fail(
                                &path,
                                "the build whose temp file was being sent failed".into(),
                            ));
                        } else if g.build.is_finished() {
                            let why = match (&mut g.build).await {
                                Ok(Err(e)) => e.to_string(),
                                _ => {
                                    "the pack's temp file ended before the pack was in place".into()
                                }
                            };
                            return Some(g.fail(&path, why));
                        } else {
                            tokio::time::sleep(WAIT).await;
                        }
                    }
                    Ok(k) => {
                        buf.truncate(k);
                        if let Some(l) = &st.limit {
                            l.take(k).await;
                        }
                        st.stats.bytes_served.fetch_add(k as u64, Ordering::Relaxed);
                        return Some((Ok(Bytes::from(buf)), g));
                    }
                    Err(e) => return Some(g.fail(&path, e.to_string())),
                }
            }
        }
    })
}

/// Refuses a request without a client certificate when one is required.
async fn guard(
    State(st): State<Arc<ServerState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if st.access == Access::ClientCert && !Caller::of(req.extensions()).has_cert() {
        return error(
            StatusCode::UNAUTHORIZED,
            "reading this store needs a client certificate from the site CA (scap agents and the deploy host have one): configure --cert and --key",
        );
    }
    next.run(req).await
}

/// How often [`build_ahead`] lists `versions/` for new versions.
const AHEAD_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// New versions whose packs one listing builds ahead, newest first: a store
/// filled in bulk (a copy, an import) gets packs for its newest only.
const AHEAD_VERSIONS: usize = 2;

/// Builds new versions' delta packs ahead of requests until the process
/// ends ([`super::pack::Ahead`]). Every [`AHEAD_POLL`] it lists
/// `versions/`; for each version recorded since the listing before (none
/// at the first: what the store held at start is old news), it builds the
/// packs from [`super::pack::Ahead::sources`], one at a time, through the
/// per-pack lock requests take (a host that asks meanwhile waits for this
/// build, never a second one). A build that fails is logged and counted;
/// the first host that asks for that pack builds it, as without this.
pub async fn build_ahead(st: Arc<ServerState>) {
    if st.ahead.limit() == 0 {
        return;
    }
    let mut known: Option<HashSet<VersionId>> = None;
    // Said once per run of failed listings, not every tick.
    let mut failing = false;
    let mut tick = tokio::time::interval(AHEAD_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = st.store.clone();
        // Kept on a failed listing: what appears meanwhile is new next time.
        let before = known.clone();
        let fresh = match tokio::task::spawn_blocking(move || new_versions(&store, before)).await {
            Ok(Ok((now, fresh))) => {
                known = Some(now);
                failing = false;
                fresh
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(
                        "cannot list the store's versions to build packs ahead: {e} (hosts' requests build them meanwhile)"
                    );
                }
                failing = true;
                continue;
            }
            Err(_) => continue,
        };
        for record in fresh {
            let v = record.version;
            for from in st.ahead.sources(&v, record.parent) {
                // Only from versions this deploy host recorded.
                if super::pack::path(&st.store, Some(&from), &v).exists()
                    || !matches!(st.store.record(&from), Ok(Some(_)))
                {
                    continue;
                }
                let started = std::time::Instant::now();
                match st.builds.build(st.store.clone(), Some(from), v).await {
                    Ok(_) => {
                        st.stats.packs_built_ahead.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            "built the pack from {} to {} ahead in {:?}",
                            from.short(),
                            v.short(),
                            started.elapsed()
                        );
                    }
                    // The source left the store (gc) since it was served.
                    Err(StoreError::UnknownVersion(gone)) => {
                        tracing::debug!("no pack ahead from {}: {gone} is gone", from.short());
                    }
                    Err(e) => {
                        st.stats.packs_ahead_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "cannot build the pack from {} to {} ahead: {e} (the first host to ask will build it)",
                            from.short(),
                            v.short()
                        );
                    }
                }
            }
        }
    }
}

/// The versions recorded now, and the records of those not in `before`
/// (none when there is no `before`), newest first, at most
/// [`AHEAD_VERSIONS`].
fn new_versions(
    store: &Store,
    before: Option<HashSet<VersionId>>,
) -> Result<(HashSet<VersionId>, Vec<VersionRecord>), StoreError> {
    let now: HashSet<VersionId> = store.recorded()?.into_iter().collect();
    let Some(before) = before else {
        return Ok((now, Vec::new()));
    };
    let mut fresh = Vec::new();
    for v in now.difference(&before) {
        // A record being removed (gc) meanwhile is no new version.
        if let Ok(Some(r)) = store.record(v) {
            fresh.push(r);
        }
    }
    fresh.sort_by_key(|r| std::cmp::Reverse((r.time, r.time_nanos)));
    fresh.truncate(AHEAD_VERSIONS);
    Ok((now, fresh))
}

/// How long a server stopping waits for the requests in flight.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` completes, then finishes the
/// requests in flight (for at most [`SHUTDOWN_GRACE`]). Handlers see the
/// peer as [`Caller`]. HTTP/1.1 only (the ALPN the TLS side offers); each
/// request counts as in flight on its connection's slot until its
/// response body is done ([`super::conns`]), and a connection the tracker
/// closes is dropped at once.
pub async fn serve(
    listener: Listener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_grace(listener, app, shutdown, SHUTDOWN_GRACE).await
}

/// [`serve`], waiting up to `grace` for the requests in flight.
pub async fn serve_with_grace(
    mut listener: Listener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
) -> std::io::Result<()> {
    use hyper_util::rt::TokioIo;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (conn, peer) = tokio::select! {
            c = listener.accept() => match c {
                Some(c) => c,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let slot = peer.slot.clone();
        let app = app.clone();
        let svc = hyper::service::service_fn(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                let in_flight = peer.slot.as_ref().map(|s| s.begin());
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer.clone()));
                let mut app = app.clone();
                let slot = peer.slot.clone();
                async move {
                    let req = req.map(|b| match slot {
                        Some(slot) => Body::new(Incoming { inner: b, slot }),
                        None => Body::new(b),
                    });
                    let resp = tower::Service::call(&mut app, req).await?;
                    Ok::<_, std::convert::Infallible>(match in_flight {
                        Some(guard) => resp.map(|b| {
                            Body::new(Tracked {
                                inner: b,
                                _guard: guard,
                            })
                        }),
                        None => resp,
                    })
                }
            },
        );
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(conn), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            match slot {
                Some(slot) => {
                    tokio::select! {
                        _ = conn => {}
                        () = slot.killed() => {}
                    }
                }
                None => {
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
    Ok(())
}

/// A request body that tells its connection's slot when the request
/// waits on the client for it ([`super::conns`]).
struct Incoming {
    inner: hyper::body::Incoming,
    slot: Arc<super::conns::Slot>,
}

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        self.slot.waits_on_client(r.is_pending());
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request in flight until it is done.
struct Tracked {
    inner: Body,
    _guard: super::conns::InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The peer of a request (a router tested without sockets has none).
pub struct Caller(pub Option<Peer>);

impl Caller {
    pub fn of(ext: &axum::http::Extensions) -> Caller {
        Caller(
            ext.get::<axum::extract::ConnectInfo<Peer>>()
                .map(|c| c.0.clone()),
        )
    }

    pub fn has_cert(&self) -> bool {
        self.0.as_ref().is_some_and(Peer::has_cert)
    }

    /// On the local socket: the caller's user ID.
    pub fn local(&self) -> Option<u32> {
        self.0.as_ref()?.local_uid
    }

    /// The first of `names` the caller's certificate is valid for.
    pub fn named<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        self.0.as_ref()?.named(names)
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Caller, Self::Rejection> {
        Ok(Caller::of(&parts.extensions))
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut m = msg.into();
    m.push('\n');
    (status, m).into_response()
}

async fn object(
    State(st): State<Arc<ServerState>>,
    Path((fan, rest)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    let Ok(id) = format!("{fan}{rest}").parse::<ObjectId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("/objects/{fan}/{rest}: not an object ID"),
        );
    };
    let etag = format!("\"{id}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let store = st.store.clone();
    match tokio::task::spawn_blocking(move || store.read_raw(&id)).await {
        Ok(Ok(Some(file))) => {
            if let Some(l) = &st.limit {
                l.take(file.len()).await;
            }
            st.stats.objects_served.fetch_add(1, Ordering::Relaxed);
            st.stats
                .bytes_served
                .fetch_add(file.len() as u64, Ordering::Relaxed);
            (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/x-scap-object"),
                    ),
                    (
                        header::CACHE_CONTROL,
                        HeaderValue::from_static("public, max-age=31536000, immutable"),
                    ),
                    (
                        header::ETAG,
                        HeaderValue::from_str(&etag).expect("hex is a valid header"),
                    ),
                ],
                file,
            )
                .into_response()
        }
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            format!("object {id}: not in this store"),
        ),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn record(State(st): State<Arc<ServerState>>, Path(file): Path<String>) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(v) = file
        .strip_suffix(".sig")
        .and_then(|h| h.parse::<VersionId>().ok())
    {
        return match st.store.signature(&v) {
            // Not immutable: `scap sign` adds a signature (a key rotation).
            Ok(Some(doc)) => (
                [(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("max-age=60"),
                )],
                axum::Json(doc),
            )
                .into_response(),
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                format!("version {v}: not signed in this store"),
            ),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
    }
    let Some(v) = file
        .strip_suffix(".json")
        .and_then(|h| h.parse::<VersionId>().ok())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("/versions/{file}: expected <version ID>.json or <version ID>.sig"),
        );
    };
    match st.store.record(&v) {
        Ok(Some(r)) => axum::Json(r).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("version {v}: no record in this store"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// What the deploy host last decided `host` should run (its desired
/// state), for the host's agent converging by itself. Never cached.
async fn desired(State(st): State<Arc<ServerState>>, Path(host): Path<String>) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    if !crate::proto::valid_host_name(&host) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "/v1/desired/{}: not a host name",
                crate::text::clip(&host, 100)
            ),
        );
    }
    let st2 = st.clone();
    let loaded = tokio::task::spawn_blocking(move || st2.desired.get()).await;
    let d = match loaded {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let t = d.get(&host);
    let body = crate::proto::DesiredResponse {
        host: host.clone(),
        version: t.map(|t| t.version),
        since: t.map_or(0, |t| t.since),
        by: t.map(|t| t.by.clone()).unwrap_or_default(),
        why: t.map(|t| t.why.clone()).unwrap_or_default(),
        order: t.and_then(|t| t.order.clone()),
    };
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        axum::Json(body),
    )
        .into_response()
}

async fn label(State(st): State<Arc<ServerState>>, Path(label): Path<String>) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    match st.store.labels() {
        Ok(labels) => match labels.into_iter().find(|(l, _)| *l == label) {
            Some((_, v)) => format!("{v}\n").into_response(),
            None => error(
                StatusCode::NOT_FOUND,
                format!("label {label:?}: not in this store"),
            ),
        },
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /v1/catalogue`: what a standby deploy host copies (the versions
/// recorded here, each label's head and how many moves its history
/// holds), one listing of the versions directory and of the labels.
async fn catalogue(State(st): State<Arc<ServerState>>) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    let store = st.store.clone();
    let listed = tokio::task::spawn_blocking(move || -> Result<_, crate::store::StoreError> {
        let versions = store.recorded()?;
        let mut labels = Vec::new();
        for (name, v) in store.labels()? {
            let moves = store.label_log(&name)?.len();
            labels.push(crate::proto::CatalogueLabel {
                name,
                version: v,
                moves,
            });
        }
        Ok(crate::proto::Catalogue {
            format: crate::proto::CATALOGUE_FORMAT,
            versions,
            labels,
        })
    })
    .await;
    match listed {
        Ok(Ok(c)) => axum::Json(c).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /refs/logs/labels/LABEL`: every move of a label, oldest first.
async fn label_log(State(st): State<Arc<ServerState>>, Path(label): Path<String>) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    if crate::store::disk::check_label(&label).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{:?}: not a label name", crate::text::clip(&label, 80)),
        );
    }
    let store = st.store.clone();
    match tokio::task::spawn_blocking(move || store.label_log(&label)).await {
        Ok(Ok(log)) => axum::Json(log).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /batch`: the body is N raw 32-byte IDs; the response streams
/// `scapbat1`, one frame per ID in request order, and an end frame. With
/// `Accept-Encoding: zstd` the whole response is one zstd stream and the
/// objects inside it are sent uncompressed, so that small files compress
/// against each other (as rsync's `--compress` stream does) instead of one
/// by one.
async fn batch(State(st): State<Arc<ServerState>>, headers: HeaderMap, body: Bytes) -> Response {
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    if body.is_empty() || !body.len().is_multiple_of(ID_LEN) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "batch body is {} bytes: expected a non-empty list of raw 32-byte IDs",
                body.len()
            ),
        );
    }
    let zstd = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("zstd")));
    let ids: Vec<ObjectId> = body
        .chunks_exact(ID_LEN)
        .map(|c| ObjectId::from_bytes(c.try_into().expect("32 bytes")))
        .collect();
    let mut groups: Vec<Vec<ObjectId>> = ids.chunks(READ_GROUP).map(<[ObjectId]>::to_vec).collect();
    groups.reverse();
    let encoder = if zstd {
        match zstd::stream::write::Encoder::new(Vec::new(), STREAM_ZSTD_LEVEL) {
            Ok(e) => Some(e),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    } else {
        None
    };
    // Each step reads (and, compressed, encodes) one group of objects on a
    // blocking thread; the encoder travels from step to step.
    let state = (groups, encoder, true, st.clone());
    let stream = futures_util::stream::unfold(Some(state), |state| async move {
        let (mut groups, encoder, first, st) = state?;
        let group = groups.pop();
        let last = group.is_none();
        let store = st.store.clone();
        let step = tokio::task::spawn_blocking(
            move || -> std::io::Result<(Vec<u8>, u64, u64, Option<_>)> {
                let mut out = Vec::new();
                if first {
                    out.extend_from_slice(BATCH_MAGIC);
                }
                let (mut found, mut raw_bytes) = (0, 0);
                for id in group.iter().flatten() {
                    let file = store.read_raw(id).map_err(std::io::Error::other)?;
                    let file = match (&file, encoder.is_some()) {
                        (Some(f), true) => Some(object::uncompressed(*id, f)),
                        _ => file,
                    };
                    out.reserve(FRAME_HEADER + file.as_ref().map_or(0, Vec::len));
                    encode_frame_header(&mut out, id, file.as_deref());
                    if let Some(f) = file {
                        raw_bytes += f.len() as u64;
                        out.extend_from_slice(&f);
                        found += 1;
                    }
                }
                if last {
                    encode_end(&mut out);
                }
                match encoder {
                    None => Ok((out, found, raw_bytes, None)),
                    Some(mut enc) => {
                        enc.write_all(&out)?;
                        if last {
                            let compressed = enc.finish()?;
                            Ok((compressed, found, raw_bytes, None))
                        } else {
                            enc.flush()?;
                            let compressed = std::mem::take(enc.get_mut());
                            Ok((compressed, found, raw_bytes, Some(enc)))
                        }
                    }
                }
            },
        )
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match step {
            Ok((bytes, found, _raw, encoder)) => {
                if let Some(l) = &st.limit {
                    l.take(bytes.len()).await;
                }
                st.stats.objects_served.fetch_add(found, Ordering::Relaxed);
                st.stats
                    .bytes_served
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                let next = (!last).then_some((groups, encoder, false, st));
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(bytes)), next))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut resp = Response::builder().header(header::CONTENT_TYPE, "application/x-scap-batch");
    if zstd {
        resp = resp.header(header::CONTENT_ENCODING, "zstd");
    }
    resp.body(Body::from_stream(stream))
        .expect("a valid response")
}
