//! One copy on disk: release slots share unchanged files as hardlinks, and
//! the check that keeps a hand edit of one slot from reaching another.
//!
//! A file a slot needs that the live slot holds at the same path, with the
//! same content and mode, is hardlinked from it instead of written: the
//! agent's directory holds the tree about once (plus its compressed store),
//! not once per slot, and bringing the spare slot to the live version costs
//! a `linkat` per file instead of a copy of the tree.
//!
//! The price is that an in-place edit of a live file (vim writes in place
//! to a file with several links; so do `>>` and `truncate`) changes that
//! inode in every slot that shares it. What keeps such an edit out of what
//! a deploy writes and what a rollback restores is one invariant:
//!
//! **Every regular file in a clean slot that nobody but the agent touched
//! has an mtime before the slot's seal, the agent's uid, the size its
//! version gives it and mode 0644 or 0755 as its version says.**
//!
//! - A slot's *seal* is the time (whole seconds, one second before the
//!   clock said, so that the kernel's coarse file clock cannot fall behind
//!   it) at which the operation that last wrote the slot began.
//! - The agent sets the mtime of every file it writes to `seal - 1`; a file
//!   it links must already pass the check against its own slot's seal,
//!   which is earlier; files a diff leaves in place pass the check against
//!   the slot's previous seal before the new one is recorded.
//! - Any write to a file after that sets its mtime to the time of the
//!   write, at or after every seal recorded before it: the check fails.
//!
//! So before a slot is changed (a deploy applies its diff) or switched to
//! as it is (a rollback), every file in it is checked with one `stat` (no
//! read), and each file that fails is rewritten from the store as a new
//! inode. The edited inode stays in the live release, where the drift check
//! (which re-hashes everything) reports it. The agent never writes an inode
//! in place: a file whose mode changes is replaced, not `chmod`ed.
//!
//! What the check cannot see: an edit that also puts back an old mtime
//! (`touch -r`, `cp -p` onto the file) or a clock stepped back past a seal.
//! Drift's re-hash finds those; ARCHITECTURE.md states the trade-off.
//!
//! Where hardlinks are not available (`EPERM`, `EXDEV`, `ENOTSUP`) or an
//! inode has reached the filesystem's link limit (`EMLINK`), the file is
//! written instead, and the agent says so once.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Stat};
use rustix::io::Errno;

use super::materialize::{self, Arena, Cursor, Dir};
use crate::cancel::Cancel;
use crate::store::disk::IoContext;
use crate::store::fsutil::SyncSet;
use crate::store::tree::MAX_DEPTH;
use crate::store::{Content, Store, StoreError, TreeId, TreeName};

/// The seal for an operation starting now (unix seconds): one second before
/// the clock, so that a write after this instant has an mtime at or after
/// it even if the kernel's coarse file clock lags the clock read here.
pub fn seal_now() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    now - 1
}

/// Whether `st` is a file the agent made, of `size` bytes and mode 0755
/// (`executable`) or 0644, in a slot sealed at `seal`, untouched since.
fn made_by_agent(st: &Stat, size: u64, executable: bool, seal: i64) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
        && st.st_size as u64 == size
        && st.st_mode & 0o7777 == materialize::file_mode(executable)
        && st.st_uid == rustix::process::geteuid().as_raw()
        && st.st_mtime < seal
}

/// `(size, executable)` of a file's content.
fn size_mode(content: &Content) -> Option<(u64, bool)> {
    match content {
        Content::File {
            size, executable, ..
        } => Some((*size, *executable)),
        _ => None,
    }
}

/// Whether an error of `linkat` means this filesystem (or this inode) will
/// not take another link, as opposed to trouble that must stop the write
/// (a full disk, an I/O error).
fn cannot_link(e: Errno) -> bool {
    matches!(e, Errno::MLINK | Errno::XDEV | Errno::PERM | Errno::NOTSUP)
}

/// Set once hardlinks failed in a way that will not change (the
/// filesystem has none): later files are written without trying.
static NO_LINKS: AtomicBool = AtomicBool::new(false);
/// Set once the fallback was reported.
static SAID: AtomicBool = AtomicBool::new(false);

fn say_once(e: Errno, path: &std::path::Path) {
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "cannot hardlink {} between release slots ({}): writing a copy instead; \
             release slots then take up to one copy of the tree each (said once)",
            path.display(),
            io::Error::from(e)
        );
    }
}

/// The `linkat` used below, or the error a test injects
/// (`SCAP_FAILPOINT=agent:link:errno=N`).
fn linkat(src: &Dir, dst: &Dir, name: &[u8]) -> Result<(), Errno> {
    if let Some(n) = crate::failpoint::errno("agent:link") {
        return Err(Errno::from_raw_os_error(n));
    }
    rustix::fs::linkat(src, name, dst, name, AtFlags::empty())
}

