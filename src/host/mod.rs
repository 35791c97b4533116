//! The agent on every target host: its own object store, its release
//! directories, the `current` symlink, and its state file.
//!
//! Layout of the agent's directory (`--dir`, default /var/lib/scap):
//!
//! ```text
//! DIR/store/          object store (same format as the deploy host's)
//! DIR/releases/a b c  release directories, and a.json… saying what each holds
//! DIR/current         -> releases/<slot>: the live release (switched atomically)
//! DIR/state.json      current / previous / stable version, history
//! ```
//!
//! Deploy paths such as /srv/mediawiki are symlinks into `DIR/current`
//! (`--link mediawiki=/srv/mediawiki` makes them), so one rename of
//! `current` switches every component at once.
//!
//! **Invariant:** the live slot is never written; a host is on its old
//! version or its new one, and `current` says which.
//! **Invariant:** the agent knows nothing of fleets, percentages or other
//! hosts; it does what one authenticated request asks.

pub mod api;
pub mod drift;
pub mod fetch;
pub mod release;
pub mod state;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::net::client::{Client, FetchError};
use crate::store::disk::LockMode;
use crate::store::{Store, StoreError, VersionId};
use crate::time::unix_now;
use release::Releases;
use state::{Deployed, Event, HostState, StateError};

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
    #[error("pre-switch hook failed ({status}); stayed on {current}: {output}")]
    Hook {
        status: String,
        current: String,
        output: String,
    },
    #[error("{0}")]
    Refused(String),
    #[error("{0}: {1}")]
    Setup(String, String),
}

pub struct AgentConfig {
    pub dir: PathBuf,
    pub host: String,
    /// (component, deploy path): deploy path becomes a symlink to DIR/current/component.
    pub links: Vec<(String, PathBuf)>,
    pub pre_switch: Option<String>,
    pub post_switch: Option<String>,
    pub slots: usize,
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

pub struct Agent {
    pub cfg: AgentConfig,
    pub store: Store,
    releases: Releases,
    state: Mutex<HostState>,
    pub counters: AgentCounters,
    /// The last drift check of the live release (after each switch, and on
    /// every `GET /v1/verify`), for the fleet's status.
    last_drift: Mutex<Option<DriftSummary>>,
    /// The slot that was live before the last switch.
    previous_slot: Mutex<Option<String>>,
}

/// What the last drift check found, in `/v1/state`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DriftSummary {
    pub checked_at: u64,
    pub version: VersionId,
    /// Files that differ from the version (edited, added or removed by hand).
    pub changed: usize,
    /// The first few of them.
    pub paths: Vec<String>,
}

/// What a sync or rollback did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub host: String,
    pub version: VersionId,
    pub from: Option<VersionId>,
    /// True when the host was already on the version: nothing was done.
    pub noop: bool,
    pub slot: String,
    pub how: String,
    pub fetched: fetch::Fetched,
    pub files_written: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct SyncRequest {
    pub version: VersionId,
    pub sources: Vec<String>,
    #[serde(default = "unknown")]
    pub by: String,
}

fn unknown() -> String {
    "unknown".into()
}

