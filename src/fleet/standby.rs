//! A standby deploy host: `scap serve --follow URL` keeps its store a copy
//! of the primary's, so that it serves hosts and caches like the primary
//! and can finish a rollout when the primary is lost.
//!
//! Every [`FollowConfig::interval`] the standby reads the primary's
//! catalogue (`GET /v1/catalogue`: the versions recorded there, each
//! label's head and the length of its history), and for each version it
//! lacks, oldest first:
//!
//! 1. its signature, which a key this standby trusts must vouch for (a
//!    primary, or whatever answers in its name, cannot make the standby
//!    serve a version the deploy key did not sign);
//! 2. its record (which must name that version);
//! 3. its objects, as an agent fetches them: the delta pack from its
//!    parent when the standby holds the parent, then by difference, every
//!    object hashed against the ID asked for before it is stored;
//! 4. then the signature and the record are written, the record last: a
//!    version is in a store once its record is, so a standby killed
//!    mid-copy has objects and no version, and copies it again.
//!
//! Labels (the trains' heads and histories) are copied once the version a
//! head names is here. What the standby holds and lacks is written to the
//! deploy state (`standby/<host>` in etcd) after every round, and `scap
//! status` on either deploy host names a standby that is behind, by how
//! many versions and since when.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::state::DeployState;
use crate::net::client::{Client, FetchError};
use crate::proto::{Catalogue, MAX_CATALOGUE_BYTES, MAX_LABEL_LOG_BYTES};
use crate::store::disk::{LabelMove, VersionRecord};
use crate::store::signature::Trust;
use crate::store::{Store, VersionId};

/// How often a standby that has nothing new to say writes its report.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Largest version record read from the primary.
const MAX_RECORD_BYTES: u64 = 4 << 20;

/// How a standby follows its primary.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// The primary's object service (one URL, or several in order).
    pub primaries: Vec<String>,
    pub interval: Duration,
    /// Whose signatures a copied version must carry.
    pub trust: Trust,
    /// This standby's name in reports.
    pub host: String,
}

/// Where the standby stands: `GET /v1/standby` on it, and its report in the
/// deploy state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StandbyReport {
    pub host: String,
    pub primary: String,
    /// When this report was made (unix seconds).
    pub time: u64,
    /// When a round last completed with everything copied.
    #[serde(default)]
    pub in_step_since: Option<u64>,
    /// Versions the primary has and this standby does not (yet).
    pub missing: Vec<VersionId>,
    /// Labels whose head differs from the primary's.
    #[serde(default)]
    pub labels_behind: Vec<String>,
    /// Versions copied since this standby started.
    pub copied: u64,
    /// Why the last round did not complete, if it did not.
    #[serde(default)]
    pub error: Option<String>,
}

impl StandbyReport {
    /// "in step", or how far behind, for people.
    pub fn summary(&self, now: u64) -> String {
        let age = now.saturating_sub(self.time);
        let mut s =
            if self.missing.is_empty() && self.labels_behind.is_empty() && self.error.is_none() {
                format!("standby {} is in step with {}", self.host, self.primary)
            } else {
                format!(
                    "standby {} is BEHIND {}: {} version(s) and {} label(s) not copied{}",
                    self.host,
                    self.primary,
                    self.missing.len(),
                    self.labels_behind.len(),
                    self.in_step_since
                        .map(|t| format!(", last in step {} s ago", now.saturating_sub(t)))
                        .unwrap_or_else(|| ", never in step since it started".into())
                )
            };
        if let Some(e) = &self.error {
            s.push_str(&format!(" ({})", crate::text::clip(e, 300)));
        }
        if age > 30 {
            s.push_str(&format!(
                "; its last report is {age} s old: is its scap serve running?"
            ));
        }
        s
    }
}

