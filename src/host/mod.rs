//! The agent on every app server: its own object store, its release
//! directories, the `current` symlink, and its state file.
//!
//! Layout of the agent's directory (`--dir`, default /var/lib/scap):
//!
//! ```text
//! DIR/store/          object store (same format as the deploy host's, role host)
//! DIR/releases/a b c  release directories, and a.json… saying what each holds
//! DIR/current         -> releases/<slot>: the live release (switched atomically)
//! DIR/state.json      current / previous / stable version, history
//! ```
//!
//! Deploy paths such as /srv/mediawiki are symlinks into `DIR/current`
//! (`--link mediawiki=/srv/mediawiki` makes them), so one rename of
//! `current` switches every component at once.
//!
//! Every long step (fetch, writing a slot, hooks, the work after a switch)
//! takes a [`Cancel`] and stops at its next check when a rollback or
//! `POST /v1/cancel` arrives, leaving the host on what it ran.
//!
//! **Invariant:** the live slot is never written; a host is on its old
//! version or its new one, and `current` says which.
//! **Invariant:** the agent knows nothing of fleets, percentages or other
//! hosts; it does what one authenticated request asks.

pub mod api;
pub mod drift;
pub mod fetch;
pub mod materialize;
pub mod release;
pub mod share;
pub mod watch;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::hooks;
use crate::net::client::{Client, FetchError};
use crate::net::tls::Transport;
use crate::proto::state::{Action, Deployed, Event, HostState, StateError};
use crate::proto::{
    DEFAULT_FETCH_TIMEOUT, DESIRED_ACTION, DriftSummary, Fetched, Outcome, RollbackRequest,
    RollbackTarget, SyncRequest,
};
use crate::store::disk::{LockMode, Role};
use crate::store::signature::{SignatureError, SignedOrder, SignedVersion, Trust, Verified};
use crate::store::{Content, Store, StoreError, TreeName, VersionId};
use crate::time::unix_now;
use release::{How, Releases};

/// Changed paths past which a restart gets no list (it restarts all).
const MAX_CHANGED_LISTED: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("fetching version {version}: {source}")]
    Fetch {
        version: VersionId,
        #[source]
        source: Box<FetchError>,
    },
    #[error(
        "fetching version {version}: not done after {seconds} s: the sources are too slow or stalled; the host stays on what it ran"
    )]
    FetchTimeout { version: VersionId, seconds: u64 },
    #[error("pre-switch hook failed ({status}); stayed on {current}: {output}")]
    Hook {
        status: String,
        current: String,
        output: String,
    },
    #[error("{0}")]
    Refused(String),
    #[error("host {host}: {source}")]
    Signature {
        host: String,
        #[source]
        source: SignatureError,
    },
    #[error("{0}: {1}")]
    Setup(String, String),
}

impl AgentError {
    /// Whether the operation stopped because it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, AgentError::Store(StoreError::Cancelled(_)))
    }
}

pub struct AgentConfig {
    pub dir: PathBuf,
    pub host: String,
    /// (component, deploy path): deploy path becomes a symlink to DIR/current/component.
    pub links: Vec<(String, PathBuf)>,
    pub pre_switch: Option<String>,
    pub post_switch: Option<String>,
    /// What makes the live release's code run (php-fpm reload, opcache
    /// reset): run on the controller's `POST /v1/restart`, between a depool
    /// and a repool.
    pub restart: Option<String>,
    pub slots: usize,
    /// How long a hook may run before it is killed.
    pub hook_timeout: Duration,
    /// How often the whole live release is re-hashed for drift, and put-off
    /// garbage collected ([`Agent::maintain`]); None: at start only.
    pub verify_every: Option<Duration>,
    /// How the agent reaches sources (TLS with its certificate, or plain).
    pub transport: Transport,
    /// The deploy keys whose signatures it accepts, and the revoked ones.
    pub trust: Trust,
    /// Lab only: run versions without a trusted signature (with a warning).
    pub allow_unsigned: bool,
    /// The deploy host(s) (`scap serve`) this host asks what it should run,
    /// at start and on `scap pull`; objects are fetched from them too. None:
    /// the host changes only when a controller tells it to.
    pub sources: Vec<String>,
    /// Bytes per second for everything this host fetches (`--max-fetch-rate`).
    pub max_fetch_rate: Option<u64>,
    /// Requests in flight to the sources at once.
    pub fetch_parallel: usize,
    /// Ask for delta packs first (cacheable); off: objects only.
    pub packs: bool,
    /// A source that delivers no object this host lacks for this long is
    /// skipped for the rest of the sync (`--source-stall-timeout`).
    pub source_stall: Duration,
}

impl AgentConfig {
    fn check(&self) -> Result<(), AgentError> {
        let bad = |what: &str, why: String| Err(AgentError::Setup(what.to_string(), why));
        if !(release::MIN_SLOTS..=release::MAX_SLOTS).contains(&self.slots) {
            return bad(
                "--slots",
                format!(
                    "{}: keep from {} (live, previous, one to prepare) to {} release slots",
                    self.slots,
                    release::MIN_SLOTS,
                    release::MAX_SLOTS
                ),
            );
        }
        if !crate::proto::valid_host_name(&self.host) {
            return bad(
                "--host",
                format!(
                    "{:?} is not a host name (letters, digits, '.', '-', '_'): give this host's name as the fleet's inventory calls it",
                    crate::text::clip(&self.host, 100)
                ),
            );
        }
        if let Err(why) = api::check_sources(
            &self.sources,
            true,
            matches!(self.transport, Transport::Insecure { .. }),
        ) {
            return bad("--source", why);
        }
        if self.trust.is_empty() && !self.allow_unsigned {
            return bad(
                "--trusted-key",
                "no trusted deploy key: give the deploy host's public key (--trusted-key FILE, from `scap keygen`), or --insecure-allow-unsigned for a lab".into(),
            );
        }
        for (component, path) in &self.links {
            if let Err(e) = TreeName::new(component.as_bytes().to_vec()) {
                return bad(
                    &format!("--link {component}={}", path.display()),
                    e.to_string(),
                );
            }
            if !path.is_absolute() {
                return bad(
                    &format!("--link {component}={}", path.display()),
                    "give an absolute path, e.g. mediawiki=/srv/mediawiki".into(),
                );
            }
        }
        Ok(())
    }
}

/// A lab host that trusts no key and runs unsigned versions: no source is
/// asked for a signature nothing could verify.
fn allow_unsigned_without_keys(cfg: &AgentConfig) -> bool {
    cfg.allow_unsigned && cfg.trust.is_empty()
}

/// The desired state an agent follows ([`Agent::desired`]).
#[derive(Debug)]
pub struct DesiredAnswer {
    pub answer: crate::proto::DesiredResponse,
    /// The source that gave it.
    pub source: String,
    /// Its order's sequence number (none on a lab host that trusts no key).
    pub seq: Option<u64>,
    /// Sources whose answer was refused or missing, with why.
    pub skipped: Vec<String>,
}

/// Totals since the agent started, for `/metrics`.
#[derive(Default)]
pub struct AgentCounters {
    pub syncs: AtomicU64,
    pub failures: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub fetched_objects: AtomicU64,
    pub last_success: AtomicU64,
    pub last_sync_ms: AtomicU64,
}

/// Garbage an agent put off collecting: gc runs when the versions it keeps
/// change, but a backport's worth of garbage waits until enough has
/// piled up ([`GC_SLACK`]) or the next maintenance, so that a switch costs
/// what changed, not a walk of every kept version and every object.
#[derive(Default)]
struct GcDebt {
    /// The versions the last gc kept, or the last decision to put it off
    /// counted; None until the first gc since the agent started.
    roots: Option<Vec<VersionId>>,
    /// Estimated bytes of files of versions dropped from the roots since the
    /// last gc (an upper bound: some may be in versions kept).
    bytes: u64,
}

