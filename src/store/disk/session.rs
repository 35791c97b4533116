//! Writer sessions: how objects get into a store, durably, beside other
//! writers and gc, and how a store recovers from a session that died.
//!
//! A session ([`Store::writer`]):
//! 1. takes the store lock shared (gc takes it exclusively), then
//!    `journal.lock` exclusively; under it, recovers every dead session;
//!    then releases `journal.lock`;
//! 2. before its first object, takes `journal.lock` again and creates,
//!    locks and syncs its own journal `journal/<session>` (a session that
//!    stores nothing, such as a switch to a staged version, has none);
//!    then writes objects into its own pack
//!    (`objects/pack/.pack.<session>.tmp`), which only this session's view
//!    of the store ([`Writer::store`]) sees;
//! 3. [`Writer::commit`]: a session that wrote more than [`LOOSE_MAX`]
//!    objects seals its pack (index, footer), fsyncs it, renames it into
//!    `objects/pack/` and fsyncs the directory: one file, however many objects. A
//!    smaller one writes them as loose objects (temp file in the object's
//!    fan-out directory, rename) and makes those durable (an fsync each
//!    when no other journal exists, else one `syncfs`, which also covers
//!    objects another session wrote that this one found present). Then it
//!    removes its journal, and hands back the shared store lock as
//!    [`Committed`], which the caller holds while it writes what
//!    references the objects.
//!
//! Recovery of a dead session removes its temp pack (nothing can reference
//! what it held: the session never committed), re-verifies every loose
//! object modified since its journal was created, deletes the ones that
//! fail, then the trees that reference a missing object (until none is
//! left); it bumps the gc generation before the first deletion, so stat
//! caches re-check presence.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::pack::{Arriving, Pack, PackWriter};
use super::{IoContext, Result, Store, StoreError};
use crate::store::fsutil::{FSYNC_EACH_MAX, SyncSet, atomic_write, read_head, sync_dir, syncfs};
use crate::store::id::{ObjectId, ObjectKind, TreeId};
use crate::store::object;

/// Present while gc deletes objects.
const GC_MARKER: &str = "gc-sweeping";
/// Clock slack when comparing a journal's time with objects' mtimes.
const CLOCK_SLACK: Duration = Duration::from_secs(2);
/// A session that wrote at most this many objects keeps them loose (a
/// backport's 3-10 objects: one pack per backport would leave thousands
/// of tiny packs to search); a larger one writes one pack.
pub const LOOSE_MAX: usize = FSYNC_EACH_MAX;
/// Questions a writer session answers with a `stat` each before it lists
/// fan-out directories instead ([`Known`]).
const STATS_BEFORE_LISTING: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// Holds a store lock until dropped.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// What a successful commit hands back: the writer's shared store lock.
/// Hold it until everything that references the committed objects (the
/// version record, a label, a release) is durable; gc cannot start before.
#[derive(Debug)]
#[must_use = "hold the lock until the version record (or release) is written"]
pub struct Committed {
    _lock: StoreLock,
}

impl Store {
    /// Takes the store lock. Exclusive is gc's; shared is every writer's.
    pub fn lock(&self, mode: LockMode) -> Result<StoreLock> {
        let path = self.root().join("lock");
        let file = flock(&path, mode, || {
            tracing::warn!(
                "waiting for the store lock on {} (another scap is {})",
                path.display(),
                match mode {
                    LockMode::Shared => "collecting garbage",
                    LockMode::Exclusive => "writing to the store",
                }
            )
        })?;
        Ok(StoreLock { _file: file })
    }

