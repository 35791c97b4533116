//! The agent's HTTP API as types: every request and response body, used by
//! the agent (`host::api`), the controller (`fleet::agents`) and the object
//! service (`net`: the desired state), so they cannot disagree about a
//! field, and nothing reads an agent's answer by indexing into untyped
//! JSON. The table of endpoints is in store-format.md ("Agent API").
//!
//! **Invariant:** this module sits below `host`, `net` and `fleet` and
//! imports none of them: what crosses the wire (the host's state file,
//! its release slots, a drift report) is defined here, and the agent's
//! code uses these types.
//!
//! Everything the controller parses from an agent goes through these types
//! (IDs are checked as 64 hex digits, enums are closed) after its size is
//! capped ([`MAX_RESPONSE_BYTES`]); strings from an agent are shown to
//! people only through `text::clip`.

use serde::{Deserialize, Serialize};

pub mod state;

use self::state::HostState;
use crate::store::VersionId;
use crate::store::signature::{SignedOrder, SignedVersion};

/// A host name scap accepts: letters, digits, `.`, `-`, `_`, at most 253
/// bytes (it goes into URLs and file names unescaped).
pub fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'))
}

/// What a slot holds, in `releases/<slot>.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotMeta {
    pub version: Option<VersionId>,
    /// False while the slot is being changed: its content is then neither
    /// `version` nor the target, and it must be rewritten before use.
    pub clean: bool,
    /// Unix seconds of the last time it was made or switched to.
    #[serde(default)]
    pub used: u64,
    /// When the operation that last wrote it began ([`share`]'s seal):
    /// every file in it untouched since has an older mtime. None for a slot
    /// written before slots shared files: it holds its own copies and is
    /// never linked from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub meta: SlotMeta,
}

/// How a slot came to hold the version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum How {
    /// The host already ran the version: nothing was done.
    #[default]
    AlreadyThere,
    /// A clean slot already held it.
    Reused,
    /// The changes from the version the slot held were applied.
    Diff,
    /// Written from nothing.
    Full,
}

impl std::fmt::Display for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            How::AlreadyThere => "already there",
            How::Reused => "reused",
            How::Diff => "diff",
            How::Full => "full",
        })
    }
}

/// What a drift check found: a live tree against its version.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Drift {
    pub checked_files: u64,
    /// `(status, path, what)`: M content or mode, A not in the version, D
    /// missing, T different kind.
    pub changes: Vec<(char, String, String)>,
}

/// This release of scap, as a controller and an agent tell each other in
/// the [`RELEASE_HEADER`] of every request and answer. One release apart
/// work together (the newer side speaks the older protocol: every field a
/// release adds is optional); further apart, the newer side refuses,
/// saying which host to upgrade. A peer that sends no header is release 1,
/// the last before the header.
pub const RELEASE: u32 = 2;

/// The HTTP header that carries [`RELEASE`].
pub const RELEASE_HEADER: &str = "scap-release";

/// The HTTP header a controller sends with every request of a rollout or
/// change: its ID (`20261207T101500Z-3f9a1c2e4b5d`), which the agent puts
/// on each log line of the operation, so a journal search for one ID
/// finds what every host did for it. Optional: an older controller sends
/// none.
pub const ROLLOUT_HEADER: &str = "scap-rollout";

/// Whether `id` may be a [`ROLLOUT_HEADER`]: 1 to 64 of `[A-Za-z0-9._:-]`,
/// so that it is one token in a log line.
pub fn rollout_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Why a peer of release `theirs` (none: it sent no header) and this one
/// cannot work together, from this side's view (`we_are`: "agent" or
/// "controller"); `None` when they can. Says what to upgrade, in the
/// upgrade order: deploy hosts (controllers) first, then agents.
pub fn release_mismatch(theirs: Option<&str>, we_are: &str) -> Option<String> {
    let theirs: u32 = match theirs {
        None => 1,
        Some(t) => match t.trim().parse() {
            Ok(n) => n,
            Err(_) => {
                return Some(format!(
                    "a {RELEASE_HEADER} header of {:?} is not a release number",
                    crate::text::clip(t, 40)
                ));
            }
        },
    };
    let upgrade_controller = (we_are == "agent" && theirs + 1 < RELEASE)
        || (we_are == "controller" && theirs > RELEASE + 1);
    let upgrade_agent = (we_are == "agent" && theirs > RELEASE + 1)
        || (we_are == "controller" && theirs + 1 < RELEASE);
    let (agent, controller) = if we_are == "agent" {
        (RELEASE, theirs)
    } else {
        (theirs, RELEASE)
    };
    if upgrade_controller {
        Some(format!(
            "the agent runs scap release {agent} and the controller release {controller}, two or more apart: upgrade scap on the deploy host first (deploy hosts, then agents)"
        ))
    } else if upgrade_agent {
        Some(format!(
            "the agent runs scap release {agent} and the controller release {controller}, two or more apart: upgrade scap on this app server (agents may be one release behind the deploy host, no more)"
        ))
    } else {
        None
    }
}