/// Hardlinks `name` from `src` (a directory of the reference slot, sealed
/// at `seal`) into `dst`, if the file there passes the check for
/// `content`. `Ok(false)`: not linked (the caller writes the file); nothing
/// named `name` is left in `dst` then.
pub(crate) fn link(
    src: &Dir,
    dst: &Dir,
    name: &[u8],
    content: &Content,
    seal: i64,
) -> Result<bool, StoreError> {
    let Some((size, exec)) = size_mode(content) else {
        return Ok(false);
    };
    if NO_LINKS.load(Ordering::Relaxed) {
        return Ok(false);
    }
    let Ok(before) = rustix::fs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW) else {
        return Ok(false);
    };
    if !made_by_agent(&before, size, exec, seal) {
        return Ok(false);
    }
    let path = dst.path().join(std::ffi::OsStr::from_bytes(name));
    match linkat(src, dst, name) {
        Ok(()) => {}
        Err(e) if cannot_link(e) => {
            if e != Errno::MLINK {
                NO_LINKS.store(true, Ordering::Relaxed);
            }
            say_once(e, &path);
            return Ok(false);
        }
        Err(e) => return Err(io::Error::from(e)).at(&path),
    }
    // What was linked must be what was checked: a rename by hand in the
    // reference between the two calls would have linked another file.
    let after = rustix::fs::statat(dst, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(io::Error::from)
        .at(&path)?;
    if after.st_ino != before.st_ino
        || after.st_dev != before.st_dev
        || !made_by_agent(&after, size, exec, seal)
    {
        rustix::fs::unlinkat(dst, name, AtFlags::empty())
            .map_err(io::Error::from)
            .at(&path)?;
        return Ok(false);
    }
    Ok(true)
}

/// Every regular file of a version, in tree order, and the directories
/// leading to them: what [`check`] stats. Built once per version from its
/// trees and kept by [`super::release::Releases`] (about 36 bytes a file:
/// 9.5 MB at 263k files), so that a deploy's check is only the `stat`s.
pub(crate) struct FileList {
    arena: Arena,
    /// Each arena directory's tree, to look up a file that must be
    /// rewritten.
    trees: Vec<TreeId>,
    files: Vec<FileEntry>,
    /// The files' names, one after the other: file `i`'s runs to where
    /// file `i + 1`'s starts.
    names: Vec<u8>,
}

/// 16 bytes: a list is kept per version, and built while another is.
struct FileEntry {
    dir: u32,
    name_at: u32,
    /// The size, and [`EXECUTABLE`].
    size_mode: u64,
}

/// The bit of [`FileEntry::size_mode`] that is the mode (no file is 2^63
/// bytes; a tree that says so has its size clamped below the bit, which no
/// file on disk then matches: [`check`] reports it).
const EXECUTABLE: u64 = 1 << 63;

/// How big a version's [`FileList`] was: what the next one reserves, so
/// that building it does not double its vectors on the way (versions in a
/// row are about the same size).
#[derive(Clone, Copy, Default)]
pub(crate) struct ListSize {
    files: usize,
    names: usize,
    dirs: usize,
}

impl FileList {
    /// Walks `tree` (a version's root) in the store; `like` is the size
    /// of another version's list, to reserve ahead.
    pub(crate) fn new(
        store: &Store,
        tree: &TreeId,
        like: ListSize,
        cancel: &Cancel,
    ) -> Result<FileList, StoreError> {
        // A little over, so that a version slightly larger than the last
        // one does not double a vector for its last few files.
        let over = |n: usize| n + n / 16;
        let mut list = FileList {
            arena: Arena::with_capacity(over(like.dirs)),
            trees: Vec::with_capacity(over(like.dirs)),
            files: Vec::with_capacity(over(like.files)),
            names: Vec::with_capacity(over(like.names)),
        };
        let root = list
            .arena
            .push(u32::MAX, TreeName::new(b"-".to_vec()).expect("a name"));
        list.trees.push(*tree);
        list.collect(store, root, tree, 0, cancel)?;
        // Kept for a while: give back what was reserved or doubled.
        list.files.shrink_to_fit();
        list.names.shrink_to_fit();
        list.trees.shrink_to_fit();
        list.arena.shrink_to_fit();
        Ok(list)
    }

    pub(crate) fn size(&self) -> ListSize {
        ListSize {
            files: self.files.len(),
            names: self.names.len(),
            dirs: self.arena.len(),
        }
    }