/// Runs rounds until the process ends; `report` is kept current.
pub async fn follow(
    store: Store,
    client: Client,
    cfg: FollowConfig,
    state: DeployState,
    report: Arc<Mutex<StandbyReport>>,
) {
    {
        let mut r = report.lock().expect("not poisoned");
        r.host = cfg.host.clone();
        r.primary = cfg.primaries.join(", ");
    }
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut last_written: Option<(StandbyReport, Instant)> = None;
    loop {
        tick.tick().await;
        let result = round(&store, &client, &cfg, &report).await;
        let now = crate::time::unix_now();
        let snapshot = {
            let mut r = report.lock().expect("not poisoned");
            r.time = now;
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!("standby: copying from {} again", r.primary);
                    }
                    failing = false;
                    r.error = None;
                    if r.missing.is_empty() && r.labels_behind.is_empty() {
                        r.in_step_since = Some(now);
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!("standby: cannot copy from {}: {e}", r.primary);
                    }
                    failing = true;
                    r.error = Some(e);
                }
            }
            r.clone()
        };
        // Written when it says something new, and every 10 s (a report
        // older than 30 s tells status the standby is gone).
        let quiet = |r: &StandbyReport| StandbyReport {
            time: 0,
            in_step_since: None,
            ..r.clone()
        };
        let news = last_written
            .as_ref()
            .is_none_or(|(was, at): &(StandbyReport, Instant)| {
                at.elapsed() >= REPORT_EVERY || quiet(was) != quiet(&snapshot)
            });
        if !news {
            continue;
        }
        let st = state.clone();
        let written = snapshot.clone();
        let done = tokio::task::spawn_blocking(move || {
            st.report_standby(
                &written.host,
                &serde_json::to_vec(&written).expect("serializes"),
            )
        })
        .await;
        match done {
            Ok(Ok(())) => last_written = Some((snapshot, Instant::now())),
            Ok(Err(e)) => tracing::debug!("standby: cannot write its report: {e}"),
            Err(_) => {}
        }
    }
}

fn fetch_err(e: FetchError) -> String {
    e.to_string()
}

/// One round: copy every version and label the primary has and this
/// standby lacks.
async fn round(
    store: &Store,
    client: &Client,
    cfg: &FollowConfig,
    report: &Mutex<StandbyReport>,
) -> Result<(), String> {
    let cat: Catalogue = client
        .get_json("/v1/catalogue", MAX_CATALOGUE_BYTES)
        .await
        .map_err(|e| format!("the primary's catalogue: {}", fetch_err(e)))?;
    if cat.format > crate::proto::CATALOGUE_FORMAT {
        return Err(format!(
            "the primary's catalogue is format v{}, this scap reads up to v{}: upgrade this standby",
            cat.format,
            crate::proto::CATALOGUE_FORMAT
        ));
    }
    let here: std::collections::HashSet<VersionId> = {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.recorded())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect()
    };
    let missing: Vec<VersionId> = cat
        .versions
        .iter()
        .filter(|v| !here.contains(v))
        .copied()
        .collect();
    report.lock().expect("not poisoned").missing = missing.clone();
    // Their records first, to copy oldest first (a parent before its
    // children: each child then comes as a delta pack from it).
    let mut records = Vec::new();
    for v in &missing {
        let r: VersionRecord = client
            .get_json(&format!("/versions/{}.json", v.to_hex()), MAX_RECORD_BYTES)
            .await
            .map_err(|e| format!("the record of {}: {}", v.short(), fetch_err(e)))?;
        if r.version != *v {
            return Err(format!(
                "the primary answered the record of {} for {}: refused",
                r.version.short(),
                v.short()
            ));
        }
        records.push(r);
    }
    records.sort_by_key(|r| (r.time, r.time_nanos, r.version));
    // A version refused (no trusted signature) stays missing and named;
    // the others, and the labels, are copied all the same.
    let mut refused = Vec::new();
    for r in records {
        let v = r.version;
        match copy_version(store, client, cfg, r).await {
            Ok(()) => {
                let mut rep = report.lock().expect("not poisoned");
                rep.copied += 1;
                rep.missing.retain(|m| *m != v);
            }
            Err(Copy::Refused(why)) => refused.push(why),
            Err(Copy::Failed(why)) => return Err(why),
        }
    }
    // Labels whose head is here.
    let mut behind = Vec::new();
    let ours: BTreeMap<String, VersionId> = store
        .labels()
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    for l in &cat.labels {
        let same_head = ours.get(&l.name) == Some(&l.version);
        let same_log =
            same_head && store.label_log(&l.name).map_err(|e| e.to_string())?.len() == l.moves;
        if same_log {
            continue;
        }
        if !store.has(&l.version.object()) {
            behind.push(l.name.clone());
            continue;
        }
        if crate::store::disk::check_label(&l.name).is_err() {
            return Err(format!(
                "the primary's catalogue names label {:?}: refused",
                crate::text::clip(&l.name, 80)
            ));
        }
        let log: Vec<LabelMove> = client
            .get_json(
                &format!("/refs/logs/labels/{}", l.name),
                MAX_LABEL_LOG_BYTES,
            )
            .await
            .map_err(|e| format!("the history of label {}: {}", l.name, fetch_err(e)))?;
        if log.last().is_some_and(|m| m.to != l.version) {
            // Moved between the two reads: next round.
            behind.push(l.name.clone());
            continue;
        }
        let s = store.clone();
        let (name, head) = (l.name.clone(), l.version);
        tokio::task::spawn_blocking(move || s.copy_label(&name, &head, &log))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    report.lock().expect("not poisoned").labels_behind = behind;
    if refused.is_empty() {
        Ok(())
    } else {
        Err(refused.join("; "))
    }
}