    /// Starts a writer session: takes the shared store lock and recovers
    /// from any session that died mid-write. It registers itself (its
    /// journal) before its first object.
    pub fn writer(&self) -> Result<Writer<'_>> {
        let lock = self.lock(LockMode::Shared)?;
        let recovering = self.lock_journals()?;
        self.recover()?;
        drop(recovering);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let session = format!("{}-{nanos}", std::process::id());
        // Under the shared lock: packs gc removed or rewrote are seen.
        self.packs.refresh(&self.packs_dir(), false)?;
        crate::failpoint::hit("writer:started");
        let mut view = self.clone();
        view.pending = Some(Arc::new(Mutex::new(None)));
        view.known = Some(Arc::new(Known::default()));
        Ok(Writer {
            store: view,
            base: self,
            lock: Some(lock),
            journal: std::sync::OnceLock::new(),
            session,
            counter: AtomicU64::new(0),
            written: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            raw_written: AtomicU64::new(0),
            low_space: std::sync::atomic::AtomicBool::new(false),
            space_at_start: std::sync::OnceLock::new(),
            finished: false,
        })
    }

    /// Recovers from dead sessions and from a gc that died mid-sweep. The
    /// caller holds `journal.lock` and the shared store lock.
    fn recover(&self) -> Result<()> {
        let mut bumped = false;
        self.recover_from_gc(&mut bumped)?;
        let dir = self.root().join("journal");
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).at(&dir),
        };
        for entry in rd {
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
                .checked_sub(CLOCK_SLACK)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let removed = self.remove_torn_since(started, &mut bumped)?;
            if removed > 0 {
                tracing::warn!(
                    "removed {removed} torn object(s) left by a crashed session ({})",
                    path.display()
                );
            }
            let suffix = format!(".{}.tmp", entry.file_name().to_string_lossy());
            self.remove_temp_files(&suffix)?;
            // What survived verification may still be only in the page
            // cache (the session died, the machine did not): make it
            // durable before the journal that covers it goes.
            syncfs(&file, self.root())?;
            fs::remove_file(&path).at(&path)?;
        }
        Ok(())
    }

    /// Bumps the gc generation once, before the first deletion.
    fn before_delete(&self, bumped: &mut bool) -> Result<()> {
        if !*bumped {
            self.bump_gc_generation()?;
            *bumped = true;
        }
        Ok(())
    }

    /// Removes a dead session's temp files (names ending in `suffix`):
    /// loose objects' and its pack's.
    fn remove_temp_files(&self, suffix: &str) -> Result<()> {
        let objects = self.root().join("objects");
        // `objects/pack/` is one of these directories.
        for fan in fs::read_dir(&objects).at(&objects)? {
            let fan = fan.at(&objects)?.path();
            let Ok(rd) = fs::read_dir(&fan) else { continue };
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(suffix) {
                    let p = e.path();
                    if name.starts_with(".pack.") {
                        // (and its side index, `.idx.<session>.tmp`)
                        tracing::warn!(
                            "removed the unfinished pack of a session that crashed before its commit ({}, {} bytes): nothing referenced it",
                            p.display(),
                            e.metadata().map_or(0, |m| m.len())
                        );
                    }
                    fs::remove_file(&p).at(&p)?;
                }
            }
        }
        Ok(())
    }

    /// Removes objects written since `since` that fail verification, then
    /// the trees written since then that reference a missing object (their
    /// children may have been torn). This restores the invariant that a
    /// tree is in the store only when everything below it is.
    fn remove_torn_since(&self, since: SystemTime, bumped: &mut bool) -> Result<u64> {
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
                    self.before_delete(bumped)?;
                    fs::remove_file(&path).at(&path)?;
                    removed += 1;
                }
            }
        }
        removed += self.remove_incomplete_trees(recent_trees, bumped)?;
        Ok(removed)
    }

    /// Removes, until none is left, each of `trees` that references an
    /// object the store does not have. Returns how many it removed.
    fn remove_incomplete_trees(
        &self,
        mut trees: Vec<(ObjectId, PathBuf)>,
        bumped: &mut bool,
    ) -> Result<u64> {
        let mut removed = 0;
        loop {
            let before = trees.len();
            let mut kept = Vec::with_capacity(before);
            for (id, path) in trees {
                let complete = match self.tree_from_disk(&TreeId::new(id)) {
                    Ok(tree) => tree.children().all(|child| self.has(&child)),
                    Err(StoreError::Missing { .. }) => continue,
                    Err(_) => false,
                };
                if complete {
                    kept.push((id, path));
                } else {
                    self.before_delete(bumped)?;
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
    fn recover_from_gc(&self, bumped: &mut bool) -> Result<()> {
        let marker = self.root().join(GC_MARKER);
        if !marker.exists() {
            return Ok(());
        }
        let mut trees = Vec::new();
        for item in self.objects()? {
            let (id, path) = item?;
            let head = read_head(&path, object::HEADER_LEN)?;
            if matches!(object::peek(id, &head), Ok((ObjectKind::Tree, _))) {
                trees.push((id, path));
            }
        }
        let removed = self.remove_incomplete_trees(trees, bumped)?;
        if removed > 0 {
            tracing::warn!("removed {removed} tree(s) an interrupted gc left incomplete");
        }
        fs::remove_file(&marker).at(&marker)?;
        Ok(())
    }

    /// Marks the start of gc's sweep (see `recover_from_gc`).
    pub(crate) fn begin_sweep(&self) -> Result<()> {
        atomic_write(&self.root().join(GC_MARKER), b"")
    }

    pub(crate) fn end_sweep(&self) -> Result<()> {
        let marker = self.root().join(GC_MARKER);
        let f = File::open(self.root()).at(self.root())?;
        syncfs(&f, self.root())?;
        fs::remove_file(&marker).at(&marker)?;
        sync_dir(self.root())
    }

    /// Takes `journal.lock` exclusively (held while dead sessions are
    /// recovered and while a session registers its journal).
    fn lock_journals(&self) -> Result<File> {
        flock(
            &self.root().join("journal.lock"),
            LockMode::Exclusive,
            || tracing::info!("waiting for another scap to finish starting its writer session"),
        )
    }

    /// Whether a journal other than `own` exists (a live session, or a
    /// dead one not recovered yet): objects it wrote may not be durable,
    /// and a session that found them "already there" must sync more than
    /// its own files before anything references them.
    fn other_journals(&self, own: Option<&Path>) -> bool {
        let dir = self.root().join("journal");
        let Ok(rd) = fs::read_dir(&dir) else {
            return true;
        };
        rd.flatten().any(|e| Some(e.path().as_path()) != own)
    }
}

/// Opens `path` (creating it) and flocks it, calling `waiting` once if it
/// has to wait.
fn flock(path: &Path, mode: LockMode, waiting: impl FnOnce()) -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .at(path)?;
    let busy = match mode {
        LockMode::Shared => file.try_lock_shared().is_err(),
        LockMode::Exclusive => file.try_lock().is_err(),
    };
    if busy {
        waiting();
        match mode {
            LockMode::Shared => file.lock_shared(),
            LockMode::Exclusive => file.lock(),
        }
        .at(path)?;
    }
    Ok(file)
}

/// A writer session: adds objects, then `commit`s them durably.
pub struct Writer<'s> {
    /// The store as this session sees it: its pending pack included.
    store: Store,
    base: &'s Store,
    lock: Option<StoreLock>,
    /// This session's journal and its path, made before its first object.
    journal: std::sync::OnceLock<(File, PathBuf)>,
    /// Names this session's temp files: `objects/ab/.<rest>.<n>.<session>.tmp`
    /// and `objects/pack/.pack.<session>.tmp`.
    session: String,
    counter: AtomicU64,
    written: AtomicU64,
    written_bytes: AtomicU64,
    /// Received objects stored uncompressed so far, and whether the disk
    /// ran low ([`LOW_SPACE`]): from then on they are compressed as they
    /// arrive.
    raw_written: AtomicU64,
    low_space: std::sync::atomic::AtomicBool,
    /// Whether the disk was low at the first received object.
    space_at_start: std::sync::OnceLock<bool>,
    finished: bool,
}

/// Received objects are stored uncompressed while the store's filesystem
/// keeps at least this much free (or a tenth of its size, if more): what
/// gc compresses later needs room until then.
pub const LOW_SPACE: u64 = 1 << 30;

/// Whether the filesystem of `path` has less than [`LOW_SPACE`] (or a
/// tenth of its size) free; false if that cannot be told.
pub fn space_low(path: &std::path::Path) -> bool {
    match rustix::fs::statvfs(path) {
        Ok(st) => {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let size = st.f_blocks.saturating_mul(st.f_frsize);
            free < LOW_SPACE.max(size / 10)
        }
        Err(_) => false,
    }
}

/// Received objects stored uncompressed between two checks of free space.
const SPACE_CHECK_EVERY: u64 = 512;

/// What a `put` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Put {
    pub id: ObjectId,
    /// False when the store already had the object.
    pub new: bool,
}

