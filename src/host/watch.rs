//! Which files of the release slots may have changed since they were last
//! checked: inotify on every directory of every slot, so that the check
//! [`super::share`] needs before a slot is changed or switched to costs a
//! `stat` per file *touched*, not per file in the tree.
//!
//! A slot is *watched* once every directory of its version has a watch and
//! a full check ran after the watches were in place ([`Watch::begin`], then
//! the caller's check). From then on, each event adds a path to the slots'
//! *suspects*:
//!
//! - a write or an attribute change of a file (`IN_MODIFY`, `IN_ATTRIB`) at
//!   path P of any slot makes P suspect in **every** slot: the inode may be
//!   shared with them (slots share files at the same path only). That
//!   holds for a muted slot's events too (one the agent is changing, or
//!   the new live slot while the work after a switch runs): an edit made
//!   through it reaches every slot that shares the file; only a file with
//!   one link (the agent's own new files) is left to the muted slot;
//! - a name created, removed or renamed (`IN_CREATE`, `IN_DELETE`,
//!   `IN_MOVED_*`) makes P suspect in that slot;
//! - anything the watches cannot follow path by path (a directory created,
//!   removed or renamed by hand, a watch gone, the kernel's queue
//!   overflowing, more suspects than [`MAX_SUSPECTS`]) un-watches the slot,
//!   or every slot.
//!
//! [`Watch::take`] gives a slot's suspects only while **every** slot
//! directory that exists is watched (an edit through an unwatched slot's
//! path could reach a shared inode unseen); otherwise the caller checks
//! every file, as without inotify. The agent un-watches a slot before it
//! changes it and watches it again in the background after a switch. On a
//! deploy's path that is [`Watch::mute`], which costs nothing: the slot's
//! events are dropped from then on, as if it had no watches. Dropping the
//! watches themselves ([`Watch::forget`], an `inotify_rm_watch` per
//! directory: 13 ms at 263k files) is left to that background work.
//!
//! Events are read by a thread of their own that holds the lock while it
//! reads, and [`Watch::take`] reads what is queued under the same lock: an
//! edit finished before a check begins is always counted.
//!
//! What this cannot see, and the full check could: a write through a
//! hardlink made by hand outside the slots (inotify reports a change to the
//! directory it was made through). The drift check after each switch, and
//! the full check after every agent start, cover that; ARCHITECTURE.md
//! states the trade-off.

use std::collections::{BTreeSet, HashMap};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};

use rustix::fs::inotify::{self, ReadFlags, WatchFlags};
use rustix::io::Errno;

use super::materialize::Dir;

/// Suspects a slot may collect before it is simply un-watched (its next
/// check is then a full one): bounds the memory a flood of edits takes.
pub const MAX_SUSPECTS: usize = 4096;

/// What a watch on a slot directory reports.
const MASK: WatchFlags = WatchFlags::MODIFY
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::CREATE)
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::MOVE_SELF);

/// The slots' watches; inert where inotify is not available.
pub struct Watch {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    fd: OwnedFd,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Each watch: its slot and the directory's path in the slot.
    wds: HashMap<i32, (usize, Box<[u8]>)>,
    slots: Vec<Slot>,
    /// Each slot's directory (to tell whether a file a muted slot reports
    /// shares its inode).
    roots: Vec<std::path::PathBuf>,
    /// Watches of directories the agent moved out of a slot, to remove.
    stale: Vec<i32>,
}

#[derive(Default)]
struct Slot {
    watched: bool,
    /// Being changed by the agent: its events are kept aside in `log`
    /// until it is watched again ([`Watch::resume`], or [`Watch::forget`]
    /// and a full check).
    muted: bool,
    wds: Vec<i32>,
    /// Each watched directory's path in the slot, and its watch.
    dirs: HashMap<Box<[u8]>, i32>,
    suspects: BTreeSet<Vec<u8>>,
    /// While muted: directories the agent is about to move out of the
    /// slot into its trash ([`Watch::expect_moved_out`]).
    moving_out: BTreeSet<Vec<u8>>,
    /// While muted: what changed in the slot since it was last checked
    /// (its suspects when it was muted, then every path an event named),
    /// so that watching it again checks only those and what the agent
    /// wrote. `None`: something was missed (it was not watched when muted,
    /// a directory was renamed, too many paths, the queue overflowed), and
    /// only a full check will do.
    log: Option<Log>,
}

