//! Trains: what a name deploys.
//!
//! A train is a label (`1.46.0-wmf.6`): a movable pointer to a version, its
//! **head**, like a git branch, with the history of its moves in the store
//! (`refs/logs/labels/<label>.jsonl`, see [`Store::move_label`]). A
//! version ID, or an unambiguous prefix of one, means exactly that tree in
//! every command; `--version TRAIN` means the train's head now. Nothing
//! here ever forwards an ID to a version made from it.
//!
//! Heads move in four ways, each recorded (from, to, who, when, what,
//! why): a build labels a new version (`build-manifest --label`), `scap
//! label` moves one by hand, a change (sync-file, sync-dir) moves the
//! head of each train it was applied to **once its rollout has succeeded**
//! (a change whose gate fails, or that is stopped, never moves it: the
//! head never points at a version that was not deployed), and a rollback
//! that takes every host of a train's head back to the version the head
//! was at before moves it back.
//!
//! **Invariant:** this module reads the store's records and labels and
//! moves labels; it never talks to hosts. What hosts run comes from a poll.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::disk::{LabelMove, VersionRecord};
use crate::store::{Store, StoreError, VersionId};

/// How a version is shown to people: its train, the changes made on the
/// train's build to reach it, and the newest change's message, with the
/// hash beside it: `1.46.0-wmf.6 +2: SWAT: [[gerrit:12345]] (3f9a1c2e4b5d)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VersionName {
    pub version: VersionId,
    /// The train (the label its build was made with, or one that points
    /// at it), if any.
    pub train: Option<String>,
    /// Changes between the train's build and this version.
    pub changes: u32,
    /// The newest change's message, if `changes > 0`.
    pub message: Option<String>,
    /// Whether a train's head is this version now.
    pub head: bool,
}

impl VersionName {
    /// The name without the hash: `1.46.0-wmf.6 +2: SWAT: ...`, or the
    /// short hash for a version of no train.
    pub fn title(&self) -> String {
        match (&self.train, self.changes, &self.message) {
            (None, 0, _) => self.version.short(),
            (None, n, Some(m)) => {
                format!(
                    "{} +{n}: {}",
                    self.version.short(),
                    crate::text::clip(m, 60)
                )
            }
            (None, n, None) => format!("{} +{n}", self.version.short()),
            (Some(t), 0, _) => t.clone(),
            (Some(t), n, Some(m)) => format!("{t} +{n}: {}", crate::text::clip(m, 60)),
            (Some(t), n, None) => format!("{t} +{n}"),
        }
    }
}

impl std::fmt::Display for VersionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.train.is_none() && self.changes == 0 {
            return f.write_str(&self.version.short());
        }
        write!(f, "{} ({})", self.title(), self.version.short())
    }
}

/// The deploy host's trains and version records, read once.
#[derive(Clone, Debug, Default)]
pub struct Trains {
    records: BTreeMap<VersionId, VersionRecord>,
    /// (label, head), sorted by label.
    heads: Vec<(String, VersionId)>,
    /// Each train's newest moves (at most [`RECENT_MOVES`]), oldest first.
    recent: BTreeMap<String, Vec<LabelMove>>,
}

/// Moves of each train a view keeps (`scap log TRAIN` reads them all).
pub const RECENT_MOVES: usize = 10;

impl Trains {
    /// Reads the store's records and labels.
    pub fn load(store: &Store) -> Result<Trains, StoreError> {
        let records = store
            .records()?
            .into_iter()
            .map(|r| (r.version, r))
            .collect();
        let heads = store.labels()?;
        let mut recent = BTreeMap::new();
        for (t, _) in &heads {
            let mut moves = store.label_log(t)?;
            let skip = moves.len().saturating_sub(RECENT_MOVES);
            moves.drain(..skip);
            recent.insert(t.clone(), moves);
        }
        Ok(Trains {
            records,
            heads,
            recent,
        })
    }

    /// The newest moves of `train`, oldest first.
    pub fn recent_moves(&self, train: &str) -> &[LabelMove] {
        self.recent.get(train).map_or(&[], Vec::as_slice)
    }

    /// From a store at `path` if there is one (an empty view otherwise:
    /// versions are then shown by their hash).
    pub fn load_or_empty(path: &std::path::Path) -> Trains {
        Store::open(path)
            .and_then(|s| Trains::load(&s))
            .unwrap_or_default()
    }

    /// Every train with its head, sorted by name.
    pub fn heads(&self) -> &[(String, VersionId)] {
        &self.heads
    }

    /// The head of `train` now.
    pub fn head(&self, train: &str) -> Option<VersionId> {
        self.heads.iter().find(|(l, _)| l == train).map(|(_, v)| *v)
    }

