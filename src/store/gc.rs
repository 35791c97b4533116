//! `scap gc`: mark and sweep.
//!
//! Roots are the newest `keep` version records, every labelled version,
//! every pinned one, and what the caller adds (on the deploy host, every
//! version the fleet runs, holds or should run: `fleet::keep`). gc holds the store lock exclusively, so no writer
//! session (build-manifest, an agent's fetch) is between writing objects and
//! recording the version that references them while gc runs; it bumps the
//! gc generation before deleting anything so stat caches re-check presence.
//! While it deletes, `STORE/gc-sweeping` exists; if gc dies mid-sweep, the
//! next writer checks every tree for missing children (see `disk::recover`).
//! A store gc cannot fully read (a missing or corrupt tree under a root) is
//! left untouched: gc refuses rather than guess what is reachable.
//!
//! The sweep removes unreachable trees first, then unreachable chunks: a
//! cancel (an agent's gc gives way to a rollback) is honoured only in the
//! second phase, when no unreachable tree is left, so stopping early never
//! leaves a tree whose children are gone.

use std::collections::HashSet;
use std::fs;
use std::sync::Arc;

use super::diff::chunks_of;
use super::disk::pack::{Pack, PackWriter, dead_path, write_dead};
use super::disk::{IoContext, LockMode, Store, StoreError};
use super::fsutil::{read_head, sync_dir};
use super::id::{ObjectId, ObjectKind, TreeId, VersionId};
use super::object;
use crate::cancel::Cancel;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    pub kept_versions: Vec<VersionId>,
    pub removed_versions: Vec<VersionId>,
    pub live_objects: u64,
    pub removed_objects: u64,
    pub removed_bytes: u64,
    /// Bytes of packs whose objects were stored uncompressed as they
    /// arrived (a fresh host's fetch), compressed into new packs.
    pub compressed_bytes: u64,
    pub dry_run: bool,
}

pub fn gc(
    store: &Store,
    keep: usize,
    also: &[VersionId],
    dry_run: bool,
) -> Result<GcReport, StoreError> {
    store.check_deploy()?;
    let _lock = store.lock(LockMode::Exclusive)?;
    let records = store.records()?;
    if records.is_empty() {
        return Err(StoreError::NoRecords(store.root().to_path_buf()));
    }
    let mut roots: Vec<VersionId> = records.iter().take(keep).map(|r| r.version).collect();
    roots.extend(store.labels()?.into_iter().map(|(_, v)| v));
    roots.extend(store.pins()?);
    // A version a host holds that this store never had (or already lost)
    // cannot be kept here; it must not stop gc from keeping the rest.
    roots.extend(also.iter().filter(|v| store.has(&v.object())));
    roots.sort();
    roots.dedup();

    let mut report = mark_and_sweep(store, &roots, dry_run, &Cancel::new())?;
    for r in &records {
        if !roots.contains(&r.version) {
            if !dry_run {
                store.remove_record(&r.version)?;
            }
            report.removed_versions.push(r.version);
        }
    }
    Ok(report)
}

/// The objects gc keeps, as the first 8 bytes of their IDs, sorted: 8
/// bytes an object where a set of whole IDs takes ~50 (a 526k-file tree's
/// ~600k objects fit in 5 MB). Two objects sharing a prefix (about one
/// chance in 2^64 / n^2) only means an unreachable one is kept until a
/// later gc: nothing reachable is ever taken for unreachable.
#[derive(Default)]
struct LiveSet {
    prefixes: Vec<u64>,
    /// How many of `prefixes` are sorted and without repeats.
    sorted: usize,
}

impl LiveSet {
    fn prefix(id: &ObjectId) -> u64 {
        let b = id.as_bytes();
        u64::from_be_bytes(b[..8].try_into().expect("IDs are 32 bytes"))
    }

    fn insert(&mut self, id: &ObjectId) {
        self.prefixes.push(Self::prefix(id));
        // Versions share most of their chunks: fold repeats in as the list
        // doubles rather than holding every root's copy of them.
        if self.prefixes.len() >= 2 * self.sorted.max(1 << 16) {
            self.seal();
        }
    }

