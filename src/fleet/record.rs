//! The rollout in progress, recorded in the deploy state (`super::state`:
//! `STORE/fleet/rollout.json`, or etcd) so that it outlives the terminal,
//! and the deploy host, that started it.
//!
//! It holds what `scap sync --resume` needs to continue from the last
//! completed step with the same settings (the goal, the stages, the gates,
//! the wait, the budget, the sources), which hosts it moved and where they
//! came from (so that rolling the canary back returns each host to its own
//! train), and when the next step is due, for `scap status` and the
//! dashboard. A change (sync-file) made meanwhile rewrites the versions in
//! it, so continuing deploys the new train with the change, and rolling
//! back returns to the old train with the change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::rollout::Stage;
use super::state::{DeployState, Doc, StateError};
use crate::store::VersionId;

pub const RECORD_FORMAT: u32 = 1;

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    /// A controller is running it (or died while doing so: see `pid`).
    Running,
    /// Stopped between steps (by the operator, Ctrl-C, a failure): `scap
    /// sync --resume` continues it.
    Stopped,
    /// Every stage done.
    Done,
    /// Rolled back: nothing to resume.
    RolledBack,
}

/// The settings a resumed rollout keeps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub sources: Vec<String>,
    /// (URL template, status)
    pub probes: Vec<(String, u16)>,
    pub commands: Vec<String>,
    #[serde(default)]
    pub prometheus: Vec<super::prom::PromGate>,
    pub wait_seconds: u64,
    pub max_failures: String,
    pub concurrency: usize,
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub format: u32,
    /// Unique per rollout: `<unix seconds>-<version short>`.
    pub id: String,
    pub version: VersionId,
    pub label: String,
    pub stages: Vec<Stage>,
    /// How many stages are done.
    pub completed: usize,
    /// Hosts this rollout moved, and the version each ran before.
    #[serde(default)]
    pub from: BTreeMap<String, VersionId>,
    pub settings: Settings,
    pub state: RolloutState,
    pub by: String,
    pub command: String,
    /// The controller's process and host while `Running`.
    pub pid: u32,
    pub host: String,
    pub started: u64,
    pub updated: u64,
    /// When the next stage may start (after the wait), if one is left.
    #[serde(default)]
    pub next_due: Option<u64>,
    /// Why it stopped, for people.
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{place}: {why}: move it aside, or upgrade scap")]
    Bad { place: String, why: String },
    #[error(transparent)]
    State(#[from] StateError),
    /// What `--resume` read changed while it waited for the lock.
    #[error("{0}")]
    Changed(String),
}

impl RolloutRecord {
    /// The rollout `id` read again once `--resume` holds the lock (its
    /// controller may have written a step after the first read, before it
    /// died): still that rollout, and still resumable.
    pub fn reload_for_resume(state: &DeployState, id: &str) -> Result<RolloutRecord, RecordError> {
        match RolloutRecord::load(state)? {
            Some(r) if r.id == id && r.resumable() => Ok(r),
            Some(r) if r.id == id => Err(RecordError::Changed(format!(
                "the rollout of {} ended while this command waited for its lock ({}): nothing to resume",
                r.label, r.note
            ))),
            _ => Err(RecordError::Changed(
                "the recorded rollout changed while this command waited for its lock: run `scap status`, then --resume again".into(),
            )),
        }
    }

    /// The rollout recorded, if any.
    pub fn load(state: &DeployState) -> Result<Option<RolloutRecord>, RecordError> {
        let Some(bytes) = state.read(Doc::Rollout)? else {
            return Ok(None);
        };
        let place = || state.location(Doc::Rollout);
        let r: RolloutRecord = serde_json::from_slice(&bytes).map_err(|e| RecordError::Bad {
            place: place(),
            why: e.to_string(),
        })?;
        if r.format > RECORD_FORMAT {
            return Err(RecordError::Bad {
                place: place(),
                why: format!(
                    "format v{}, this scap reads up to v{RECORD_FORMAT}",
                    r.format
                ),
            });
        }
        Ok(Some(r))
    }

    pub fn save(&mut self, state: &DeployState) -> Result<(), RecordError> {
        self.format = RECORD_FORMAT;
        self.updated = crate::time::unix_now();
        let mut json = serde_json::to_vec_pretty(self).expect("serializes");
        json.push(b'\n');
        Ok(state.write(Doc::Rollout, &json)?)
    }

    /// The record of a new rollout of `version` now, by this process.
    /// Rolling out the version of the recorded rollout again keeps where
    /// its hosts came from (unless it was rolled back); returns the
    /// unfinished rollout it replaces, if any, for the operator.
    pub fn start(
        state: &super::state::DeployState,
        version: VersionId,
        label: &str,
        stages: &[Stage],
        settings: Settings,
        by: &str,
        command: &str,
    ) -> Result<(RolloutRecord, Option<RolloutRecord>), RecordError> {
        let old = RolloutRecord::load(state)?;
        let mut from = BTreeMap::new();
        let mut replaced = None;
        if let Some(old) = old {
            if old.version == version && old.state != RolloutState::RolledBack {
                // The same train again: its hosts still came from where the
                // record says.
                from = old.from.clone();
            } else if old.resumable() {
                replaced = Some(old);
            }
        }
        let now = crate::time::unix_now();
        Ok((
            RolloutRecord {
                format: RECORD_FORMAT,
                id: format!("{}-{}", crate::time::fmt_compact(now), version.short()),
                version,
                label: label.to_string(),
                stages: stages.to_vec(),
                completed: 0,
                from,
                settings,
                state: RolloutState::Running,
                by: by.to_string(),
                command: command.to_string(),
                pid: std::process::id(),
                host: crate::sys::hostname(),
                started: now,
                updated: now,
                next_due: None,
                note: String::new(),
            },
            replaced,
        ))
    }

    /// Whether `scap sync --resume` may continue it.
    pub fn resumable(&self) -> bool {
        matches!(self.state, RolloutState::Running | RolloutState::Stopped)
            && self.completed < self.stages.len()
    }

    /// The next stage, if one is left.
    pub fn next_stage(&self) -> Option<Stage> {
        self.stages.get(self.completed).copied()
    }

    /// A change replaced versions by others (old -> new).
    pub fn rewrite(&mut self, map: &BTreeMap<VersionId, VersionId>) {
        if let Some(new) = map.get(&self.version) {
            self.version = *new;
        }
        for v in self.from.values_mut() {
            if let Some(new) = map.get(v) {
                *v = *new;
            }
        }
    }
}
