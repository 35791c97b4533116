//! Version records and refs: what `build-manifest` knew about each version
//! (`versions/<id>.json`), labels (`refs/labels/<label>`) with the history
//! of their moves (`refs/logs/labels/<label>.jsonl`), pins
//! (`refs/pins/<id>`), and resolving a name a person typed to a version.
//!
//! A label is a train: a movable pointer to the version it deploys (its
//! head), like a git branch. Every move is a compare-and-swap under
//! `refs/labels.lock` and is appended to the label's log before the
//! pointer changes, so the log never misses a move that happened (a crash
//! between the two leaves a log line whose move did not happen: readers
//! take the pointer as the truth and the log as its history).

use std::fs;
use std::io::ErrorKind;
use std::path::PathBuf;

use super::{IoContext, Result, Store, StoreError};
use crate::store::fsutil::{atomic_write, read_head};
use crate::store::id::{IdError, IdPrefix, ObjectId, ObjectKind, TreeId, VersionId};
use crate::store::object;
use crate::store::signature::SignedVersion;

/// A version record: what `build-manifest` knew about a version. Kept beside
/// the version, not part of its hash.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VersionRecord {
    pub format: u32,
    pub version: VersionId,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    pub author: String,
    /// Seconds since the Unix epoch, UTC.
    pub time: u64,
    /// Sub-second part of `time`, to order builds made in the same second.
    #[serde(default)]
    pub time_nanos: u32,
    #[serde(default)]
    pub parent: Option<VersionId>,
    /// The change (`sync-file`, `sync-dir`) that made this version from
    /// `parent`; the versions one change made on several trains share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    pub components: Vec<ComponentRecord>,
    pub files: u64,
    pub bytes: u64,
}

#[cfg(test)]
impl VersionRecord {
    /// A record of `version` made at `time` that says nothing else, for
    /// unit tests to fill in what they need.
    pub fn bare(version: VersionId, time: u64) -> VersionRecord {
        VersionRecord {
            format: 1,
            version,
            label: None,
            message: None,
            author: "t".into(),
            time,
            time_nanos: 0,
            parent: None,
            change: None,
            components: vec![],
            files: 0,
            bytes: 0,
        }
    }
}

/// One move of a label (a train's head): a line of
/// `refs/logs/labels/<label>.jsonl`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LabelMove {
    /// Seconds since the Unix epoch, UTC.
    pub time: u64,
    pub user: String,
    /// Where it pointed before (none: the label was made).
    pub from: Option<VersionId>,
    pub to: VersionId,
    /// What moved it: "build", "label", "change", "revert", "rollback".
    pub action: String,
    /// Why: the change's or build's message, the command.
    pub message: String,
    /// The change (sync-file, sync-dir) that made `to`, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
}

impl LabelMove {
    /// A move now by `user`.
    pub fn now(user: &str, to: VersionId, action: &str, message: &str) -> LabelMove {
        LabelMove {
            time: crate::time::unix_now(),
            user: user.to_string(),
            from: None,
            to,
            action: action.to_string(),
            message: message.to_string(),
            change: None,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ComponentRecord {
    pub name: String,
    pub tree: TreeId,
    pub files: u64,
    pub bytes: u64,
}

/// A label as a shared record holds it: its head and its whole history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedLabel {
    pub name: String,
    pub head: VersionId,
    pub log: Vec<LabelMove>,
}

/// A record of labels shared by several stores (the deploy hosts' deploy
/// state): every move is made there first, atomically against the head
/// this store saw, then here, so that two stores never move one label
/// from the same head to two places. The store knows nothing more of it.
pub trait SharedLabels: Send + Sync + std::fmt::Debug {
    /// Moves `label` to `mv.to` if the shared head is `head` (`None`: the
    /// label does not exist there, or exists at `mv.to` already). `Err`
    /// says why not, for a person.
    /// `log` is the store's history of the label before this move, the
    /// shared record's start when it has none yet.
    fn move_label(
        &self,
        label: &str,
        head: Option<VersionId>,
        log: &[LabelMove],
        mv: &LabelMove,
    ) -> std::result::Result<(), String>;
    /// Every shared label.
    fn labels(&self) -> std::result::Result<Vec<SharedLabel>, String>;
}

impl Store {
    /// This store with `shared` as the shared record of its labels; the
    /// labels there whose head this store holds are copied here first.
    pub fn with_shared_labels(mut self, shared: std::sync::Arc<dyn SharedLabels>) -> Result<Store> {
        let all = shared.labels().map_err(|why| StoreError::Shared {
            label: "(all)".into(),
            why,
        })?;
        let mut behind = std::collections::BTreeMap::new();
        for l in all {
            if check_label(&l.name).is_err() {
                continue;
            }
            if !self.has(&l.head.object()) {
                behind.insert(l.name.clone(), l.head);
                continue;
            }
            let same = self.label(&l.name)? == Some(l.head)
                && self.label_log(&l.name)?.len() == l.log.len();
            if !same {
                self.copy_label(&l.name, &l.head, &l.log)?;
            }
        }
        self.shared = Some(shared);
        self.shared_behind = std::sync::Arc::new(behind);
        Ok(self)
    }

    /// A label whose shared head this store does not hold (yet): naming
    /// it would deploy an older head.
    fn check_not_behind(&self, label: &str) -> Result<()> {
        match self.shared_behind.get(label) {
            Some(head) => Err(StoreError::Shared {
                label: label.to_string(),
                why: format!(
                    "its head is {} on another deploy host, a version this store does not hold yet: wait for this standby to copy it (`scap status` says how far behind it is), or name a version by its ID",
                    head.short()
                ),
            }),
            None => Ok(()),
        }
    }

    fn record_path(&self, v: &VersionId) -> PathBuf {
        self.root
            .join("versions")
            .join(format!("{}.json", v.to_hex()))
    }

    pub fn write_record(&self, record: &VersionRecord) -> Result<()> {
        let path = self.record_path(&record.version);
        let mut json = serde_json::to_vec_pretty(record).expect("records serialize");
        json.push(b'\n');
        atomic_write(&path, &json)
    }

    pub fn record(&self, v: &VersionId) -> Result<Option<VersionRecord>> {
        let path = self.record_path(v);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError::BadRecord {
                    path,
                    why: e.to_string(),
                }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).at(&path),
        }
    }