impl Writer<'_> {
    /// The store with this session's objects in it (others see them only
    /// once committed).
    pub fn store(&self) -> &Store {
        &self.store
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

    /// Stores `data`, the content of object `id` of `kind` as the caller
    /// has just verified it (decoded and hashed against `id`: a received
    /// object stored uncompressed, or a delta's result), compressed as the
    /// store keeps objects. For a receiver that would otherwise verify the
    /// same bytes twice.
    pub fn put_decoded(&self, id: ObjectId, kind: ObjectKind, data: &[u8]) -> Result<()> {
        if !self.store.has(&id) {
            self.write_object(&id, &object::encode(kind, data))?;
        }
        Ok(())
    }

    /// Stores an object file received from elsewhere, after checking it is
    /// object `id` of kind `kind` with at most `max_len` bytes of content,
    /// as it arrived. Returns the decoded payload.
    pub fn put_verified(
        &self,
        id: ObjectId,
        kind: ObjectKind,
        file: &[u8],
        max_len: u64,
    ) -> Result<Vec<u8>> {
        let data = object::decode_within(id, kind, file, max_len).map_err(|source| {
            StoreError::Object {
                path: self.store.object_path(&id),
                source,
            }
        })?;
        if !self.store.has(&id) {
            self.write_received(&id, file)?;
        }
        Ok(data)
    }

    /// Stores an object file received from elsewhere that the caller has
    /// just checked is object `id` (decoded, bounded and hashed), as it
    /// arrived. An uncompressed one (what a pack or a compressed batch
    /// stream carries) is not compressed here, on the deploy's path: a
    /// session of many such objects flags its pack [`super::pack::FLAG_RAW`], and
    /// gc compresses it later; a small session's are compressed as it
    /// commits.
    pub fn put_checked(&self, id: ObjectId, file: &[u8]) -> Result<()> {
        if !self.store.has(&id) {
            self.write_received(&id, file)?;
        }
        Ok(())
    }

    /// [`Writer::put_checked`] for an object file that came in `seg`, a
    /// segment of a delta pack, at `offset` in its content: the segment
    /// is stored as it came (compressed) with the first object stored
    /// from it, and the object is a reference into it, so that the bytes
    /// a fresh host receives are written once. As `put_checked` when the
    /// disk runs low or the object is not where `offset` says.
    pub fn put_in_segment(
        &self,
        id: ObjectId,
        file: &[u8],
        seg: &Arriving,
        offset: usize,
    ) -> Result<()> {
        if self.store.has(&id) {
            return Ok(());
        }
        let there = seg.content.get(offset..).and_then(|c| c.get(..file.len())) == Some(file);
        if !there || !object::is_uncompressed(file) {
            return self.write_received(&id, file);
        }
        if !self.keep_raw() {
            return self.write_compressed(&id, file);
        }
        let mut guard = self.pending_pack()?;
        let pack = guard.as_mut().expect("created by pending_pack");
        let before = (pack.len(), pack.body_len());
        let n = {
            let mut stored = seg.stored.lock().expect("not poisoned");
            match *stored {
                Some(n) => n,
                None => {
                    let n = pack.append_segment(&seg.compressed, seg.content.clone())?;
                    *stored = Some(n);
                    n
                }
            }
        };
        pack.append_in_segment(id, n, offset as u32, file.len())?;
        pack.mark_raw();
        if pack.len() > before.0 {
            self.written.fetch_add(1, Ordering::Relaxed);
        }
        self.written_bytes
            .fetch_add(pack.body_len() - before.1, Ordering::Relaxed);
        Ok(())
    }

    /// Segments of delta packs stored ([`Writer::put_in_segment`]) after
    /// the highest one an object was read from since.
    pub fn segments_unread(&self) -> usize {
        let guard = self.pending().lock().expect("not poisoned");
        guard.as_ref().map_or(0, PackWriter::segments_unread)
    }

    /// Whether a received object may be stored uncompressed (counted), or
    /// the disk is low ([`LOW_SPACE`]) and it is compressed as it is
    /// stored.
    fn keep_raw(&self) -> bool {
        let n = self.raw_written.fetch_add(1, Ordering::Relaxed);
        // Every caller waits for the first check: a receiver storing in
        // parallel must not store anything raw (a whole segment, for its
        // first object) on a disk already low before it is known.
        let low_at_start = *self.space_at_start.get_or_init(|| self.space_low());
        if !self.low_space.load(Ordering::Relaxed)
            && (low_at_start || (n > 0 && n.is_multiple_of(SPACE_CHECK_EVERY) && self.space_low()))
        {
            self.low_space.store(true, Ordering::Relaxed);
            // Said once per process; each session checks for itself.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| tracing::warn!(
                "{}: under {} MiB (or a tenth of the filesystem) free: compressing what arrives as it is stored, not later",
                self.store.root().display(),
                LOW_SPACE >> 20
            ));
        }
        !self.low_space.load(Ordering::Relaxed)
    }

    fn write_received(&self, id: &ObjectId, file: &[u8]) -> Result<()> {
        if !object::is_uncompressed(file) {
            return self.write_object(id, file);
        }
        if !self.keep_raw() {
            return self.write_compressed(id, file);
        }
        self.write_object_with(id, file, true)
    }

    /// Stores a received uncompressed object file compressed (the disk is
    /// low). The caller checked it: its payload is compressed, no second
    /// hash.
    fn write_compressed(&self, id: &ObjectId, file: &[u8]) -> Result<()> {
        let (kind, _) = object::peek(*id, file).map_err(|source| StoreError::Object {
            path: self.store.object_path(id),
            source,
        })?;
        self.write_object(id, &object::encode(kind, &file[object::HEADER_LEN..]))
    }

    /// Whether the store's filesystem has less than [`LOW_SPACE`] (or a
    /// tenth of its size) free; false if that cannot be told.
    fn space_low(&self) -> bool {
        space_low(self.store.root())
    }

    /// Appends the object to this session's pack (created on the first).
    fn write_object(&self, id: &ObjectId, file: &[u8]) -> Result<()> {
        self.write_object_with(id, file, false)
    }

    /// [`Writer::write_object`]; `raw`: `file` is stored uncompressed for
    /// speed, to be compressed later.
    fn write_object_with(&self, id: &ObjectId, file: &[u8], raw: bool) -> Result<()> {
        let mut guard = self.pending_pack()?;
        let pack = guard.as_mut().expect("created by pending_pack");
        let before = pack.len();
        pack.append(*id, file)?;
        if raw {
            pack.mark_raw();
        }
        if pack.len() > before {
            self.written.fetch_add(1, Ordering::Relaxed);
            self.written_bytes
                .fetch_add(file.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The slot of this session's pack (empty until its first object).
    fn pending(&self) -> &Mutex<Option<PackWriter>> {
        self.store
            .pending
            .as_ref()
            .expect("a writer's view has a pack")
    }

    /// This session's pack, created on the first object, locked.
    fn pending_pack(&self) -> Result<std::sync::MutexGuard<'_, Option<PackWriter>>> {
        let mut guard = self.pending().lock().expect("not poisoned");
        if guard.is_none() {
            // Before anything of this session is on disk.
            self.open_journal()?;
            let tmp = self
                .store
                .packs_dir()
                .join(format!(".pack.{}.tmp", self.session));
            *guard = Some(self.store.create_pack(tmp, false)?);
        }
        Ok(guard)
    }

    /// Creates, locks and syncs this session's journal (once): from then
    /// on a recovery by another session knows this one is alive, and after
    /// a crash, which of its files to check.
    fn open_journal(&self) -> Result<()> {
        if self.journal.get().is_some() {
            return Ok(());
        }
        let _registry = self.base.lock_journals()?;
        let journal_dir = self.base.root().join("journal");
        fs::create_dir_all(&journal_dir).at(&journal_dir)?;
        let path = journal_dir.join(&self.session);
        let journal = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path)?;
        journal.lock().at(&path)?;
        journal.sync_all().at(&path)?;
        sync_dir(&journal_dir)?;
        let _ = self.journal.set((journal, path));
        Ok(())
    }

    /// Writes a loose object: temp file in its own fan-out directory, then
    /// rename (within one directory: a rename across directories takes a
    /// filesystem-wide lock in Linux). Returns its path.
    fn write_loose(&self, id: &ObjectId, file: &[u8]) -> Result<PathBuf> {
        let dest = self.store.object_path(id);
        let hex = id.to_hex();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dest.with_file_name(format!(".{}.{n}.{}.tmp", &hex[2..], self.session));
        let write = |tmp: &Path| -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(tmp)?;
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
        Ok(dest)
    }

    /// Objects and bytes (as stored) written by this session so far.
    pub fn written(&self) -> (u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.written_bytes.load(Ordering::Relaxed),
        )
    }

    /// Makes every object written so far durable, then ends the session.
    /// Only after this may anything reference them; the returned guard keeps
    /// gc out until the caller has written that reference.
    pub fn commit(mut self) -> Result<Committed> {
        self.finish()?;
        Ok(Committed {
            _lock: self.lock.take().expect("taken only here"),
        })
    }

    fn finish(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        // Its objects are about to join the store's: from now on its view
        // asks the store itself.
        if let Some(k) = &self.store.known {
            k.ended.store(true, Ordering::Relaxed);
        }
        let pending = self
            .store
            .pending
            .as_ref()
            .and_then(|p| p.lock().expect("not poisoned").take());
        let mut loose: Vec<PathBuf> = Vec::new();
        if let Some(mut pack) = pending {
            if pack.len() <= LOOSE_MAX {
                let result = (|| -> Result<()> {
                    // In the order written: objects stored in a received
                    // pack's segments are read segment by segment, each
                    // decompressed once.
                    for id in pack.ids()? {
                        if self.base.has(&id) {
                            continue;
                        }
                        let file = pack.read(&id)?.expect("listed by the pack");
                        // What was stored raw for speed is compressed now:
                        // gc compresses only packs.
                        let file = match pack.is_raw() {
                            true => object::compressed(id, &file).map_err(|source| {
                                StoreError::Object {
                                    path: pack.path().to_path_buf(),
                                    source,
                                }
                            })?,
                            false => std::borrow::Cow::Borrowed(file.as_slice()),
                        };
                        loose.push(self.write_loose(&id, &file)?);
                    }
                    Ok(())
                })();
                pack.discard();
                result?;
                crate::failpoint::hit("writer:loose-written");
            } else {
                let dir = self.store.packs_dir();
                let sealed = pack.seal().and_then(|()| {
                    crate::failpoint::hit("writer:pack-sealed");
                    pack.file().sync_all().at(&dir)
                });
                if let Err(e) = sealed {
                    pack.discard();
                    return Err(e);
                }
                let path = pack.publish(&dir)?;
                sync_dir(&dir)?;
                self.base.mark_packed()?;
                self.base.packs.add(Pack::open(&path)?);
            }
        }
        let own = self.journal.get();
        // Any open file of the store's filesystem, for syncfs.
        let fd = match (own, &self.lock) {
            (Some((journal, _)), _) => journal,
            (None, Some(lock)) => &lock._file,
            (None, None) => unreachable!("the lock goes only after finish"),
        };
        if self.store.other_journals(own.map(|(_, p)| p.as_path())) {
            syncfs(fd, self.store.root())?;
        } else if !loose.is_empty() {
            let mut dirs: Vec<&Path> = loose.iter().filter_map(|p| p.parent()).collect();
            dirs.sort();
            dirs.dedup();
            let set = SyncSet::default();
            for p in loose.iter().map(PathBuf::as_path).chain(dirs) {
                set.add_path(p)?;
            }
            set.sync(fd, self.store.root())?;
        }
        crate::failpoint::hit("writer:synced");
        if let Some((_, path)) = own {
            fs::remove_file(path).at(path)?;
        }
        Ok(())
    }
}

