//! The audit log of the deploy hosts: one JSON entry per sync, rollback or
//! promote, in the deploy state (`super::state`: `STORE/fleet/history.jsonl`,
//! appended and fsynced, or a key each in etcd).

use serde::{Deserialize, Serialize};

use super::state::{DeployState, StateError};
use crate::store::VersionId;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub time: u64,
    pub user: String,
    /// "sync", "change", "rollback", "promote", "catch-up".
    pub action: String,
    pub version: Option<VersionId>,
    /// The share of traffic asked for and reached, in percent.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub reached: Option<f64>,
    /// The step's health gates: "passed", "failed", "skipped (--force)",
    /// "none" (no gates configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gates: Option<String>,
    /// Hosts this command changed, and those that failed.
    pub hosts: Vec<String>,
    pub failed: Vec<String>,
    pub ok: bool,
    pub message: String,
    pub command: String,
    /// The change (sync-file, sync-dir) this entry deployed, if any: its
    /// versions are in the store's records with this change ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    /// What the step's Prometheus gates measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measurements: Vec<super::prom::Measurement>,
    /// Bytes the step's hosts received from each source (caches, the
    /// deploy host).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sources: std::collections::BTreeMap<String, u64>,
}

impl Entry {
    /// A fleet command's outcome, now: the hosts it changed (those of
    /// `results` that succeeded) and the ones that failed. The caller sets
    /// what else applies (version, target, share reached).
    pub fn outcome<T>(
        action: &str,
        user: &str,
        command: &str,
        results: &[super::agents::HostResult<T>],
        failed: &[String],
        message: &str,
    ) -> Entry {
        Entry {
            time: crate::time::unix_now(),
            user: user.to_string(),
            action: action.to_string(),
            version: None,
            target: None,
            reached: None,
            gates: None,
            hosts: results
                .iter()
                .filter(|r| r.ok())
                .map(|r| r.host.to_string())
                .collect(),
            failed: failed.to_vec(),
            ok: failed.is_empty(),
            message: message.to_string(),
            command: command.to_string(),
            change: None,
            measurements: vec![],
            sources: Default::default(),
        }
    }
}

/// Entries as JSON for people and programs, each version also named by
/// its train (`"name": "1.46.0-wmf.6 +1: SWAT: ... (3f9a1c2e4b5d)"`).
pub fn named(entries: &[Entry], trains: &super::trains::Trains) -> Vec<serde_json::Value> {
    entries
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            if let Some(ver) = &e.version {
                v["name"] = trains.name(ver).to_string().into();
            }
            v
        })
        .collect()
}

/// Appends `entry` to the history; one that cannot be written is warned
/// about, never fatal: what it records has happened.
pub fn record(state: &DeployState, entry: &Entry) {
    if let Err(e) = append(state, entry) {
        tracing::warn!(
            "cannot append to the deploy history ({}): {e}",
            state.describe()
        );
    }
}

pub fn append(state: &DeployState, entry: &Entry) -> Result<(), StateError> {
    state.append_history(&serde_json::to_vec(entry).expect("serializes"))
}

/// The newest `n` entries, oldest first (a line that does not parse is
/// skipped).
pub fn recent(state: &DeployState, n: usize) -> Result<Vec<Entry>, StateError> {
    Ok(state
        .history_last(n)?
        .iter()
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect())
}