/// Why a version was not copied.
enum Copy {
    /// Its signature: it will not be copied until that changes.
    Refused(String),
    /// The primary, the network or this store: the round stops.
    Failed(String),
}

/// Copies one version: signature checked, objects fetched and verified,
/// then the signature and the record written.
async fn copy_version(
    store: &Store,
    client: &Client,
    cfg: &FollowConfig,
    record: VersionRecord,
) -> Result<(), Copy> {
    let v = record.version;
    let trust = cfg.trust.clone();
    let signed = client
        .signature(&v, |doc| {
            trust.verify(&v, Some(doc)).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| match e {
            FetchError::AllFailed(why) if why.contains("refused") => {
                Copy::Refused(format!("{}: {why}", v.short()))
            }
            e => Copy::Failed(format!("{}: {}", v.short(), fetch_err(e))),
        })?;
    let Some((doc, _verified)) = signed else {
        return Err(Copy::Refused(format!(
            "version {} is not signed on the primary: a standby copies only versions a trusted deploy key signed",
            v.short()
        )));
    };
    let started = std::time::Instant::now();
    let failed = |e: String| Copy::Failed(format!("{}: {e}", v.short()));
    let writer = store.writer().map_err(|e| failed(e.to_string()))?;
    let from = record.parent.filter(|p| store.has(&p.object()));
    match crate::host::fetch::fetch_pack(client, &writer, from.as_ref(), &v, None).await {
        Ok(_) => {}
        Err(FetchError::Store(e)) => return Err(failed(e.to_string())),
        Err(e) => tracing::debug!(
            "standby: no delta pack for {} ({e}): fetching objects",
            v.short()
        ),
    }
    crate::host::fetch::fetch_version(client, &writer, &v)
        .await
        .map_err(|e| failed(fetch_err(e)))?;
    // The record last: the version exists here once it is written.
    (|| -> Result<(), crate::store::StoreError> {
        let _committed = writer.commit()?;
        store.write_signature(&v, &doc)?;
        store.write_record(&record)
    })()
    .map_err(|e| failed(e.to_string()))?;
    tracing::info!("standby: copied {} in {:?}", v.short(), started.elapsed());
    Ok(())
}

/// The deploy host whose `scap serve` is the primary: `serve/primary` in
/// the deploy state (etcd), held under a lease while that process runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Primary {
    pub host: String,
    /// Its object service, for a standby's `--follow`.
    pub url: String,
    /// Its store.
    pub store: String,
    pub pid: u32,
    pub since: u64,
}

impl std::fmt::Display for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, store {}, pid {}) since {}",
            self.host,
            self.url,
            self.store,
            self.pid,
            crate::time::fmt_utc(self.since)
        )
    }
}

const PRIMARY_KEY: &str = "serve/primary";

/// Why this `scap serve` is not (yet) the primary.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "another deploy host is the primary: {0}; start this one as its standby (`scap serve --follow URL`), or stop that one first (its claim goes with it, or within the lease after it died)"
    )]
    Taken(String),
    #[error("cannot claim the primary's place in the deploy state: {0}")]
    State(#[from] super::state::StateError),
}