/// What a writer session's view of the store ([`Writer::store`]) takes
/// as present besides its own pack, without asking the filesystem again:
/// the packs loaded when the session started, and each fan-out
/// directory's loose objects as first listed. A session asks whether the
/// store has each object it could write (~30k on a fresh host or a cold
/// build), mostly to hear no: two `stat`s per question were a quarter of
/// a fresh host's receiving thread. An object another session commits
/// meanwhile is not seen, and this session stores it too (an object may
/// be in the store twice; a read verifies whichever copy it finds); one
/// seen here does not go away meanwhile: gc takes the store lock that the
/// session holds shared. (Recovery, when another session starts, deletes
/// only the damaged loose objects of a session that died in a machine
/// crash: a `stat` per question could miss that deletion too, between
/// the question and the commit.) A session's first
/// [`STATS_BEFORE_LISTING`] questions are each one `stat`: a backport
/// asks a dozen, each about another fan-out directory, and a `stat` costs
/// less than listing one.
pub(crate) struct Known {
    /// Set when the session commits or ends: its view then asks the store.
    ended: std::sync::atomic::AtomicBool,
    /// Questions asked so far.
    asked: AtomicU64,
    /// Per first byte of an ID, the loose objects of that fan-out
    /// directory, sorted; listed on the first question about one.
    loose: Box<[std::sync::OnceLock<Box<[ObjectId]>>]>,
}

