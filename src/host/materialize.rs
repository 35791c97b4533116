//! Writes release directories through directory file descriptors only.
//!
//! A version may hold any name and any symlink (`etc -> /etc`, a file
//! called `.index.php.scap-tmp`, a directory that used to be a symlink).
//! Nothing here ever resolves a path string: every name is looked up
//! relative to an open directory, and
//! - directories are opened with `O_DIRECTORY | O_NOFOLLOW`: a symlink where
//!   a directory is expected is an error, never followed;
//! - files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`: an existing
//!   name (a symlink included) is an error, never a target; a file being
//!   replaced is unlinked first (the slot is not live, so no reader sees
//!   the gap); there are no temporary names a tree could collide with;
//! - modes are set at creation, and with `fchmod` on the file just created
//!   where the umask took bits away, never by path, and never on an
//!   existing file (it may be a hardlink shared with the
//!   live slot: see [`super::share`]);
//! - removal is `unlinkat` of a name in an opened directory, descending
//!   only through directories opened with `O_NOFOLLOW`; a directory a diff
//!   removes is first renamed (`renameat`, no replacing) into the agent's
//!   [`Trash`], and emptied from there after the switch.
//!
//! So no tree can make the agent open, chmod, unlink or rename anything
//! outside the release. A slot whose content does not match what its
//! metadata says (edited by hand) makes an operation fail with an error;
//! the caller then rewrites the slot from nothing.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::fetch::Arrivals;
use super::share;
use crate::cancel::Cancel;
use crate::store::disk::IoContext;
use crate::store::fsutil::SyncSet;
use crate::store::tree::MAX_DEPTH;
use crate::store::{Content, Store, StoreError, TreeId, TreeName};

/// An open directory of a release, and its path (for messages only: the
/// path is never used to reach anything).
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn io_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

impl Dir {
    /// Opens a directory the agent owns by path (the slot itself); the last
    /// component must not be a symlink.
    pub fn open(path: &Path) -> Result<Dir, StoreError> {
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty())
            .map_err(io_err)
            .at(path)?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn child(&self, name: &[u8]) -> PathBuf {
        self.path.join(OsStr::from_bytes(name))
    }