/// Largest agent answer the controller reads (a state file with its
/// 100-event history is about 40 KB).
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Largest request body the agent reads.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// Most sources one sync request may name.
pub const MAX_SOURCES: usize = 32;
/// Longest `by` (who asked) an agent records.
pub const MAX_BY_LEN: usize = 128;

/// `POST /v1/sync`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncRequest {
    pub version: VersionId,
    /// URLs of `scap serve` or caches in front of one, tried in order.
    pub sources: Vec<String>,
    #[serde(default = "unknown")]
    pub by: String,
    /// The whole fetch must end within this many seconds, or the sync
    /// fails with the host unchanged (default [`DEFAULT_FETCH_TIMEOUT`]).
    #[serde(default)]
    pub fetch_timeout_seconds: Option<u64>,
    /// The version's signatures (`versions/<id>.sig`), to save a request;
    /// without them the agent fetches them from the sources. Either way it
    /// checks them against the keys it trusts.
    #[serde(default)]
    pub signature: Option<SignedVersion>,
    /// The deploy host's signed order for this host and version: with it,
    /// the agent takes the version if the order is newer than any it took
    /// (a revert to a version it ran before included); without it, only a
    /// version signed no earlier than the one it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<SignedOrder>,
}

/// Seconds a fetch may take when the request does not say.
pub const DEFAULT_FETCH_TIMEOUT: u64 = 1800;

pub fn unknown() -> String {
    "unknown".into()
}

/// Where a rollback goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RollbackTarget {
    Previous,
    Stable,
    Version(VersionId),
}

impl std::fmt::Display for RollbackTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RollbackTarget::Previous => f.write_str("previous"),
            RollbackTarget::Stable => f.write_str("stable"),
            RollbackTarget::Version(v) => write!(f, "{v}"),
        }
    }
}

impl std::str::FromStr for RollbackTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "previous" => Ok(RollbackTarget::Previous),
            "stable" => Ok(RollbackTarget::Stable),
            v => v
                .parse()
                .map(RollbackTarget::Version)
                .map_err(|e| format!("rollback target {v:?}: {e} (or \"previous\", \"stable\")")),
        }
    }
}

impl Serialize for RollbackTarget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RollbackTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `POST /v1/rollback`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub to: RollbackTarget,
    #[serde(default = "unknown")]
    pub by: String,
    /// Where to fetch a named version this host does not hold (the old
    /// train with a change made since): without sources, such a rollback
    /// is refused. The version must still carry a trusted signature.
    #[serde(default)]
    pub sources: Vec<String>,
    /// The deploy host's signed order (action "rollback") for a named
    /// version: an agent refuses an order older than one it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<SignedOrder>,
}

/// `GET /v1/desired/<host>` on `scap serve`: what the deploy host last
/// decided this host should run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesiredResponse {
    pub host: String,
    /// `None`: no target recorded for this host (a host never deployed to
    /// by this deploy host): it keeps what it runs.
    pub version: Option<VersionId>,
    #[serde(default)]
    pub since: u64,
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub why: String,
    /// The deploy key's order (action `desired`) for this host to run
    /// `version`: an agent that trusts a key follows only a target whose
    /// order verifies and is newer than every order it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<SignedOrder>,
}

/// The action a desired target's order names.
pub const DESIRED_ACTION: &str = "desired";

/// Longest desired-state answer an agent reads.
pub const MAX_DESIRED_BYTES: usize = 16 << 10;

/// `GET /v1/catalogue` (the object service): what a standby deploy host
/// copies from its primary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalogue {
    pub format: u32,
    /// Every version recorded in the store, in no order.
    pub versions: Vec<crate::store::VersionId>,
    pub labels: Vec<CatalogueLabel>,
}

pub const CATALOGUE_FORMAT: u32 = 1;
/// Largest catalogue a standby reads (100k versions and labels fit).
pub const MAX_CATALOGUE_BYTES: u64 = 16 << 20;
/// Largest label history a standby reads.
pub const MAX_LABEL_LOG_BYTES: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogueLabel {
    pub name: String,
    pub version: crate::store::VersionId,
    /// How many moves its history holds.
    pub moves: usize,
}

/// `POST /v1/restart`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestartRequest {
    #[serde(default = "unknown")]
    pub by: String,
}

/// The answer to a restart: the command's result (a failed command is a
/// 200 with `ok: false`, so the controller can tell it from a host that
/// did not answer).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestartOutcome {
    pub host: String,
    pub ok: bool,
    pub status: String,
    /// The end of its output (clipped).
    pub output: String,
    pub seconds: f64,
}

/// `POST /v1/pull`: converge to the deploy host's desired state now.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PullRequest {
    #[serde(default = "unknown")]
    pub by: String,
}

/// The answer to a pull.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PullOutcome {
    pub host: String,
    /// The target the deploy host gave, if any.
    pub target: Option<VersionId>,
    /// The sync it took to get there (none when already there or no target).
    pub outcome: Option<Outcome>,
    pub message: String,
}

/// `POST /v1/promote`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromoteRequest {
    pub version: VersionId,
    #[serde(default = "unknown")]
    pub by: String,
}