impl std::fmt::Debug for Known {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Known")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Default for Known {
    fn default() -> Known {
        Known {
            ended: Default::default(),
            asked: AtomicU64::new(0),
            loose: (0..256).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }
}

impl Known {
    /// Whether `id` is a loose object of `store` as this session knows;
    /// `None` once the session has ended.
    pub(crate) fn has_loose(&self, store: &Store, id: &ObjectId) -> Option<bool> {
        if self.ended.load(Ordering::Relaxed) {
            return None;
        }
        let first = id.as_bytes()[0];
        let slot = &self.loose[usize::from(first)];
        if slot.get().is_none() && self.asked.fetch_add(1, Ordering::Relaxed) < STATS_BEFORE_LISTING
        {
            return Some(store.has_loose(id));
        }
        let listed = slot.get_or_init(|| {
            let dir = store.root().join("objects").join(format!("{first:02x}"));
            let mut ids: Vec<ObjectId> = match fs::read_dir(&dir) {
                Ok(rd) => rd
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name();
                        let rest = name.to_str()?;
                        let id: ObjectId = format!("{first:02x}{rest}").parse().ok()?;
                        Some(id)
                    })
                    .collect(),
                // Unreadable: every question about it is a miss, and the
                // object is written again (the directory's trouble shows
                // when this session writes or commits).
                Err(_) => Vec::new(),
            };
            ids.sort_unstable();
            ids.into_boxed_slice()
        });
        Some(listed.binary_search(id).is_ok())
    }
}

