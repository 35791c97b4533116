//! A change (`scap sync-file`, `scap sync-dir`) as a deploy: which
//! versions are live, the new version of each (`manifest::change`), who
//! goes where, and, once the rollout has succeeded, the trains' heads and
//! the train rollout in progress moved to the new versions.
//!
//! **Invariant:** nothing names a change's new versions as a train's head,
//! or as the target of the rollout record, before the change has reached
//! every host it was rolled out to with its gates passed. A change whose
//! gate fails, that is stopped, or whose controller dies, leaves the heads
//! where they were: `--version TRAIN` never deploys a change that was not
//! deployed. A change that gives a train an earlier tree back (a revert)
//! is a new step in its history like any other.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::poll::Reading;
use super::record::{RecordError, RolloutRecord};
use super::state::{DeployState, Doc};
use super::trains::{self, HeadMove, Trains, VersionName};
use crate::manifest::change::{self, Applied, ChangeSpec};
use crate::store::{Store, VersionId};

/// The deploy host's records of the fleet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FleetFileError {
    #[error(transparent)]
    Desired(#[from] super::desired::DesiredError),
    #[error(transparent)]
    Record(#[from] super::record::RecordError),
}

/// The live versions a change applies to: what hosts run, hold (previous,
/// stable, staged), should run (the desired state), and the recorded
/// rollout's target and origins. Returns them with a note for each one
/// this store does not have (the change cannot be applied to it).
pub fn live_versions(
    store: &Store,
    readings: &[Reading],
    state: &DeployState,
) -> Result<(Vec<VersionId>, Vec<String>), FleetFileError> {
    let desired = super::desired::Desired::load(state)?;
    let record = RolloutRecord::load(state)?;
    let mut live: BTreeSet<VersionId> = desired.versions();
    let mut notes = Vec::new();
    for r in readings {
        match &r.view {
            Ok(_) => live.extend(r.held()),
            Err(e) => notes.push(format!("{e}: its desired state stands for it")),
        }
    }
    if let Some(r) = &record {
        live.insert(r.version);
        live.extend(r.from.values().copied());
    }
    let mut bases = Vec::new();
    for v in live {
        if store.has(&v.object()) {
            bases.push(v);
        } else {
            let hosts: Vec<String> = readings
                .iter()
                .filter(|r| r.held().contains(&v))
                .map(|r| r.member.host.to_string())
                .collect();
            notes.push(format!(
                "warning: version {} (held by {}) is not in this store: the change cannot be applied to it",
                v.short(),
                if hosts.is_empty() {
                    "the desired state".into()
                } else {
                    hosts.join(", ")
                }
            ));
        }
    }
    Ok((bases, notes))
}

/// Polls every host, finds the live versions (`live_versions`, each note
/// said to `op`), and builds the change's new version of each (`spec`'s
/// `bases` are filled in here).
pub async fn build(
    store: &Store,
    agents: &super::agents::Agents,
    members: &[super::inventory::Member],
    state: &DeployState,
    mut spec: ChangeSpec<'_>,
    op: &mut dyn super::operator::Operator,
    meter: &dyn crate::progress::Meter,
) -> Result<Prepared, ChangeError> {
    let readings = super::poll::poll(agents, members, 64).await;
    let (bases, notes) = live_versions(store, &readings, state)?;
    for n in notes {
        op.say(&n);
    }
    if let Some(check) = spec.check {
        let failures: Vec<String> = bases.iter().flat_map(|b| check(store, b)).collect();
        if !failures.is_empty() {
            return Err(ChangeError::Check(failures));
        }
    }
    spec.bases = bases;
    Ok(prepare(store, &spec, &readings, meter)?)
}

/// Why a change could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    FleetFiles(#[from] FleetFileError),
    #[error(transparent)]
    Build(#[from] crate::manifest::BuildError),
    #[error("{} check(s) failed, nothing was built or deployed:\n  {}", .0.len(), .0.join("\n  "))]
    Check(Vec<String>),
}

/// One live version and what the change makes of it, for people and
/// `--json`.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Step {
    pub from: VersionId,
    pub to: VersionId,
    pub from_name: VersionName,
    /// Hosts that run `from` now.
    pub hosts: Vec<String>,
    /// `git --name-status` lines.
    pub files: Vec<String>,
    /// Why the change leaves this version alone (the path's directory is
    /// not in it), if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// The path is new in this version (`--create`).
    pub created: bool,
    /// The new tree is an earlier version's (a revert).
    pub revert: bool,
}

/// A change built: its new versions, ready to roll out.
#[derive(Clone, Debug, Serialize)]
pub struct Prepared {
    pub id: String,
    pub message: String,
    pub steps: Vec<Step>,
    /// old -> new, for the versions the change altered.
    #[serde(skip)]
    pub map: BTreeMap<VersionId, VersionId>,
}