/// What happened in a muted slot ([`Slot::log`]).
#[derive(Default)]
pub struct Log {
    /// Paths of files created, written, changed, removed or renamed.
    pub paths: BTreeSet<Vec<u8>>,
    /// Directories whose watch went (removed, by the agent's diff or by
    /// hand): the caller checks the diff removed each of them.
    pub gone: Vec<Box<[u8]>>,
}

impl State {
    /// Whether the file at `path` in slot `slot` may share its inode with
    /// another slot: more than one link, or no longer there to tell.
    fn maybe_shared(&self, slot: usize, path: &[u8]) -> bool {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let Some(root) = self.roots.get(slot) else {
            return true;
        };
        let full = root.join(std::ffi::OsStr::from_bytes(path));
        std::fs::symlink_metadata(full).map_or(true, |m| m.nlink() > 1)
    }

    fn unwatch(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.watched = false;
        s.suspects.clear();
    }

    /// Something happened in muted slot `slot` that its log cannot follow:
    /// it is watched again only by a full check.
    fn lose_log(&mut self, slot: usize, why: &str) {
        let s = &mut self.slots[slot];
        if s.log.take().is_some() {
            tracing::info!(
                "release slot {}: {why}; it is checked in full when watched again",
                self.roots
                    .get(slot)
                    .map(|r| r.display().to_string())
                    .unwrap_or_default()
            );
        }
    }

    /// Notes `path` in muted slot `slot`'s log.
    fn log(&mut self, slot: usize, path: Vec<u8>) {
        let Some(log) = &mut self.slots[slot].log else {
            return;
        };
        log.paths.insert(path);
        if log.paths.len() > MAX_SUSPECTS {
            self.lose_log(slot, "more paths changed than the watch keeps");
        }
    }

    /// The agent moved directory `path` out of muted slot `slot` (a diff
    /// removed it): its watches and those below it go, and the log notes
    /// it gone, as if it had been removed there. (Their own events, a
    /// move and later their removal from the trash, name watches no
    /// longer known.)
    fn moved_out(&mut self, slot: usize, path: Vec<u8>) {
        let below = |d: &[u8]| {
            d == path.as_slice() || (d.starts_with(&path) && d.get(path.len()) == Some(&b'/'))
        };
        let wds: Vec<i32> = self.slots[slot]
            .dirs
            .iter()
            .filter(|(d, _)| below(d))
            .map(|(_, wd)| *wd)
            .collect();
        for wd in wds {
            self.drop_wd(wd);
            self.stale.push(wd);
        }
        if let Some(log) = &mut self.slots[slot].log {
            log.gone.push(path.into_boxed_slice());
        }
    }

    /// Drops watch `wd` from the maps (its directory went, or it was
    /// removed).
    fn drop_wd(&mut self, wd: i32) -> Option<(usize, Box<[u8]>)> {
        let (slot, dir) = self.wds.remove(&wd)?;
        let s = &mut self.slots[slot];
        s.wds.retain(|w| *w != wd);
        if s.dirs.get(&dir) == Some(&wd) {
            s.dirs.remove(&dir);
        }
        Some((slot, dir))
    }

    /// Makes `path` suspect in slot `slot`: in its suspects if it is
    /// watched, in its log if it is muted (an edit through another slot of
    /// an inode it shares, while the agent changes it).
    fn suspect(&mut self, slot: usize, path: Vec<u8>) {
        let s = &mut self.slots[slot];
        if s.muted {
            self.log(slot, path);
            return;
        }
        if !s.watched {
            return;
        }
        s.suspects.insert(path);
        if s.suspects.len() > MAX_SUSPECTS {
            self.unwatch(slot);
        }
    }

