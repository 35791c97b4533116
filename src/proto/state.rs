//! The host's state file: what this host runs, what it ran before, what
//! the last stable version is, and a bounded history.
//!
//! `STATE/state.json`, human-readable JSON, written atomically (temp file,
//! fsync, rename, fsync of the directory). The `current` symlink is the
//! truth about what is live; the state file is brought in line with it on
//! agent start (see `Agent::reconcile`), so a crash between the switch and
//! the state write is repaired, never believed.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::VersionId;
use crate::store::fsutil::atomic_write;

/// Version of the state file format this scap writes and reads.
pub const STATE_FORMAT: u32 = 1;
/// History entries kept.
pub const HISTORY_LEN: usize = 100;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Deployed {
    pub version: VersionId,
    /// Unix seconds when it became this.
    pub since: u64,
    pub by: String,
    /// When the deploy host built it, from its verified signature (a sync
    /// to a version built earlier is refused as a possible replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_time: Option<u64>,
}

/// What an event in a host's history was.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Sync,
    Rollback,
    Promote,
    /// The agent made the state file agree with `current` at start.
    Repair,
    /// The host's restart command ran (php-fpm reload, opcache reset).
    Restart,
    /// A running operation was cancelled.
    Cancel,
    /// The agent converged to the deploy host's desired state by itself
    /// (at start, or `scap pull`).
    Pull,
    /// A version was fetched and prepared, not switched to.
    Stage,
    /// Written by a newer agent; shown as is.
    #[serde(other)]
    Other,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Sync => "sync",
            Action::Rollback => "rollback",
            Action::Promote => "promote",
            Action::Pull => "pull",
            Action::Stage => "stage",
            Action::Repair => "repair",
            Action::Restart => "restart",
            Action::Cancel => "cancel",
            Action::Other => "other",
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub time: u64,
    pub action: Action,
    pub version: Option<VersionId>,
    pub from: Option<VersionId>,
    pub by: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seconds: f64,
    #[serde(default)]
    pub fetched_objects: u64,
    #[serde(default)]
    pub fetched_bytes: u64,
}

impl Event {
    /// A successful event now, with nothing fetched; the caller fills in
    /// the rest.
    pub fn new(
        action: Action,
        version: Option<VersionId>,
        from: Option<VersionId>,
        by: &str,
    ) -> Event {
        Event {
            time: crate::time::unix_now(),
            action,
            version,
            from,
            by: crate::text::clip(by, 128),
            ok: true,
            error: None,
            seconds: 0.0,
            fetched_objects: 0,
            fetched_bytes: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LastError {
    pub time: u64,
    pub action: Action,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostState {
    pub format: u32,
    pub host: String,
    pub current: Option<Deployed>,
    pub previous: Option<Deployed>,
    pub stable: Option<Deployed>,
    pub last_error: Option<LastError>,
    pub history: VecDeque<Event>,
    /// The newest deploy order this host took (its `seq`): an older one is
    /// refused as a replay (`store::signature::Order`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub order_seq: u64,
    /// The newest order that decided what this host runs (a sync, a
    /// rollback, a desired target; not a stage, which only prepares): a
    /// desired target older than it is not followed. Absent in an older
    /// state file: `order_seq`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub switch_seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "{path}: state file is format v{found}, this scap reads up to v{STATE_FORMAT}: upgrade scap on this host"
    )]
    Newer { path: PathBuf, found: u32 },
    #[error(
        "{path}: not a scap state file ({why}): move it aside and restart the agent, which rebuilds it from the live release"
    )]
    Corrupt { path: PathBuf, why: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HostState {
    pub fn new(host: &str) -> HostState {
        HostState {
            format: STATE_FORMAT,
            host: host.to_string(),
            current: None,
            previous: None,
            stable: None,
            last_error: None,
            history: VecDeque::new(),
            order_seq: 0,
            switch_seq: 0,
        }
    }

    /// Reads a state file; `Ok(None)` if there is none yet.
    pub fn load(path: &Path) -> Result<Option<HostState>, StateError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        check_format(path, &bytes)?;
        let mut st: HostState =
            serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        if st.switch_seq == 0 {
            st.switch_seq = st.order_seq;
        }
        Ok(Some(st))
    }

    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let mut json = serde_json::to_vec_pretty(self).expect("state serializes");
        json.push(b'\n');
        Ok(atomic_write(path, &json)?)
    }

    pub fn record(&mut self, event: Event) {
        if !event.ok {
            self.last_error = Some(LastError {
                time: event.time,
                action: event.action,
                message: event.error.clone().unwrap_or_default(),
            });
        }
        self.history.push_front(event);
        self.history.truncate(HISTORY_LEN);
    }
}

/// Checks the `format` field before anything else, so that a newer file
/// gets "upgrade scap" rather than a parse error. Shared with the fleet
/// controller, which reads hosts' state over HTTP.
pub fn check_format(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if head.format > STATE_FORMAT {
        return Err(StateError::Newer {
            path: path.to_path_buf(),
            found: head.format,
        });
    }
    Ok(())
}