    /// The trains whose head is `v`.
    pub fn headed_by(&self, v: &VersionId) -> Vec<&str> {
        self.heads
            .iter()
            .filter(|(_, h)| h == v)
            .map(|(l, _)| l.as_str())
            .collect()
    }

    /// The build `v` was made from by changes (itself if no change made
    /// it), and how many changes are on the way.
    fn build_of(&self, v: &VersionId) -> (VersionId, u32) {
        let (mut at, mut n) = (*v, 0u32);
        while let Some(r) = self.records.get(&at)
            && r.change.is_some()
            && let Some(p) = r.parent
            && n < 100_000
        {
            at = p;
            n += 1;
        }
        (at, n)
    }

    /// The train `v` belongs to: a train whose head is `v`, else the label
    /// its build was made with, else a train whose head is that build.
    pub fn train_of(&self, v: &VersionId) -> Option<String> {
        if let Some(t) = self.headed_by(v).first() {
            return Some((*t).to_string());
        }
        let (build, _) = self.build_of(v);
        if let Some(l) = self.records.get(&build).and_then(|r| r.label.clone()) {
            return Some(l);
        }
        self.headed_by(&build).first().map(|t| (*t).to_string())
    }

    /// How `v` is shown to people.
    pub fn name(&self, v: &VersionId) -> VersionName {
        let (_, changes) = self.build_of(v);
        VersionName {
            version: *v,
            train: self.train_of(v),
            changes,
            message: (changes > 0)
                .then(|| self.records.get(v).and_then(|r| r.message.clone()))
                .flatten(),
            head: !self.headed_by(v).is_empty(),
        }
    }

    /// When `name` (what a deployer typed) is not a train but names `v`,
    /// and `v` is not its train's head: the train and its head, for a note
    /// that `v` is deployed as asked.
    pub fn not_head(&self, name: &str, v: &VersionId) -> Option<(String, VersionId)> {
        if self.head(name).is_some() {
            return None;
        }
        let train = self.train_of(v)?;
        let head = self.head(&train)?;
        (head != *v).then_some((train, head))
    }

    /// `v`'s train's head now, if that head was made from the same build
    /// by changes (what "that train" means for a rollback to a host's
    /// stable version); else `v` itself.
    pub fn head_of_train(&self, v: &VersionId) -> VersionId {
        let Some(train) = self.train_of(v) else {
            return *v;
        };
        match self.head(&train) {
            Some(h) if self.build_of(&h).0 == self.build_of(v).0 => h,
            _ => *v,
        }
    }
}

/// One head moved (or refused to move) after a change or a rollback.
#[derive(Clone, Debug, Serialize)]
pub struct HeadMove {
    pub train: String,
    pub from: VersionId,
    pub to: VersionId,
    /// Why it did not move (another deployer moved it meanwhile), if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl std::fmt::Display for HeadMove {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.refused {
            None => write!(
                f,
                "train {}: {} -> {}",
                self.train,
                self.from.short(),
                self.to.short()
            ),
            Some(why) => write!(f, "train {}: NOT moved: {why}", self.train),
        }
    }
}

