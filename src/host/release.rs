//! Release directories ("slots") and the atomic switch.
//!
//! The agent keeps a few release directories (default 3, at most
//! [`MAX_SLOTS`]) under `DIR/releases/`, each holding one whole version, and
//! one symlink, `DIR/current -> releases/<slot>`, that says which is live.
//! Deploying version V:
//!
//! 1. pick a slot that is neither live nor the previous release (those two
//!    stay untouched: requests still running on the old tree keep a whole
//!    tree, and rollback is a switch away);
//! 2. mark it dirty, then bring it from the version it holds to V by
//!    applying the Merkle diff through [`materialize`] (directory file
//!    descriptors only: no tree can make it write outside the slot); a slot
//!    with no usable version, or whose content turns out not to match its
//!    version, is written in full;
//! 3. make what changed durable, then record the slot as clean at V;
//! 4. switch: a new symlink renamed over `current` (one `rename(2)`).
//!
//! A crash or a cancel during 2 leaves the slot dirty; it is never switched
//! to and is rewritten in full next time. The live slot is never written.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::fetch::Arrivals;
use super::materialize::{self, Dir};
use super::share::{self, Found};
use super::watch::Watch;
use crate::cancel::Cancel;
use crate::store::disk::IoContext;
use crate::store::fsutil::{SyncSet, atomic_write, sync_dir};
use crate::store::{Content, Store, StoreError, TreeId, VersionId};

/// Most release slots an agent keeps (`--slots`).
pub const MAX_SLOTS: usize = 8;
/// Fewest: the live one, the previous one, and one to prepare.
pub const MIN_SLOTS: usize = 3;

pub use crate::proto::{How, Slot, SlotMeta};

/// What preparing a slot cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Prepared {
    pub slot: String,
    pub how: How,
    pub files_written: u64,
    pub bytes_written: u64,
    /// Files hardlinked from the live slot.
    pub files_linked: u64,
    /// Files found changed by hand through a shared inode and rewritten.
    pub repaired: u64,
    /// Files the check for those took a `stat` of: every file of the slot,
    /// or with the slots watched, those reported changed.
    pub files_checked: u64,
    pub removed: u64,
    /// The slot's seal (see [`share`]).
    #[serde(skip)]
    pub seal: i64,
}

pub struct Releases {
    dir: PathBuf,
    slots: Vec<String>,
    /// The file lists of the last few versions checked ([`share`]), newest
    /// last: a deploy's check is then only its `stat`s.
    lists: std::sync::Mutex<Vec<(TreeId, Arc<share::FileList>)>>,
    /// Which files of the slots may have changed since they were checked.
    watch: Watch,
    /// Each slot muted for a diff: the version it held (clean, watched)
    /// when the diff began. Watching it again then checks only the diff's
    /// paths and what its watch saw meanwhile ([`Releases::resume_watch`]).
    muted_from: std::sync::Mutex<Vec<Option<VersionId>>>,
    /// Where a diff puts the directories it removes, and a full rewrite
    /// the slot it replaces (`<dir>/trash`): emptied after the switch.
    trash: materialize::Trash,
}

/// Changed paths past which a slot is watched again by a full check
/// rather than path by path (a train: the full check costs about the
/// same, and the list's memory stays bounded).
const MAX_RESUME_PATHS: usize = 65_536;

/// File lists kept: the live version's (the spare holds it) and the
/// previous one's (rollback).
const LISTS_KEPT: usize = 2;

impl Releases {
    /// `slots` is from [`MIN_SLOTS`] to [`MAX_SLOTS`] (the agent's
    /// configuration checks it).
    pub fn new(base: &Path, slots: usize) -> Result<Releases, StoreError> {
        assert!(
            (MIN_SLOTS..=MAX_SLOTS).contains(&slots),
            "checked by AgentConfig"
        );
        let dir = base.join("releases");
        fs::create_dir_all(&dir).at(&dir)?;
        let slots: Vec<String> = (0..slots)
            .map(|i| char::from(b'a' + i as u8).to_string())
            .collect();
        Ok(Releases {
            trash: materialize::Trash::open(&base.join("trash"))?,
            watch: Watch::new(slots.iter().map(|s| dir.join(s)).collect()),
            muted_from: std::sync::Mutex::new(vec![None; slots.len()]),
            dir,
            slots,
            lists: Default::default(),
        })
    }