/// Claims the primary's place for this `scap serve` (with the deploy state
/// in etcd; without it there is one deploy host, and nothing to claim):
/// refused while another deploy host holds it, so that two deploy hosts
/// are never both started as primary. Held until the returned claim is
/// dropped, or within the lease of this process's death.
fn claim_primary(
    state: &DeployState,
    store: &std::path::Path,
    url: &str,
) -> Result<Option<super::state::LeaseLock>, ClaimError> {
    let me = Primary {
        host: crate::sys::hostname(),
        url: url.to_string(),
        store: store.display().to_string(),
        pid: std::process::id(),
        since: crate::time::unix_now(),
    };
    match state.claim_lease(PRIMARY_KEY, &serde_json::to_vec(&me).expect("serializes"))? {
        Ok(claim) => Ok(claim),
        Err(theirs) => Err(ClaimError::Taken(
            serde_json::from_slice::<Primary>(&theirs)
                .map(|p| p.to_string())
                .unwrap_or_else(|_| "another scap serve".into()),
        )),
    }
}

/// Keeps this `scap serve`'s claim to be the primary for as long as it
/// runs: the claim it made at start (`first`), and, when there is none (it
/// started while etcd did not answer) or it is lost (etcd out for longer
/// than the lease), a new one once etcd answers. It serves meanwhile:
/// hosts must never need etcd to fetch. Another primary found then is an
/// error for a person, said every minute. Dropped: the claim is given up.
pub struct PrimaryKeeper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PrimaryKeeper {
    /// Claims the primary's place for this `scap serve` and keeps it.
    /// `Err` only if another deploy host holds it; if etcd does not
    /// answer, this serves anyway and claims the place once it does.
    pub fn claim(
        state: DeployState,
        store: std::path::PathBuf,
        url: String,
    ) -> Result<PrimaryKeeper, ClaimError> {
        let first = match claim_primary(&state, &store, &url) {
            Ok(claim) => claim,
            Err(e @ ClaimError::Taken(_)) => return Err(e),
            Err(e) => {
                tracing::warn!("{e}: serving anyway, and claiming it once etcd answers");
                None
            }
        };
        Ok(PrimaryKeeper::start(state, store, url, first))
    }

    fn start(
        state: DeployState,
        store: std::path::PathBuf,
        url: String,
        first: Option<super::state::LeaseLock>,
    ) -> PrimaryKeeper {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("scap-primary".into())
            .spawn(move || {
                let mut claim = first;
                let mut said = None::<Instant>;
                let mut next = Instant::now();
                while !stopping.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    if Instant::now() < next {
                        continue;
                    }
                    next = Instant::now() + Duration::from_secs(2);
                    if let Some(why) = claim.as_ref().and_then(|c| c.lost()) {
                        tracing::warn!("lost the primary's claim in the deploy state ({why}): claiming it again");
                        claim = None;
                    }
                    if claim.is_some() {
                        continue;
                    }
                    match claim_primary(&state, &store, &url) {
                        Ok(c) => {
                            tracing::info!("claimed the primary's place in the deploy state");
                            claim = c;
                            if claim.is_none() {
                                return;
                            }
                        }
                        Err(e @ ClaimError::Taken(_)) => {
                            if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                                tracing::error!("{e}");
                                said = Some(Instant::now());
                            }
                        }
                        Err(e) => tracing::debug!("{e}"),
                    }
                }
            })
            .ok();
        PrimaryKeeper { stop, thread }
    }
}

impl Drop for PrimaryKeeper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether this store may build versions: not while another deploy host
/// (or another store) is the primary, since a standby's store is a copy
/// of the primary's, and what it built would be overwritten.
pub fn may_build(state: &DeployState, store: &std::path::Path) -> Result<(), String> {
    let Some(v) = state.get_key(PRIMARY_KEY).map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let Ok(p) = serde_json::from_slice::<Primary>(&v) else {
        return Ok(());
    };
    let mine = p.host == crate::sys::hostname() && std::path::Path::new(&p.store) == store;
    if mine {
        return Ok(());
    }
    Err(format!(
        "this deploy host is not the primary: {p} is; build there (this store is its standby's copy), or make this one the primary (stop that scap serve, then run this one's without --follow)"
    ))
}