    fn collect(
        &mut self,
        store: &Store,
        idx: u32,
        tree: &TreeId,
        depth: usize,
        cancel: &Cancel,
    ) -> Result<(), StoreError> {
        cancel.check()?;
        if depth > MAX_DEPTH {
            return Ok(());
        }
        let t = store.tree(tree)?;
        for e in t.entries() {
            match &e.content {
                Content::Dir { tree, .. } => {
                    let sub = self.arena.push(idx, e.name.clone());
                    self.trees.push(*tree);
                    self.collect(store, sub, tree, depth + 1, cancel)?;
                }
                Content::File {
                    size, executable, ..
                } => {
                    let mode = if *executable { EXECUTABLE } else { 0 };
                    self.files.push(FileEntry {
                        dir: idx,
                        name_at: self.names.len() as u32,
                        size_mode: (*size).min(EXECUTABLE - 1) | mode,
                    });
                    self.names.extend_from_slice(e.name.as_bytes());
                }
                Content::Symlink { .. } => {}
            }
        }
        Ok(())
    }

    /// File `i`'s name.
    fn name(&self, i: usize) -> &[u8] {
        let end = self
            .files
            .get(i + 1)
            .map_or(self.names.len(), |n| n.name_at as usize);
        &self.names[self.files[i].name_at as usize..end]
    }

    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }

    /// File `i`'s path below the slot's root.
    pub(crate) fn path(&self, i: usize) -> Vec<u8> {
        let f = &self.files[i];
        let mut p = self.arena.path(f.dir);
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(self.name(i));
        p
    }

    /// Opens every directory of the version in slot `root` in turn, the
    /// root first, and gives `f` its path and descriptor; stops at the
    /// first error.
    pub(crate) fn each_dir(
        &self,
        root: &Dir,
        cancel: &Cancel,
        mut f: impl FnMut(Vec<u8>, &Dir) -> bool,
    ) -> Result<bool, StoreError> {
        let mut cursor = Cursor::new(root, &self.arena);
        for idx in 0..self.arena.len() as u32 {
            if idx % 1024 == 0 {
                cancel.check()?;
            }
            let dir = cursor.dir(idx)?;
            if !f(self.arena.path(idx), dir) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// What a check found changed in a slot: by index in the version's file
/// list (a check of every file), or by path (a check of what the slots'
/// watch reported: [`super::watch`]).
pub(crate) enum Found {
    Listed(std::sync::Arc<FileList>, Vec<usize>),
    Paths(TreeId, Vec<Vec<u8>>),
}

impl Found {
    pub(crate) fn len(&self) -> usize {
        match self {
            Found::Listed(_, bad) => bad.len(),
            Found::Paths(_, bad) => bad.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rewrites what was found as new inodes with mtime `mtime`: see
    /// [`repair`].
    pub(crate) fn repair(
        &self,
        store: &Store,
        root: &Dir,
        mtime: i64,
        sync: &SyncSet,
        cancel: &Cancel,
    ) -> Result<u64, StoreError> {
        match self {
            Found::Listed(list, bad) => repair(store, root, list, bad, mtime, sync, cancel),
            Found::Paths(tree, bad) => {
                let mut n = 0;
                for_each_file(store, root, tree, bad, cancel, |dir, e, _| {
                    if dir.kind(e.name.as_bytes())?.is_some() {
                        dir.remove(e.name.as_bytes())?;
                    }
                    sync.add(dir.as_fd().try_clone_to_owned().at(dir.path())?);
                    materialize::write_file(store, dir, &e.name, &e.content, mtime, sync, None)?;
                    n += 1;
                    Ok(())
                })?;
                Ok(n)
            }
        }
    }
}

/// The files at `paths` of slot `root`, which holds version tree `tree`
/// and was sealed at `seal`, that fail the check ([`check`]'s, for a few
/// paths). A path that is no file of the version is left out: an extra
/// name is drift's to report, and the check is about files the version
/// has.
pub(crate) fn check_paths(
    store: &Store,
    root: &Dir,
    tree: &TreeId,
    paths: &[Vec<u8>],
    seal: i64,
    cancel: &Cancel,
) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut bad = Vec::new();
    for_each_file(store, root, tree, paths, cancel, |dir, e, path| {
        let Some((size, exec)) = size_mode(&e.content) else {
            return Ok(());
        };
        let ok = rustix::fs::statat(dir, e.name.as_bytes(), AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| made_by_agent(&st, size, exec, seal));
        if !ok {
            bad.push(path.to_vec());
        }
        Ok(())
    })?;
    Ok(bad)
}

/// Calls `f` with the slot directory, the version's entry and the path of
/// each of `paths` that is a regular file of version tree `tree`, a
/// directory at a time. A directory of the version that is not one in the
/// slot is an error, as in [`check`].
fn for_each_file(
    store: &Store,
    root: &Dir,
    tree: &TreeId,
    paths: &[Vec<u8>],
    cancel: &Cancel,
    mut f: impl FnMut(&Dir, &crate::store::Entry, &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    // Directory -> (name, path) of each file asked about in it.
    type ByDir<'a> = std::collections::BTreeMap<&'a [u8], Vec<(&'a [u8], &'a [u8])>>;
    let mut by_dir = ByDir::new();
    for p in paths {
        let (parent, name) = match p.iter().rposition(|b| *b == b'/') {
            Some(at) => (&p[..at], &p[at + 1..]),
            None => (&p[..0], &p[..]),
        };
        by_dir.entry(parent).or_default().push((name, p));
    }
    'dirs: for (parent, names) in by_dir {
        cancel.check()?;
        let mut t = store.tree(tree)?;
        let mut dir: Option<Dir> = None;
        for comp in parent.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            let Some(Content::Dir { tree: sub, .. }) = t.get(comp).map(|e| &e.content) else {
                continue 'dirs;
            };
            let sub = *sub;
            dir = Some(match &dir {
                Some(d) => d.subdir(comp)?,
                None => root.subdir(comp)?,
            });
            t = store.tree(&sub)?;
        }
        let d = dir.as_ref().unwrap_or(root);
        for (name, path) in names {
            if let Some(e) = t
                .get(name)
                .filter(|e| matches!(e.content, Content::File { .. }))
            {
                f(d, e, path)?;
            }
        }
    }
    Ok(())
}

/// Files checked by one thread between two looks at the cancel flag.
const CHECKS_PER_LOOK: usize = 1024;

/// Checks every regular file of slot `root`, which holds the version of
/// `list` and was sealed at `seal`, with one `stat` each, on a few threads
/// of its own (not the shared pool: a rollback must not queue behind a
/// fetch's work). Returns the files that fail, by index. A directory of
/// the version that is not one in the slot is an error
/// [`super::release`] answers by rewriting the slot.
pub(crate) fn check(
    root: &Dir,
    list: &FileList,
    seal: i64,
    cancel: &Cancel,
) -> Result<Vec<usize>, StoreError> {
    let check_range = |start: usize, files: &[FileEntry]| -> Result<Vec<usize>, StoreError> {
        let mut cursor = Cursor::new(root, &list.arena);
        let mut bad = Vec::new();
        for (i, f) in files.iter().enumerate() {
            if i % CHECKS_PER_LOOK == 0 {
                cancel.check()?;
            }
            let dir = cursor.dir(f.dir)?;
            let (size, executable) = (f.size_mode & !EXECUTABLE, f.size_mode & EXECUTABLE != 0);
            let ok = rustix::fs::statat(dir, list.name(start + i), AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| made_by_agent(&st, size, executable, seal));
            if !ok {
                bad.push(start + i);
            }
        }
        Ok(bad)
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let per = list.files.len().div_ceil(threads).max(4 * CHECKS_PER_LOOK);
    if list.files.len() <= per {
        return check_range(0, &list.files);
    }
    std::thread::scope(|s| {
        let running: Vec<_> = list
            .files
            .chunks(per)
            .enumerate()
            .map(|(k, files)| s.spawn(move || check_range(k * per, files)))
            .collect();
        let mut bad = Vec::new();
        for r in running {
            bad.extend(r.join().expect("a check thread does not panic")?);
        }
        Ok(bad)
    })
}

/// Rewrites the files [`check`] found (indices into `list`) as new inodes
/// with mtime `mtime`; whatever stands at their names is removed first
/// (the slot is not live). Returns how many.
pub(crate) fn repair(
    store: &Store,
    root: &Dir,
    list: &FileList,
    suspects: &[usize],
    mtime: i64,
    sync: &SyncSet,
    cancel: &Cancel,
) -> Result<u64, StoreError> {
    let mut cursor = Cursor::new(root, &list.arena);
    for &i in suspects {
        cancel.check()?;
        let f = &list.files[i];
        let dir = cursor.dir(f.dir)?;
        let name = list.name(i);
        let tree = store.tree(&list.trees[f.dir as usize])?;
        let Some(entry) = tree
            .get(name)
            .filter(|e| matches!(e.content, Content::File { .. }))
        else {
            return Err(StoreError::Io {
                path: dir.path().join(std::ffi::OsStr::from_bytes(name)),
                source: io::Error::other("not a file in its version's tree"),
            });
        };
        if dir.kind(name)?.is_some() {
            dir.remove(name)?;
        }
        sync.add(dir.as_fd().try_clone_to_owned().at(dir.path())?);
        materialize::write_file(store, dir, &entry.name, &entry.content, mtime, sync, None)?;
    }
    Ok(suspects.len() as u64)
}
