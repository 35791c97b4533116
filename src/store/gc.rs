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

use super::diff::chunks_of;
use super::disk::{IoContext, LockMode, Store, StoreError};
use super::fsutil::read_head;
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

/// Deletes every object not reachable from `roots`. The caller holds the
/// exclusive store lock.
pub fn mark_and_sweep(
    store: &Store,
    roots: &[VersionId],
    dry_run: bool,
    cancel: &Cancel,
) -> Result<GcReport, StoreError> {
    let mut live: HashSet<ObjectId> = HashSet::new();
    let mut trees: HashSet<TreeId> = HashSet::new();
    for v in roots {
        cancel.check()?;
        chunks_of(store, &v.root(), &mut trees, &mut |c| {
            live.insert(c.object());
        })?;
    }
    live.extend(trees.iter().map(|t| t.object()));
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
    if dry_run {
        return Ok(report);
    }
    store.bump_gc_generation()?;
    store.begin_sweep()?;
    for (n, path) in dead_trees.iter().enumerate() {
        if n == dead_trees.len() / 2 {
            crate::failpoint::hit("gc:sweeping-trees");
        }
        fs::remove_file(path).at(path)?;
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