    /// Sorts and drops repeats; [`LiveSet::contains`] needs it.
    fn seal(&mut self) {
        self.prefixes.sort_unstable();
        self.prefixes.dedup();
        self.sorted = self.prefixes.len();
    }

    fn contains(&self, id: &ObjectId) -> bool {
        debug_assert_eq!(self.sorted, self.prefixes.len(), "sealed");
        self.prefixes.binary_search(&Self::prefix(id)).is_ok()
    }

    fn len(&self) -> usize {
        self.prefixes.len()
    }
}

/// Deletes every object not reachable from `roots`. The caller holds the
/// exclusive store lock.
pub fn mark_and_sweep(
    store: &Store,
    roots: &[VersionId],
    dry_run: bool,
    cancel: &Cancel,
) -> Result<GcReport, StoreError> {
    let mut live = LiveSet::default();
    let mut trees: HashSet<TreeId> = HashSet::new();
    for v in roots {
        cancel.check()?;
        chunks_of(store, &v.root(), &mut trees, &mut |c| {
            live.insert(&c.object())
        })?;
    }
    for t in &trees {
        live.insert(&t.object());
    }
    drop(trees);
    live.seal();
    // Held through the sweep: give back what the folds reserved.
    live.prefixes.shrink_to_fit();
    cancel.check()?;

    let mut report = GcReport {
        kept_versions: roots.to_vec(),
        live_objects: live.len() as u64,
        dry_run,
        ..Default::default()
    };
    let mut dead_trees = Vec::new();
    let mut dead_chunks = Vec::new();
    for item in store.objects()? {
        let (id, path) = item?;
        if live.contains(&id) {
            continue;
        }
        let len = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
        report.removed_objects += 1;
        report.removed_bytes += len;
        let head = read_head(&path, object::HEADER_LEN)?;
        match object::peek(id, &head) {
            Ok((ObjectKind::Chunk, _)) => dead_chunks.push(path),
            // Trees, and whatever does not parse, go in the first phase.
            _ => dead_trees.push(path),
        }
    }
    let plans = plan_packs(store, &live, &mut report)?;
    if dry_run {
        return Ok(report);
    }
    if dead_trees.is_empty() && dead_chunks.is_empty() && plans.is_empty() {
        // Nothing to delete or repack (an agent switching between versions
        // it holds): no sweep, no new gc generation, nothing made durable.
        // A repack a crash left behind still goes.
        remove_stale_repacks(store)?;
        return Ok(report);
    }
    store.bump_gc_generation()?;
    store.begin_sweep()?;
    remove_stale_repacks(store)?;
    // Packs kept with unreachable trees in them list those first: from
    // then on they are not in the store, so deleting their children below
    // never leaves a tree without its children.
    for plan in &plans {
        if let PackPlan::MarkDead(pack, dead) = plan {
            write_dead(pack.path(), dead.clone())?;
        }
    }
    for (n, path) in dead_trees.iter().enumerate() {
        if n == dead_trees.len() / 2 {
            crate::failpoint::hit("gc:sweeping-trees");
        }
        fs::remove_file(path).at(path)?;
    }
    let dir = store.packs_dir();
    for plan in &plans {
        match plan {
            PackPlan::Delete(pack) => remove_pack(pack.path())?,
            PackPlan::Repack(pack) => {
                if !repack(store, pack, &live, cancel)? {
                    break;
                }
                remove_pack(pack.path())?;
            }
            PackPlan::MarkDead(..) => {}
        }
    }
    if !plans.is_empty() {
        sync_dir(&dir)?;
        store.pack_set().refresh(&dir, true)?;
    }
    for (n, path) in dead_chunks.iter().enumerate() {
        if n % 256 == 0 && cancel.is_cancelled() {
            report.removed_objects -= (dead_chunks.len() - n) as u64;
            break;
        }
        fs::remove_file(path).at(path)?;
    }
    store.end_sweep()?;
    Ok(report)
}