impl Prepared {
    /// The live versions the change leaves as they are: a host on one
    /// has all it brings.
    pub fn unchanged(&self) -> BTreeSet<VersionId> {
        self.steps
            .iter()
            .filter(|s| s.from == s.to)
            .map(|s| s.from)
            .collect()
    }
}

/// Builds the change's new versions (nothing is recorded or signed for a
/// dry run) and says, per live version, who moves and which files change.
pub fn prepare(
    store: &Store,
    spec: &ChangeSpec<'_>,
    readings: &[Reading],
    meter: &dyn crate::progress::Meter,
) -> Result<Prepared, crate::manifest::BuildError> {
    let applied = change::apply(store, spec, meter)?;
    let trains = Trains::load(store)?;
    let mut groups: BTreeMap<VersionId, Vec<String>> = BTreeMap::new();
    for r in readings {
        if let Some(c) = r.current() {
            groups.entry(c).or_default().push(r.member.host.to_string());
        }
    }
    let steps = applied
        .iter()
        .map(|a: &Applied| Step {
            from: a.base,
            to: a.version,
            from_name: trains.name(&a.base),
            hosts: groups.get(&a.base).cloned().unwrap_or_default(),
            files: a.files.clone(),
            skipped: a.skipped.clone(),
            created: a.created,
            revert: a.revert,
        })
        .collect();
    Ok(Prepared {
        id: spec.id.clone(),
        message: spec.message.clone(),
        steps,
        map: change::map(&applied),
    })
}

/// After the change's rollout (`to_all`: its last stage was 100%): moves
/// the trains' heads if it succeeded everywhere, forgets the pending
/// change if it succeeded or every host it moved went back, and says on
/// `outcome`'s message what that means for the trains.
pub fn conclude(
    store: &Store,
    state: &DeployState,
    prepared: &Prepared,
    to_all: bool,
    outcome: &mut super::deploy::Outcome,
    by: &str,
    orders: Option<&super::orders::Orders>,
) -> Vec<HeadMove> {
    // A controller that lost the deploy lock (etcd) moves no head and
    // forgets nothing: the command that holds it now decides.
    if let Err(e) = state.check_lock() {
        outcome.ok = false;
        outcome.message = format!("{}; {e}", outcome.message);
        return Vec::new();
    }
    let done = outcome.ok && outcome.finished && to_all;
    let moves = settle(store, state, prepared, done, by);
    // Undone: a failed gate's rollback brought back every host it had
    // moved. Hosts its steps chose but that never got it must not go there
    // later by themselves: their desired state goes back too.
    let undone = !outcome.ok && outcome.all_back;
    if undone {
        undo_desired(state, prepared, by, orders);
    }
    if done || undone {
        PendingChange::remove(state);
    } else if let Ok(Some(mut p)) = PendingChange::load(state) {
        p.note = outcome.message.clone();
        p.pid = 0;
        if let Err(e) = p.save(state) {
            tracing::warn!("cannot save the pending change: {e}");
        }
    }
    if done {
        let moved: Vec<String> = moves
            .iter()
            .filter(|m| m.refused.is_none())
            .map(|m| format!("{} -> {}", m.train, m.to.short()))
            .collect();
        if !moved.is_empty() {
            outcome
                .message
                .push_str(&format!("; train head(s) moved: {}", moved.join(", ")));
        }
        if moves.iter().any(|m| m.refused.is_some()) {
            outcome.ok = false;
            outcome
                .message
                .push_str("; some train heads could NOT be moved (see above)");
        }
    } else if outcome.ok {
        outcome.message.push_str(
            "; the trains' heads stay where they were until the change reaches 100% (`scap sync --resume` continues it)",
        );
    } else if !undone {
        outcome.message.push_str(
            "; the change is on some hosts, and no train's head moved: `scap sync --resume` finishes it, `scap rollback` undoes it",
        );
    }
    moves
}

/// Takes back the desired targets a change's steps set (to the versions
/// it was made from): the change is undone.
pub fn undo_desired(
    state: &DeployState,
    prepared: &Prepared,
    by: &str,
    orders: Option<&super::orders::Orders>,
) {
    let inverse: BTreeMap<VersionId, VersionId> =
        prepared.map.iter().map(|(a, b)| (*b, *a)).collect();
    // Only the targets this change's steps set.
    let ours = format!("change {}", prepared.id);
    if let Err(e) = super::desired::update(state, orders, |d| {
        for t in d.hosts.values_mut() {
            if t.why == ours
                && let Some(old) = inverse.get(&t.version)
            {
                t.version = *old;
                t.since = crate::time::unix_now();
                t.by = by.to_string();
                t.why = format!("{ours} undone");
            }
        }
    }) {
        tracing::error!("cannot record the desired state: {e}");
    }
}