    /// Opens subdirectory `name`, refusing to follow a symlink.
    pub fn subdir(&self, name: &[u8]) -> Result<Dir, StoreError> {
        let path = self.child(name);
        let fd = rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty())
            .map_err(io_err)
            .at(&path)?;
        Ok(Dir { fd, path })
    }

    /// Creates subdirectory `name` (mode 0755 whatever the umask) and opens it.
    pub fn mkdir(&self, name: &[u8]) -> Result<Dir, StoreError> {
        let path = self.child(name);
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o755))
            .map_err(io_err)
            .at(&path)?;
        let d = self.subdir(name)?;
        rustix::fs::fchmod(&d.fd, Mode::from_raw_mode(0o755))
            .map_err(io_err)
            .at(&path)?;
        Ok(d)
    }

    pub fn symlink(&self, name: &[u8], target: &[u8]) -> Result<(), StoreError> {
        let path = self.child(name);
        rustix::fs::symlinkat(target, &self.fd, name)
            .map_err(io_err)
            .at(&path)
    }

    /// Creates regular file `name`, which must not exist, with the mode a
    /// version gives it.
    pub fn create_file(&self, name: &[u8], executable: bool) -> Result<File, StoreError> {
        let path = self.child(name);
        let mode = Mode::from_raw_mode(file_mode(executable));
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
        )
        .map_err(io_err)
        .at(&path)?;
        // The umask may have taken bits away (a syscall, and an inode
        // change, per file saved where it cannot have).
        if umask_strips(file_mode(executable)) {
            rustix::fs::fchmod(&fd, mode).map_err(io_err).at(&path)?;
        }
        Ok(File::from(fd))
    }

    /// Opens existing regular file `name` for reading, refusing symlinks
    /// and anything that is not a regular file (a FIFO would block).
    pub fn open_file(&self, name: &[u8]) -> Result<File, StoreError> {
        let path = self.child(name);
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)
        .at(&path)?;
        let st = rustix::fs::fstat(&fd).map_err(io_err).at(&path)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(StoreError::Io {
                path,
                source: io::Error::other("not a regular file"),
            });
        }
        Ok(File::from(fd))
    }

    /// What `name` is, without following it; `None` if absent.
    pub fn kind(&self, name: &[u8]) -> Result<Option<FileType>, StoreError> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(io_err(e)).at(&self.child(name)),
        }
    }

    pub fn read_link(&self, name: &[u8]) -> Result<Vec<u8>, StoreError> {
        rustix::fs::readlinkat(&self.fd, name, Vec::new())
            .map(|c| c.into_bytes())
            .map_err(io_err)
            .at(&self.child(name))
    }

    /// The names in this directory (not `.` or `..`), sorted.
    pub fn names(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut rd = rustix::fs::Dir::read_from(&self.fd)
            .map_err(io_err)
            .at(&self.path)?;
        let mut out = Vec::new();
        while let Some(e) = rd.read() {
            let e = e.map_err(io_err).at(&self.path)?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push(n.to_vec());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes `name`, whatever it is; a directory with everything in it,
    /// descending only through directories opened without following.
    pub fn remove(&self, name: &[u8]) -> Result<(), StoreError> {
        self.remove_at_depth(name, 0, None)
    }

    /// `cancel`: checked at every directory (emptying the trash, which can
    /// stop anywhere).
    fn remove_at_depth(
        &self,
        name: &[u8],
        depth: usize,
        cancel: Option<&Cancel>,
    ) -> Result<(), StoreError> {
        let path = self.child(name);
        if self.kind(name)? == Some(FileType::Directory) {
            if depth > MAX_DEPTH * 4 {
                return Err(StoreError::Io {
                    path,
                    source: io::Error::other("directories nested too deep to remove"),
                });
            }
            if let Some(c) = cancel {
                c.check()?;
            }
            let sub = self.subdir(name)?;
            for n in sub.names()? {
                sub.remove_at_depth(&n, depth + 1, cancel)?;
            }
            rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)
                .map_err(io_err)
                .at(&path)
        } else {
            rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
                .map_err(io_err)
                .at(&path)
        }
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Where directories a diff removes go: `trash/` beside the release slots
/// (the same filesystem). A rename takes a removed branch of 25,000 files
/// out of a slot at once; its unlinks come after the switch, off the
/// deploy's path, and can stop anywhere (nothing in the trash is anyone's:
/// what a crash leaves there is emptied at the next start).
pub struct Trash {
    dir: Dir,
    next: AtomicU64,
}

impl Trash {
    /// Opens `path`, made (mode 0700) if missing.
    pub fn open(path: &Path) -> Result<Trash, StoreError> {
        match std::fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).at(path),
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).at(path)?;
        let dir = Dir::open(path)?;
        // Names from the clock, so that this run's seldom meet what a
        // crash left (a name taken is skipped anyway).
        let next = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(Trash {
            dir,
            next: AtomicU64::new(next),
        })
    }

    /// Moves entry `name` of `from` into the trash.
    pub fn take(&self, from: &Dir, name: &[u8]) -> Result<(), StoreError> {
        // Low on disk, the space is given back at once, as the deploy goes.
        if crate::store::disk::space_low(self.dir.path()) {
            return from.remove(name);
        }
        loop {
            let to = format!("{:x}", self.next.fetch_add(1, Ordering::Relaxed));
            match rustix::fs::renameat_with(
                &from.fd,
                name,
                &self.dir.fd,
                to.as_str(),
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::EXIST) => continue,
                // Another filesystem mounted below the slots, or one
                // without RENAME_NOREPLACE: removed in place.
                Err(rustix::io::Errno::XDEV | rustix::io::Errno::INVAL) => {
                    return from.remove(name);
                }
                Err(e) => return Err(io_err(e)).at(&from.child(name)),
            }
        }
    }

    /// Removes what is in the trash, checking `cancel` at every directory;
    /// returns how many entries went.
    pub fn empty(&self, cancel: &Cancel) -> Result<u64, StoreError> {
        let names = self.dir.names()?;
        if names.is_empty() {
            return Ok(0);
        }
        tracing::debug!("emptying the trash: {} entr(ies)", names.len());
        crate::failpoint::hit_or_cancel("agent:trash", cancel);
        let mut n = 0;
        for name in names {
            self.dir.remove_at_depth(&name, 0, Some(cancel))?;
            n += 1;
        }
        Ok(n)
    }
}