/// What gc does with one pack.
enum PackPlan {
    /// Nothing in it is reachable.
    Delete(Arc<Pack>),
    /// At least half its bytes are unreachable, or it holds objects stored
    /// uncompressed for speed ([`Pack::holds_raw`]): its reachable objects
    /// are copied (compressed) into a new pack, then it is removed.
    Repack(Arc<Pack>),
    /// Mostly reachable: kept whole, its unreachable trees (these, and
    /// those already listed) listed dead.
    MarkDead(Arc<Pack>, Vec<ObjectId>),
}

fn plan_packs(
    store: &Store,
    live: &LiveSet,
    report: &mut GcReport,
) -> Result<Vec<PackPlan>, StoreError> {
    let mut plans = Vec::new();
    for pack in store.pack_set().all(&store.packs_dir())? {
        let (mut live_n, mut dead_n, mut dead_bytes) = (0u64, 0u64, 0u64);
        let mut dead_trees: Vec<ObjectId> = Vec::new();
        let mut listed: Vec<ObjectId> = Vec::new();
        pack.for_each_entry(|id, slot| {
            if pack.is_dead(&id) {
                listed.push(id);
                dead_bytes += u64::from(slot.len);
            } else if live.contains(&id) {
                live_n += 1;
            } else {
                dead_n += 1;
                dead_bytes += u64::from(slot.len);
                // Dead trees matter to a pack kept whole; one holding raw
                // objects never is (and reading a head from a segment
                // means decompressing it).
                if !pack.holds_raw() {
                    let head = pack.read_head(slot)?;
                    if !matches!(object::peek(id, &head), Ok((ObjectKind::Chunk, _))) {
                        dead_trees.push(id);
                    }
                }
            }
            Ok(())
        })?;
        if live_n == 0 {
            report.removed_objects += dead_n;
            report.removed_bytes += pack.body_len();
            plans.push(PackPlan::Delete(pack));
        } else if dead_bytes * 2 >= pack.body_len() || pack.holds_raw() {
            report.removed_objects += dead_n;
            report.removed_bytes += dead_bytes;
            if pack.holds_raw() {
                // (A pack with segments holds fewer bytes than its
                // objects: they are compressed in it.)
                report.compressed_bytes += pack.body_len().saturating_sub(dead_bytes);
            }
            plans.push(PackPlan::Repack(pack));
        } else if !dead_trees.is_empty() {
            listed.extend(dead_trees);
            plans.push(PackPlan::MarkDead(pack, listed));
        }
    }
    Ok(plans)
}

fn remove_pack(path: &std::path::Path) -> Result<(), StoreError> {
    fs::remove_file(path).at(path)?;
    let dead = dead_path(path);
    match fs::remove_file(&dead) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).at(&dead),
        _ => Ok(()),
    }
}

/// Temp packs of a repack that died (gc holds the store exclusively: no
/// other gc is writing one).
fn remove_stale_repacks(store: &Store) -> Result<(), StoreError> {
    let dir = store.packs_dir();
    let Ok(rd) = fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".pack.gc-") || name.starts_with(".idx.gc-") {
            let p = e.path();
            fs::remove_file(&p).at(&p)?;
        }
    }
    Ok(())
}

/// Objects a repack reads, compresses (in parallel) and appends at once:
/// at most this many, and no more bytes than [`REPACK_BATCH_BYTES`] past
/// the first (a chunk may be several MB: an agent's memory is bounded).
const REPACK_BATCH: usize = 256;
const REPACK_BATCH_BYTES: usize = 4 << 20;

