//! The store on disk: object files under fan-out directories, version
//! records, refs, and the locks and journal that keep it valid across crashes.
//!
//! Locking rules (see also store-format.md, "Concurrency and crashes"):
//! - `lock` is flocked *shared* by every writer session for its whole life
//!   and *exclusive* by `gc`. So gc never sweeps while a build or a fetch is
//!   writing objects that no version record names yet.
//! - Each writer session holds an exclusive flock on its own journal file
//!   `journal/<session>`. A journal file whose lock can be taken belongs to a
//!   dead session: the objects written since its start are re-verified and
//!   the torn ones removed before any new session starts writing.
//! - Object writes are temp file -> rename, not fsynced one by one; the
//!   session's `commit` runs one `syncfs` before anything (a version record,
//!   a ref, a host's release) may reference them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use thiserror::Error;

use super::id::{IdError, IdPrefix, ObjectId, ObjectKind, TreeId, VersionId};
use super::object::{self, ObjectError};
use super::tree::{Tree, TreeError};

/// Version of the store layout, written to `STORE/scap-store`.
pub const STORE_FORMAT: u32 = 1;
const MARKER: &str = "scap-store";
/// Present while gc deletes objects.
const GC_MARKER: &str = "gc-sweeping";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0}: not a scap store (no {MARKER} file): create one with `scap build-manifest`, or pass --store"
    )]
    NotAStore(PathBuf),
    #[error("{path}: store format v{found}, this scap reads up to v{STORE_FORMAT}: upgrade scap")]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("{path}: {source}")]
    Object {
        path: PathBuf,
        #[source]
        source: ObjectError,
    },
    #[error(
        "{kind} {id} is missing from the store: run `scap verify`, then rebuild or re-fetch it"
    )]
    Missing { id: ObjectId, kind: ObjectKind },
    #[error("tree {id}: {source}")]
    BadTree {
        id: TreeId,
        #[source]
        source: TreeError,
    },
    #[error(transparent)]
    BadId(#[from] IdError),
    #[error("no version or label {0:?} in this store: see `scap log` for the versions it has")]
    UnknownVersion(String),
    #[error("{prefix:?} names {} versions ({}): type more digits", candidates.len(), candidates.join(", "))]
    Ambiguous {
        prefix: String,
        candidates: Vec<String>,
    },
    #[error(
        "bad label {0:?}: use letters, digits, '.', '_', '+' and '-' (at most 128), not starting with '.' or '-', and not only hex digits"
    )]
    BadLabel(String),
    #[error("{path}: {why}")]
    BadRecord { path: PathBuf, why: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

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
    pub components: Vec<ComponentRecord>,
    pub files: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ComponentRecord {
    pub name: String,
    pub tree: TreeId,
    pub files: u64,
    pub bytes: u64,
}

/// An open store. Cheap to clone paths out of; all state is on disk.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens an existing store.
    pub fn open(root: &Path) -> Result<Store> {
        let marker = root.join(MARKER);
        let text = match fs::read_to_string(&marker) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(StoreError::NotAStore(root.to_path_buf()));
            }
            Err(e) => return Err(e).at(&marker),
        };
        let found = text
            .lines()
            .find_map(|l| l.strip_prefix("format "))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .ok_or_else(|| StoreError::BadRecord {
                path: marker.clone(),
                why: "no 'format N' line".into(),
            })?;
        if found > STORE_FORMAT {
            return Err(StoreError::NewerFormat {
                path: root.to_path_buf(),
                found,
            });
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// Opens a store, creating an empty one if `root` has none.
    pub fn open_or_init(root: &Path) -> Result<Store> {
        match Store::open(root) {
            Err(StoreError::NotAStore(_)) => {}
            other => return other,
        }
        for dir in [
            "objects",
            "versions",
            "refs/labels",
            "refs/pins",
            "journal",
            "cache",
        ] {
            fs::create_dir_all(root.join(dir)).at(&root.join(dir))?;
        }
        let marker = root.join(MARKER);
        atomic_write(
            &marker,
            format!("scap store\nformat {STORE_FORMAT}\n").as_bytes(),
        )?;
        Store::open(root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, id: &ObjectId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("objects").join(&hex[..2]).join(&hex[2..])
    }

    pub fn has(&self, id: &ObjectId) -> bool {
        fs::symlink_metadata(self.object_path(id)).is_ok()
    }

    /// The object file's bytes as stored (and served), unverified.
    pub fn read_raw(&self, id: &ObjectId) -> Result<Option<Vec<u8>>> {
        let path = self.object_path(id);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).at(&path),
        }
    }

    /// Reads, decompresses and verifies one object.
    pub fn read(&self, id: &ObjectId, kind: ObjectKind) -> Result<Vec<u8>> {
        let raw = self
            .read_raw(id)?
            .ok_or(StoreError::Missing { id: *id, kind })?;
        object::decode(*id, kind, &raw).map_err(|source| StoreError::Object {
            path: self.object_path(id),
            source,
        })
    }

    pub fn tree(&self, id: &TreeId) -> Result<Tree> {
        let bytes = self.read(&id.object(), ObjectKind::Tree)?;
        Tree::decode(&bytes).map_err(|source| StoreError::BadTree { id: *id, source })
    }

    /// Starts a writer session: takes the shared store lock and recovers
    /// from any session that died mid-write.
    pub fn writer(&self) -> Result<Writer<'_>> {
        let lock = self.lock(LockMode::Shared)?;
        self.recover()?;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let session = format!("{}-{nanos}", std::process::id());
        let journal_path = self.root.join("journal").join(&session);
        let journal = File::create(&journal_path).at(&journal_path)?;
        journal.lock().at(&journal_path)?;
        journal.sync_all().at(&journal_path)?;
        sync_dir(&self.root.join("journal"))?;
        Ok(Writer {
            store: self,
            _lock: lock,
            journal,
            journal_path,
            session,
            counter: AtomicU64::new(0),
            written_paths: Default::default(),
            written: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            finished: false,
        })
    }

    /// Takes the store lock. Exclusive is gc's; shared is every writer's.
    pub fn lock(&self, mode: LockMode) -> Result<StoreLock> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?;
        let busy = match mode {
            LockMode::Shared => file.try_lock_shared().is_err(),
            LockMode::Exclusive => file.try_lock().is_err(),
        };
        if busy {
            eprintln!(
                "scap: waiting for the store lock on {} (another scap is {})",
                path.display(),
                match mode {
                    LockMode::Shared => "collecting garbage",
                    LockMode::Exclusive => "writing to the store",
                }
            );
            match mode {
                LockMode::Shared => file.lock_shared(),
                LockMode::Exclusive => file.lock(),
            }
            .at(&path)?;
        }
        Ok(StoreLock { _file: file })
    }

    /// Re-verifies what dead writer sessions wrote, removing torn objects.
    fn recover(&self) -> Result<()> {
        self.recover_from_gc()?;
        let dir = self.root.join("journal");
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let path = entry.path();
            let Ok(file) = OpenOptions::new().write(true).open(&path) else {
                continue;
            };
            if file.try_lock().is_err() {
                continue; // a live session
            }
            let started = file
                .metadata()
                .and_then(|m| m.modified())
                .at(&path)?
                .checked_sub(Duration::from_secs(2))
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let removed = self.remove_torn_since(started)?;
            if removed > 0 {
                eprintln!(
                    "scap: removed {removed} torn object(s) left by a crashed session ({})",
                    path.display()
                );
            }
            let suffix = format!(".{}.tmp", entry.file_name().to_string_lossy());
            self.remove_temp_files(&suffix)?;
            // What survived verification may still be only in the page
            // cache (the session died, the machine did not): make it
            // durable before the journal that covers it goes.
            rustix::fs::syncfs(&file)
                .map_err(io::Error::from)
                .at(&self.root)?;
            fs::remove_file(&path).at(&path)?;
        }
        Ok(())
    }

    /// Whether a writer session other than `own` is running: its objects
    /// may be unsynced, and a session that found them "already there"
    /// must sync more than its own files before referencing them.
    fn other_live_sessions(&self, own: &Path) -> bool {
        let dir = self.root.join("journal");
        let Ok(rd) = fs::read_dir(&dir) else {
            return true;
        };
        rd.flatten().any(|e| {
            e.path() != own
                && OpenOptions::new()
                    .write(true)
                    .open(e.path())
                    .map(|f| f.try_lock().is_err())
                    .unwrap_or(false)
        })
    }

    /// Removes objects written since `since` that fail verification, then
    /// the trees written since then that reference a missing object (their
    /// children may have been torn). This restores the invariant that a
    /// tree is in the store only when everything below it is.
    /// Removes a dead session's temp files (names ending in `suffix`).
    fn remove_temp_files(&self, suffix: &str) -> Result<()> {
        let objects = self.root.join("objects");
        for fan in fs::read_dir(&objects).at(&objects)? {
            let fan = fan.at(&objects)?.path();
            let Ok(rd) = fs::read_dir(&fan) else { continue };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(suffix) {
                    let p = e.path();
                    fs::remove_file(&p).at(&p)?;
                }
            }
        }
        Ok(())
    }

    fn remove_torn_since(&self, since: SystemTime) -> Result<u64> {
        let mut removed = 0;
        let mut recent_trees: Vec<(ObjectId, PathBuf)> = Vec::new();
        for item in self.objects()? {
            let (id, path) = item?;
            let Ok(modified) = fs::symlink_metadata(&path).and_then(|m| m.modified()) else {
                continue;
            };
            if modified < since {
                continue;
            }
            let raw = fs::read(&path).at(&path)?;
            match object::peek(id, &raw)
                .and_then(|(kind, _)| object::decode(id, kind, &raw).map(|_| kind))
            {
                Ok(ObjectKind::Tree) => recent_trees.push((id, path)),
                Ok(ObjectKind::Chunk) => {}
                Err(_) => {
                    fs::remove_file(&path).at(&path)?;
                    removed += 1;
                }
            }
        }
        removed += self.remove_incomplete_trees(recent_trees)?;
        Ok(removed)
    }

    /// Removes, until none is left, each of `trees` that references an
    /// object the store does not have. Returns how many it removed.
    fn remove_incomplete_trees(&self, mut trees: Vec<(ObjectId, PathBuf)>) -> Result<u64> {
        let mut removed = 0;
        loop {
            let before = trees.len();
            let mut kept = Vec::with_capacity(before);
            for (id, path) in trees {
                let complete = match self.tree(&TreeId::new(id)) {
                    Ok(tree) => tree.children().all(|child| self.has(&child)),
                    Err(StoreError::Missing { .. }) => continue,
                    Err(_) => false,
                };
                if complete {
                    kept.push((id, path));
                } else {
                    fs::remove_file(&path).at(&path)?;
                    removed += 1;
                }
            }
            trees = kept;
            if trees.len() == before {
                return Ok(removed);
            }
        }
    }

    /// After a gc that died mid-sweep, a tree may have lost a subtree: check
    /// every tree in the store.
    fn recover_from_gc(&self) -> Result<()> {
        let marker = self.root.join(GC_MARKER);
        if !marker.exists() {
            return Ok(());
        }
        let mut trees = Vec::new();
        for item in self.objects()? {
            let (id, path) = item?;
            let head = read_head(&path)?;
            if matches!(object::peek(id, &head), Ok((ObjectKind::Tree, _))) {
                trees.push((id, path));
            }
        }
        let removed = self.remove_incomplete_trees(trees)?;
        if removed > 0 {
            eprintln!("scap: removed {removed} tree(s) an interrupted gc left incomplete");
        }
        fs::remove_file(&marker).at(&marker)?;
        Ok(())
    }

    /// Marks the start of gc's sweep (see `recover_from_gc`).
    pub(crate) fn begin_sweep(&self) -> Result<()> {
        atomic_write(&self.root.join(GC_MARKER), b"")
    }

    pub(crate) fn end_sweep(&self) -> Result<()> {
        let marker = self.root.join(GC_MARKER);
        let f = File::open(self.root.join(MARKER)).at(&marker)?;
        rustix::fs::syncfs(&f)
            .map_err(io::Error::from)
            .at(&self.root)?;
        fs::remove_file(&marker).at(&marker)?;
        sync_dir(&self.root)
    }

    /// Every object file in the store, by ID. Stray files are skipped.
    pub fn objects(&self) -> Result<impl Iterator<Item = Result<(ObjectId, PathBuf)>> + use<>> {
        let objects = self.root.join("objects");
        let mut fans: Vec<_> = fs::read_dir(&objects)
            .at(&objects)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        fans.sort();
        Ok(fans.into_iter().flat_map(|fan| {
            let prefix = fan
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let entries: Vec<Result<(ObjectId, PathBuf)>> = match fs::read_dir(&fan) {
                Ok(rd) => rd
                    .filter_map(|e| match e {
                        Ok(e) => {
                            let name = e.file_name();
                            let hex = format!("{prefix}{}", name.to_string_lossy());
                            hex.parse::<ObjectId>().ok().map(|id| Ok((id, e.path())))
                        }
                        Err(err) => Some(Err(err).at(&fan)),
                    })
                    .collect(),
                Err(e) => vec![Err(e).at(&fan)],
            };
            entries
        }))
    }

    // ---- versions and refs ----

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

    pub fn remove_record(&self, v: &VersionId) -> Result<()> {
        let path = self.record_path(v);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e).at(&path),
            _ => Ok(()),
        }
    }

    /// All version records, newest first.
    pub fn records(&self) -> Result<Vec<VersionRecord>> {
        let dir = self.root.join("versions");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let name = entry.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(v) = hex.parse::<VersionId>() else {
                continue;
            };
            if let Some(r) = self.record(&v)? {
                out.push(r);
            }
        }
        out.sort_by_key(|r| std::cmp::Reverse((r.time, r.time_nanos, r.version)));
        Ok(out)
    }

    pub fn set_label(&self, label: &str, v: &VersionId) -> Result<()> {
        check_label(label)?;
        let path = self.root.join("refs/labels").join(label);
        atomic_write(&path, format!("{}\n", v.to_hex()).as_bytes())
    }

    /// Every label with its version, sorted by label.
    pub fn labels(&self) -> Result<Vec<(String, VersionId)>> {
        self.read_refs("refs/labels")
    }

    pub fn pin(&self, v: &VersionId) -> Result<()> {
        let path = self.root.join("refs/pins").join(v.to_hex());
        atomic_write(&path, format!("{}\n", v.to_hex()).as_bytes())
    }

    pub fn unpin(&self, v: &VersionId) -> Result<bool> {
        let path = self.root.join("refs/pins").join(v.to_hex());
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
        let dir = self.root.join(sub);
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
            let path = entry.path();
            let text = fs::read_to_string(&path).at(&path)?;
            let v = text
                .trim()
                .parse::<VersionId>()
                .map_err(|e| StoreError::BadRecord {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
            out.push((name, v));
        }
        out.sort();
        Ok(out)
    }

    /// Resolves a label, a full ID or an unambiguous hex prefix (>= 8
    /// digits) to a version. Labels win; then version records; then any
    /// root tree the store holds (an agent's store has no records).
    pub fn resolve(&self, name: &str) -> Result<VersionId> {
        if let Some((_, v)) = self.labels()?.into_iter().find(|(l, _)| l == name) {
            return Ok(v);
        }
        let prefix = match IdPrefix::parse(name) {
            Ok(p) => p,
            Err(IdError::NotHex(_)) => {
                return Err(StoreError::UnknownVersion(name.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
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
        let fan = self.root.join("objects").join(&p[..2]);
        let rd = match fs::read_dir(&fan) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).at(&fan),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.at(&fan)?;
            let hex = format!("{}{}", &p[..2], entry.file_name().to_string_lossy());
            let Ok(id) = hex.parse::<ObjectId>() else {
                continue;
            };
            if !prefix.matches(&id) {
                continue;
            }
            let path = entry.path();
            let head = read_head(&path)?;
            if matches!(object::peek(id, &head), Ok((ObjectKind::Tree, _))) {
                out.push(VersionId::new(id));
            }
        }
        Ok(out)
    }

    /// Bumped by every gc before it deletes anything; caches of "this chunk
    /// is in the store" made under an older generation must be re-checked.
    pub fn gc_generation(&self) -> Result<u64> {
        let path = self.root.join("gc-generation");
        match fs::read_to_string(&path) {
            Ok(t) => Ok(t.trim().parse().unwrap_or(u64::MAX)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e).at(&path),
        }
    }

    pub(crate) fn bump_gc_generation(&self) -> Result<u64> {
        let next = self.gc_generation()?.wrapping_add(1);
        atomic_write(
            &self.root.join("gc-generation"),
            format!("{next}\n").as_bytes(),
        )?;
        Ok(next)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }
}

fn read_head(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(object::HEADER_LEN);
    File::open(path)
        .and_then(|f| f.take(object::HEADER_LEN as u64).read_to_end(&mut head))
        .at(path)?;
    Ok(head)
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// Holds the store lock until dropped.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// A writer session: adds objects, then `commit`s them durably.
pub struct Writer<'s> {
    store: &'s Store,
    _lock: StoreLock,
    journal: File,
    journal_path: PathBuf,
    /// Names this session's temp files: `objects/ab/.<rest>.<n>.<session>.tmp`.
    session: String,
    counter: AtomicU64,
    /// The first `FSYNC_EACH_MAX` objects written, to fsync one by one.
    written_paths: std::sync::Mutex<Vec<PathBuf>>,
    written: AtomicU64,
    written_bytes: AtomicU64,
    finished: bool,
}

/// What a `put` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Put {
    pub id: ObjectId,
    /// False when the store already had the object.
    pub new: bool,
}

impl Writer<'_> {
    pub fn store(&self) -> &Store {
        self.store
    }

    /// Stores `data` as an object of `kind` unless the store has it already.
    pub fn put(&self, kind: ObjectKind, data: &[u8]) -> Result<Put> {
        let id = kind.hash(data);
        if self.store.has(&id) {
            return Ok(Put { id, new: false });
        }
        let file = object::encode(kind, data);
        self.write_object(&id, &file)?;
        Ok(Put { id, new: true })
    }

    /// Stores an object file received from elsewhere, after checking it is
    /// object `id` of kind `kind`, as it arrived. (Objects that came inside
    /// a compressed batch stream are stored uncompressed: on a host, CPU
    /// during a deploy is dearer than disk.) Returns the decoded payload.
    pub fn put_verified(&self, id: ObjectId, kind: ObjectKind, file: &[u8]) -> Result<Vec<u8>> {
        let data = object::decode(id, kind, file).map_err(|source| StoreError::Object {
            path: self.store.object_path(&id),
            source,
        })?;
        if !self.store.has(&id) {
            self.write_object(&id, file)?;
        }
        Ok(data)
    }

    /// Writes the temp file in the object's own fan-out directory, so the
    /// rename stays within one directory (a rename across directories takes
    /// a filesystem-wide lock in Linux, and writers would queue on it).
    fn write_object(&self, id: &ObjectId, file: &[u8]) -> Result<()> {
        let dest = self.store.object_path(id);
        let hex = id.to_hex();
        // Unique per write: two threads may store the same content at once.
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dest.with_file_name(format!(".{}.{n}.{}.tmp", &hex[2..], self.session));
        let write = |tmp: &Path| -> io::Result<()> {
            let mut f = File::create(tmp)?;
            f.write_all(file)
        };
        if let Err(e) = write(&tmp) {
            let _ = fs::remove_file(&tmp);
            if e.kind() != ErrorKind::NotFound {
                return Err(e).at(&tmp);
            }
            let fan = dest.parent().expect("object paths have a fan-out dir");
            fs::create_dir_all(fan).at(fan)?;
            if let Err(e) = write(&tmp) {
                let _ = fs::remove_file(&tmp);
                return Err(e).at(&tmp);
            }
        }
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(e).at(&dest);
        }
        let n = self.written.fetch_add(1, Ordering::Relaxed);
        self.written_bytes
            .fetch_add(file.len() as u64, Ordering::Relaxed);
        if (n as usize) < FSYNC_EACH_MAX {
            self.written_paths.lock().expect("not poisoned").push(dest);
        }
        Ok(())
    }

    /// Objects and bytes (as stored) written by this session so far.
    pub fn written(&self) -> (u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.written_bytes.load(Ordering::Relaxed),
        )
    }

    /// Makes every object written so far durable (one `syncfs`), then ends
    /// the session. Only after this may anything reference them.
    pub fn commit(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let written = self.written.load(Ordering::Relaxed);
        if written as usize > FSYNC_EACH_MAX || self.store.other_live_sessions(&self.journal_path) {
            rustix::fs::syncfs(&self.journal)
                .map_err(io::Error::from)
                .at(self.store.root())?;
        } else if written > 0 {
            let paths = std::mem::take(&mut *self.written_paths.lock().expect("not poisoned"));
            sync_files(&paths)?;
        }
        fs::remove_file(&self.journal_path).at(&self.journal_path)?;
        Ok(())
    }
}

impl Drop for Writer<'_> {
    /// A session that ends in an error still leaves only whole objects:
    /// sync them and close the journal, so no recovery scan is needed.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Up to this many files written, a commit fsyncs each file and directory;
/// past it, one `syncfs` is cheaper. (`syncfs` is filesystem-wide: it would
/// also wait for every other writer's dirty data, which makes a three-file
/// backport pay for whatever else the host wrote lately.)
pub const FSYNC_EACH_MAX: usize = 256;

/// Makes `paths` and their directories durable, one fsync each.
pub fn sync_files(paths: &[PathBuf]) -> Result<()> {
    let mut dirs: Vec<&Path> = Vec::new();
    for p in paths {
        File::open(p).and_then(|f| f.sync_all()).at(p)?;
        if let Some(d) = p.parent() {
            dirs.push(d);
        }
    }
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        sync_dir(d)?;
    }
    Ok(())
}

/// Writes `path` atomically and durably: temp file beside it, fsync,
/// rename, fsync of the directory. Readers see the old or the new content.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).at(&tmp);
    }
    fs::rename(&tmp, path).at(path)?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}