/// Estimated garbage past which gc runs at once rather than at the next
/// maintenance: a bound on the disk a string of backports can leave behind.
pub const GC_SLACK: u64 = 256 << 20;

pub struct Agent {
    pub cfg: AgentConfig,
    pub store: Store,
    /// Kept for the agent's life: connections and TLS sessions to sources
    /// are reused from one sync to the next.
    fetch_http: reqwest::Client,
    releases: Releases,
    state: Mutex<HostState>,
    pub counters: AgentCounters,
    /// The last drift check of the live release (a re-hash at start, on
    /// schedule and on every `GET /v1/verify`; the deploy's check at each
    /// switch), for the fleet's status.
    last_drift: Mutex<Option<DriftSummary>>,
    /// gc's last roots and the garbage put off since ([`Agent::collect_garbage`]).
    gc: Mutex<GcDebt>,
    /// The slot that was live before the last switch.
    previous_slot: Mutex<Option<String>>,
    fetch_limit: Option<std::sync::Arc<crate::net::ratelimit::RateLimit>>,
    /// The version last staged (`POST /v1/stage`): the work after a switch
    /// leaves its slot alone.
    staged: Mutex<Option<VersionId>>,
    /// Background work that only checks or frees space runs: the tail of
    /// the work after a switch (gc, emptying the trash), or maintenance.
    /// Nothing a deploy needs is left in it, so a deploy arriving cancels
    /// it rather than wait ([`Agent::yields_to_deploys`]).
    tail: std::sync::atomic::AtomicBool,
}

impl Agent {
    pub fn open(cfg: AgentConfig) -> Result<Agent, AgentError> {
        cfg.check()?;
        let setup = |what: &Path, e: &dyn std::fmt::Display| {
            AgentError::Setup(what.display().to_string(), e.to_string())
        };
        std::fs::create_dir_all(&cfg.dir).map_err(|e| setup(&cfg.dir, &e))?;
        let store = Store::open_or_init(&cfg.dir.join("store"), Role::Host)?;
        let releases = Releases::new(&cfg.dir, cfg.slots)?;
        let state_path = cfg.dir.join("state.json");
        let state = HostState::load(&state_path)?.unwrap_or_else(|| HostState::new(&cfg.host));
        let fetch_http = crate::net::client::http_client(&cfg.transport)
            .map_err(|e| AgentError::Setup("TLS".into(), e.to_string()))?;
        let cfg_limit = cfg
            .max_fetch_rate
            .map(|r| std::sync::Arc::new(crate::net::ratelimit::RateLimit::new(r)));
        let agent = Agent {
            cfg,
            store,
            fetch_http,
            releases,
            state: Mutex::new(state),
            counters: AgentCounters::default(),
            last_drift: Mutex::new(None),
            gc: Mutex::new(GcDebt::default()),
            previous_slot: Mutex::new(None),
            fetch_limit: cfg_limit,
            staged: Mutex::new(None),
            tail: std::sync::atomic::AtomicBool::new(false),
        };
        agent.reconcile()?;
        agent.make_links()?;
        Ok(agent)
    }

    fn state_path(&self) -> PathBuf {
        self.cfg.dir.join("state.json")
    }

    pub fn state(&self) -> HostState {
        self.state.lock().expect("not poisoned").clone()
    }

    pub fn slots(&self) -> Vec<release::Slot> {
        self.releases.list()
    }

    /// The `current` symlink is the truth; make the state file agree with
    /// it (after a crash between the switch and the state write).
    fn reconcile(&self) -> Result<(), AgentError> {
        let live = release::live_slot(&self.cfg.dir).map(|s| self.releases.meta(&s));
        let mut st = self.state.lock().expect("not poisoned");
        let live_version = live.as_ref().and_then(|m| m.version.filter(|_| m.clean));
        if st.current.as_ref().map(|d| d.version) != live_version {
            let from = st.current.as_ref().map(|d| d.version);
            if let Some(v) = live_version {
                st.previous = st.current.take();
                st.current = Some(Deployed {
                    version: v,
                    since: unix_now(),
                    by: "scap agent (repair)".into(),
                    // The replay floor: a sync to a version built before
                    // this one stays refused after the repair.
                    signed_time: self.stored_signed_time(&v),
                });
            } else {
                st.current = None;
            }
            st.record(Event::new(Action::Repair, live_version, from, "scap agent"));
        }
        st.host = self.cfg.host.clone();
        st.save(&self.state_path())?;
        Ok(())
    }

    /// When `v` was built, by the signature kept with it, if a key trusted
    /// now vouches for it.
    fn stored_signed_time(&self, v: &VersionId) -> Option<u64> {
        let doc = self.store.signature(v).ok()??;
        match self.cfg.trust.verify(v, Some(&doc)) {
            Ok(verified) => Some(verified.statement.time),
            Err(e) => {
                tracing::warn!(
                    "the live version {} has no signature a trusted key vouches for ({e}): until the next switch, no replay floor",
                    v.short()
                );
                None
            }
        }
    }

