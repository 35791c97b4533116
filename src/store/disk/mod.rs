//! The store on disk: object files under fan-out directories ([`Store`]),
//! writer sessions and crash recovery ([`session`]), version records and
//! refs ([`refs`]).
//!
//! Locking rules (the table is in store-format.md, "Locks"):
//! - `STORE/lock` is flocked *shared* by every writer session from its start
//!   until the caller drops what [`Writer::commit`] returns, i.e. until
//!   whatever references the new objects (a version record, a label, a
//!   host's release) is durable; *exclusive* by gc. So gc never sweeps
//!   objects that nothing references *yet*.
//! - `STORE/journal.lock` is flocked exclusively while a session starts
//!   (it recovers dead sessions under it) and while it registers its own
//!   journal, before its first object: two recoveries never run at once
//!   and a journal is never seen before it is locked.
//! - Each live session holds an exclusive flock on `journal/<session>`; a
//!   journal whose lock can be taken belongs to a dead session.
//!
//! **Invariant:** a tree object is in a store only if every object below it
//! is. **Invariant:** nothing references an object before it is durable.

pub mod pack;
mod refs;
mod session;
mod staged;

pub use refs::{ComponentRecord, LabelMove, SharedLabel, SharedLabels, VersionRecord, check_label};
pub use session::{Committed, LockMode, Put, StoreLock, Writer, space_low};

use std::fs;
use std::io;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use pack::{PackSet, PackWriter};

use super::fsutil::atomic_write;
use super::id::{IdError, ObjectId, ObjectKind, TreeId};
use super::object::{self, ObjectError};
use super::tree::{Tree, TreeError};

/// Version of the store layout, written to `STORE/scap-store`. Format 2
/// adds pack files (`STORE/objects/pack/`); a store is marked 2 when its first
/// pack is written, so an older scap refuses it rather than miss objects.
pub const STORE_FORMAT: u32 = 2;
const MARKER: &str = "scap-store";

/// Who a store belongs to, from its marker file: a deploy host's store has
/// version records and is what `build-manifest`, `gc --keep` and `serve`
/// work on; an app server agent's store holds only what its releases need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Deploy,
    Host,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Deploy => "deploy",
            Role::Host => "host",
        }
    }
}

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
    #[error(
        "{path}: store format v{found}, this scap ({}) reads up to v{STORE_FORMAT}: upgrade scap on this host (deploy hosts first, then agents)",
        env!("CARGO_PKG_VERSION")
    )]
    NewerFormat { path: PathBuf, found: u32 },
    #[error(
        "{0}: this is an app server agent's store (role host), not a deploy host's: pass --store with the deploy host's store (or set SCAP_STORE)"
    )]
    HostStore(PathBuf),
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
    #[error(
        "{0}: the store has no version records, so gc would find nothing to keep and delete everything: refusing (is this an agent's store? agents collect their own garbage)"
    )]
    NoRecords(PathBuf),
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error(
        "{name:?} is both a label (version {label}) and a prefix of version {id}: give the full version ID, or a longer prefix"
    )]
    LabelOrId {
        name: String,
        label: String,
        id: String,
    },
    #[error("train {label}: {why}")]
    Shared { label: String, why: String },
    #[error(
        "train {label} moved meanwhile: expected its head at {expected}, it is at {found}{moved}: look at `scap log {label}` and try again"
    )]
    LabelMoved {
        label: String,
        expected: String,
        found: String,
        /// Who moved it last and why, if its history says.
        moved: String,
    },
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

/// An open store. All state is on disk; what a clone shares is the index
/// of the store's packs as this process loaded them.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    role: Option<Role>,
    packs: Arc<PackSet>,
    /// A writer session's own pack, being written: seen by this view of
    /// the store only (the one [`Writer::store`] gives), never by other
    /// sessions, which must not reference objects before they are durable.
    pending: Option<Arc<Mutex<Option<PackWriter>>>>,
    /// A writer session's view: what else it takes as present.
    known: Option<Arc<session::Known>>,
    /// Where label moves are also recorded, shared with other deploy
    /// hosts' stores (`refs::SharedLabels`); none: this store's files are
    /// the only record.
    shared: Option<Arc<dyn refs::SharedLabels>>,
    /// Shared labels whose head this store does not hold: not resolved.
    shared_behind: Arc<std::collections::BTreeMap<String, crate::store::VersionId>>,
    /// Trees read lately, decoded ([`Store::tree`]).
    trees: Arc<TreeCache>,
}