/// Moves the head of every train at a key of `map` to its value (compare
/// and swap: a train moved meanwhile is left alone and named). `action`
/// is "change", "revert" or "rollback".
pub fn move_heads(
    store: &Store,
    map: &BTreeMap<VersionId, (VersionId, &str)>,
    user: &str,
    message: &str,
    change: Option<&str>,
) -> Vec<HeadMove> {
    let heads = match store.labels() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("cannot read the trains to move their heads: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (train, head) in heads {
        let Some((to, action)) = map.get(&head) else {
            continue;
        };
        let mv = LabelMove {
            change: change.map(str::to_string),
            ..LabelMove::now(user, *to, action, message)
        };
        let refused = match store.move_label(&train, Some(Some(head)), &mv) {
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        out.push(HeadMove {
            train,
            from: head,
            to: *to,
            refused,
        });
    }
    out
}

/// After a rollback: the trains whose head no host runs any more, and that
/// every host which ran it left for the version the head was at before
/// (by the train's history), move back there. `moved` is (from, to) for
/// each host the rollback moved; `still` the versions hosts run now.
pub fn heads_after_rollback(
    store: &Store,
    moved: &[(VersionId, VersionId)],
    still: &[VersionId],
    user: &str,
    message: &str,
) -> Vec<HeadMove> {
    let Ok(heads) = store.labels() else {
        return Vec::new();
    };
    let mut map: BTreeMap<VersionId, (VersionId, &str)> = BTreeMap::new();
    for (train, head) in &heads {
        if still.contains(head) {
            continue;
        }
        let dests: Vec<VersionId> = moved
            .iter()
            .filter(|(f, _)| f == head)
            .map(|(_, t)| *t)
            .collect();
        let Some(first) = dests.first() else {
            continue;
        };
        if dests.iter().any(|d| d != first) {
            continue;
        }
        let before = store
            .label_log(train)
            .unwrap_or_default()
            .into_iter()
            .rev()
            .find(|m| m.to == *head)
            .and_then(|m| m.from);
        if before == Some(*first) {
            map.insert(*head, (*first, "rollback"));
        }
    }
    if map.is_empty() {
        return Vec::new();
    }
    move_heads(store, &map, user, message, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectKind;

    fn v(s: &str) -> VersionId {
        VersionId::new(ObjectKind::Tree.hash(s.as_bytes()))
    }

    fn rec(ver: VersionId, parent: Option<VersionId>, change: Option<&str>) -> VersionRecord {
        VersionRecord {
            message: change.map(|c| format!("SWAT: {c}")),
            parent,
            change: change.map(str::to_string),
            ..VersionRecord::bare(ver, 0)
        }
    }

    #[test]
    fn two_deployers_racing_to_move_a_head_one_wins_the_other_is_told_who() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open_or_init(&dir.path().join("s"), crate::store::disk::Role::Deploy).unwrap();
        let (h0, a, b) = (v("h0"), v("a"), v("b"));
        let t = "1.46.0-wmf.6";
        assert!(
            store
                .move_label(
                    t,
                    Some(None),
                    &LabelMove::now("builder", h0, "build", "new train")
                )
                .unwrap()
        );
        let alice = [(h0, (a, "change"))].into_iter().collect();
        let bob = [(h0, (b, "change"))].into_iter().collect();
        let won = move_heads(&store, &alice, "alice", "SWAT: [[gerrit:1]]", Some("c1"));
        assert_eq!(won.len(), 1);
        assert!(won[0].refused.is_none());
        // Bob read the head before Alice moved it.
        let e = store
            .move_label(
                t,
                Some(Some(h0)),
                &LabelMove::now("bob", b, "change", "SWAT: 2"),
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "train {t} moved meanwhile: expected its head at {}, it is at {} (moved by alice at ",
                h0.short(),
                a.short()
            )) && e.contains("change SWAT: [[gerrit:1]]"),
            "{e}"
        );
        // Bob's map no longer matches a head: nothing moves.
        assert!(move_heads(&store, &bob, "bob", "SWAT: 2", None).is_empty());
        assert_eq!(store.label(t).unwrap(), Some(a));
        let log = store.label_log(t).unwrap();
        let steps: Vec<(Option<VersionId>, VersionId, &str)> = log
            .iter()
            .map(|m| (m.from, m.to, m.user.as_str()))
            .collect();
        assert_eq!(steps, vec![(None, h0, "builder"), (Some(h0), a, "alice")]);
        assert_eq!(log[1].change.as_deref(), Some("c1"));
        // A torn last line (a crash mid-append) is skipped.
        let path = dir
            .path()
            .join("s/refs/logs/labels")
            .join(format!("{t}.jsonl"));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"{\"time\":1,\"us");
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(store.label_log(t).unwrap().len(), 2);
    }

    #[test]
    fn a_version_is_named_by_its_train_and_changes() {
        let (t1, t1a, t1b, other) = (v("t1"), v("t1a"), v("t1b"), v("x"));
        let mut build = rec(t1, None, None);
        build.label = Some("1.46.0-wmf.5".into());
        let trains = Trains {
            records: [
                (t1, build),
                (t1a, rec(t1a, Some(t1), Some("a"))),
                (t1b, rec(t1b, Some(t1a), Some("b"))),
                (other, rec(other, None, None)),
            ]
            .into_iter()
            .collect(),
            heads: vec![("1.46.0-wmf.5".into(), t1a)],
            recent: BTreeMap::new(),
        };
        assert_eq!(trains.name(&t1).title(), "1.46.0-wmf.5");
        assert_eq!(trains.name(&t1a).title(), "1.46.0-wmf.5 +1: SWAT: a");
        assert!(trains.name(&t1a).head);
        assert_eq!(
            trains.name(&t1b).to_string(),
            format!("1.46.0-wmf.5 +2: SWAT: b ({})", t1b.short())
        );
        assert_eq!(trains.name(&other).to_string(), other.short());
        // The head, not the newest version made from the build.
        assert_eq!(trains.head_of_train(&t1), t1a);
        assert_eq!(trains.head_of_train(&t1b), t1a);
        assert_eq!(trains.head_of_train(&other), other);
    }
}