    /// Makes each deploy path a symlink into `DIR/current`, replacing an
    /// older link in one rename (the path never goes missing).
    fn make_links(&self) -> Result<(), AgentError> {
        for (component, link) in &self.cfg.links {
            let target = self.cfg.dir.join("current").join(component);
            let setup = |e: &dyn std::fmt::Display| {
                AgentError::Setup(link.display().to_string(), e.to_string())
            };
            match std::fs::symlink_metadata(link) {
                Ok(m) if m.file_type().is_symlink() => {
                    if std::fs::read_link(link).ok().as_deref() == Some(target.as_path()) {
                        continue;
                    }
                }
                Ok(_) => {
                    return Err(setup(
                        &"exists and is not a symlink: move it aside once, then scap owns it",
                    ));
                }
                Err(_) => {}
            }
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent).map_err(|e| setup(&e))?;
            }
            release::replace_symlink(&target, link).map_err(|e| setup(&e))?;
        }
        Ok(())
    }

    /// Syncs this host to `req.version`: fetch what is missing, prepare a
    /// release, run hooks, switch. Blocking; `rt` drives the HTTP client.
    pub fn sync(
        &self,
        req: &SyncRequest,
        rt: &tokio::runtime::Handle,
        cancel: &Cancel,
    ) -> Result<Outcome, AgentError> {
        let started = Instant::now();
        let from = self.state().current.map(|d| d.version);
        if from == Some(req.version)
            && let Some(live) = release::live_slot(&self.cfg.dir)
            && self.releases.meta(&live).clean
            && self.releases.meta(&live).version == Some(req.version)
        {
            return Ok(self.noop(req.version, from, live, started));
        }
        let result = self
            .take_order(req.order.as_ref(), &req.version, "sync")
            .and_then(|ordered| self.sync_inner(req, rt, started, ordered, cancel));
        self.finish(
            Action::Sync,
            Some(req.version),
            from,
            &req.by,
            started,
            &result,
        );
        result
    }

    fn noop(
        &self,
        v: VersionId,
        from: Option<VersionId>,
        slot: String,
        started: Instant,
    ) -> Outcome {
        Outcome {
            host: self.cfg.host.clone(),
            version: v,
            from,
            noop: true,
            slot,
            how: How::AlreadyThere,
            fetched: Fetched::default(),
            files_written: 0,
            files_linked: 0,
            repaired: 0,
            files_checked: 0,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// Checks the deploy order a request carries: `Ok(true)` if it is an
    /// order, signed by a trusted key, for this host to `action` `version`,
    /// and newer than the newest order this host took (it becomes the
    /// newest); `Ok(false)` without one (an older controller, or a lab
    /// host that trusts no key), when the version's own signed time guards
    /// against a replay instead.
    fn take_order(
        &self,
        order: Option<&SignedOrder>,
        version: &VersionId,
        action: &str,
    ) -> Result<bool, AgentError> {
        let Some(doc) = order else {
            return Ok(false);
        };
        if self.cfg.trust.is_empty() {
            return Ok(false);
        }
        let o = self
            .cfg
            .trust
            .verify_order(doc, &self.cfg.host, version, action)
            .map_err(|source| AgentError::Signature {
                host: self.cfg.host.clone(),
                source,
            })?;
        let mut st = self.state.lock().expect("not poisoned");
        // Every order is used once: the deploy host never sends one twice.
        if o.seq <= st.order_seq {
            return Err(AgentError::Refused(format!(
                "host {}: the deploy order to {action} {} (#{}) is not newer than the newest this host took (#{}): a replayed or stale request is refused; the deploy host's newer command stands",
                self.cfg.host,
                version.short(),
                o.seq,
                st.order_seq
            )));
        }
        st.order_seq = o.seq;
        if action != "stage" {
            st.switch_seq = o.seq;
        }
        // Durable before the order is acted on: a restart never reopens it.
        st.save(&self.state_path())?;
        Ok(true)
    }

    /// Fetches `req.version` and switches to it. `may_go_back`: a version
    /// built before the one that runs is allowed (a deploy order newer than
    /// any this host took, a rollback, or the deploy host's desired state
    /// after one), not refused as a replay.
    fn sync_inner(
        &self,
        req: &SyncRequest,
        rt: &tokio::runtime::Handle,
        started: Instant,
        may_go_back: bool,
        cancel: &Cancel,
    ) -> Result<Outcome, AgentError> {
        let client = self.fetch_client(&req.sources);
        // Before fetching anything: nothing is fetched for a version this
        // host must refuse.
        let (signed_time, doc) = self.check_signature(
            &req.version,
            req.signature.clone(),
            &client,
            rt,
            may_go_back,
            cancel,
        )?;
        let seconds = req
            .fetch_timeout_seconds
            .unwrap_or(DEFAULT_FETCH_TIMEOUT)
            .clamp(1, 7 * 24 * 3600);
        let writer = self.store.writer()?;
        // A release written from nothing (a fresh host) is written while
        // the pack arrives, on threads of its own: it waits for what has
        // not come yet, and the fetch keeps within a few segments of it
        // (`fetch::Arrivals`).
        let arrivals = fetch::Arrivals::default();
        let (fetched, early) = std::thread::scope(|scope| {
            let early =
                self.write_while_fetching(scope, writer.store(), &req.version, &arrivals, cancel);
            let ended = fetch::EndOnDrop(&arrivals);
            let fetched = rt.block_on(async {
                tokio::select! {
                    r = tokio::time::timeout(
                        Duration::from_secs(seconds),
                        self.fetch(&client, &writer, &req.version, Some(&arrivals)),
                    ) => match r {
                        Ok(r) => r.map_err(|source| match source {
                            FetchError::Store(e @ StoreError::Cancelled(_)) => AgentError::Store(e),
                            source => AgentError::Fetch {
                                version: req.version,
                                source: Box::new(source),
                            },
                        }),
                        Err(_) => Err(AgentError::FetchTimeout { version: req.version, seconds }),
                    },
                    () = cancel.cancelled() => Err(StoreError::Cancelled(cancel.why()).into()),
                }
            });
            drop(ended);
            tracing::debug!("fetch ended after {:?}", started.elapsed());
            let early = early.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            (fetched, early.flatten())
        });
        let fetched = fetched?;
        crate::failpoint::hit("agent:fetched");
        // Held until the release that references the objects is written
        // and switched to: the store's gc cannot run in between.
        let _committed = writer.commit()?;
        tracing::debug!(
            "fetched {} trees, {} chunks in {:?}",
            fetched.trees,
            fetched.chunks,
            started.elapsed()
        );
        self.counters
            .fetched_bytes
            .fetch_add(fetched.bytes, Ordering::Relaxed);
        self.counters
            .fetched_objects
            .fetch_add(fetched.trees + fetched.chunks, Ordering::Relaxed);
        // Kept, so that a rollback to this version re-checks it offline.
        if let Some(doc) = &doc {
            self.store.write_signature(&req.version, doc)?;
        }
        let ready = match early {
            Some(Ok(p)) => {
                // Its objects are durable now (committed above).
                self.releases.mark_prepared(&req.version, &p)?;
                tracing::debug!(
                    "wrote slot {} ({} files) while fetching, done {:?} after the start",
                    p.slot,
                    p.files_written,
                    started.elapsed()
                );
                Some(p)
            }
            // Cut short: the fetch ended without an object it waited for
            // (the objects came another way) or the sync was cancelled.
            Some(Err(e @ StoreError::Cancelled(_))) => {
                tracing::debug!("the release written while fetching stopped ({e}): writing it now");
                None
            }
            // A real fault (a full disk): the slot was removed; writing it
            // again below names the fault if it is still there.
            Some(Err(e)) => {
                tracing::info!("writing the release while fetching failed ({e}): writing it now");
                None
            }
            None => None,
        };
        let mut outcome =
            self.switch_to(&req.version, &req.by, started, signed_time, cancel, ready)?;
        outcome.fetched = fetched;
        Ok(outcome)
    }

    /// Starts writing `v` into a release slot from nothing while it is
    /// fetched ([`Releases::prepare_arriving`]), when that is how its slot
    /// would be written anyway; on a thread pool of its own, whose threads
    /// may wait for objects without holding up the fetch's.
    fn write_while_fetching<'scope, 'env>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        view: &Store,
        v: &VersionId,
        arrivals: &'env fetch::Arrivals,
        cancel: &'env Cancel,
    ) -> Option<std::thread::ScopedJoinHandle<'scope, Option<Result<release::Prepared, StoreError>>>>
    {
        if !self.cfg.packs || view.has(&v.object()) {
            return None;
        }
        // A diff (a backport) builds no pool.
        let (keep, stable) = self.spared(&self.state());
        if !self
            .releases
            .writes_from_nothing(view, v, &keep, stable.as_ref())
        {
            return None;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("scap-release-{i}"))
            .build()
            .inspect_err(|e| tracing::debug!("no threads to write the release while fetching: {e}"))
            .ok()?;
        let (view, v) = (view.clone(), *v);
        Some(scope.spawn(move || {
            let _writing = arrivals.writing();
            let t = Instant::now();
            let r = pool.install(|| {
                self.releases
                    .prepare_arriving(&view, &v, &keep, stable.as_ref(), cancel, arrivals)
            });
            if r.is_some() {
                tracing::debug!("release written while fetching in {:?}", t.elapsed());
            }
            r
        }))
    }

    /// A client for fetching from `sources`, under this agent's bandwidth
    /// cap and per-source parallelism.
    fn fetch_client(&self, sources: &[String]) -> Client {
        Client::new(self.fetch_http.clone(), sources)
            .with_limits(self.fetch_limit.clone(), self.cfg.fetch_parallel)
            .with_stall(self.cfg.source_stall)
    }

    /// Brings `v`'s objects into the store: its delta pack from what this
    /// host runs (cacheable: hosts moving between the same versions ask for
    /// the same URL), then whatever is still missing, object by object.
    async fn fetch(
        &self,
        client: &Client,
        writer: &crate::store::disk::Writer<'_>,
        v: &VersionId,
        arrivals: Option<&fetch::Arrivals>,
    ) -> Result<Fetched, FetchError> {
        let before = (
            client.stats.bytes.load(Ordering::Relaxed),
            client.stats.requests.load(Ordering::Relaxed),
        );
        let mut pack = (false, 0, 0);
        if self.cfg.packs {
            let from = self
                .state()
                .current
                .map(|d| d.version)
                .filter(|c| self.store.has(&c.object()));
            match fetch::fetch_pack(client, writer, from.as_ref(), v, arrivals).await {
                Ok(p) => pack = p,
                Err(e @ FetchError::Store(_)) => return Err(e),
                Err(e) => tracing::info!("no delta pack ({e}): fetching objects"),
            }
        }
        let mut f = fetch::fetch_version(client, writer, v).await?;
        f.pack = pack.0;
        f.trees += pack.1;
        f.chunks += pack.2;
        f.bytes = client.stats.bytes.load(Ordering::Relaxed) - before.0;
        f.requests = client.stats.requests.load(Ordering::Relaxed) - before.1;
        f.by_source = client.per_source();
        f.skipped = client.dropped();
        Ok(f)
    }

    /// Fetches and checks `v`'s signature: `(when it was built, the
    /// signatures)` if a trusted key vouches for it and it is not older
    /// than what runs here (a replay); `(None, _)` for an unsigned version
    /// on a lab host that allows them. The controller's copy (`given`) is
    /// taken if it verifies; otherwise the first source whose copy does
    /// (a source whose copy does not is skipped and named).
    fn check_signature(
        &self,
        v: &VersionId,
        given: Option<SignedVersion>,
        client: &Client,
        rt: &tokio::runtime::Handle,
        may_go_back: bool,
        cancel: &Cancel,
    ) -> Result<(Option<u64>, Option<SignedVersion>), AgentError> {
        let (verified, doc) = match given.map(|doc| (self.cfg.trust.verify(v, Some(&doc)), doc)) {
            Some((Ok(verified), doc)) => (Some(verified), Some(doc)),
            given => {
                let kept = match &given {
                    Some((Err(e), _)) => Some(e.to_string()),
                    _ => None,
                };
                match self.signature_from(client, v, rt, cancel, kept)? {
                    Some((doc, verified)) => (verified, Some(doc)),
                    None => (None, given.map(|(_, doc)| doc)),
                }
            }
        };
        let Some(verified) = verified else {
            // Only on a lab host: `signature_from` refuses otherwise.
            tracing::warn!(
                "running version {} without a trusted signature (--insecure-allow-unsigned)",
                v.short()
            );
            return Ok((None, doc));
        };
        let st = self.state();
        if !may_go_back
            && let Some(cur) = &st.current
            && let Some(cur_time) = cur.signed_time
            && verified.statement.time < cur_time
        {
            return Err(AgentError::Refused(format!(
                "host {}: version {} was built at {}, before the version this host runs ({}, built at {}): a sync never goes back in time (a replayed old version?); to return to it on purpose, run `scap rollback --to {}`",
                self.cfg.host,
                v.short(),
                crate::time::fmt_utc(verified.statement.time),
                cur.version.short(),
                crate::time::fmt_utc(cur_time),
                v.short()
            )));
        }
        Ok((Some(verified.statement.time), doc))
    }

    /// `v`'s signature from the first of `client`'s sources whose copy a
    /// key trusted now vouches for (`kept`: why the one at hand is
    /// refused, for the error; none: there is none at hand). `Ok(None)`
    /// only on a lab host that allows unsigned versions and found no
    /// trusted signature.
    fn signature_from(
        &self,
        client: &Client,
        v: &VersionId,
        rt: &tokio::runtime::Handle,
        cancel: &Cancel,
        kept: Option<String>,
    ) -> Result<Option<(SignedVersion, Option<Verified>)>, AgentError> {
        if allow_unsigned_without_keys(&self.cfg) {
            return Ok(None);
        }
        let allow = self.cfg.allow_unsigned;
        let check = |doc: &SignedVersion| match self.cfg.trust.verify(v, Some(doc)) {
            Ok(verified) => Ok(Some(verified)),
            Err(_) if allow => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        let refused = |sources: String| AgentError::Signature {
            host: self.cfg.host.clone(),
            source: match &kept {
                None if sources.is_empty() => SignatureError::Unsigned { version: *v },
                _ => SignatureError::NoneAccepted {
                    version: *v,
                    kept: kept
                        .clone()
                        .unwrap_or_else(|| "the deploy host sent no signature".into()),
                    sources,
                },
            },
        };
        if client.sources().is_empty() {
            return if allow {
                Ok(None)
            } else {
                Err(refused("no source to ask for another".into()))
            };
        }
        let found = rt.block_on(async {
            tokio::select! {
                r = client.signature(v, check) => r,
                () = cancel.cancelled() => Err(FetchError::Store(StoreError::Cancelled(cancel.why()))),
            }
        });
        match found {
            Ok(Some(found)) => Ok(Some(found)),
            Ok(None) if allow => Ok(None),
            // Nobody has one: unsigned (or only the copy at hand, refused).
            Ok(None) if kept.is_none() => Err(refused(String::new())),
            Ok(None) => Err(refused(format!(
                "no source has another ({})",
                client.sources().join(", ")
            ))),
            Err(FetchError::Store(e)) => Err(e.into()),
            Err(e) if allow => {
                tracing::warn!("{e}");
                Ok(None)
            }
            Err(e) => Err(refused(e.to_string())),
        }
    }

    /// Re-checks the signature kept with `v` since it was synced, against
    /// the keys trusted now; when it no longer passes (a key rotated and
    /// the old one revoked since), asks `sources` for one that does and
    /// keeps it. When it was built, if signed.
    fn check_local_signature(
        &self,
        v: &VersionId,
        sources: &[String],
        rt: &tokio::runtime::Handle,
        cancel: &Cancel,
    ) -> Result<Option<u64>, AgentError> {
        let doc = self.store.signature(v)?;
        let kept = match self.cfg.trust.verify(v, doc.as_ref()) {
            Ok(verified) => return Ok(Some(verified.statement.time)),
            Err(e) => e,
        };
        let client = self.fetch_client(sources);
        let kept = format!("the signature kept on this host: {kept}");
        match self.signature_from(&client, v, rt, cancel, Some(kept))? {
            Some((doc, Some(verified))) => {
                tracing::info!(
                    "version {}: the signature kept here no longer verifies; took one by key {} from the sources",
                    v.short(),
                    verified.key
                );
                self.store.write_signature(v, &doc)?;
                Ok(Some(verified.statement.time))
            }
            _ => {
                tracing::warn!(
                    "switching to version {} without a trusted signature (--insecure-allow-unsigned)",
                    v.short()
                );
                Ok(None)
            }
        }
    }

    /// Rolls back to the previous or stable release, or a given version:
    /// a switch when this host holds it; otherwise (the old train with a
    /// change made since) a fetch from `sources`, if given.
    pub fn rollback(
        &self,
        req: &RollbackRequest,
        rt: &tokio::runtime::Handle,
        cancel: &Cancel,
    ) -> Result<Outcome, AgentError> {
        let started = Instant::now();
        let st = self.state();
        let from = st.current.as_ref().map(|d| d.version);
        let to = req.to;
        let by = req.by.as_str();
        let target = match to {
            RollbackTarget::Previous => st.previous.as_ref().map(|d| d.version),
            RollbackTarget::Stable => st.stable.as_ref().map(|d| d.version),
            RollbackTarget::Version(v) => Some(v),
        };
        let Some(target) = target else {
            return Err(AgentError::Refused(format!(
                "host {}: no {to} version recorded: name a version with --to",
                self.cfg.host
            )));
        };
        if let RollbackTarget::Version(v) = to {
            self.take_order(req.order.as_ref(), &v, "rollback")?;
        }
        if from == Some(target) {
            let slot = release::live_slot(&self.cfg.dir).unwrap_or_default();
            return Ok(self.noop(target, from, slot, started));
        }
        let local = self.releases.find(&target).is_some() || self.store.has(&target.object());
        let result = if local {
            // A rollback may go back in time, but only to a version a key
            // trusted now still vouches for.
            let sources = if req.sources.is_empty() {
                &self.cfg.sources
            } else {
                &req.sources
            };
            self.check_local_signature(&target, sources, rt, cancel)
                .and_then(|signed_time| {
                    self.switch_to(&target, by, started, signed_time, cancel, None)
                })
        } else if req.sources.is_empty() {
            return Err(AgentError::Refused(format!(
                "host {}: version {} is not on this host (not in a release or the local store): sync to it instead",
                self.cfg.host,
                target.short()
            )));
        } else {
            let sync = SyncRequest {
                version: target,
                sources: req.sources.clone(),
                by: req.by.clone(),
                fetch_timeout_seconds: None,
                signature: None,
                order: None,
            };
            self.sync_inner(&sync, rt, started, true, cancel)
        };
        self.finish(Action::Rollback, Some(target), from, by, started, &result);
        result
    }

    /// Stages `req.version`: fetches it and prepares a release slot with
    /// it, without switching; a later sync to it is only a switch. Refused
    /// like a sync (signature, replay). The work after a switch leaves the
    /// staged slot alone.
    pub fn stage(
        &self,
        req: &SyncRequest,
        rt: &tokio::runtime::Handle,
        cancel: &Cancel,
    ) -> Result<Outcome, AgentError> {
        let started = Instant::now();
        let st = self.state();
        let from = st.current.as_ref().map(|d| d.version);
        if from == Some(req.version) {
            let slot = release::live_slot(&self.cfg.dir).unwrap_or_default();
            return Ok(self.noop(req.version, from, slot, started));
        }
        if let Some(slot) = self.releases.find(&req.version) {
            *self.staged.lock().expect("not poisoned") = Some(req.version);
            return Ok(self.noop(req.version, from, slot, started));
        }
        let result: Result<Outcome, AgentError> = (|| {
            let ordered = self.take_order(req.order.as_ref(), &req.version, "stage")?;
            let client = self.fetch_client(&req.sources);
            let (_, doc) = self.check_signature(
                &req.version,
                req.signature.clone(),
                &client,
                rt,
                ordered,
                cancel,
            )?;
            let writer = self.store.writer()?;
            let fetched = rt.block_on(async {
                tokio::select! {
                    r = self.fetch(&client, &writer, &req.version, None) => r.map_err(|source| match source {
                        FetchError::Store(e @ StoreError::Cancelled(_)) => AgentError::Store(e),
                        source => AgentError::Fetch { version: req.version, source: Box::new(source) },
                    }),
                    () = cancel.cancelled() => Err(StoreError::Cancelled(cancel.why()).into()),
                }
            })?;
            let _committed = writer.commit()?;
            if let Some(doc) = &doc {
                self.store.write_signature(&req.version, doc)?;
            }
            let st = self.state();
            let (keep, stable) = self.spared(&st);
            let prepared =
                self.releases
                    .prepare(&self.store, &req.version, &keep, stable.as_ref(), cancel)?;
            *self.staged.lock().expect("not poisoned") = Some(req.version);
            // The slot just written is un-watched: watch it now, still off
            // the deploy's path, so that the switch to it checks only what
            // changed since (else every file). The staged slot stands
            // whatever happens to this.
            if let Err(e) = self.releases.watch_slots(&self.store, cancel) {
                tracing::info!(
                    "staged {} in slot {}; watching it stopped: {e}",
                    req.version.short(),
                    prepared.slot
                );
            }
            Ok(Outcome {
                host: self.cfg.host.clone(),
                version: req.version,
                from,
                noop: false,
                slot: prepared.slot,
                how: prepared.how,
                fetched,
                files_written: prepared.files_written,
                files_linked: prepared.files_linked,
                repaired: prepared.repaired,
                files_checked: prepared.files_checked,
                seconds: started.elapsed().as_secs_f64(),
            })
        })();
        let mut e = Event::new(Action::Stage, Some(req.version), from, &req.by);
        e.seconds = started.elapsed().as_secs_f64();
        if let Err(err) = &result {
            e.ok = false;
            e.error = Some(crate::text::clip(&err.to_string(), 500));
        }
        let mut st = self.state.lock().expect("not poisoned");
        st.record(e);
        if let Err(e) = st.save(&self.state_path()) {
            tracing::error!("cannot record the stage in the state file: {e}");
        }
        result
    }

    /// Converges to `target` (the deploy host's desired state for this
    /// host), fetching from `sources`: may go back in time (a host that was
    /// down during a rollback), but only to a version a trusted key signed.
    pub fn converge(
        &self,
        target: VersionId,
        sources: &[String],
        by: &str,
        rt: &tokio::runtime::Handle,
        cancel: &Cancel,
    ) -> Result<Outcome, AgentError> {
        let started = Instant::now();
        let from = self.state().current.map(|d| d.version);
        if from == Some(target)
            && let Some(live) = release::live_slot(&self.cfg.dir)
            && self.releases.meta(&live).clean
        {
            return Ok(self.noop(target, from, live, started));
        }
        let req = SyncRequest {
            version: target,
            sources: sources.to_vec(),
            by: by.to_string(),
            fetch_timeout_seconds: None,
            signature: None,
            order: None,
        };
        let result = self.sync_inner(&req, rt, started, true, cancel);
        self.finish(Action::Pull, Some(target), from, by, started, &result);
        result
    }

    /// What the deploy host says this host should run, asked of every
    /// `--source` at once: of the answers whose order a trusted key signed
    /// for this host (any answer, on a lab host that trusts no key), the
    /// newest. Sources that gave no such answer are named in `skipped`.
    pub fn desired(
        &self,
        rt: &tokio::runtime::Handle,
        cancel: &Cancel,
    ) -> Result<DesiredAnswer, AgentError> {
        let host = &self.cfg.host;
        if self.cfg.sources.is_empty() {
            return Err(AgentError::Refused(format!(
                "host {host}: no deploy host to ask: start the agent with --source https://DEPLOY-HOST:8469"
            )));
        }
        let client = Client::new(self.fetch_http.clone(), &self.cfg.sources);
        let answers = rt.block_on(async {
            tokio::select! {
                a = client.desired_all(host) => Ok(a),
                () = cancel.cancelled() => Err(AgentError::from(StoreError::Cancelled(cancel.why()))),
            }
        })?;
        let mut best: Option<DesiredAnswer> = None;
        let mut skipped = Vec::new();
        for (source, answer) in answers {
            let d = match answer {
                Ok(d) => d,
                Err(why) => {
                    skipped.push(why);
                    continue;
                }
            };
            let seq = match (&d.version, &d.order) {
                // "No target": it moves nothing, whoever says it.
                (None, _) => None,
                (Some(_), _) if self.cfg.trust.is_empty() => None,
                (Some(_), None) => {
                    skipped.push(format!(
                        "{source}: its desired state for this host is not signed by the deploy key: ignored (on the deploy host, `scap sign --desired` signs the targets)"
                    ));
                    continue;
                }
                (Some(v), Some(order)) => {
                    match self.cfg.trust.verify_order(order, host, v, DESIRED_ACTION) {
                        Ok(o) => Some(o.seq),
                        Err(e) => {
                            skipped.push(format!("{source}: its desired state is refused: {e}"));
                            continue;
                        }
                    }
                }
            };
            let better = match &best {
                None => true,
                Some(b) => seq > b.seq || (b.answer.version.is_none() && d.version.is_some()),
            };
            if better {
                best = Some(DesiredAnswer {
                    answer: d,
                    source,
                    seq,
                    skipped: Vec::new(),
                });
            }
        }
        for s in &skipped {
            tracing::warn!("host {host}: asking what to run: {s}");
        }
        match best {
            Some(mut b) => {
                b.skipped = skipped;
                Ok(b)
            }
            None => Err(AgentError::Refused(format!(
                "host {host}: no source said what to run in a way this host accepts: {}",
                skipped.join("; ")
            ))),
        }
    }

    /// Takes the desired state's order number `seq` as the newest that
    /// decided what this host runs, if no such order it took is newer
    /// (a sync, a rollback, a desired target; a stage only prepares, and
    /// does not hide a target set before it): `false` (nothing changes)
    /// when one is (a stale or replayed answer). The same desired order
    /// may be taken again: it is the same decision, and a pull that failed
    /// half-way (a source down) must be able to try again.
    pub fn take_desired(&self, seq: u64) -> Result<bool, AgentError> {
        let mut st = self.state.lock().expect("not poisoned");
        if seq < st.switch_seq {
            return Ok(false);
        }
        if seq == st.switch_seq {
            return Ok(true);
        }
        st.switch_seq = seq;
        st.order_seq = st.order_seq.max(seq);
        st.save(&self.state_path())?;
        Ok(true)
    }

    /// Records `v` as this host's last stable version; it must be live.
    pub fn promote(&self, v: &VersionId, by: &str) -> Result<HostState, AgentError> {
        let mut st = self.state.lock().expect("not poisoned");
        if st.current.as_ref().map(|d| d.version) != Some(*v) {
            return Err(AgentError::Refused(format!(
                "host {} runs {}, not {}: sync it first",
                self.cfg.host,
                st.current
                    .as_ref()
                    .map(|d| d.version.short())
                    .unwrap_or_else(|| "nothing".into()),
                v.short()
            )));
        }
        st.stable = Some(Deployed {
            version: *v,
            since: unix_now(),
            by: by.to_string(),
            signed_time: st.current.as_ref().and_then(|d| d.signed_time),
        });
        st.record(Event::new(Action::Promote, Some(*v), None, by));
        st.save(&self.state_path())?;
        Ok(st.clone())
    }

    /// Runs the restart command (`POST /v1/restart`): the new code runs
    /// once it succeeds. Its failure is the caller's to report; the host
    /// stays on its version either way.
    pub fn restart(
        &self,
        by: &str,
        cancel: &Cancel,
    ) -> Result<crate::proto::RestartOutcome, AgentError> {
        let started = Instant::now();
        let Some(cmd) = &self.cfg.restart else {
            return Err(AgentError::Refused(format!(
                "host {}: no restart command configured: start the agent with --restart-command 'CMD'",
                self.cfg.host
            )));
        };
        let st = self.state();
        let cur = st.current.as_ref().map(|d| d.version);
        let dir = release::live_slot(&self.cfg.dir)
            .map(|s| self.releases.path(&s))
            .unwrap_or_default();
        let mut env = match &cur {
            Some(v) => self.hook_env(v, st.previous.as_ref().map(|d| &d.version), &dir),
            None => vec![("SCAP_HOST", self.cfg.host.clone())],
        };
        if let Some(v) = &cur
            && let Some((path, n)) = self.changed_since_restart(&st, v)
        {
            env.push(("SCAP_CHANGED_FILES", path.display().to_string()));
            env.push(("SCAP_CHANGED_COUNT", n.to_string()));
        }
        let result = hooks::run(cmd, &env, self.cfg.hook_timeout, cancel);
        let seconds = started.elapsed().as_secs_f64();
        let mut e = Event::new(Action::Restart, cur, None, by);
        e.seconds = seconds;
        let outcome = match result {
            Ok(()) => crate::proto::RestartOutcome {
                host: self.cfg.host.clone(),
                ok: true,
                status: "exit status 0".into(),
                output: String::new(),
                seconds,
            },
            Err(f) => {
                e.ok = false;
                e.error = Some(crate::text::clip(
                    &format!("{}: {}", f.status, f.output),
                    500,
                ));
                crate::proto::RestartOutcome {
                    host: self.cfg.host.clone(),
                    ok: false,
                    status: f.status,
                    output: crate::text::clip(&f.output, 2000),
                    seconds,
                }
            }
        };
        let mut st = self.state.lock().expect("not poisoned");
        st.record(e);
        if let Err(e) = st.save(&self.state_path()) {
            tracing::error!("cannot record the restart in the state file: {e}");
        }
        Ok(outcome)
    }

    /// The files that changed since the code last ran (the version of the
    /// last successful restart) up to `v`, as paths through the deploy
    /// links (`/srv/mediawiki/wmf-config/x.php`), one a line, in
    /// `DIR/restart-changed.txt` (`DIR/current/COMPONENT/...` for a
    /// component with no link): what a restart command that only resets
    /// opcache for those files reads. None (the command must restart
    /// everything) when no restart is on record, the store lacks that
    /// version, or the list would be longer than [`MAX_CHANGED_LISTED`].
    fn changed_since_restart(&self, st: &HostState, v: &VersionId) -> Option<(PathBuf, usize)> {
        let since = st
            .history
            .iter()
            .rev()
            .find(|e| e.action == Action::Restart && e.ok)
            .and_then(|e| e.version)?;
        let mut lines = String::new();
        let mut n = 0usize;
        let r = crate::store::diff::diff(&self.store, &since.root(), &v.root(), &mut |c| {
            n += 1;
            if n > MAX_CHANGED_LISTED {
                // Stops the walk: the list would be too long to be of use.
                return Err(StoreError::UnknownVersion(v.to_hex()));
            }
            let (component, rest) = match c.path.iter().position(|&b| b == b'/') {
                Some(i) => (&c.path[..i], &c.path[i + 1..]),
                None => (&c.path[..], &b""[..]),
            };
            // Through its deploy link, else through DIR/current.
            let mut p = match self
                .cfg
                .links
                .iter()
                .find(|(name, _)| name.as_bytes() == component)
            {
                Some((_, link)) => link.as_os_str().as_bytes().to_vec(),
                None => {
                    let mut p = self.cfg.dir.join("current").as_os_str().as_bytes().to_vec();
                    p.push(b'/');
                    p.extend_from_slice(component);
                    p
                }
            };
            if !rest.is_empty() {
                p.push(b'/');
                p.extend_from_slice(rest);
            }
            // A name with a newline cannot be one line of the list.
            if !p.contains(&b'\n') {
                lines.push_str(&String::from_utf8_lossy(&p));
                lines.push('\n');
            }
            Ok(())
        });
        if r.is_err() {
            return None;
        }
        let path = self.cfg.dir.join("restart-changed.txt");
        std::fs::write(&path, lines).ok()?;
        Some((path, n))
    }

    /// Records that an operation was cancelled, and by whom.
    pub fn record_cancel(&self, what: &str, by: &str) {
        let mut st = self.state.lock().expect("not poisoned");
        let cur = st.current.as_ref().map(|d| d.version);
        let mut e = Event::new(Action::Cancel, cur, None, by);
        e.error = Some(crate::text::clip(what, 200));
        st.record(e);
        if let Err(e) = st.save(&self.state_path()) {
            tracing::error!("cannot record the cancel in the state file: {e}");
        }
    }

    fn hook_env(&self, v: &VersionId, prev: Option<&VersionId>, dir: &Path) -> Vec<(&str, String)> {
        vec![
            ("SCAP_VERSION", v.to_hex()),
            (
                "SCAP_PREVIOUS_VERSION",
                prev.map(|p| p.to_hex()).unwrap_or_default(),
            ),
            ("SCAP_RELEASE_DIR", dir.display().to_string()),
            ("SCAP_HOST", self.cfg.host.clone()),
        ]
    }

    /// Prepares a release of `v` (from the local store) and switches to it.
    fn switch_to(
        &self,
        v: &VersionId,
        by: &str,
        started: Instant,
        signed_time: Option<u64>,
        cancel: &Cancel,
        ready: Option<release::Prepared>,
    ) -> Result<Outcome, AgentError> {
        let st = self.state();
        let (keep, stable) = self.spared(&st);
        let phase = Instant::now();
        let prepared = match ready {
            Some(p) => p,
            None => self
                .releases
                .prepare(&self.store, v, &keep, stable.as_ref(), cancel)?,
        };
        tracing::debug!(
            "prepared slot {} ({}, {} files) in {:?}",
            prepared.slot,
            prepared.how,
            prepared.files_written,
            phase.elapsed()
        );
        let release_dir = self.releases.path(&prepared.slot);
        let from = st.current.as_ref().map(|d| d.version);
        if let Some(hook) = &self.cfg.pre_switch {
            let env = self.hook_env(v, from.as_ref(), &release_dir);
            hooks::run(hook, &env, self.cfg.hook_timeout, cancel).map_err(|f| {
                AgentError::Hook {
                    status: f.status,
                    current: from.map(|v| v.short()).unwrap_or_else(|| "nothing".into()),
                    output: f.output,
                }
            })?;
        }
        // The last point where a cancel leaves the host as it was.
        cancel.check()?;
        crate::failpoint::hit("agent:prepared");
        let was_live = release::live_slot(&self.cfg.dir);
        release::switch(&self.cfg.dir, &prepared.slot)?;
        crate::failpoint::hit("agent:switched");
        // The host runs `v` from here on: what fails below is reported in
        // the log, not as a failed sync (the controller would then count a
        // switched host as unchanged).
        *self.previous_slot.lock().expect("not poisoned") = was_live;
        // A slot this operation wrote was stamped then; one it found ready
        // (staged, or a rollback's) is stamped now.
        if prepared.how == release::How::Reused
            && let Err(e) = self.releases.touch(&prepared.slot)
        {
            tracing::warn!("{e}");
        }
        {
            // Saved with the operation's record ([`Agent::finish`], every
            // caller's next step): one durable write instead of two. A
            // crash before it is repaired from the `current` symlink at
            // the next start ([`Agent::reconcile`]).
            let mut st = self.state.lock().expect("not poisoned");
            st.previous = st.current.take();
            st.current = Some(Deployed {
                version: *v,
                since: unix_now(),
                by: by.to_string(),
                signed_time,
            });
        }
        if let Some(hook) = &self.cfg.post_switch {
            // A rollback arriving stops it too: the rollback runs its own.
            let env = self.hook_env(v, from.as_ref(), &release_dir);
            if let Err(f) = hooks::run(hook, &env, self.cfg.hook_timeout, cancel) {
                tracing::warn!("post-switch hook failed ({}): {}", f.status, f.output);
            }
        }

        Ok(Outcome {
            host: self.cfg.host.clone(),
            version: *v,
            from,
            noop: false,
            slot: prepared.slot,
            how: prepared.how,
            fetched: Fetched::default(),
            files_written: prepared.files_written,
            files_linked: prepared.files_linked,
            repaired: prepared.repaired,
            files_checked: prepared.files_checked,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Appends the event for an operation, saves the state file (with what
    /// a switch changed in it) and counts it; a failure to save is logged
    /// (the operation's own result stands).
    fn finish(
        &self,
        action: Action,
        version: Option<VersionId>,
        from: Option<VersionId>,
        by: &str,
        started: Instant,
        result: &Result<Outcome, AgentError>,
    ) {
        let secs = started.elapsed().as_secs_f64();
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(_) => {
                self.counters
                    .last_success
                    .store(unix_now(), Ordering::Relaxed);
                self.counters
                    .last_sync_ms
                    .store((secs * 1000.0) as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut e = Event::new(action, version, from, by);
        e.seconds = secs;
        match result {
            Ok(o) => {
                e.fetched_objects = o.fetched.trees + o.fetched.chunks;
                e.fetched_bytes = o.fetched.bytes;
            }
            Err(err) => {
                e.ok = false;
                e.error = Some(err.to_string());
            }
        }
        let mut st = self.state.lock().expect("not poisoned");
        st.record(e);
        if let Err(e) = st.save(&self.state_path()) {
            tracing::error!(
                "cannot save the state file after the {action} ({e}): the host runs what {} points to, and the agent's next start repairs the state file from it",
                self.cfg.dir.join("current").display()
            );
        }
    }

    /// What a deploy leaves alone: the slots it never writes
    /// ([`Agent::protected_slots`]), and the stable version, whose slot it
    /// spares when it can.
    fn spared(&self, st: &HostState) -> (Vec<String>, Option<VersionId>) {
        (
            self.protected_slots(st),
            st.stable.as_ref().map(|d| d.version),
        )
    }

    /// Slots never written by a deploy: the live one and the previous
    /// release's (requests may still run there; rollback switches to it).
    /// The previous slot is the one that was live before the last switch
    /// (several slots may hold the same version); after a restart, any slot
    /// holding the previous version.
    fn protected_slots(&self, st: &HostState) -> Vec<String> {
        let live = release::live_slot(&self.cfg.dir);
        let remembered = self
            .previous_slot
            .lock()
            .expect("not poisoned")
            .clone()
            .filter(|s| {
                let m = self.releases.meta(s);
                m.clean
                    && m.version.is_some()
                    && m.version == st.previous.as_ref().map(|d| d.version)
            });
        let previous = remembered.or_else(|| {
            st.previous
                .as_ref()
                .and_then(|d| self.releases.find(&d.version))
        });
        live.into_iter().chain(previous).collect()
    }

    /// Work after a switch that the next deploy benefits from but this one
    /// need not wait for (the API runs it in the background; a rollback
    /// cancels it), all of it in proportion to what the deploy changed:
    /// watch the slots it changed again from their diffs, bring the spare
    /// release slot to the live version (so the next deploy writes only its
    /// own diff), leave the drift baseline of the deploy's check, and
    /// collect garbage in the local store when enough has piled up.
    pub fn after_switch(&self, cancel: &Cancel) -> Result<(), AgentError> {
        let started = Instant::now();
        // The slots the deploy changed first (from their diffs, by what
        // their watch saw: [`Releases::watch_slots`]), so that the spare's
        // check below is only of what changed in it, too.
        self.releases.watch_slots(&self.store, cancel)?;
        let st = self.state();
        // The live release as the deploy left it: every file it wrote came
        // from the store, every file it kept passed the check of what
        // changed since the last one. The scheduled re-hash
        // ([`Agent::maintain`]) sees what a `stat` cannot.
        if let Some(cur) = &st.current {
            self.note_switch_drift(cur.version);
            let mut protected = self.protected_slots(&st);
            // A staged version's slot stays as it is.
            let staged = *self.staged.lock().expect("not poisoned");
            if let Some(s) = staged.filter(|s| *s != cur.version)
                && let Some(slot) = self.releases.find(&s)
            {
                protected.push(slot);
            }
            if protected.len() >= self.cfg.slots {
                // No spare slot left this time.
            } else if let Some(p) =
                self.releases
                    .prepare_spare(&self.store, &cur.version, &protected, cancel)?
            {
                tracing::debug!(
                    "spare slot {} brought to {} ({}, {} files written, {} linked)",
                    p.slot,
                    cur.version.short(),
                    p.how,
                    p.files_written,
                    p.files_linked
                );
            }
        }
        // So that the next deploy checks only what changed since.
        self.releases.watch_slots(&self.store, cancel)?;
        // A slot that could not be watched is checked in full by the next
        // deploy: list the live version's files for it now, off its path.
        if let Some(cur) = &st.current
            && !self.releases.all_watched()
        {
            self.releases
                .prefetch_files(&self.store, &cur.version, cancel)?;
        }
        // The tail: what is left frees space only. A deploy arriving from
        // here on stops it (gc's debt and the trash carry over to the
        // next time) instead of waiting for it.
        self.yielding(|| {
            self.collect_garbage(false, cancel)?;
            self.empty_trash(cancel)
        })?;
        // What this work and the deploy before it freed goes back to the
        // system, so that the next deploy starts from what the agent holds.
        // Not at this work's start, nor when a rollback cancels it (the
        // rollback's own work after its switch trims): the rollback would
        // wait for it (malloc_trim walks every free block and cannot be
        // cancelled).
        crate::sys::trim_malloc();
        tracing::debug!("after-switch work took {:?}", started.elapsed());
        Ok(())
    }

    /// Whether the background work running is one a deploy arriving
    /// cancels rather than waits for: the tail of the work after a switch
    /// (gc, the trash), or maintenance.
    pub fn yields_to_deploys(&self) -> bool {
        self.tail.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs `f`, work nobody waits for, as work a deploy arriving cancels
    /// rather than waits for ([`Agent::yields_to_deploys`]), at the lowest
    /// CPU priority (for good: this thread never gets it back).
    fn yielding<R>(&self, f: impl FnOnce() -> R) -> R {
        self.tail.store(true, std::sync::atomic::Ordering::SeqCst);
        crate::sys::lower_background_priority();
        let r = f();
        self.tail.store(false, std::sync::atomic::Ordering::SeqCst);
        r
    }

    /// Removes the directories diffs moved out of the slots (and what a
    /// crash left in the trash), off the deploys' path.
    fn empty_trash(&self, cancel: &Cancel) -> Result<(), AgentError> {
        let started = Instant::now();
        let n = self.releases.empty_trash(cancel)?;
        if n > 0 {
            tracing::debug!("trash emptied: {n} entr(ies) in {:?}", started.elapsed());
        }
        Ok(())
    }

    /// Watches the release slots, so that the next deploy's check of the
    /// slot it changes is only of what changed ([`watch`]): what the agent
    /// does at start, in the background.
    pub fn watch_slots(&self, cancel: &Cancel) -> Result<(), AgentError> {
        Ok(self.releases.watch_slots(&self.store, cancel)?)
    }

    /// The drift summary a switch to `version` leaves: nothing found by the
    /// deploy's check, not a re-hash.
    fn note_switch_drift(&self, version: VersionId) {
        *self.last_drift.lock().expect("not poisoned") = Some(DriftSummary {
            checked_at: unix_now(),
            version,
            changed: 0,
            paths: Vec::new(),
            rehashed: false,
        });
    }

    /// The work an agent does on a schedule (`--verify-every`) and at
    /// start, in the background: re-hash the whole live release for drift
    /// (what the check at a switch cannot see: an edit that put back its
    /// mtime, a write through a hardlink made outside the slots), and
    /// collect the garbage switches put off.
    pub fn maintain(&self, cancel: &Cancel) -> Result<(), AgentError> {
        // A deploy arriving stops it (it is tried again a minute later).
        self.yielding(|| self.maintain_now(cancel))
    }

    fn maintain_now(&self, cancel: &Cancel) -> Result<(), AgentError> {
        crate::failpoint::hit_or_cancel("agent:maintain", cancel);
        let started = Instant::now();
        let mut said = String::from("no version is live");
        if self.state().current.is_some() {
            let d = self.verify_live(cancel)?;
            if !d.changes.is_empty() {
                tracing::warn!(
                    "host {}: {} file(s) of the live release differ from its version (`scap verify --live` lists them)",
                    self.cfg.host,
                    d.changes.len()
                );
            }
            said = format!(
                "{} file(s) of the live release re-hashed, {} differ",
                d.checked_files,
                d.changes.len()
            );
        }
        self.collect_garbage(true, cancel)?;
        self.empty_trash(cancel)?;
        crate::sys::trim_malloc();
        tracing::info!(
            "maintenance done in {:?}: {said}; gc run",
            started.elapsed()
        );
        Ok(())
    }

    /// Keeps in the local store what releases, rollback and promote need:
    /// every clean slot's version and the current, previous and stable ones.
    /// Runs when those versions change, unless what their change left
    /// behind is small ([`GcDebt`]): then it waits for more, or for
    /// `always` (maintenance).
    fn collect_garbage(&self, always: bool, cancel: &Cancel) -> Result<(), AgentError> {
        let st = self.state();
        let mut roots: Vec<VersionId> = self
            .releases
            .list()
            .into_iter()
            .filter(|s| s.meta.clean)
            .filter_map(|s| s.meta.version)
            .collect();
        roots.extend(
            [&st.current, &st.previous, &st.stable]
                .into_iter()
                .flatten()
                .map(|d| d.version),
        );
        roots.sort();
        roots.dedup();
        roots.retain(|v| self.store.has(&v.object()));
        {
            let mut debt = self.gc.lock().expect("not poisoned");
            if let Some(last) = debt.roots.clone() {
                let dropped: Vec<VersionId> = last
                    .iter()
                    .filter(|v| !roots.contains(v) && self.store.has(&v.object()))
                    .copied()
                    .collect();
                debt.bytes = debt.bytes.saturating_add(
                    self.garbage_estimate(&dropped, st.current.as_ref().map(|d| d.version))?,
                );
                debt.roots = Some(roots.clone());
                // Objects a fresh host stored uncompressed (for speed) are
                // compressed by gc: that is not put off.
                if !always && debt.bytes < GC_SLACK && !self.store.holds_raw_packs()? {
                    if !dropped.is_empty() {
                        tracing::debug!(
                            "gc put off: about {} byte(s) of dropped versions so far (runs past {GC_SLACK}, or at the next maintenance)",
                            debt.bytes
                        );
                    }
                    return Ok(());
                }
            }
        }
        let _lock = self.store.lock(LockMode::Exclusive)?;
        crate::store::gc::mark_and_sweep(&self.store, &roots, false, cancel)?;
        self.store.retain_signatures(&roots)?;
        *self.gc.lock().expect("not poisoned") = GcDebt {
            roots: Some(roots),
            bytes: 0,
        };
        Ok(())
    }

    /// Bytes of the files of `dropped` versions that differ from `current`
    /// (all of them without one): what dropping them may free, found by
    /// Merkle diffs (the cost of what changed, not of the trees).
    fn garbage_estimate(
        &self,
        dropped: &[VersionId],
        current: Option<VersionId>,
    ) -> Result<u64, AgentError> {
        let mut bytes = 0u64;
        for v in dropped {
            let Some(cur) = current.filter(|c| self.store.has(&c.object())) else {
                return Ok(u64::MAX);
            };
            crate::store::diff::diff(&self.store, &v.root(), &cur.root(), &mut |c| {
                if let Some(Content::File { size, .. }) = &c.old {
                    bytes = bytes.saturating_add(*size);
                }
                Ok(())
            })?;
        }
        Ok(bytes)
    }

    /// Re-hashes the live release against its version.
    pub fn verify_live(&self, cancel: &Cancel) -> Result<drift::Drift, AgentError> {
        let Some(slot) = release::live_slot(&self.cfg.dir) else {
            return Err(AgentError::Refused(format!(
                "host {}: no version is live",
                self.cfg.host
            )));
        };
        let meta = self.releases.meta(&slot);
        let Some(version) = meta.version.filter(|_| meta.clean) else {
            return Err(AgentError::Refused(format!(
                "host {}: the live slot {slot} has no clean version",
                self.cfg.host
            )));
        };
        let root = materialize::Dir::open(&self.releases.path(&slot))?;
        let d = drift::check(&self.store, root, &version.root(), cancel)?;
        *self.last_drift.lock().expect("not poisoned") = Some(DriftSummary {
            checked_at: unix_now(),
            version,
            changed: d.changes.len() as u64,
            paths: d.changes.iter().take(10).map(|c| c.1.clone()).collect(),
            rehashed: true,
        });
        Ok(d)
    }

    /// The last drift check, if it was of the version now live.
    pub fn last_drift(&self) -> Option<DriftSummary> {
        let cur = self.state().current.map(|d| d.version);
        self.last_drift
            .lock()
            .expect("not poisoned")
            .clone()
            .filter(|d| Some(d.version) == cur)
    }
}