    fn event(&mut self, wd: i32, what: ReadFlags, name: Option<&[u8]>) {
        if what.contains(ReadFlags::QUEUE_OVERFLOW) {
            // Said when it costs something: a slot was watched, or kept a
            // log (not for every overflow of a queue nobody relies on).
            if self.slots.iter().any(|s| s.watched || s.log.is_some()) {
                tracing::warn!(
                    "the release slots' inotify queue overflowed (fs.inotify.max_queued_events): \
                     events were lost, so the next check of each slot is a full one"
                );
            }
            for s in 0..self.slots.len() {
                self.unwatch(s);
                self.lose_log(s, "the inotify queue overflowed");
            }
            return;
        }
        let Some((slot, dir)) = self.wds.get(&wd).map(|(s, d)| (*s, d.clone())) else {
            return;
        };
        let muted = self.slots[slot].muted;
        if muted
            && what.contains(ReadFlags::ISDIR | ReadFlags::MOVED_FROM)
            && let Some(name) = name
        {
            let mut path = dir.to_vec();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            if self.slots[slot].moving_out.remove(&path) {
                self.moved_out(slot, path);
                return;
            }
        }
        if what.contains(ReadFlags::IGNORED) {
            self.drop_wd(wd);
            if muted {
                // Removed by the agent's diff, or by hand: the caller
                // tells which when it watches the slot again.
                if let Some(log) = &mut self.slots[slot].log {
                    log.gone.push(dir);
                }
            } else {
                self.unwatch(slot);
            }
            return;
        }
        if what.intersects(ReadFlags::MOVE_SELF | ReadFlags::UNMOUNT)
            || (muted
                && what.contains(ReadFlags::ISDIR)
                && what.intersects(ReadFlags::MOVED_FROM | ReadFlags::MOVED_TO))
        {
            // A directory moved (its watch now names the wrong path), or
            // the filesystem went: path by path no longer works.
            self.unwatch(slot);
            self.lose_log(slot, "a directory was moved");
            return;
        }
        if what.contains(ReadFlags::DELETE_SELF) {
            // Its IGNORED follows.
            if !muted {
                self.unwatch(slot);
            }
            return;
        }
        let Some(name) = name else {
            return;
        };
        let mut path = dir.to_vec();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        let names =
            ReadFlags::CREATE | ReadFlags::DELETE | ReadFlags::MOVED_FROM | ReadFlags::MOVED_TO;
        if what.contains(ReadFlags::ISDIR) {
            // A directory made, removed or renamed by hand: not followed
            // path by path. (Its mode or times changing does not matter to
            // the check of the files.)
            if what.intersects(names) {
                self.unwatch(slot);
            }
            return;
        }
        if muted {
            // A write through a slot the agent is changing: noted in its
            // log (its own writes, which its diff names too, and any hand
            // edit alike). Its own new files have one link and concern no
            // other slot; a file with more (or gone already) may be
            // shared, and is suspect in every slot that is watched.
            self.log(slot, path.clone());
            if !what.intersects(ReadFlags::MODIFY | ReadFlags::ATTRIB)
                || !self.maybe_shared(slot, &path)
            {
                return;
            }
            for s in (0..self.slots.len()).filter(|s| *s != slot) {
                self.suspect(s, path.clone());
            }
            return;
        }
        if what.intersects(ReadFlags::MODIFY | ReadFlags::ATTRIB) {
            for s in 0..self.slots.len() {
                self.suspect(s, path.clone());
            }
        }
        if what.intersects(names) {
            self.suspect(slot, path);
        }
    }
}