/// After the change's rollout: if it succeeded on every host it was
/// rolled out to (`done`), each train whose head is a changed version that
/// hosts ran moves to its new version (a revert is recorded as one), and
/// the train rollout in progress continues with the change. Otherwise
/// nothing moves.
pub fn settle(
    store: &Store,
    state: &DeployState,
    prepared: &Prepared,
    done: bool,
    by: &str,
) -> Vec<HeadMove> {
    if !done || prepared.map.is_empty() {
        return Vec::new();
    }
    match RolloutRecord::load(state) {
        Ok(Some(mut r)) => {
            r.rewrite(&prepared.map);
            if let Err(e) = r.save(state) {
                tracing::error!("cannot save the rollout record: {e}");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("{e}"),
    }
    // Only trains some host ran: a head held only as a previous or stable
    // version, or a target, was not deployed with the change by this
    // rollout, and stays.
    let map: BTreeMap<VersionId, (VersionId, &str)> = prepared
        .steps
        .iter()
        .filter(|s| s.from != s.to && !s.hosts.is_empty())
        .map(|s| (s.from, (s.to, if s.revert { "revert" } else { "change" })))
        .collect();
    trains::move_heads(store, &map, by, &prepared.message, Some(&prepared.id))
}

/// The format of `STORE/fleet/change.json`.
pub const PENDING_FORMAT: u32 = 1;

/// A change being rolled out, recorded on the deploy host
/// (`STORE/fleet/change.json`) from before its first host moves until it
/// has succeeded (the trains' heads moved) or was rolled back: a
/// controller that dies or is stopped meanwhile leaves it, and `scap sync
/// --resume` finishes it. The train rollout in progress (`record`) is left
/// alone meanwhile.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct PendingChange {
    pub format: u32,
    pub id: String,
    pub message: String,
    /// Its steps, as `prepare` made them.
    pub steps: Vec<Step>,
    pub stages: Vec<super::rollout::Stage>,
    pub settings: super::record::Settings,
    pub by: String,
    pub command: String,
    /// The controller's process and host while it runs.
    pub pid: u32,
    pub host: String,
    pub started: u64,
    /// Why it stopped, for people.
    #[serde(default)]
    pub note: String,
}

impl PendingChange {
    /// Records `prepared` as the change in flight, by this process, before
    /// its first host moves: a controller that dies from then on leaves
    /// it for `scap sync --resume`.
    pub fn begin(
        state: &DeployState,
        prepared: &Prepared,
        stages: &[super::rollout::Stage],
        settings: super::record::Settings,
        by: &str,
        command: &str,
    ) -> Result<(), super::record::RecordError> {
        PendingChange {
            format: PENDING_FORMAT,
            id: prepared.id.clone(),
            message: prepared.message.clone(),
            steps: prepared.steps.clone(),
            stages: stages.to_vec(),
            settings,
            by: by.to_string(),
            command: command.to_string(),
            pid: std::process::id(),
            host: crate::sys::hostname(),
            started: crate::time::unix_now(),
            note: String::new(),
        }
        .save(state)
    }

    /// The change, as `prepare` made it.
    pub fn prepared(&self) -> Prepared {
        Prepared {
            id: self.id.clone(),
            message: self.message.clone(),
            steps: self.steps.clone(),
            map: self
                .steps
                .iter()
                .filter(|s| s.from != s.to)
                .map(|s| (s.from, s.to))
                .collect(),
        }
    }

    /// The change `id` read again once `--resume` holds the lock (another
    /// `--resume` may have finished it meanwhile), recorded as this
    /// process's (unless `dry_run`), so that a `--resume` after this one
    /// dies waits out this one's lease.
    pub fn take_for_resume(
        state: &DeployState,
        id: &str,
        dry_run: bool,
    ) -> Result<PendingChange, RecordError> {
        let mut p = match PendingChange::load(state)? {
            Some(p) if p.id == id => p,
            _ => {
                return Err(RecordError::Changed(format!(
                    "change {id} was finished or undone while this command waited for its lock: nothing to resume (`scap status`)"
                )));
            }
        };
        if !dry_run {
            p.pid = std::process::id();
            p.host = crate::sys::hostname();
            p.save(state)?;
        }
        Ok(p)
    }

    /// The change recorded, if one is.
    pub fn load(state: &DeployState) -> Result<Option<PendingChange>, RecordError> {
        let Some(bytes) = state.read(Doc::Change)? else {
            return Ok(None);
        };
        let bad = |why: String| RecordError::Bad {
            place: state.location(Doc::Change),
            why,
        };
        let c: PendingChange = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if c.format > PENDING_FORMAT {
            return Err(bad(format!(
                "format v{}, this scap reads up to v{PENDING_FORMAT}",
                c.format
            )));
        }
        Ok(Some(c))
    }

    pub fn save(&mut self, state: &DeployState) -> Result<(), RecordError> {
        self.format = PENDING_FORMAT;
        let mut json = serde_json::to_vec_pretty(self).expect("serializes");
        json.push(b'\n');
        Ok(state.write(Doc::Change, &json)?)
    }

    /// The change is over (succeeded, or rolled back).
    pub fn remove(state: &DeployState) {
        if let Err(e) = state.remove(Doc::Change) {
            tracing::warn!("cannot remove {}: {e}", state.location(Doc::Change));
        }
    }
}