/// `POST /v1/cancel`: stop whatever the agent is doing (a fetch, writing a
/// release, the work after a switch), leaving the host on what it ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CancelRequest {
    #[serde(default = "unknown")]
    pub by: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fetched {
    pub trees: u64,
    pub chunks: u64,
    /// Body bytes received from sources.
    pub bytes: u64,
    pub requests: u64,
    /// Whether a delta pack came (the rest, if any, by object requests).
    #[serde(default)]
    pub pack: bool,
    /// Body bytes received from each source.
    #[serde(default)]
    pub by_source: std::collections::BTreeMap<String, u64>,
    /// Sources skipped for the rest of the sync, and why (a cache that
    /// sent a corrupt object, or did not answer).
    #[serde(default)]
    pub skipped: Vec<String>,
}

/// The answer to a sync or a rollback.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub host: String,
    pub version: VersionId,
    pub from: Option<VersionId>,
    /// True when the host was already on the version: nothing was done.
    pub noop: bool,
    pub slot: String,
    pub how: How,
    #[serde(default)]
    pub fetched: Fetched,
    #[serde(default)]
    pub files_written: u64,
    /// Files hardlinked from the live release instead of written.
    #[serde(default)]
    pub files_linked: u64,
    /// Files of the release found changed by hand through an inode it
    /// shares with the live one, and rewritten (`host::share`).
    #[serde(default)]
    pub repaired: u64,
    /// Files of the release whose `stat` that check took: every file, or
    /// with the agent's watch on its slots (`host::watch`), only those
    /// reported changed since the last check.
    #[serde(default)]
    pub files_checked: u64,
    #[serde(default)]
    pub seconds: f64,
}

/// The answer to `POST /v1/cancel`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CancelOutcome {
    pub host: String,
    /// What was running and is now stopping, if anything.
    pub cancelled: Option<String>,
}

/// What the last drift check found, in `/v1/state`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DriftSummary {
    pub checked_at: u64,
    pub version: VersionId,
    /// Files that differ from the version (edited, added or removed by hand).
    pub changed: u64,
    /// The first few of them.
    pub paths: Vec<String>,
    /// True: every file was re-hashed (at start, on schedule, on `GET
    /// /v1/verify`). False: the baseline a switch leaves, the deploy's
    /// `stat` check of what changed since the last one (an edit that put
    /// back its mtime waits for the next re-hash).
    #[serde(default)]
    pub rehashed: bool,
}

/// `GET /v1/state`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateResponse {
    pub state: HostState,
    pub slots: Vec<Slot>,
    /// True while an operation (or the work after a switch) runs.
    pub busy: bool,
    /// What runs, for people.
    #[serde(default)]
    pub operation: Option<String>,
    /// True while a sync, rollback or pull runs (not just the work after a
    /// switch): what the host runs may change any moment.
    #[serde(default)]
    pub changing: bool,
    pub drift: Option<DriftSummary>,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthResponse {
    pub ok: bool,
    pub host: String,
    pub version: VersionId,
}

/// `GET /v1/verify`.
pub type VerifyResponse = Drift;

/// Every error answer: a message that names the host and says what to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_release_apart_works_two_apart_names_what_to_upgrade() {
        assert_eq!(
            release_mismatch(None, "agent"),
            None,
            "release 1, the one before"
        );
        assert_eq!(release_mismatch(Some("2"), "controller"), None);
        assert_eq!(release_mismatch(Some("3"), "agent"), None);
        let old_controller = release_mismatch(Some("0"), "agent").unwrap();
        assert!(
            old_controller.contains("upgrade scap on the deploy host first"),
            "{old_controller}"
        );
        let new_controller = release_mismatch(Some("4"), "agent").unwrap();
        assert!(
            new_controller.contains("upgrade scap on this app server"),
            "{new_controller}"
        );
        let old_agent = release_mismatch(Some("0"), "controller").unwrap();
        assert!(
            old_agent.contains("upgrade scap on this app server"),
            "{old_agent}"
        );
        let new_agent = release_mismatch(Some("9"), "controller").unwrap();
        assert!(new_agent.contains("deploy host first"), "{new_agent}");
        assert!(
            release_mismatch(Some("x"), "agent")
                .unwrap()
                .contains("not a release number")
        );
    }

    #[test]
    fn rollback_targets_round_trip() {
        let v = VersionId::new(crate::store::ObjectKind::Tree.hash(b"v"));
        for t in [
            RollbackTarget::Previous,
            RollbackTarget::Stable,
            RollbackTarget::Version(v),
        ] {
            let j = serde_json::to_string(&RollbackRequest {
                to: t,
                by: "me".into(),
                sources: vec![],
                order: None,
            })
            .unwrap();
            assert_eq!(serde_json::from_str::<RollbackRequest>(&j).unwrap().to, t);
        }
        assert!(serde_json::from_str::<RollbackRequest>(r#"{"to":"nope"}"#).is_err());
        assert!(serde_json::from_str::<RollbackRequest>(r#"{"to":"abcd"}"#).is_err());
    }
}