    /// The file list of version root `tree`, from the cache or its trees.
    fn files(
        &self,
        store: &Store,
        tree: &TreeId,
        cancel: &Cancel,
    ) -> Result<Arc<share::FileList>, StoreError> {
        let mut lists = self.lists.lock().expect("not poisoned");
        if let Some(at) = lists.iter().position(|(t, _)| t == tree) {
            let hit = lists.remove(at);
            let list = hit.1.clone();
            lists.push(hit);
            return Ok(list);
        }
        let like = lists.last().map(|l| l.1.size()).unwrap_or_default();
        // The one it replaces goes first: the agent's peak memory is then
        // two lists, not three.
        if lists.len() >= LISTS_KEPT {
            lists.remove(0);
        }
        let list = Arc::new(share::FileList::new(store, tree, like, cancel)?);
        lists.push((*tree, list.clone()));
        Ok(list)
    }

    /// Slot `slot`'s index.
    fn index(&self, slot: &str) -> usize {
        self.slots
            .iter()
            .position(|s| s == slot)
            .expect("a slot of this agent")
    }

    /// The slots whose directory exists.
    fn existing(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|i| fs::symlink_metadata(self.path(&self.slots[*i])).is_ok())
            .collect()
    }

    /// The files of slot `slot` (opened as `root`), which holds `v` sealed
    /// at `seal`, changed through a shared inode ([`share::check`]): only
    /// those the slots' watch reported since the last check, when it can
    /// tell ([`super::watch`]), else every file.
    fn suspects(
        &self,
        store: &Store,
        root: &Dir,
        slot: &str,
        v: &VersionId,
        seal: i64,
        cancel: &Cancel,
    ) -> Result<(Found, u64), StoreError> {
        let started = std::time::Instant::now();
        let idx = self.index(slot);
        if let Some(paths) = self.watch.take(idx, &self.existing()) {
            let bad = share::check_paths(store, root, &v.root(), &paths, seal, cancel)
                .inspect_err(|_| self.watch.unwatch(idx))?;
            tracing::debug!(
                "checked {} file(s) of {} the watch reported in {:?}: {} to rewrite",
                paths.len(),
                root.path().display(),
                started.elapsed(),
                bad.len()
            );
            return Ok((Found::Paths(v.root(), bad), paths.len() as u64));
        }
        let list = self.files(store, &v.root(), cancel)?;
        let listed = started.elapsed();
        let suspects = share::check(root, &list, seal, cancel)?;
        tracing::debug!(
            "checked {} files of {} in {:?} (file list: {listed:?}): {} to rewrite",
            list.len(),
            root.path().display(),
            started.elapsed(),
            suspects.len()
        );
        let checked = list.len() as u64;
        Ok((Found::Listed(list, suspects), checked))
    }

    /// Watches every clean slot not watched yet ([`super::watch`]): a
    /// watch on each of its directories, then a check of every file, so
    /// that the next deploy checks only what changed since. The agent runs
    /// this in the background, after a switch and at start. A slot that
    /// cannot be watched (a directory of its version missing, the
    /// kernel's watch limit) stays un-watched: deploys then check all of it,
    /// and the work after a switch goes on (only a cancel stops it).
    pub fn watch_slots(&self, store: &Store, cancel: &Cancel) -> Result<(), StoreError> {
        for (idx, name) in self.slots.iter().enumerate() {
            if self.watch.watched(idx) {
                continue;
            }
            let from = self.muted_from.lock().expect("not poisoned")[idx].take();
            if let Some(from) = from {
                match self.resume_watch(store, idx, name, &from, cancel) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e @ StoreError::Cancelled(_)) => return Err(e),
                    Err(e) => tracing::info!(
                        "release slot {name}: watching it again from its changes failed ({e}); checking it in full"
                    ),
                }
            }
            match self.watch_slot(store, idx, name, cancel) {
                Ok(()) => {}
                // Fast: a rollback may be waiting for this to stop. Its
                // watches go the next time it is watched.
                Err(e @ StoreError::Cancelled(_)) => {
                    self.watch.mute(idx);
                    return Err(e);
                }
                Err(e) => {
                    self.watch.forget(idx);
                    tracing::warn!(
                        "release slot {name} is not watched ({e}): deploys check every file of it"
                    );
                }
            }
        }
        Ok(())
    }

    /// Watches slot `name` again after the agent brought it from `from` to
    /// the version it now holds by a diff, without a full check: watches
    /// for the directories the diff made, then a `stat` of each path the
    /// diff wrote and each its watch saw changed meanwhile
    /// ([`Watch::resume`]). False: that cannot be trusted (the log was
    /// lost, a directory of the version went, the diff is too big), and
    /// the caller checks the slot in full; the reason is logged.
    fn resume_watch(
        &self,
        store: &Store,
        idx: usize,
        name: &str,
        from: &VersionId,
        cancel: &Cancel,
    ) -> Result<bool, StoreError> {
        let started = std::time::Instant::now();
        let meta = self.meta(name);
        let (true, Some(v), Some(seal)) = (meta.clean, meta.version, meta.sealed) else {
            return Ok(false);
        };
        if !store.has(&v.object()) || !store.has(&from.object()) {
            return Ok(false);
        }
        if !self.watch.resumable(idx) {
            tracing::info!(
                "release slot {name}: its watch cannot tell what changed while the agent changed it (it was not watched then, or events were lost); checking it in full"
            );
            return Ok(false);
        }
        // What the diff wrote, and the directories it made.
        let mut paths: Vec<Vec<u8>> = Vec::new();
        // Directories holding a path the diff wrote: those without a watch
        // are the ones it made.
        let mut parents: std::collections::BTreeSet<Vec<u8>> = Default::default();
        let mut too_many = false;
        crate::store::diff::diff(store, &from.root(), &v.root(), &mut |c| {
            if paths.len() >= MAX_RESUME_PATHS {
                too_many = true;
                return Err(StoreError::Cancelled("too many paths".into()));
            }
            if c.new.is_some()
                && let Some(slash) = c.path.iter().rposition(|b| *b == b'/')
            {
                parents.insert(c.path[..slash].to_vec());
            }
            paths.push(c.path.to_vec());
            Ok(())
        })
        .or_else(|e| if too_many { Ok(()) } else { Err(e) })?;
        if too_many {
            tracing::info!(
                "release slot {name}: more than {MAX_RESUME_PATHS} paths changed; checking it in full"
            );
            return Ok(false);
        }
        let releases = Dir::open(&self.dir)?;
        let root = releases.subdir(name.as_bytes())?;
        // Each parent and its ancestors, parents first (BTreeSet order).
        let mut new_dirs: std::collections::BTreeSet<&[u8]> = Default::default();
        for p in &parents {
            for (i, b) in p
                .iter()
                .enumerate()
                .chain(std::iter::once((p.len(), &b'/')))
            {
                if *b == b'/' && !self.watch.has_dir(idx, &p[..i]) {
                    new_dirs.insert(&p[..i]);
                }
            }
        }
        for d in &new_dirs {
            cancel.check()?;
            // Made by the diff: a directory of the version, opened
            // component by component through directory descriptors (no
            // symlink followed).
            let Some(Content::Dir { .. }) = store.lookup(&v.root(), d)? else {
                return Ok(false);
            };
            let mut comps = d.split(|b| *b == b'/');
            let mut dir = root.subdir(comps.next().expect("a first component"))?;
            for comp in comps {
                dir = dir.subdir(comp)?;
            }
            if !self.watch.add(idx, d.to_vec(), &dir) {
                return Ok(false);
            }
        }
        let Some(log) = self.watch.resume(idx) else {
            tracing::info!("release slot {name}: its watch missed events; checking it in full");
            return Ok(false);
        };
        // A directory of the version whose watch went (removed and made
        // again by hand): not followed path by path.
        for g in &log.gone {
            if let Some(Content::Dir { .. }) = store.lookup(&v.root(), g)? {
                self.watch.unwatch(idx);
                tracing::info!(
                    "release slot {name}: directory {} was removed while the agent changed the slot; checking it in full",
                    String::from_utf8_lossy(g)
                );
                return Ok(false);
            }
        }
        let logged = log.paths.len();
        paths.extend(log.paths);
        paths.sort();
        paths.dedup();
        let bad = share::check_paths(store, &root, &v.root(), &paths, seal, cancel)
            .inspect_err(|_| self.watch.unwatch(idx))?;
        self.watch.suspect(bad.iter().cloned());
        tracing::debug!(
            "release slot {name} watched again in {:?}: {} path(s) of its diff from {}, {logged} its watch saw, {} new director(ies); {} changed by hand",
            started.elapsed(),
            paths.len(),
            from.short(),
            new_dirs.len(),
            bad.len()
        );
        Ok(true)
    }

    fn watch_slot(
        &self,
        store: &Store,
        idx: usize,
        name: &str,
        cancel: &Cancel,
    ) -> Result<(), StoreError> {
        // Its old watches (a slot changed since is only muted), before
        // anything else: removing a slot that still has them would queue
        // an event per directory.
        self.watch.forget(idx);
        let meta = self.meta(name);
        let releases = Dir::open(&self.dir)?;
        if !meta.clean && live_slot_of(&self.dir).as_deref() != Some(name) {
            // Left half-written (a crash, a cancel): it would be rewritten
            // in full before use anyway, and files it may share with the
            // others cannot go unwatched.
            return materialize::remove_if_present(&releases, name.as_bytes());
        }
        let (true, Some(v), Some(seal)) = (meta.clean, meta.version, meta.sealed) else {
            return Ok(());
        };
        if !store.has(&v.object()) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let list = self.files(store, &v.root(), cancel)?;
        let root = releases.subdir(name.as_bytes())?;
        if !list.each_dir(&root, cancel, |path, dir| self.watch.add(idx, path, dir))? {
            self.watch.forget(idx);
            return Ok(());
        }
        self.watch.start(idx);
        let bad = share::check(&root, &list, seal, cancel)?;
        // In every slot: the live slot's files changed in place (an edit
        // made while the work after a switch ran, say) may be shared with
        // the previous one a rollback goes to.
        self.watch.suspect(bad.iter().map(|i| list.path(*i)));
        tracing::debug!(
            "release slot {name} watched in {:?}: {} file(s) changed by hand",
            started.elapsed(),
            bad.len()
        );
        Ok(())
    }

    /// Whether every slot that exists is watched: a deploy's check is then
    /// only of what its watch reported.
    pub fn all_watched(&self) -> bool {
        self.existing().iter().all(|i| self.watch.watched(*i))
    }

    /// Builds (and keeps) `v`'s file list ahead of the deploy that will
    /// check it: the agent calls this after bringing the spare slot to the
    /// live version, in the background.
    pub fn prefetch_files(
        &self,
        store: &Store,
        v: &VersionId,
        cancel: &Cancel,
    ) -> Result<(), StoreError> {
        self.files(store, &v.root(), cancel).map(|_| ())
    }

    pub fn path(&self, slot: &str) -> PathBuf {
        self.dir.join(slot)
    }

    fn meta_path(&self, slot: &str) -> PathBuf {
        self.dir.join(format!("{slot}.json"))
    }

    pub fn meta(&self, slot: &str) -> SlotMeta {
        fs::read(self.meta_path(slot))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(SlotMeta {
                version: None,
                clean: false,
                used: 0,
                sealed: None,
            })
    }

    fn set_meta(&self, slot: &str, meta: &SlotMeta) -> Result<(), StoreError> {
        atomic_write(
            &self.meta_path(slot),
            &serde_json::to_vec(meta).expect("serializes"),
        )
    }

    pub fn list(&self) -> Vec<Slot> {
        self.slots
            .iter()
            .map(|s| Slot {
                name: s.clone(),
                meta: self.meta(s),
            })
            .collect()
    }

    /// A clean slot holding `v`, if any.
    pub fn find(&self, v: &VersionId) -> Option<String> {
        self.list()
            .into_iter()
            .find(|s| s.meta.clean && s.meta.version == Some(*v))
            .map(|s| s.name)
    }

    /// Brings a slot other than those in `keep` to version `v`, sparing
    /// the one that holds `stable` when it can.
    pub fn prepare(
        &self,
        store: &Store,
        v: &VersionId,
        keep: &[String],
        stable: Option<&VersionId>,
        cancel: &Cancel,
    ) -> Result<Prepared, StoreError> {
        if let Some(slot) = self.find(v) {
            match self.recheck(store, &slot, cancel) {
                Ok((repaired, files_checked)) => {
                    return Ok(Prepared {
                        slot,
                        how: How::Reused,
                        repaired,
                        files_checked,
                        ..Default::default()
                    });
                }
                Err(e) if content_mismatch(&e) => {
                    tracing::warn!(
                        "release slot {slot} does not hold version {} as its record says ({e}): rewriting it in full",
                        v.short()
                    );
                    let mut meta = self.meta(&slot);
                    meta.clean = false;
                    return self.prepare_into(store, v, Slot { name: slot, meta }, cancel, None);
                }
                Err(e) => return Err(e),
            }
        }
        let slot = self.choose(keep, stable);
        self.prepare_into(store, v, slot, cancel, None)
    }

    /// Writes `v` into a slot from nothing while its objects still arrive
    /// (`arrivals`: a fresh host, whose release is then written while its
    /// pack comes, not after it), when that is what [`Releases::prepare`]
    /// would do anyway; `None` when a slot holds `v` or would be brought to
    /// it by a diff. The slot stays marked dirty: the caller marks it
    /// clean ([`Releases::mark_prepared`]) once the objects it was written
    /// from are durable in the store, and so never switches to a release
    /// the store could not restore. An error leaves it dirty (or removed)
    /// for [`Releases::prepare`] to write again.
    pub fn prepare_arriving(
        &self,
        store: &Store,
        v: &VersionId,
        keep: &[String],
        stable: Option<&VersionId>,
        cancel: &Cancel,
        arrivals: &Arrivals,
    ) -> Option<Result<Prepared, StoreError>> {
        if !self.writes_from_nothing(store, v, keep, stable) {
            return None;
        }
        let slot = self.choose(keep, stable);
        Some(self.prepare_into(store, v, slot, cancel, Some(arrivals)))
    }

    /// Whether preparing `v` would write a slot from nothing (no slot
    /// holds it, and the one chosen has no version to diff from): what
    /// [`Releases::prepare_arriving`] does.
    pub fn writes_from_nothing(
        &self,
        store: &Store,
        v: &VersionId,
        keep: &[String],
        stable: Option<&VersionId>,
    ) -> bool {
        self.find(v).is_none() && diff_base(store, &self.choose(keep, stable)).is_none()
    }

    /// Records a slot [`Releases::prepare_arriving`] wrote as clean at `v`.
    pub fn mark_prepared(&self, v: &VersionId, p: &Prepared) -> Result<(), StoreError> {
        self.set_meta(
            &p.slot,
            &SlotMeta {
                version: Some(*v),
                clean: true,
                used: crate::time::unix_now(),
                sealed: Some(p.seal),
            },
        )
    }

    /// Checks a clean slot about to be switched to as it is (a rollback)
    /// for files changed through an inode it shares ([`share`]), and
    /// rewrites them; returns how many. Keeps its seal: rewritten files get
    /// an mtime before it.
    fn recheck(
        &self,
        store: &Store,
        slot: &str,
        cancel: &Cancel,
    ) -> Result<(u64, u64), StoreError> {
        let meta = self.meta(slot);
        let (Some(v), Some(seal)) = (meta.version, meta.sealed) else {
            return Ok((0, 0));
        };
        let releases = Dir::open(&self.dir)?;
        let root = releases.subdir(slot.as_bytes())?;
        let (found, checked) = self.suspects(store, &root, slot, &v, seal, cancel)?;
        if found.is_empty() {
            return Ok((0, checked));
        }
        self.set_meta(
            slot,
            &SlotMeta {
                clean: false,
                ..meta.clone()
            },
        )?;
        let sync = SyncSet::default();
        let repaired = found
            .repair(store, &root, seal - 1, &sync, cancel)
            .and_then(|n| sync.sync(&releases, &self.dir).map(|()| n))
            .inspect_err(|_| self.watch.unwatch(self.index(slot)))?;
        log_repaired(slot, repaired);
        self.set_meta(slot, &meta)?;
        Ok((repaired, checked))
    }

    /// Brings the spare slot (one not in `keep`) to `v` ahead of time, so
    /// that the next deploy applies only the diff from `v`. `None` if it is
    /// already there.
    pub fn prepare_spare(
        &self,
        store: &Store,
        v: &VersionId,
        keep: &[String],
        cancel: &Cancel,
    ) -> Result<Option<Prepared>, StoreError> {
        let slot = self.choose(keep, None);
        if slot.meta.clean && slot.meta.version == Some(*v) {
            return Ok(None);
        }
        self.prepare_into(store, v, slot, cancel, None).map(Some)
    }

    /// The slot to overwrite: not in `keep`, preferably not holding
    /// `stable`; of those, a clean one most recently made (the spare that
    /// the agent keeps at the live version, so the diff to apply is the
    /// deploy's own), else an empty or dirty one.
    fn choose(&self, keep: &[String], stable: Option<&VersionId>) -> Slot {
        let mut candidates: Vec<Slot> = self
            .list()
            .into_iter()
            .filter(|s| !keep.contains(&s.name))
            .collect();
        let without_stable: Vec<Slot> = candidates
            .iter()
            .filter(|s| stable.is_none() || s.meta.version.as_ref() != stable)
            .cloned()
            .collect();
        if !without_stable.is_empty() {
            candidates = without_stable;
        }
        candidates.sort_by_key(|s| (!s.meta.clean, std::cmp::Reverse(s.meta.used)));
        candidates
            .into_iter()
            .next()
            .expect("at least 3 slots, at most 2 kept")
    }

    fn prepare_into(
        &self,
        store: &Store,
        v: &VersionId,
        slot: Slot,
        cancel: &Cancel,
        arriving: Option<&Arrivals>,
    ) -> Result<Prepared, StoreError> {
        let seal = share::seal_now();
        let base = diff_base(store, &slot);
        self.set_meta(
            &slot.name,
            &SlotMeta {
                clean: false,
                ..slot.meta.clone()
            },
        )?;
        let releases = Dir::open(&self.dir)?;
        let name = slot.name.as_bytes();
        let sync = SyncSet::default();
        // Unchanged files are hardlinked from the live slot, when it is
        // clean, sealed and its version is in the store.
        let live = self
            .dir
            .parent()
            .and_then(live_slot)
            .filter(|l| *l != slot.name)
            .map(|l| (self.meta(&l), l))
            .and_then(|(m, l)| match (m.clean, m.version, m.sealed) {
                (true, Some(lv), Some(ls)) if store.has(&lv.object()) => Some((l, lv, ls)),
                _ => None,
            });
        let live_root = match &live {
            Some((l, ..)) => releases.subdir(l.as_bytes()).ok(),
            None => None,
        };
        let opts = materialize::Options {
            mtime: seal - 1,
            reference: live
                .as_ref()
                .zip(live_root.as_ref())
                .map(|((_, lv, ls), root)| materialize::Reference {
                    root,
                    tree: lv.root(),
                    seal: *ls,
                }),
            arriving,
            trash: None,
        };
        let idx = self.index(&slot.name);
        // A directory the diff removes: its rename out of the (muted) slot
        // is the agent's own, not a hand's.
        let tell = |path: &[u8]| self.watch.expect_moved_out(idx, path);
        let opts = materialize::Options {
            trash: Some((&self.trash, &tell)),
            ..opts
        };
        let (mut repaired, mut checked) = (0, 0);
        let full = |sync: &SyncSet| -> Result<(How, materialize::Applied), StoreError> {
            self.watch.forget(idx);
            if releases.kind(name)?.is_some() {
                self.trash.take(&releases, name)?;
            }
            let root = releases.mkdir(name)?;
            // The slot's own entry in releases/.
            sync.add(
                rustix::fs::openat(
                    &releases,
                    ".",
                    rustix::fs::OFlags::RDONLY
                        | rustix::fs::OFlags::DIRECTORY
                        | rustix::fs::OFlags::CLOEXEC,
                    rustix::fs::Mode::empty(),
                )
                .map_err(std::io::Error::from)
                .at(&self.dir)?,
            );
            let applied = materialize::apply(store, root, None, &v.root(), &opts, sync, cancel)?;
            Ok((How::Full, applied))
        };
        let result = match base {
            Some(old) => releases
                .subdir(name)
                .and_then(|root| {
                    // Files the diff leaves in place must not carry a hand
                    // edit made through an inode they share with the live
                    // slot ([`share`]); those written before slots shared
                    // anything (no seal) are the slot's own.
                    if let Some(old_seal) = slot.meta.sealed {
                        let found;
                        (found, checked) =
                            self.suspects(store, &root, &slot.name, &old, old_seal, cancel)?;
                        repaired = found.repair(store, &root, seal - 1, &sync, cancel)?;
                    }
                    // Changed from here on: watched again after the switch,
                    // from the diff and what the watch sees meanwhile.
                    self.muted_from.lock().expect("not poisoned")[idx] = Some(old);
                    self.watch.mute(idx);
                    materialize::apply(
                        store,
                        root,
                        Some(&old.root()),
                        &v.root(),
                        &opts,
                        &sync,
                        cancel,
                    )
                })
                .map(|a| (How::Diff, a))
                .or_else(|e| {
                    if !content_mismatch(&e) {
                        return Err(e);
                    }
                    tracing::warn!(
                        "release slot {} does not hold version {} as its record says ({e}): rewriting it in full",
                        slot.name,
                        old.short()
                    );
                    full(&sync)
                }),
            None => full(&sync),
        }
        .and_then(|r| {
            let t = std::time::Instant::now();
            sync.sync(&releases, &self.dir)?;
            tracing::debug!("slot {} durable in {:?}", slot.name, t.elapsed());
            Ok(r)
        });
        let (how, applied) = match result {
            Ok(r) => r,
            // A cancelled slot stays dirty (rewritten next time); stopping
            // fast is the point. Anything else (a full disk): nothing
            // half-written stays behind, the space is given back.
            Err(e @ StoreError::Cancelled(_)) => {
                self.watch.mute(idx);
                return Err(e);
            }
            Err(e) => {
                self.watch.forget(idx);
                let _ = materialize::remove_if_present(&releases, name);
                let _ = fs::remove_file(self.meta_path(&slot.name));
                return Err(e);
            }
        };
        let prepared = Prepared {
            slot: slot.name,
            how,
            files_written: applied.files_written,
            bytes_written: applied.bytes_written,
            files_linked: applied.files_linked,
            repaired,
            files_checked: checked,
            removed: applied.removed,
            seal,
        };
        if arriving.is_none() {
            self.mark_prepared(v, &prepared)?;
        }
        log_repaired(&prepared.slot, repaired);
        Ok(prepared)
    }

    /// Removes what the slots' diffs put in the trash, stopping at
    /// `cancel` (what is left goes next time): how many entries went.
    pub fn empty_trash(&self, cancel: &Cancel) -> Result<u64, StoreError> {
        self.trash.empty(cancel)
    }

    /// Marks a slot as just used (for choosing which to overwrite next).
    pub fn touch(&self, slot: &str) -> Result<(), StoreError> {
        let mut m = self.meta(slot);
        m.used = crate::time::unix_now();
        self.set_meta(slot, &m)
    }
}