/// Whether this process's umask takes any of `mode`'s bits away. Read once
/// from `/proc/self/status` (reading it with `umask(2)` would change it
/// for a moment under the other threads); unknown counts as yes. The
/// agent never changes its umask.
fn umask_strips(mode: u32) -> bool {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let umask = UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    });
    umask.is_none_or(|u| u & mode != 0)
}

pub fn file_mode(executable: bool) -> u32 {
    if executable { 0o755 } else { 0o644 }
}

/// What applying a tree cost.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub files_written: u64,
    pub bytes_written: u64,
    /// Files hardlinked from the reference slot instead of written.
    pub files_linked: u64,
    pub removed: u64,
}

/// How [`apply`] writes files.
pub struct Options<'a> {
    /// The mtime (unix seconds) of every file written: the slot's seal
    /// minus one (see [`super::share`]).
    pub mtime: i64,
    /// A slot to hardlink unchanged files from.
    pub reference: Option<Reference<'a>>,
    /// The version is still arriving: trees and chunks not in the store
    /// yet are taken from, or waited for on, the fetch bringing them
    /// (a fresh host writes its release while its pack arrives).
    pub arriving: Option<&'a Arrivals>,
    /// Where removed directories go ([`Trash`]), and what to tell before
    /// each goes (its path below the root: the slot's watch expects the
    /// rename). `None`: removed in place.
    pub trash: Option<(&'a Trash, &'a TellMove<'a>)>,
}

/// Told a removed directory's path before it goes into the [`Trash`].
pub type TellMove<'a> = dyn Fn(&[u8]) + Sync + 'a;

/// The slot files are hardlinked from: a file is linked when this slot's
/// version has the same content and mode at the same path, and the file
/// there passes [`super::share`]'s check against `seal`.
pub struct Reference<'a> {
    pub root: &'a Dir,
    pub tree: TreeId,
    pub seal: i64,
}

/// The directories a walk has visited, by index (0 is the root): each
/// knows its parent and name, so that parallel work can reopen any of them
/// from the root, name by name, without holding one descriptor per
/// directory (a MediaWiki tree has tens of thousands).
#[derive(Default)]
pub(crate) struct Arena {
    nodes: Vec<(u32, TreeName)>,
}

impl Arena {
    pub(crate) fn new() -> Arena {
        Arena { nodes: Vec::new() }
    }

    pub(crate) fn with_capacity(dirs: usize) -> Arena {
        Arena {
            nodes: Vec::with_capacity(dirs),
        }
    }

    pub(crate) fn shrink_to_fit(&mut self) {
        self.nodes.shrink_to_fit();
    }

    /// Registers `name` under `parent` (`u32::MAX` for the root's own
    /// entry, which is index 0); returns its index.
    pub(crate) fn push(&mut self, parent: u32, name: TreeName) -> u32 {
        self.nodes.push((parent, name));
        (self.nodes.len() - 1) as u32
    }

    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Directory `idx`'s path below the root (empty for the root).
    pub(crate) fn path(&self, idx: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for i in self.chain(idx) {
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(self.nodes[i as usize].1.as_bytes());
        }
        out
    }

    /// Indices from the root's child down to `idx`.
    fn chain(&self, mut idx: u32) -> Vec<u32> {
        let mut out = Vec::new();
        while idx != 0 {
            out.push(idx);
            idx = self.nodes[idx as usize].0;
        }
        out.reverse();
        out
    }
}