impl Inner {
    /// Reads every queued event; the caller holds the lock.
    fn drain(&self, st: &mut State) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 16 * 1024];
        let mut r = inotify::Reader::new(&self.fd, &mut buf);
        loop {
            match r.next() {
                Ok(ev) => {
                    let name = ev.file_name().map(|n| n.to_bytes());
                    st.event(ev.wd(), ev.events(), name);
                }
                Err(Errno::AGAIN) | Err(Errno::INTR) => {
                    for wd in std::mem::take(&mut st.stale) {
                        // Gone already if the trash was emptied.
                        let _ = inotify::remove_watch(&self.fd, wd);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!("reading the release slots' inotify events: {e}");
                    for s in 0..st.slots.len() {
                        st.unwatch(s);
                    }
                    return;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        let mut st = self.state.lock().expect("not poisoned");
        self.drain(&mut st);
        st
    }
}

impl Watch {
    /// Watches for the release slots in `roots` (by index); inert, with a
    /// warning, where inotify cannot be had.
    pub fn new(roots: Vec<std::path::PathBuf>) -> Watch {
        let slots = roots.len();
        // A test stands in for a host out of inotify instances
        // (`SCAP_FAILPOINT=agent:inotify:errno=24`).
        let fd = match crate::failpoint::errno("agent:inotify").map_or_else(
            || init_inotify(crate::failpoint::value("agent:inotify-queue")),
            |n| Err(Errno::from_raw_os_error(n)),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(
                    "inotify is not available ({e}): every deploy checks each file of the release slot it changes (a stat per file)"
                );
                return Watch { inner: None };
            }
        };
        let inner = Arc::new(Inner {
            fd,
            state: Mutex::new(State {
                wds: HashMap::new(),
                slots: (0..slots).map(|_| Slot::default()).collect(),
                roots,
                stale: Vec::new(),
            }),
        });
        let weak = Arc::downgrade(&inner);
        let spawned = std::thread::Builder::new()
            .name("slot-watch".into())
            .spawn(move || read_events(weak));
        if let Err(e) = spawned {
            tracing::warn!("cannot start the release slots' watch thread ({e})");
            return Watch { inner: None };
        }
        Watch { inner: Some(inner) }
    }

    /// Un-watches slot `slot` and drops its events from now on, keeping
    /// its watches (until [`Watch::forget`]): the agent is about to change
    /// it. A slot's events then cannot tell hand edits from the agent's
    /// own writes, so this is the same, for every check, as dropping the
    /// watches, without the cost of a call per directory on the deploy's
    /// path.
    pub fn mute(&self, slot: usize) {
        let Some(inner) = &self.inner else { return };
        let mut st = inner.lock();
        let s = &mut st.slots[slot];
        if s.muted {
            return;
        }
        // What was suspect and not yet checked stays so in the log; a slot
        // not watched now starts a log of nothing to trust.
        s.log = s.watched.then(|| Log {
            paths: std::mem::take(&mut s.suspects),
            gone: Vec::new(),
        });
        st.unwatch(slot);
        st.slots[slot].muted = true;
        st.slots[slot].moving_out.clear();
    }

    /// Says the agent is about to move directory `path` out of muted slot
    /// `slot` (a diff removed it; [`super::materialize::Trash`]): its
    /// rename is then the slot's change, not a directory moved by hand.
    pub fn expect_moved_out(&self, slot: usize, path: &[u8]) {
        let Some(inner) = &self.inner else { return };
        let mut st = inner.lock();
        let s = &mut st.slots[slot];
        if s.muted && s.log.is_some() {
            s.moving_out.insert(path.to_vec());
        }
    }

    /// Watches muted slot `slot` again without a full check: hands over
    /// its log (what changed in it while muted, and before that what was
    /// suspect) and counts it watched from now on, with no suspects. The
    /// caller adds watches for the directories the agent made first, then
    /// checks every path of the log and of its own diff, and reports what
    /// fails with [`Watch::suspect`]. `None` (nothing changes): the log was
    /// lost, and only [`Watch::forget`] and a full check will do.
    pub fn resume(&self, slot: usize) -> Option<Log> {
        let inner = self.inner.as_ref()?;
        let mut st = inner.lock();
        let s = &mut st.slots[slot];
        if !s.muted {
            return None;
        }
        let log = s.log.take()?;
        s.moving_out.clear();
        s.muted = false;
        s.watched = true;
        s.suspects.clear();
        Some(log)
    }

    /// Whether muted slot `slot` can be watched again from its log
    /// ([`Watch::resume`]).
    pub fn resumable(&self, slot: usize) -> bool {
        self.inner.as_ref().is_some_and(|i| {
            let st = i.lock();
            st.slots[slot].muted && st.slots[slot].log.is_some()
        })
    }

    /// Whether directory `path` of slot `slot` has a watch.
    pub fn has_dir(&self, slot: usize, path: &[u8]) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.lock().slots[slot].dirs.contains_key(path))
    }

    /// Un-watches slot `slot` and drops its watches: the agent is about to
    /// change it, remove it, or watch it again.
    pub fn forget(&self, slot: usize) {
        let Some(inner) = &self.inner else { return };
        let mut st = inner.lock();
        st.unwatch(slot);
        st.slots[slot].log = None;
        st.slots[slot].moving_out.clear();
        st.slots[slot].dirs.clear();
        for (n, wd) in std::mem::take(&mut st.slots[slot].wds)
            .into_iter()
            .enumerate()
        {
            st.wds.remove(&wd);
            // Gone already if its directory was removed.
            let _ = inotify::remove_watch(&inner.fd, wd);
            // Each removal queues an event: read them as they come, or a
            // slot of more directories than the kernel's queue holds
            // (fs.inotify.max_queued_events, 16,384) would overflow it
            // and un-watch every slot.
            if n % 1024 == 1023 {
                inner.drain(&mut st);
            }
        }
        st.slots[slot].muted = false;
    }

    /// Adds a watch on directory `dir` of slot `slot` (at `path` in it),
    /// while the slot is being watched again ([`Watch::forget`] first, then
    /// every directory, then [`Watch::start`]). False if it cannot be had.
    pub fn add(&self, slot: usize, path: Vec<u8>, dir: &Dir) -> bool {
        let Some(inner) = &self.inner else {
            return false;
        };
        // The watch is on the directory open here, not on whatever a path
        // string names by now.
        let proc = format!("/proc/self/fd/{}", dir.as_fd().as_raw_fd());
        match inotify::add_watch(&inner.fd, proc.as_str(), MASK) {
            Ok(wd) => {
                let mut st = inner.lock();
                let path = path.into_boxed_slice();
                st.slots[slot].wds.push(wd);
                st.slots[slot].dirs.insert(path.clone(), wd);
                st.wds.insert(wd, (slot, path));
                true
            }
            Err(e) => {
                tracing::warn!(
                    "cannot watch {} ({e}): deploys check every file of its release slot",
                    dir.path().display()
                );
                false
            }
        }
    }

    /// Marks slot `slot`, every directory of which has a watch, watched
    /// with no suspects: the caller then checks every file of it and
    /// reports what failed with [`Watch::suspect`].
    pub fn start(&self, slot: usize) {
        let Some(inner) = &self.inner else { return };
        let mut st = inner.lock();
        let s = &mut st.slots[slot];
        debug_assert!(!s.muted, "watched again only after forget");
        s.watched = true;
        s.suspects.clear();
    }

    /// Un-watches slot `slot` (keeping its watches): its next check is a
    /// full one. For a check that stopped half-way.
    pub fn unwatch(&self, slot: usize) {
        if let Some(inner) = &self.inner {
            inner.lock().unwatch(slot);
        }
    }

    /// Adds paths found changed by a full check of a slot to the suspects
    /// of **every** slot: a file changed in place may share its inode with
    /// the others (a rollback must not trust their empty lists).
    pub fn suspect(&self, paths: impl IntoIterator<Item = Vec<u8>>) {
        let Some(inner) = &self.inner else { return };
        let mut st = inner.lock();
        for p in paths {
            for s in 0..st.slots.len() {
                st.suspect(s, p.clone());
            }
        }
    }

    /// Whether slot `slot` is watched.
    pub fn watched(&self, slot: usize) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|i| i.lock().slots[slot].watched)
    }

    /// The paths of slot `slot` that may have changed since it was last
    /// checked, handed over (the next call gives only what changed after
    /// this one), if every slot in `existing` (the slots whose directory
    /// exists) is watched; None: check every file.
    pub fn take(&self, slot: usize, existing: &[usize]) -> Option<Vec<Vec<u8>>> {
        let inner = self.inner.as_ref()?;
        let mut st = inner.lock();
        if !st.slots[slot].watched || existing.iter().any(|s| !st.slots[*s].watched) {
            return None;
        }
        Some(
            std::mem::take(&mut st.slots[slot].suspects)
                .into_iter()
                .collect(),
        )
    }
}