    fn signature_path(&self, v: &VersionId) -> PathBuf {
        self.root()
            .join("versions")
            .join(format!("{}.sig", v.to_hex()))
    }

    /// Writes (replaces) a version's signatures, `versions/<id>.sig`. The
    /// same bytes already there are left as they are (a host switching to
    /// a version it staged is given its signature again: no write, no
    /// fsync).
    pub fn write_signature(&self, v: &VersionId, doc: &SignedVersion) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(doc).expect("signatures serialize");
        json.push(b'\n');
        let path = self.signature_path(v);
        if fs::read(&path).is_ok_and(|have| have == json) {
            return Ok(());
        }
        atomic_write(&path, &json)
    }

    /// A version's signatures, if it has any.
    pub fn signature(&self, v: &VersionId) -> Result<Option<SignedVersion>> {
        let path = self.signature_path(v);
        match fs::read(&path) {
            Ok(b) => SignedVersion::parse(&b)
                .map(Some)
                .map_err(|why| StoreError::BadRecord { path, why }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).at(&path),
        }
    }

    /// Removes the signature files of versions not in `keep` (an agent's
    /// store keeps signatures only for what it can switch to).
    pub fn retain_signatures(&self, keep: &[VersionId]) -> Result<()> {
        let dir = self.root().join("versions");
        let Ok(rd) = fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(v) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".sig"))
                .and_then(|h| h.parse::<VersionId>().ok())
            else {
                continue;
            };
            if !keep.contains(&v) {
                let p = e.path();
                fs::remove_file(&p).at(&p)?;
            }
        }
        Ok(())
    }

    pub fn remove_record(&self, v: &VersionId) -> Result<()> {
        let sig = self.signature_path(v);
        match fs::remove_file(&sig) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e).at(&sig),
            _ => {}
        }
        let path = self.record_path(v);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e).at(&path),
            _ => Ok(()),
        }
    }

    /// All version records, newest first.
    pub fn records(&self) -> Result<Vec<VersionRecord>> {
        let mut out = Vec::new();
        for v in self.recorded()? {
            if let Some(r) = self.record(&v)? {
                out.push(r);
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse((r.time, r.time_nanos, r.version)));
        Ok(out)
    }

    /// The versions that have a record, in no order, without reading the
    /// records (one directory listing).
    pub fn recorded(&self) -> Result<Vec<VersionId>> {
        let dir = self.root().join("versions");
        let mut out = Vec::new();
        // A store nothing was built in yet has no versions directory.
        let entries = match fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            r => r.at(&dir)?,
        };
        for entry in entries {
            let entry = entry.at(&dir)?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Ok(v) = hex.parse::<VersionId>() {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Points `label` at `v` without recording a move (tests, repairs).
    /// Deploy-host commands move labels with [`Store::move_label`].
    pub fn set_label(&self, label: &str, v: &VersionId) -> Result<()> {
        check_label(label)?;
        let path = self.root().join("refs/labels").join(label);
        atomic_write(&path, format!("{}\n", v.to_hex()).as_bytes())
    }

    /// The version `label` points at now, if it exists.
    pub fn label(&self, label: &str) -> Result<Option<VersionId>> {
        check_label(label)?;
        self.check_not_behind(label)?;
        read_ref(&self.root().join("refs/labels").join(label))
    }

    /// Moves `label` to `mv.to`, recording the move in its history. With
    /// `expect: Some(head)`, only if the label points at `head` now
    /// (`Some(None)`: only if it does not exist yet); otherwise the move is
    /// refused with [`StoreError::LabelMoved`], naming who moved it last and
    /// why. A move to where the label already points records nothing.
    pub fn move_label(
        &self,
        label: &str,
        expect: Option<Option<VersionId>>,
        mv: &LabelMove,
    ) -> Result<bool> {
        check_label(label)?;
        let _lock = self.lock_labels()?;
        let head = self.label(label)?;
        if let Some(expected) = expect
            && expected != head
        {
            let moved = self
                .label_log(label)?
                .into_iter()
                .rev()
                .find(|m| Some(m.to) == head)
                .map(|m| {
                    format!(
                        " (moved by {} at {}: {} {})",
                        m.user,
                        crate::time::fmt_utc(m.time),
                        m.action,
                        m.message
                    )
                })
                .unwrap_or_default();
            let show = |v: Option<VersionId>| v.map_or_else(|| "nothing".into(), |v| v.short());
            return Err(StoreError::LabelMoved {
                label: label.to_string(),
                expected: show(expected),
                found: show(head),
                moved,
            });
        }
        if head == Some(mv.to) {
            return Ok(false);
        }
        let mut entry = mv.clone();
        entry.from = head;
        if let Some(shared) = &self.shared {
            let log = self.label_log(label)?;
            shared
                .move_label(label, head, &log, &entry)
                .map_err(|why| StoreError::Shared {
                    label: label.to_string(),
                    why,
                })?;
        }
        let log = self.label_log_path(label);
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir).at(dir)?;
        }
        let mut line = serde_json::to_vec(&entry).expect("moves serialize");
        line.push(b'\n');
        {
            use std::io::Write;
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .at(&log)?;
            f.write_all(&line).at(&log)?;
            f.sync_data().at(&log)?;
        }
        self.set_label(label, &mv.to)?;
        Ok(true)
    }

    /// Makes `label` what another store says it is: its head `head` and
    /// its whole history `log` (a standby deploy host copying its
    /// primary's trains), under the labels' lock. The log is written
    /// before the head, so a crash between them leaves a log that says
    /// more than the head (the next copy mends it), never a head with no
    /// history.
    pub fn copy_label(&self, label: &str, head: &VersionId, log: &[LabelMove]) -> Result<()> {
        check_label(label)?;
        let _lock = self.lock_labels()?;
        let path = self.label_log_path(label);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).at(dir)?;
        }
        let mut text = Vec::new();
        for m in log {
            text.extend(serde_json::to_vec(m).expect("moves serialize"));
            text.push(b'\n');
        }
        atomic_write(&path, &text)?;
        self.set_label(label, head)
    }

    /// The labels' lock (an flock of `refs/labels.lock`): every move and
    /// copy of a label holds it, until the file returned is dropped.
    fn lock_labels(&self) -> Result<fs::File> {
        let lock_path = self.root().join("refs/labels.lock");
        if let Some(dir) = lock_path.parent() {
            fs::create_dir_all(dir).at(dir)?;
        }
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .at(&lock_path)?;
        lock.lock().at(&lock_path)?;
        Ok(lock)
    }

    fn label_log_path(&self, label: &str) -> PathBuf {
        self.root()
            .join("refs/logs/labels")
            .join(format!("{label}.jsonl"))
    }

    /// Every recorded move of `label`, oldest first. A line that does not
    /// parse (a torn last line after a crash) is skipped.
    pub fn label_log(&self, label: &str) -> Result<Vec<LabelMove>> {
        check_label(label)?;
        let path = self.label_log_path(label);
        let text = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).at(&path),
        };
        Ok(text
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect())
    }

    /// Every label with its version, sorted by label.
    pub fn labels(&self) -> Result<Vec<(String, VersionId)>> {
        self.read_refs("refs/labels")
    }

    pub fn pin(&self, v: &VersionId) -> Result<()> {
        let path = self.root().join("refs/pins").join(v.to_hex());
        atomic_write(&path, format!("{}\n", v.to_hex()).as_bytes())
    }

    pub fn unpin(&self, v: &VersionId) -> Result<bool> {
        let path = self.root().join("refs/pins").join(v.to_hex());
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).at(&path),
        }
    }

    pub fn pins(&self) -> Result<Vec<VersionId>> {
        Ok(self
            .read_refs("refs/pins")?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    fn read_refs(&self, sub: &str) -> Result<Vec<(String, VersionId)>> {
        let dir = self.root().join(sub);
        let mut out = Vec::new();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).at(&dir),
        };
        for entry in rd {
            let entry = entry.at(&dir)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            // (One removed since the listing, by an unpin or a label move's
            // rename, is not there.)
            if let Some(v) = read_ref(&entry.path())? {
                out.push((name, v));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Resolves a label (a train: the version it points at now), a full
    /// ID or an unambiguous hex prefix (>= 8 digits) to a version. An ID
    /// means exactly that version, never another made from it. A name
    /// that is both a label and a prefix of a version is refused, naming
    /// both. Then version records; then any root tree the store holds (an
    /// agent's store has no records).
    pub fn resolve(&self, name: &str) -> Result<VersionId> {
        let label = self.labels()?.into_iter().find(|(l, _)| l == name);
        if label.is_some() || self.shared_behind.contains_key(name) {
            self.check_not_behind(name)?;
        }
        let prefix = match IdPrefix::parse(name) {
            Ok(p) => p,
            Err(_) if label.is_some() => return Ok(label.expect("checked").1),
            Err(IdError::NotHex(_)) => {
                return Err(StoreError::UnknownVersion(name.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        if let Some((_, head)) = label {
            // A label made before labels that look like IDs were refused.
            let ids: Vec<VersionId> = self
                .recorded()?
                .into_iter()
                .filter(|v| prefix.matches(&v.object()))
                .collect();
            return match ids.first() {
                Some(id) => Err(StoreError::LabelOrId {
                    name: name.to_string(),
                    label: head.short(),
                    id: id.short(),
                }),
                None => Ok(head),
            };
        }
        let mut found: Vec<VersionId> = self
            .records()?
            .into_iter()
            .map(|r| r.version)
            .filter(|v| prefix.matches(&v.object()))
            .collect();
        if found.is_empty() {
            found = self.trees_with_prefix(&prefix)?;
        }
        found.sort();
        found.dedup();
        match found.len() {
            0 => Err(StoreError::UnknownVersion(name.to_string())),
            1 => Ok(found[0]),
            _ => Err(StoreError::Ambiguous {
                prefix: name.to_string(),
                candidates: found.iter().map(|v| v.short()).collect(),
            }),
        }
    }

    fn trees_with_prefix(&self, prefix: &IdPrefix) -> Result<Vec<VersionId>> {
        let p = prefix.as_str();
        let fan = self.root().join("objects").join(&p[..2]);
        let rd = match fs::read_dir(&fan) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e).at(&fan),
        };
        let mut out = Vec::new();
        for entry in rd.into_iter().flatten() {
            let entry = entry.at(&fan)?;
            let hex = format!("{}{}", &p[..2], entry.file_name().to_string_lossy());
            let Ok(id) = hex.parse::<ObjectId>() else {
                continue;
            };
            if !prefix.matches(&id) {
                continue;
            }
            let path = entry.path();
            let head = read_head(&path, object::HEADER_LEN)?;
            if matches!(object::peek(id, &head), Ok((ObjectKind::Tree, _))) {
                out.push(VersionId::new(id));
            }
        }
        for pack in self.pack_set().all(&self.packs_dir())? {
            pack.for_each_entry(|id, slot| {
                if !prefix.matches(&id) || pack.is_dead(&id) {
                    return Ok(());
                }
                let head = pack.read_head(slot)?;
                if matches!(object::peek(id, &head), Ok((ObjectKind::Tree, _))) {
                    out.push(VersionId::new(id));
                }
                Ok(())
            })?;
        }
        Ok(out)
    }
}

/// The version a ref file names (`"<64 hex>\n"`), if the file exists.
fn read_ref(path: &std::path::Path) -> Result<Option<VersionId>> {
    match fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse::<VersionId>()
            .map(Some)
            .map_err(|e| StoreError::BadRecord {
                path: path.to_path_buf(),
                why: e.to_string(),
            }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at(path),
    }
}

/// Checks a label: it names a file in `refs/labels` and must never be
/// mistaken for an ID prefix.
pub fn check_label(label: &str) -> Result<()> {
    let ok_chars = label
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'+' | b'-'));
    let looks_like_id = label.len() >= 8 && label.bytes().all(|c| c.is_ascii_hexdigit());
    if label.is_empty()
        || label.len() > 128
        || !ok_chars
        || label.starts_with(['.', '-'])
        || looks_like_id
    {
        return Err(StoreError::BadLabel(label.to_string()));
    }
    Ok(())
}