impl Drop for Writer<'_> {
    /// A session that ends in an error still leaves only whole objects:
    /// sync them and close the journal, so no recovery scan is needed.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::super::Role;
    use super::*;

    fn journals(store: &Store) -> usize {
        fs::read_dir(store.root().join("journal")).unwrap().count()
    }

    #[test]
    fn a_session_has_a_journal_from_its_first_object_and_none_if_it_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir.path(), Role::Host).unwrap();
        let id = {
            let w = store.writer().unwrap();
            assert_eq!(journals(&store), 0, "no object yet: no journal");
            let put = w.put(ObjectKind::Chunk, b"first object").unwrap();
            assert!(put.new);
            assert_eq!(journals(&store), 1, "registered before the object");
            let _ = w.put(ObjectKind::Chunk, b"second object").unwrap();
            assert_eq!(journals(&store), 1, "one journal a session");
            let _committed = w.commit().unwrap();
            assert_eq!(journals(&store), 0, "gone at commit");
            put.id
        };
        assert!(store.has(&id));
        // A session that finds everything present (a switch to a staged
        // version) leaves no trace, and commits.
        let w = store.writer().unwrap();
        assert!(!w.put(ObjectKind::Chunk, b"first object").unwrap().new);
        assert_eq!(journals(&store), 0);
        let _committed = w.commit().unwrap();
        assert_eq!(journals(&store), 0);
    }

    #[test]
    fn a_live_session_s_journal_registered_late_is_not_recovered_by_another() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir.path(), Role::Host).unwrap();
        let first = store.writer().unwrap();
        let _ = first
            .put(ObjectKind::Chunk, b"held by a live session")
            .unwrap();
        // Another session starts (and recovers) while the first is live:
        // the first's journal is locked, so it is left alone.
        let second = store.writer().unwrap();
        assert_eq!(journals(&store), 1);
        let _ = second.put(ObjectKind::Chunk, b"the second's").unwrap();
        assert_eq!(journals(&store), 2);
        drop(second.commit().unwrap());
        drop(first.commit().unwrap());
        assert_eq!(journals(&store), 0);
        assert!(store.has(&ObjectKind::Chunk.hash(b"held by a live session")));
    }
}