/// Opens arena directories one path at a time: keeps the directories on
/// the last path asked for open (at most the tree's depth), reopening only
/// what differs. Each parallel task has its own.
pub(crate) struct Cursor<'a> {
    root: &'a Dir,
    arena: &'a Arena,
    open: Vec<(u32, Dir)>,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(root: &'a Dir, arena: &'a Arena) -> Cursor<'a> {
        Cursor {
            root,
            arena,
            open: Vec::new(),
        }
    }

    /// Directory `idx`, opened from the root without following anything.
    pub(crate) fn dir(&mut self, idx: u32) -> Result<&Dir, StoreError> {
        if idx == 0 {
            return Ok(self.root);
        }
        let chain = self.arena.chain(idx);
        let keep = self
            .open
            .iter()
            .zip(&chain)
            .take_while(|((a, _), b)| a == *b)
            .count();
        self.open.truncate(keep);
        for &i in &chain[keep..] {
            let name = self.arena.nodes[i as usize].1.as_bytes();
            let d = match self.open.last() {
                Some((_, parent)) => parent.subdir(name)?,
                None => self.root.subdir(name)?,
            };
            self.open.push((i, d));
        }
        Ok(self.open.last().map(|(_, d)| d).unwrap_or(self.root))
    }
}

/// Directories whose entries changed (their fsync is due), each added to
/// the sync set once.
struct Touched(std::sync::Mutex<std::collections::HashSet<u32>>);

impl Touched {
    fn mark(&self, idx: u32, dir: &Dir, sync: &SyncSet) -> Result<(), StoreError> {
        if self.0.lock().expect("not poisoned").insert(idx) {
            sync.add(dir.fd.try_clone().at(&dir.path)?);
        }
        Ok(())
    }
}

/// A file to write once every directory exists.
struct Write1 {
    dir: u32,
    name: TreeName,
    content: Content,
    /// The reference slot holds the same file at the same path.
    link: bool,
}

/// Files, and bytes of them, listed before they are written while the
/// version arrives: the writing then trails the fetch by that much, not by
/// a whole batch, and the files being written at any instant are within a
/// few of the pack's segments (which the store keeps decompressed).
const WRITES_PER_ARRIVING_BATCH: usize = 512;
const BYTES_PER_ARRIVING_BATCH: u64 = 2 * crate::net::pack::SEGMENT as u64;

/// Turns directory `root`, which holds tree `old` (or is empty), into tree
/// `new`: removals, directories and symlinks first, in tree order, then the
/// files in parallel, each hardlinked from `opts.reference` when it can be.
/// No inode is ever changed in place (it may be shared with other slots):
/// a changed file, or one whose mode changes, is a new one. Everything it
/// changed is added to `sync`.
pub fn apply(
    store: &Store,
    root: Dir,
    old: Option<&TreeId>,
    new: &TreeId,
    opts: &Options<'_>,
    sync: &SyncSet,
    cancel: &Cancel,
) -> Result<Applied, StoreError> {
    let mut w = Walk {
        store,
        root: &root,
        opts,
        sync,
        cancel,
        arena: Arena::new(),
        touched: Touched(Default::default()),
        writes: Vec::with_capacity(WRITES_PER_BATCH),
        applied: Applied::default(),
        batch: if opts.arriving.is_some() {
            (WRITES_PER_ARRIVING_BATCH, BYTES_PER_ARRIVING_BATCH)
        } else {
            (WRITES_PER_BATCH, u64::MAX)
        },
        listed_bytes: 0,
    };
    let root_idx = w
        .arena
        .push(u32::MAX, TreeName::new(b"-".to_vec()).expect("a name"));
    let refr = opts.reference.as_ref().map(|r| r.tree);
    w.structure(&root, root_idx, old, new, refr.as_ref(), 0)?;
    crate::failpoint::hit("agent:slot-half-written");
    w.write()?;
    Ok(w.applied)
}

/// Files listed before they are written: the structure pass hands them
/// over in batches of this many (each directory on their paths exists by
/// then), so that what a deploy holds does not grow with the tree.
const WRITES_PER_BATCH: usize = 8192;
/// Fewest files a batch gives each thread it writes on.
const FILES_PER_THREAD_MIN: usize = 16;

/// A pass of [`apply`]: the structure, in tree order, then the files.
struct Walk<'a> {
    store: &'a Store,
    root: &'a Dir,
    opts: &'a Options<'a>,
    sync: &'a SyncSet,
    cancel: &'a Cancel,
    arena: Arena,
    touched: Touched,
    /// Files to write, not yet written.
    writes: Vec<Write1>,
    applied: Applied,
    /// Files, and bytes, listed before they are written.
    batch: (usize, u64),
    /// Bytes of the files listed, not yet written.
    listed_bytes: u64,
}