/// Copies `pack`'s reachable objects into a new pack, durable and in
/// place before the caller removes `pack`; those it holds uncompressed for
/// speed ([`Pack::holds_raw`]) are checked against their IDs and
/// compressed on the way. False if cancelled first (the old pack stays,
/// whole).
fn repack(store: &Store, pack: &Pack, live: &LiveSet, cancel: &Cancel) -> Result<bool, StoreError> {
    use rayon::prelude::*;
    let dir = store.packs_dir();
    let tmp = dir.join(format!(".pack.gc-{}.tmp", std::process::id()));
    // In ID order, as `for_each_entry` gives them: no index held in
    // memory. A pack with segments is read in its own order instead (each
    // segment decompressed once), so the new one is written in that order.
    let mut out = store.create_pack(tmp, !pack.has_segments())?;
    let mut batch: Vec<(ObjectId, Vec<u8>)> = Vec::with_capacity(REPACK_BATCH);
    let mut batch_bytes = 0;
    let flush = |batch: &mut Vec<(ObjectId, Vec<u8>)>, out: &mut PackWriter| {
        if cancel.is_cancelled() {
            return Err(StoreError::Cancelled(cancel.why()));
        }
        if pack.holds_raw() {
            let files: Vec<Vec<u8>> = batch
                .par_iter()
                .map(|(id, file)| match object::compressed(*id, file) {
                    Ok(std::borrow::Cow::Owned(f)) => f,
                    Ok(std::borrow::Cow::Borrowed(_)) => file.clone(),
                    // Copied as it is, as a repack copies everything: a
                    // read of it fails, naming it, and an agent fetches
                    // it again.
                    Err(e) => {
                        tracing::warn!("{}: {e}: kept as it is", pack.path().display());
                        file.clone()
                    }
                })
                .collect();
            for ((id, _), f) in batch.iter().zip(files) {
                out.append(*id, &f)?;
            }
        } else {
            for (id, f) in batch.iter() {
                out.append(*id, f)?;
            }
        }
        batch.clear();
        Ok(())
    };
    let mut copy = |id: ObjectId, slot| {
        batch.push((id, pack.read(slot)?));
        batch_bytes += slot.len as usize;
        if batch.len() == REPACK_BATCH || batch_bytes >= REPACK_BATCH_BYTES {
            flush(&mut batch, &mut out)?;
            batch_bytes = 0;
        }
        Ok(())
    };
    let keep = |id: &ObjectId| live.contains(id) && !pack.is_dead(id);
    let copied = match pack.has_segments() {
        false => pack.for_each_entry(|id, slot| match keep(&id) {
            true => copy(id, slot),
            false => Ok(()),
        }),
        true => pack.order(|id, _| keep(id)).and_then(|order| {
            order.into_iter().try_for_each(|i| {
                let (id, slot) = pack.entry(i as usize)?;
                copy(id, slot)
            })
        }),
    }
    .and_then(|()| flush(&mut batch, &mut out));
    let sealed = copied.and_then(|()| {
        out.seal()?;
        out.file().sync_all().at(&dir)
    });
    match sealed {
        Ok(()) => {}
        Err(StoreError::Cancelled(_)) => {
            out.discard();
            return Ok(false);
        }
        Err(e) => {
            out.discard();
            return Err(e);
        }
    }
    out.publish(&dir)?;
    sync_dir(&dir)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64, tail: u8) -> ObjectId {
        let mut b = [tail; 32];
        b[..8].copy_from_slice(&n.to_be_bytes());
        ObjectId::from_bytes(b)
    }

    #[test]
    fn the_live_set_holds_what_was_inserted_across_its_folds() {
        let mut live = LiveSet::default();
        // Enough repeats to fold several times on the way.
        for round in 0..3u64 {
            for n in 0..100_000u64 {
                live.insert(&id(n * 7 + round % 2, 1));
            }
        }
        live.seal();
        assert_eq!(live.len(), 200_000);
        for n in (0..100_000u64).step_by(997) {
            assert!(live.contains(&id(n * 7, 9)), "prefix {n}");
            assert!(live.contains(&id(n * 7 + 1, 9)), "prefix {n}+1");
            assert!(!live.contains(&id(n * 7 + 3, 1)), "never inserted");
        }
    }
}