/// The version `slot` is brought from by a diff: the one it holds, if it
/// is clean and that version is in the store; `None`: it is written in
/// full.
fn diff_base(store: &Store, slot: &Slot) -> Option<VersionId> {
    match (slot.meta.clean, slot.meta.version) {
        (true, Some(old)) if store.has(&old.object()) => Some(old),
        _ => None,
    }
}

/// Logs files of `slot` rewritten because they were changed by hand
/// through a shared inode, if any.
fn log_repaired(slot: &str, repaired: u64) {
    if repaired > 0 {
        tracing::warn!(
            "release slot {slot}: {repaired} file(s) changed by hand through a shared inode, rewritten from the store (`scap verify --live` lists the edits in the live release)"
        );
    }
}

/// Whether applying a diff failed because the slot's content is not what
/// its record says (edited by hand, say), as opposed to the machine's
/// trouble (a full disk, an I/O error) or a cancel.
fn content_mismatch(e: &StoreError) -> bool {
    match e {
        StoreError::Io { source, .. } => {
            !matches!(
                source.kind(),
                io::ErrorKind::StorageFull
                    | io::ErrorKind::QuotaExceeded
                    | io::ErrorKind::ReadOnlyFilesystem
                    | io::ErrorKind::PermissionDenied
            ) && source.raw_os_error() != Some(rustix::io::Errno::IO.raw_os_error())
        }
        _ => false,
    }
}

/// The live slot of the agent whose `releases/` is `releases`.
fn live_slot_of(releases: &Path) -> Option<String> {
    releases.parent().and_then(live_slot)
}

/// The live slot: where `current` points, if anywhere.
pub fn live_slot(base: &Path) -> Option<String> {
    let target = fs::read_link(base.join("current")).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Points `current` at `slot`, atomically: a new symlink renamed over it.
pub fn switch(base: &Path, slot: &str) -> Result<(), StoreError> {
    replace_symlink(&Path::new("releases").join(slot), &base.join("current"))
}

/// Makes `link` a symlink to `target` in one `rename(2)`: at no instant is
/// there no `link` (a deploy path such as /srv/mediawiki never vanishes).
pub fn replace_symlink(target: &Path, link: &Path) -> Result<(), StoreError> {
    let dir = link.parent().unwrap_or(Path::new("."));
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(link.file_name().unwrap_or_default());
    tmp_name.push(format!(".scap-link.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).at(&tmp)?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(e).at(link);
    }
    sync_dir(dir)
}