impl Walk<'_> {
    /// Writes (or links) the files listed so far, in parallel, and forgets
    /// them.
    fn write(&mut self) -> Result<(), StoreError> {
        let Walk {
            store,
            root,
            opts,
            sync,
            cancel,
            arena,
            touched,
            writes,
            applied,
            batch: _,
            listed_bytes,
        } = self;
        *listed_bytes = 0;
        let (arena, touched) = (&*arena, &*touched);
        // Each thread takes the next file not yet taken: the files being
        // written at any instant are next to each other in tree order,
        // which is the order a pack arrives in (a release written while
        // it arrives reads from the few segments the store keeps
        // decompressed).
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let worker = |_| -> Result<(u64, u64), StoreError> {
            let mut cursor = Cursor::new(root, arena);
            let mut from = opts
                .reference
                .as_ref()
                .map(|r| (Cursor::new(r.root, arena), r.seal));
            let (mut bytes, mut linked) = (0, 0);
            while !failed.load(Ordering::Relaxed) {
                let Some(w) = writes.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let one = (|| -> Result<(), StoreError> {
                    cancel.check()?;
                    let dir = cursor.dir(w.dir)?;
                    touched.mark(w.dir, dir, sync)?;
                    let was_linked = match (&mut from, w.link) {
                        // A reference directory that cannot be opened
                        // (edited by hand) only means writing the file.
                        (Some((src, seal)), true) => match src.dir(w.dir) {
                            Ok(src) => share::link(src, dir, w.name.as_bytes(), &w.content, *seal)?,
                            Err(_) => false,
                        },
                        _ => false,
                    };
                    if was_linked {
                        linked += 1;
                    } else {
                        let arriving = opts.arriving.map(|a| (a, &**cancel));
                        bytes += write_file(
                            store, dir, &w.name, &w.content, opts.mtime, sync, arriving,
                        )?;
                    }
                    Ok(())
                })();
                one.inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
            }
            Ok((bytes, linked))
        };
        // A few files (a backport's) are written on this thread: waking
        // the pool's threads costs more than they would save.
        let threads = rayon::current_num_threads()
            .min(writes.len().div_ceil(FILES_PER_THREAD_MIN))
            .max(1);
        let done: Vec<(u64, u64)> = match threads {
            1 => vec![worker(0)?],
            n => (0..n)
                .into_par_iter()
                .map(worker)
                .collect::<Result<_, StoreError>>()?,
        };
        let linked: u64 = done.iter().map(|d| d.1).sum();
        applied.files_linked += linked;
        applied.files_written += writes.len() as u64 - linked;
        applied.bytes_written += done.iter().map(|d| d.0).sum::<u64>();
        writes.clear();
        Ok(())
    }

    /// Removes entry `name` of directory `idx`, which the old version has
    /// as `was`: a directory into the trash, if there is one.
    fn remove(&self, dir: &Dir, idx: u32, name: &[u8], was: &Content) -> Result<(), StoreError> {
        match (was, self.opts.trash) {
            (Content::Dir { .. }, Some((trash, tell))) => {
                let mut path = self.arena.path(idx);
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(name);
                tell(&path);
                trash.take(dir, name)
            }
            _ => dir.remove(name),
        }
    }

    /// The structure pass: removals, directories and symlinks, in tree
    /// order; files are listed, and written a batch at a time.
    fn structure(
        &mut self,
        dir: &Dir,
        idx: u32,
        old: Option<&TreeId>,
        new: &TreeId,
        refr: Option<&TreeId>,
        depth: usize,
    ) -> Result<(), StoreError> {
        if old == Some(new) {
            return Ok(());
        }
        self.cancel.check()?;
        if depth > MAX_DEPTH {
            return Err(StoreError::BadTree {
                id: *new,
                source: crate::store::tree::TreeError::NotCanonical(
                    "nested deeper than 256 levels",
                ),
            });
        }
        let old_tree = old.map(|t| self.store.tree(t)).transpose()?;
        let new_tree = match self.opts.arriving {
            Some(a) => a.tree(self.store, new, self.cancel)?,
            None => self.store.tree(new)?,
        };
        // The reference's directory at this path, if it is one.
        let ref_tree = match refr {
            Some(t) => Some(self.store.tree(t)?),
            _ => None,
        };
        if let Some(old_tree) = &old_tree {
            for e in old_tree.entries() {
                if new_tree.get(e.name.as_bytes()).is_none() {
                    self.remove(dir, idx, e.name.as_bytes(), &e.content)?;
                    self.touched.mark(idx, dir, self.sync)?;
                    self.applied.removed += 1;
                }
            }
        }
        for e in new_tree.entries() {
            let name = e.name.as_bytes();
            let before = old_tree
                .as_ref()
                .and_then(|t| t.get(name))
                .map(|e| &e.content);
            let there = ref_tree
                .as_ref()
                .and_then(|t| t.get(name))
                .map(|e| &e.content);
            let ref_sub = match there {
                Some(Content::Dir { tree, .. }) => Some(tree),
                _ => None,
            };
            match (before, &e.content) {
                (Some(a), b) if a == b => {}
                (Some(Content::Dir { tree: a, .. }), Content::Dir { tree: b, .. }) => {
                    let sub = dir.subdir(name)?;
                    let sub_idx = self.arena.push(idx, e.name.clone());
                    self.structure(&sub, sub_idx, Some(a), b, ref_sub, depth + 1)?;
                }
                (before, new) => {
                    if let Some(before) = before {
                        self.remove(dir, idx, name, before)?;
                        self.touched.mark(idx, dir, self.sync)?;
                        self.applied.removed += 1;
                    }
                    match new {
                        Content::Dir { tree, .. } => {
                            let sub = dir.mkdir(name)?;
                            self.touched.mark(idx, dir, self.sync)?;
                            let sub_idx = self.arena.push(idx, e.name.clone());
                            self.structure(&sub, sub_idx, None, tree, ref_sub, depth + 1)?;
                        }
                        Content::Symlink { target } => {
                            dir.symlink(name, target)?;
                            self.touched.mark(idx, dir, self.sync)?;
                        }
                        file @ Content::File { size, .. } => {
                            self.listed_bytes += size;
                            self.writes.push(Write1 {
                                dir: idx,
                                name: e.name.clone(),
                                content: file.clone(),
                                link: there == Some(file),
                            });
                            if self.writes.len() >= self.batch.0
                                || self.listed_bytes >= self.batch.1
                            {
                                self.write()?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Creates file `name` (which must not exist) in `dir` with `content`,
/// its mode, and mtime `mtime`; returns its size. `arriving`: each chunk
/// not in the store yet is waited for as the file reaches it.
pub(crate) fn write_file(
    store: &Store,
    dir: &Dir,
    name: &TreeName,
    content: &Content,
    mtime: i64,
    sync: &SyncSet,
    arriving: Option<(&Arrivals, &Cancel)>,
) -> Result<u64, StoreError> {
    let Content::File {
        executable, size, ..
    } = content
    else {
        unreachable!("only files are written")
    };
    let name = name.as_bytes();
    let path = dir.child(name);
    // Each chunk goes to the file in one write, from where it lies in
    // memory (no buffer between: chunks are whole small files or tens of
    // KiB of a large one).
    let mut f = dir.create_file(name, *executable)?;
    store.write_file_as_arriving(content, &mut f, &path, &|id| match arriving {
        Some((a, cancel)) => a.chunk(store, id, cancel),
        None => Ok(()),
    })?;
    let t = rustix::fs::Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    rustix::fs::futimens(
        &f,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
    )
    .map_err(io_err)
    .at(&path)?;
    sync.add(f);
    Ok(*size)
}

/// Empties and removes directory `name` of `parent` (a slot), if there.
pub fn remove_if_present(parent: &Dir, name: &[u8]) -> Result<(), StoreError> {
    if parent.kind(name)?.is_some() {
        parent.remove(name)?;
    }
    Ok(())
}