/// Trees read lately, decoded and verified, by ID. A deploy reads the few
/// trees on a change's paths many times (its fetch, the slot's diff, the
/// spare slot's, the watch's): a dozen reads of each, every one an open,
/// a decompression and a hash, before this. An object's content never
/// changes, so an entry is never wrong; what it does not say is whether
/// the store still holds the object: [`Store::has`] says that, and never
/// asks here. Bounded by [`TREE_CACHE_ENTRIES`] entries of the trees
/// together (emptied when full); a larger tree is not kept.
#[derive(Debug, Default)]
struct TreeCache {
    map: Mutex<(std::collections::HashMap<TreeId, Arc<Tree>>, usize)>,
}

/// Most directory entries [`TreeCache`] holds, all trees together.
const TREE_CACHE_ENTRIES: usize = 1 << 16;

impl TreeCache {
    fn get(&self, id: &TreeId) -> Option<Arc<Tree>> {
        self.map.lock().expect("not poisoned").0.get(id).cloned()
    }

    fn put(&self, id: TreeId, tree: &Tree) {
        let n = tree.entries().len().max(1);
        if n > TREE_CACHE_ENTRIES / 16 {
            return;
        }
        let mut guard = self.map.lock().expect("not poisoned");
        let (map, held) = &mut *guard;
        if *held + n > TREE_CACHE_ENTRIES {
            map.clear();
            *held = 0;
        }
        if map.insert(id, Arc::new(tree.clone())).is_none() {
            *held += n;
        }
    }
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
        let role = text
            .lines()
            .find_map(|l| l.strip_prefix("role "))
            .and_then(|r| match r.trim() {
                "deploy" => Some(Role::Deploy),
                "host" => Some(Role::Host),
                _ => None,
            });
        Ok(Store {
            root: root.to_path_buf(),
            role,
            packs: Arc::default(),
            pending: None,
            known: None,
            shared: None,
            shared_behind: Arc::default(),
            trees: Arc::default(),
        })
    }

    /// Opens a deploy host's store; refuses an agent's.
    pub fn open_deploy(root: &Path) -> Result<Store> {
        let s = Store::open(root)?;
        s.check_deploy()?;
        Ok(s)
    }

    /// Opens a store, creating an empty one of `role` if `root` has none.
    pub fn open_or_init(root: &Path, role: Role) -> Result<Store> {
        match Store::open(root) {
            Err(StoreError::NotAStore(_)) => {}
            Ok(s) if s.role.is_none() => {
                // A store from before roles were written: say what it is now.
                s.write_marker(role)?;
                return Store::open(root);
            }
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
        let s = Store {
            root: root.to_path_buf(),
            role: Some(role),
            packs: Arc::default(),
            pending: None,
            known: None,
            shared: None,
            shared_behind: Arc::default(),
            trees: Arc::default(),
        };
        s.write_marker(role)?;
        Store::open(root)
    }

    fn write_marker(&self, role: Role) -> Result<()> {
        atomic_write(
            &self.root.join(MARKER),
            format!("scap store\nformat {STORE_FORMAT}\nrole {}\n", role.name()).as_bytes(),
        )
    }

    /// Marks the store format 2 (it has packs) if it says less.
    pub(crate) fn mark_packed(&self) -> Result<()> {
        let marker = self.root.join(MARKER);
        let text = fs::read_to_string(&marker).at(&marker)?;
        if text
            .lines()
            .any(|l| l.trim() == format!("format {STORE_FORMAT}"))
        {
            return Ok(());
        }
        self.write_marker(self.role.unwrap_or(Role::Deploy))
    }

    /// Errs if this is an agent's store (deploy-host commands refuse it).
    pub fn check_deploy(&self) -> Result<()> {
        if self.role == Some(Role::Host) {
            return Err(StoreError::HostStore(self.root.clone()));
        }
        Ok(())
    }

    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// A new pack of this store at `tmp` (`in_order`:
    /// [`PackWriter::create_in_order`]). An app server's is written past
    /// the page cache ([`PackWriter::bypass_cache`]): its release holds
    /// what the pack does as files, and reads the pack only while the two
    /// are written together, from the segments kept in memory.
    pub(crate) fn create_pack(&self, tmp: PathBuf, in_order: bool) -> Result<PackWriter> {
        let mut w = match in_order {
            true => PackWriter::create_in_order(tmp)?,
            false => PackWriter::create(tmp)?,
        };
        if self.role == Some(Role::Host) {
            w.bypass_cache();
        }
        Ok(w)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, id: &ObjectId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("objects").join(&hex[..2]).join(&hex[2..])
    }

    /// Where the store's pack files are: `objects/pack/`, beside the loose
    /// objects' fan-out directories (`packs/` holds the server's delta
    /// packs, a cache).
    pub fn packs_dir(&self) -> PathBuf {
        self.root.join("objects").join("pack")
    }

    pub(crate) fn pack_set(&self) -> &PackSet {
        &self.packs
    }

    /// Whether a pack holds objects stored uncompressed as they arrived
    /// (a fresh host's fetch), which gc compresses.
    pub fn holds_raw_packs(&self) -> Result<bool, StoreError> {
        Ok(self
            .packs
            .all(&self.packs_dir())?
            .iter()
            .any(|p| p.holds_raw()))
    }

    /// Whether the store has object `id`: loose, in a pack, or in this
    /// view's pending pack. An unreadable pack index counts as a miss
    /// (logged): the object is fetched or written again.
    pub fn has(&self, id: &ObjectId) -> bool {
        if let Some(p) = &self.pending
            && p.lock()
                .expect("not poisoned")
                .as_ref()
                .is_some_and(|w| w.contains(id))
        {
            return true;
        }
        // A writer session's view answers from what it knows (the packs
        // as loaded when it started); any other asks the filesystem.
        let known = self.known.as_ref().and_then(|k| k.has_loose(self, id));
        if known.unwrap_or_else(|| self.has_loose(id)) {
            return true;
        }
        let found = match known {
            Some(_) => self.packs.find_loaded(id),
            None => self.packs.find(&self.packs_dir(), id),
        };
        match found {
            Ok(found) => found.is_some(),
            Err(e) => {
                self.packs.warn_once(&e);
                false
            }
        }
    }

    /// Whether `id` is a loose object: its path stat'ed relative to the
    /// `objects/` directory when that is open.
    fn has_loose(&self, id: &ObjectId) -> bool {
        match self.packs.objects_dir(&self.root) {
            Some(at) => {
                let name = id.loose_name();
                let name = std::ffi::CStr::from_bytes_with_nul(&name).expect("one NUL, at the end");
                rustix::fs::statat(at, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok()
            }
            None => fs::symlink_metadata(self.object_path(id)).is_ok(),
        }
    }

    /// The object file's bytes as stored (and served), unverified.
    pub fn read_raw(&self, id: &ObjectId) -> Result<Option<Vec<u8>>> {
        Ok(self.read_stored(id)?.map(|(file, _)| file.into_vec()))
    }

    /// [`Store::read_raw`], and whether the file was verified against `id`
    /// from these very bytes: an object of this session's pack, read from
    /// a segment as its receiver stored it ([`pack::Located::read_verified`]).
    fn read_stored(&self, id: &ObjectId) -> Result<Option<(pack::FileBytes, bool)>> {
        if let Some(p) = &self.pending {
            // Found under the lock, read outside it (the fetch appends
            // meanwhile; reading may mean decompressing a segment).
            let at = match p.lock().expect("not poisoned").as_ref() {
                Some(w) => w.locate(id)?,
                None => None,
            };
            if let Some(at) = at {
                return at.read_verified().map(Some);
            }
        }
        let path = self.object_path(id);
        match fs::read(&path) {
            Ok(b) => return Ok(Some((pack::FileBytes::Own(b), false))),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).at(&path),
        }
        match self.packs.find(&self.packs_dir(), id)? {
            Some((pack, slot)) => pack.read_shared(slot).map(|file| Some((file, false))),
            None => Ok(None),
        }
    }

    /// Reads, decompresses and verifies one object (an object this
    /// session's fetch verified from the very bytes read is not hashed
    /// again: [`Store::read_stored`]).
    pub fn read(&self, id: &ObjectId, kind: ObjectKind) -> Result<Vec<u8>> {
        let (raw, verified) = self
            .read_stored(id)?
            .ok_or(StoreError::Missing { id: *id, kind })?;
        let decoded = match verified {
            true => object::decode_verified(*id, kind, raw.into_vec()),
            false => object::decode(*id, kind, &raw),
        };
        decoded.map_err(|source| StoreError::Object {
            path: self.object_path(id),
            source,
        })
    }

    /// [`Store::read`], handing the content to `f`: an object this
    /// session's fetch verified and kept in memory uncompressed (most of a
    /// fresh host's) is handed as it lies in its segment, not copied.
    pub fn read_with<T>(
        &self,
        id: &ObjectId,
        kind: ObjectKind,
        f: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let (raw, verified) = self
            .read_stored(id)?
            .ok_or(StoreError::Missing { id: *id, kind })?;
        let bad = |source| StoreError::Object {
            path: self.object_path(id),
            source,
        };
        if verified && let Some(content) = object::verified_payload(*id, kind, &raw).map_err(bad)? {
            return f(content);
        }
        let decoded = match verified {
            true => object::decode_verified(*id, kind, raw.into_vec()),
            false => object::decode(*id, kind, &raw),
        };
        f(&decoded.map_err(bad)?)
    }

    /// Reads, verifies and decodes tree `id`, or takes it from the trees
    /// read lately ([`TreeCache`]).
    pub fn tree(&self, id: &TreeId) -> Result<Tree> {
        if let Some(t) = self.trees.get(id) {
            return Ok(Tree::clone(&t));
        }
        let tree = self.tree_from_disk(id)?;
        self.trees.put(*id, &tree);
        Ok(tree)
    }

    /// [`Store::tree`] read from the store's files every time: what
    /// checks the store itself (`scap verify`, recovery) reads.
    pub fn tree_from_disk(&self, id: &TreeId) -> Result<Tree> {
        let bytes = self.read(&id.object(), ObjectKind::Tree)?;
        Tree::decode(&bytes).map_err(|source| StoreError::BadTree { id: *id, source })
    }

    /// Every object file in the store, by ID. Stray files (temp files,
    /// anything that is not 62 hex digits) are skipped.
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

    /// Bumped by every gc, and by every recovery that deletes anything,
    /// before it deletes: caches of "this chunk is in the store" made under
    /// an older generation must be re-checked.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tree::{Content, Entry, TreeName};

    fn tree_of(names: &[&str]) -> Tree {
        let entries = names
            .iter()
            .map(|n| Entry {
                name: TreeName::new(n.as_bytes()).unwrap(),
                content: Content::Symlink {
                    target: n.as_bytes().to_vec(),
                },
            })
            .collect();
        Tree::new(entries).unwrap()
    }

    #[test]
    fn a_tree_read_again_comes_from_the_cache_and_has_still_asks_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir.path(), Role::Host).unwrap();
        let tree = tree_of(&["a", "b"]);
        let w = store.writer().unwrap();
        let id = TreeId::new(w.put(ObjectKind::Tree, &tree.encode()).unwrap().id);
        drop(w.commit().unwrap());
        assert_eq!(store.tree(&id).unwrap(), tree);
        // Its file gone (a gc elsewhere): the content is still known, the
        // object is not.
        let path = store.object_path(&id.object());
        fs::remove_file(&path).unwrap();
        assert_eq!(
            store.clone().tree(&id).unwrap(),
            tree,
            "cached, shared by clones"
        );
        assert!(!store.has(&id.object()), "presence is the disk's");
        assert!(matches!(
            store.tree_from_disk(&id),
            Err(StoreError::Missing { .. })
        ));
        // Corrupt on disk: what checks the store reads the disk.
        fs::write(&path, b"not an object").unwrap();
        assert!(store.tree_from_disk(&id).is_err());
    }

    #[test]
    fn the_tree_cache_is_bounded() {
        let cache = TreeCache::default();
        let big: Vec<String> = (0..TREE_CACHE_ENTRIES / 16 + 1)
            .map(|i| format!("f{i}"))
            .collect();
        let big = tree_of(&big.iter().map(String::as_str).collect::<Vec<_>>());
        let id = |n: u32| TreeId::new(ObjectKind::Tree.hash(&n.to_le_bytes()));
        cache.put(id(0), &big);
        assert!(cache.get(&id(0)).is_none(), "a tree too large is not kept");
        let small = tree_of(&["x"]);
        for n in 1..=(TREE_CACHE_ENTRIES as u32 + 10) {
            cache.put(id(n), &small);
            assert!(cache.map.lock().unwrap().1 <= TREE_CACHE_ENTRIES);
        }
        assert!(cache.get(&id(TREE_CACHE_ENTRIES as u32 + 10)).is_some());
    }
}