impl Agent {
    pub fn open(cfg: AgentConfig) -> Result<Agent, AgentError> {
        let setup = |what: &Path, e: &dyn std::fmt::Display| {
            AgentError::Setup(what.display().to_string(), e.to_string())
        };
        std::fs::create_dir_all(&cfg.dir).map_err(|e| setup(&cfg.dir, &e))?;
        let store = Store::open_or_init(&cfg.dir.join("store"), crate::store::disk::Role::Host)?;
        let releases = Releases::new(&cfg.dir, cfg.slots).map_err(|e| setup(&cfg.dir, &e))?;
        let state_path = cfg.dir.join("state.json");
        let state = HostState::load(&state_path)?.unwrap_or_else(|| HostState::new(&cfg.host));
        let agent = Agent {
            cfg,
            store,
            releases,
            state: Mutex::new(state),
            counters: AgentCounters::default(),
            last_drift: Mutex::new(None),
            previous_slot: Mutex::new(None),
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
                });
            } else {
                st.current = None;
            }
            st.record(Event {
                time: unix_now(),
                action: "repair".into(),
                version: live_version,
                from,
                by: "scap agent".into(),
                ok: true,
                error: None,
                seconds: 0.0,
                fetched_objects: 0,
                fetched_bytes: 0,
            });
        }
        st.host = self.cfg.host.clone();
        st.save(&self.state_path())?;
        Ok(())
    }

    fn make_links(&self) -> Result<(), AgentError> {
        for (component, link) in &self.cfg.links {
            let target = self.cfg.dir.join("current").join(component);
            match std::fs::symlink_metadata(link) {
                Ok(m) if m.file_type().is_symlink() => {
                    if std::fs::read_link(link).ok().as_deref() == Some(target.as_path()) {
                        continue;
                    }
                    std::fs::remove_file(link).map_err(|e| {
                        AgentError::Setup(link.display().to_string(), e.to_string())
                    })?;
                }
                Ok(_) => {
                    return Err(AgentError::Setup(
                        link.display().to_string(),
                        "exists and is not a symlink: move it aside once, then scap owns it".into(),
                    ));
                }
                Err(_) => {}
            }
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| AgentError::Setup(parent.display().to_string(), e.to_string()))?;
            }
            std::os::unix::fs::symlink(&target, link)
                .map_err(|e| AgentError::Setup(link.display().to_string(), e.to_string()))?;
        }
        Ok(())
    }

    /// Syncs this host to `req.version`: fetch what is missing, prepare a
    /// release, run hooks, switch. Blocking; `rt` drives the HTTP client.
    pub fn sync(
        &self,
        req: &SyncRequest,
        rt: &tokio::runtime::Handle,
    ) -> Result<Outcome, AgentError> {
        let started = Instant::now();
        let from = self.state().current.map(|d| d.version);
        if from == Some(req.version)
            && let Some(live) = release::live_slot(&self.cfg.dir)
            && self.releases.meta(&live).clean
            && self.releases.meta(&live).version == Some(req.version)
        {
            return Ok(Outcome {
                host: self.cfg.host.clone(),
                version: req.version,
                from,
                noop: true,
                slot: live,
                how: "already there".into(),
                fetched: Default::default(),
                files_written: 0,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let result = self.sync_inner(req, rt, started);
        if let Err(e) = self.finish("sync", Some(req.version), from, &req.by, started, &result) {
            tracing::warn!("cannot record the sync in the state file: {e}");
        }
        result
    }

    fn sync_inner(
        &self,
        req: &SyncRequest,
        rt: &tokio::runtime::Handle,
        started: Instant,
    ) -> Result<Outcome, AgentError> {
        let client = Client::new(&req.sources);
        let fetched = {
            let writer = self.store.writer()?;
            let f = rt
                .block_on(fetch::fetch_version(&client, &writer, &req.version))
                .map_err(|source| AgentError::Fetch {
                    version: req.version,
                    source: Box::new(source),
                })?;
            let _committed = writer.commit()?;
            tracing::debug!(
                "fetched {} trees, {} chunks in {:?}",
                f.trees,
                f.chunks,
                started.elapsed()
            );
            f
        };
        self.counters
            .fetched_bytes
            .fetch_add(fetched.bytes, Ordering::Relaxed);
        self.counters
            .fetched_objects
            .fetch_add(fetched.trees + fetched.chunks, Ordering::Relaxed);
        let mut outcome = self.switch_to(&req.version, &req.by, started)?;
        outcome.fetched = fetched;
        Ok(outcome)
    }

    /// Rolls back to the previous or stable release, or a given version
    /// this host still has. A switch, no fetch.
    pub fn rollback(&self, to: &str, by: &str) -> Result<Outcome, AgentError> {
        let started = Instant::now();
        let st = self.state();
        let from = st.current.as_ref().map(|d| d.version);
        let target = match to {
            "previous" => st.previous.as_ref().map(|d| d.version),
            "stable" => st.stable.as_ref().map(|d| d.version),
            hex => Some(
                hex.parse::<VersionId>()
                    .map_err(|e| AgentError::Refused(e.to_string()))?,
            ),
        };
        let Some(target) = target else {
            return Err(AgentError::Refused(format!(
                "host {}: no {to} version recorded: name a version with --to",
                self.cfg.host
            )));
        };
        if from == Some(target) {
            return Ok(Outcome {
                host: self.cfg.host.clone(),
                version: target,
                from,
                noop: true,
                slot: release::live_slot(&self.cfg.dir).unwrap_or_default(),
                how: "already there".into(),
                fetched: Default::default(),
                files_written: 0,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        if self.releases.find(&target).is_none() && !self.store.has(&target.object()) {
            return Err(AgentError::Refused(format!(
                "host {}: version {} is not on this host (not in a release or the local store): sync to it instead",
                self.cfg.host,
                target.short()
            )));
        }
        let result = self.switch_to(&target, by, started);
        if let Err(e) = self.finish("rollback", Some(target), from, by, started, &result) {
            tracing::warn!("cannot record the rollback in the state file: {e}");
        }
        result
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
        });
        st.record(Event {
            time: unix_now(),
            action: "promote".into(),
            version: Some(*v),
            from: None,
            by: by.to_string(),
            ok: true,
            error: None,
            seconds: 0.0,
            fetched_objects: 0,
            fetched_bytes: 0,
        });
        st.save(&self.state_path())?;
        Ok(st.clone())
    }

    /// Prepares a release of `v` (from the local store) and switches to it.
    fn switch_to(&self, v: &VersionId, by: &str, started: Instant) -> Result<Outcome, AgentError> {
        let st = self.state();
        let protected = self.protected_slots(&st);
        let keep: Vec<&str> = protected.iter().map(String::as_str).collect();
        let stable = st.stable.as_ref().map(|d| d.version);
        let phase = Instant::now();
        let prepared = self
            .releases
            .prepare(&self.store, v, &keep, stable.as_ref())?;
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
            run_hook(hook, v, from.as_ref(), &release_dir, &self.cfg.host).map_err(
                |(status, output)| AgentError::Hook {
                    status,
                    current: from.map(|v| v.short()).unwrap_or_else(|| "nothing".into()),
                    output,
                },
            )?;
        }
        let was_live = release::live_slot(&self.cfg.dir);
        release::switch(&self.cfg.dir, &prepared.slot)?;
        // The host runs `v` from here on: what fails below is reported in
        // the log, not as a failed sync (the controller would then count a
        // switched host as unchanged).
        *self.previous_slot.lock().expect("not poisoned") = was_live;
        if let Err(e) = self.releases.touch(&prepared.slot) {
            tracing::warn!("{e}");
        }
        {
            let mut st = self.state.lock().expect("not poisoned");
            st.previous = st.current.take();
            st.current = Some(Deployed {
                version: *v,
                since: unix_now(),
                by: by.to_string(),
            });
            if let Err(e) = st.save(&self.state_path()) {
                tracing::warn!(
                    "switched to {}, but cannot save the state file: {e}",
                    v.short()
                );
            }
        }
        if let Some(hook) = &self.cfg.post_switch
            && let Err((status, output)) =
                run_hook(hook, v, from.as_ref(), &release_dir, &self.cfg.host)
        {
            tracing::warn!("post-switch hook failed ({status}): {output}");
        }

        Ok(Outcome {
            host: self.cfg.host.clone(),
            version: *v,
            from,
            noop: false,
            slot: prepared.slot,
            how: prepared.how.to_string(),
            fetched: Default::default(),
            files_written: prepared.files_written,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Appends the event for an operation and saves the state file.
    fn finish(
        &self,
        action: &str,
        version: Option<VersionId>,
        from: Option<VersionId>,
        by: &str,
        started: Instant,
        result: &Result<Outcome, AgentError>,
    ) -> Result<(), AgentError> {
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
        let mut st = self.state.lock().expect("not poisoned");
        st.record(Event {
            time: unix_now(),
            action: action.into(),
            version,
            from,
            by: by.to_string(),
            ok: result.is_ok(),
            error: result.as_ref().err().map(|e| e.to_string()),
            seconds: secs,
            fetched_objects: result
                .as_ref()
                .map(|o| o.fetched.trees + o.fetched.chunks)
                .unwrap_or(0),
            fetched_bytes: result.as_ref().map(|o| o.fetched.bytes).unwrap_or(0),
        });
        st.save(&self.state_path())?;
        Ok(())
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
    /// need not wait for (the API runs it in the background, holding the
    /// host's operation lock): bring the spare release slot to the live
    /// version, so the next deploy writes only its own diff, then collect
    /// garbage in the local store.
    pub fn after_switch(&self) -> Result<(), AgentError> {
        let started = Instant::now();
        let st = self.state();
        if let Some(cur) = &st.current {
            let protected = self.protected_slots(&st);
            let keep: Vec<&str> = protected.iter().map(String::as_str).collect();
            if let Some(p) = self
                .releases
                .prepare_spare(&self.store, &cur.version, &keep)?
            {
                tracing::debug!(
                    "spare slot {} brought to {} ({}, {} files)",
                    p.slot,
                    cur.version.short(),
                    p.how,
                    p.files_written
                );
            }
        }
        self.collect_garbage()?;
        // A fresh release matches its version; checking it here gives the
        // fleet's status a baseline that `GET /v1/verify` keeps current.
        self.verify_live()?;
        tracing::debug!("after-switch work took {:?}", started.elapsed());
        Ok(())
    }

    /// Keeps in the local store what releases, rollback and promote need:
    /// every clean slot's version and the current, previous and stable ones.
    fn collect_garbage(&self) -> Result<(), AgentError> {
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
        let _lock = self.store.lock(LockMode::Exclusive)?;
        crate::store::gc::mark_and_sweep(&self.store, &roots, false)?;
        Ok(())
    }

    /// Re-hashes the live release against its version.
    pub fn verify_live(&self) -> Result<drift::Drift, AgentError> {
        let st = self.state();
        let Some(cur) = st.current else {
            return Err(AgentError::Refused(format!(
                "host {}: no version is live",
                self.cfg.host
            )));
        };
        let dir = self.cfg.dir.join("current");
        let dir = std::fs::canonicalize(&dir)
            .map_err(|e| AgentError::Setup(dir.display().to_string(), e.to_string()))?;
        let d = drift::check(&self.store, &dir, &cur.version.root())?;
        *self.last_drift.lock().expect("not poisoned") = Some(DriftSummary {
            checked_at: unix_now(),
            version: cur.version,
            changed: d.changes.len(),
            paths: d.changes.iter().take(10).map(|c| c.1.clone()).collect(),
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

/// Runs a hook with `sh -c`; Err((status, output)) when it fails.
fn run_hook(
    cmd: &str,
    v: &VersionId,
    prev: Option<&VersionId>,
    dir: &Path,
    host: &str,
) -> Result<(), (String, String)> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("SCAP_VERSION", v.to_hex())
        .env(
            "SCAP_PREVIOUS_VERSION",
            prev.map(|p| p.to_hex()).unwrap_or_default(),
        )
        .env("SCAP_RELEASE_DIR", dir)
        .env("SCAP_HOST", host)
        .output()
        .map_err(|e| ("not started".to_string(), e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    text.truncate(2000);
    Err((out.status.to_string(), text.trim().to_string()))
}