/// A new inotify instance. With `queue`, a test's: the kernel's event
/// queue for it holds only that many events (the system-wide
/// fs.inotify.max_queued_events is set around the call and put back at
/// once: each instance keeps the limit it was made with), so that a test
/// can make it overflow.
fn init_inotify(queue: Option<u64>) -> Result<OwnedFd, Errno> {
    let flags = inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC;
    let Some(queue) = queue else {
        return inotify::init(flags);
    };
    let sysctl = "/proc/sys/fs/inotify/max_queued_events";
    let was = std::fs::read_to_string(sysctl).map_err(|_| Errno::ACCESS)?;
    std::fs::write(sysctl, queue.to_string()).map_err(|_| Errno::ACCESS)?;
    let fd = inotify::init(flags);
    let _ = std::fs::write(sysctl, was.trim());
    fd
}

/// The watch thread: waits for events, then reads them under the lock.
fn read_events(inner: Weak<Inner>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        let mut fds = [rustix::event::PollFd::new(
            &i.fd,
            rustix::event::PollFlags::IN,
        )];
        let second = rustix::fs::Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&second)) {
            Ok(n) if n > 0 => drop(i.lock()),
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => {
                tracing::warn!("waiting for the release slots' inotify events: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropping the watches of a slot of more directories than the
    /// kernel's event queue holds leaves the other slots watched.
    #[test]
    fn forgetting_a_big_slot_does_not_overflow_the_queue() {
        let tmp = tempfile::tempdir().unwrap();
        let queue: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let big = tmp.path().join("big");
        let dirs = queue + 1000;
        for i in 0..dirs {
            std::fs::create_dir_all(big.join(format!("{}/{i}", i / 1000))).unwrap();
        }
        let small = tmp.path().join("small");
        std::fs::create_dir_all(&small).unwrap();
        let watch = Watch::new(vec![tmp.path().join("a"), tmp.path().join("b")]);
        assert!(watch.add(1, Vec::new(), &Dir::open(&small).unwrap()));
        watch.start(1);
        let mut added = 0;
        for top in std::fs::read_dir(&big).unwrap() {
            let top = top.unwrap().path();
            for d in std::fs::read_dir(&top).unwrap() {
                assert!(watch.add(0, Vec::new(), &Dir::open(&d.unwrap().path()).unwrap()));
                added += 1;
            }
        }
        assert_eq!(added, dirs);
        watch.start(0);
        watch.forget(0);
        assert!(!watch.watched(0));
        assert!(watch.watched(1), "slot 1 is still watched");
        // And it still reports what changes in it.
        std::fs::write(small.join("f"), b"x").unwrap();
        assert_eq!(watch.take(1, &[1]), Some(vec![b"f".to_vec()]));
    }

    /// A muted slot keeps its watches but reports nothing, not even to the
    /// other slots, and counts as un-watched until it is watched again.
    #[test]
    fn a_muted_slot_is_unwatched_and_silent_until_watched_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let watch = Watch::new(vec![tmp.path().join("a"), tmp.path().join("b")]);
        for (i, d) in [&a, &b].into_iter().enumerate() {
            assert!(watch.add(i, Vec::new(), &Dir::open(d).unwrap()));
            watch.start(i);
        }
        watch.mute(0);
        assert!(!watch.watched(0));
        assert_eq!(watch.take(1, &[1]), Some(vec![]));
        // The agent's writes in slot a: no suspect anywhere.
        std::fs::write(a.join("f"), b"x").unwrap();
        std::fs::write(a.join("f"), b"y").unwrap();
        assert_eq!(watch.take(1, &[1]), Some(vec![]));
        // While a is un-watched, no slot's suspects are trusted.
        assert_eq!(watch.take(1, &[0, 1]), None);
        // Watched again: its own events count, and reach the other slot.
        watch.forget(0);
        assert!(watch.add(0, Vec::new(), &Dir::open(&a).unwrap()));
        watch.start(0);
        std::fs::write(a.join("f"), b"z").unwrap();
        assert_eq!(watch.take(0, &[0, 1]), Some(vec![b"f".to_vec()]));
        assert_eq!(watch.take(1, &[0, 1]), Some(vec![b"f".to_vec()]));
    }

    /// An edit made through a muted slot to a file it shares with another
    /// slot (the new live slot while the work after a switch runs) makes
    /// the file suspect in the other slot; the agent's own new files (one
    /// link) do not.
    #[test]
    fn an_edit_through_a_muted_slot_reaches_the_slots_sharing_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(b.join("shared"), b"v1").unwrap();
        std::fs::hard_link(b.join("shared"), a.join("shared")).unwrap();
        let watch = Watch::new(vec![a.clone(), b.clone()]);
        for (i, d) in [&a, &b].into_iter().enumerate() {
            assert!(watch.add(i, Vec::new(), &Dir::open(d).unwrap()));
            watch.start(i);
        }
        watch.mute(0);
        std::fs::write(a.join("new"), b"agent's own").unwrap();
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(a.join("shared"))
            .unwrap()
            .write_all(b" edited")
            .unwrap();
        assert_eq!(watch.take(1, &[1]), Some(vec![b"shared".to_vec()]));
    }

    /// A muted slot's log keeps what was suspect when it was muted and
    /// every path written meanwhile; a directory the agent removes is
    /// listed gone; resuming counts the slot watched, with no suspects.
    #[test]
    fn a_muted_slots_log_has_what_changed_in_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(a.join("old")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let watch = Watch::new(vec![a.clone(), b.clone()]);
        assert!(watch.add(0, Vec::new(), &Dir::open(&a).unwrap()));
        assert!(watch.add(0, b"old".to_vec(), &Dir::open(&a.join("old")).unwrap()));
        assert!(watch.add(1, Vec::new(), &Dir::open(&b).unwrap()));
        watch.start(0);
        watch.start(1);
        std::fs::write(a.join("edited-before"), b"x").unwrap();
        watch.mute(0);
        assert!(watch.resumable(0));
        std::fs::write(a.join("written"), b"y").unwrap();
        std::fs::remove_dir(a.join("old")).unwrap();
        std::fs::create_dir(a.join("new")).unwrap();
        // An edit through the other slot (an inode they may share).
        std::fs::write(b.join("through-b"), b"w").unwrap();
        std::fs::write(b.join("through-b"), b"ww").unwrap();
        let log = watch.resume(0).expect("nothing was missed");
        assert_eq!(
            log.paths.into_iter().collect::<Vec<_>>(),
            vec![
                b"edited-before".to_vec(),
                b"through-b".to_vec(),
                b"written".to_vec()
            ]
        );
        assert_eq!(log.gone, vec![b"old".to_vec().into_boxed_slice()]);
        assert!(!watch.has_dir(0, b"old"));
        assert!(watch.watched(0));
        assert_eq!(watch.take(0, &[0, 1]), Some(vec![]));
        std::fs::write(a.join("after"), b"z").unwrap();
        assert_eq!(watch.take(0, &[0, 1]), Some(vec![b"after".to_vec()]));
    }

    /// A directory the agent moves out of a muted slot into its trash
    /// (said first) is listed gone, its watches and those below it go, and
    /// its removal from the trash afterwards reaches no slot; the same
    /// rename unannounced, or of another directory, still loses the log.
    #[test]
    fn a_directory_the_agent_moves_to_its_trash_keeps_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let trash = tmp.path().join("trash");
        std::fs::create_dir_all(a.join("php-1/includes")).unwrap();
        std::fs::write(a.join("php-1/includes/x.php"), b"x").unwrap();
        std::fs::create_dir_all(a.join("other")).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let watch = Watch::new(vec![a.clone(), b.clone()]);
        for (path, dir) in [
            (&b""[..], a.clone()),
            (b"php-1", a.join("php-1")),
            (b"php-1/includes", a.join("php-1/includes")),
            (b"other", a.join("other")),
        ] {
            assert!(watch.add(0, path.to_vec(), &Dir::open(&dir).unwrap()));
        }
        assert!(watch.add(1, Vec::new(), &Dir::open(&b).unwrap()));
        watch.start(0);
        watch.start(1);
        watch.mute(0);
        let t = crate::host::materialize::Trash::open(&trash).unwrap();
        watch.expect_moved_out(0, b"php-1");
        t.take(&Dir::open(&a).unwrap(), b"php-1").unwrap();
        assert!(!a.join("php-1").exists());
        // Emptied while the slot is still muted, and after: nothing of it
        // reaches a log or a slot.
        t.empty(&crate::cancel::Cancel::new()).unwrap();
        assert_eq!(std::fs::read_dir(&trash).unwrap().count(), 0);
        let log = watch.resume(0).expect("the agent's own move keeps the log");
        assert_eq!(log.gone, vec![b"php-1".to_vec().into_boxed_slice()]);
        assert!(log.paths.is_empty(), "{:?}", log.paths);
        assert!(!watch.has_dir(0, b"php-1"));
        assert!(!watch.has_dir(0, b"php-1/includes"));
        assert!(watch.has_dir(0, b"other"));
        assert_eq!(watch.take(0, &[0, 1]), Some(vec![]));
        // Unannounced: a directory moved by hand while muted.
        watch.mute(0);
        watch.expect_moved_out(0, b"php-1");
        t.take(&Dir::open(&a).unwrap(), b"other").unwrap();
        assert!(watch.resume(0).is_none(), "a directory moved unannounced");
    }

    /// What a muted slot's log cannot follow loses it: a slot muted while
    /// not watched, a directory moved, the kernel's queue overflowing.
    #[test]
    fn a_muted_slots_log_is_lost_when_it_cannot_follow() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        std::fs::create_dir_all(a.join("d")).unwrap();
        let watch = Watch::new(vec![a.clone()]);
        // Never watched: nothing to resume from.
        watch.mute(0);
        assert!(!watch.resumable(0));
        assert!(watch.resume(0).is_none());
        watch.forget(0);
        assert!(watch.add(0, Vec::new(), &Dir::open(&a).unwrap()));
        watch.start(0);
        watch.mute(0);
        std::fs::rename(a.join("d"), a.join("e")).unwrap();
        assert!(watch.resume(0).is_none(), "a directory moved");
        // The queue overflowing (a state event, as the kernel gives it).
        watch.forget(0);
        assert!(watch.add(0, Vec::new(), &Dir::open(&a).unwrap()));
        watch.start(0);
        watch.mute(0);
        assert!(watch.resumable(0));
        watch
            .inner
            .as_ref()
            .unwrap()
            .lock()
            .event(-1, ReadFlags::QUEUE_OVERFLOW, None);
        assert!(watch.resume(0).is_none(), "the queue overflowed");
    }

    /// What a full check of one slot found changed is suspect in all.
    #[test]
    fn a_full_checks_findings_are_suspect_in_every_slot() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let watch = Watch::new(vec![a.clone(), b.clone()]);
        for (i, d) in [&a, &b].into_iter().enumerate() {
            assert!(watch.add(i, Vec::new(), &Dir::open(d).unwrap()));
            watch.start(i);
        }
        watch.suspect([b"x/y".to_vec()]);
        assert_eq!(watch.take(0, &[0, 1]), Some(vec![b"x/y".to_vec()]));
        assert_eq!(watch.take(1, &[0, 1]), Some(vec![b"x/y".to_vec()]));
    }
}
