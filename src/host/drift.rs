//! Drift: compare a live release directory with the version it claims to
//! be, re-hashing every file, and list what was edited by hand.
//!
//! Reads go through directory file descriptors like the materializer's
//! writes: a symlink where a file or directory should be is reported, never
//! followed; a FIFO or device planted in the tree is reported, never opened
//! for reading; a file is read no further than one byte past the size its
//! version gives it.

use std::io::Read;

use rayon::prelude::*;
use rustix::fs::FileType;

use super::materialize::{Arena, Cursor, Dir};
use crate::cancel::Cancel;
use crate::store::chunk::{self, ChunkError};
use crate::store::tree::{ChunkRef, MAX_DEPTH};
use crate::store::{ChunkId, Content, ObjectKind, Store, StoreError, TreeId, TreeName, join};

pub use crate::proto::Drift;

struct FileCheck {
    /// Its directory, in the walk's arena.
    dir: u32,
    name: TreeName,
    rel: Vec<u8>,
    content: Content,
}

/// Files re-hashed per parallel task.
const CHECKS_PER_TASK: usize = 64;

/// Files listed before they are re-hashed: the walk hands them over in
/// batches of this many, so that what a check holds does not grow with the
/// tree (each entry carries its path and chunk list: ~250 bytes).
const FILES_PER_BATCH: usize = 4096;

pub fn check(
    store: &Store,
    root: Dir,
    tree: &TreeId,
    cancel: &Cancel,
) -> Result<Drift, StoreError> {
    let mut w = Walk {
        store,
        root: &root,
        arena: Arena::new(),
        files: Vec::with_capacity(FILES_PER_BATCH),
        drift: Drift::default(),
        cancel,
    };
    let root_idx = w
        .arena
        .push(u32::MAX, TreeName::new(b"-".to_vec()).expect("a name"));
    w.walk(&root, root_idx, tree, &[], 0)?;
    w.flush()?;
    let mut drift = w.drift;
    drift.changes.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(drift)
}

/// A drift check in progress: the directories walked so far and the files
/// listed but not yet re-hashed.
struct Walk<'a> {
    store: &'a Store,
    root: &'a Dir,
    arena: Arena,
    files: Vec<FileCheck>,
    drift: Drift,
    cancel: &'a Cancel,
}

impl Walk<'_> {
    /// Re-hashes the files listed so far, in parallel, and forgets them.
    fn flush(&mut self) -> Result<(), StoreError> {
        let (root, arena, cancel) = (self.root, &self.arena, self.cancel);
        let bad: Vec<Vec<(char, String, String)>> = self
            .files
            .par_chunks(CHECKS_PER_TASK)
            .map(|chunk| {
                let mut cursor = Cursor::new(root, arena);
                let mut bad = Vec::new();
                for f in chunk {
                    cancel.check()?;
                    let found = match cursor.dir(f.dir) {
                        Ok(dir) => check_file(dir, f),
                        Err(e) => Some((
                            'T',
                            String::from_utf8_lossy(&f.rel).into_owned(),
                            format!("cannot open its directory: {e}"),
                        )),
                    };
                    bad.extend(found);
                }
                Ok(bad)
            })
            .collect::<Result<_, StoreError>>()?;
        self.drift.checked_files += self.files.len() as u64;
        self.drift.changes.extend(bad.into_iter().flatten());
        self.files.clear();
        Ok(())
    }

    fn walk(
        &mut self,
        dir: &Dir,
        idx: u32,
        tree: &TreeId,
        rel: &[u8],
        depth: usize,
    ) -> Result<(), StoreError> {
        self.cancel.check()?;
        if depth > MAX_DEPTH {
            return Ok(());
        }
        let t = self.store.tree(tree)?;
        let on_disk = dir.names().unwrap_or_default();
        for name in &on_disk {
            if t.get(name).is_none() {
                let mut p = rel.to_vec();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                self.drift.changes.push((
                    'A',
                    String::from_utf8_lossy(&p).into_owned(),
                    "not in the version".into(),
                ));
            }
        }
        for e in t.entries() {
            let name = e.name.as_bytes();
            let p = join(rel, &e.name);
            let shown = || String::from_utf8_lossy(&p).into_owned();
            let Ok(Some(kind)) = dir.kind(name) else {
                self.drift.changes.push(('D', shown(), "missing".into()));
                continue;
            };
            match &e.content {
                Content::Dir { tree, .. } if kind == FileType::Directory => {
                    match dir.subdir(name) {
                        Ok(sub) => {
                            let sub_idx = self.arena.push(idx, e.name.clone());
                            self.walk(&sub, sub_idx, tree, &p, depth + 1)?
                        }
                        Err(err) => self.drift.changes.push((
                            'T',
                            shown(),
                            format!("cannot open it: {err}"),
                        )),
                    }
                }
                Content::Symlink { target } if kind == FileType::Symlink => {
                    if dir.read_link(name).ok().as_deref() != Some(target.as_slice()) {
                        self.drift
                            .changes
                            .push(('M', shown(), "symlink target differs".into()));
                    }
                }
                c @ Content::File { .. } if kind == FileType::RegularFile => {
                    self.files.push(FileCheck {
                        dir: idx,
                        name: e.name.clone(),
                        rel: p,
                        content: c.clone(),
                    });
                    if self.files.len() >= FILES_PER_BATCH {
                        self.flush()?;
                    }
                }
                c => self.drift.changes.push((
                    'T',
                    shown(),
                    format!("should be a {}", c.kind_name()),
                )),
            }
        }
        Ok(())
    }
}

fn check_file(dir: &Dir, f: &FileCheck) -> Option<(char, String, String)> {
    let Content::File {
        chunks,
        executable,
        size,
    } = &f.content
    else {
        return None;
    };
    let shown = String::from_utf8_lossy(&f.rel).into_owned();
    let file = match dir.open_file(f.name.as_bytes()) {
        Ok(file) => file,
        Err(e) => return Some(('M', shown, format!("cannot read it: {e}"))),
    };
    let is_exec = file
        .metadata()
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
        .unwrap_or(false);
    if hash(file, *size).as_deref() != Ok(chunks.as_slice()) {
        return Some(('M', shown, "content differs".into()));
    }
    (is_exec != *executable).then(|| ('M', shown, "executable bit differs".into()))
}

/// The chunk list of what `file` holds, read no further than `size + 1`
/// bytes (a longer file differs anyway).
fn hash(file: std::fs::File, size: u64) -> Result<Vec<ChunkRef>, ()> {
    let mut out = Vec::new();
    let mut read: u64 = 0;
    chunk::for_each_chunk::<_, ()>(file.take(size.saturating_add(1)), size, |data| {
        read += data.len() as u64;
        out.push(ChunkRef {
            id: ChunkId::new(ObjectKind::Chunk.hash(data)),
            len: data.len() as u32,
        });
        Ok(())
    })
    .map_err(|_: ChunkError<()>| ())?;
    if read != size {
        return Err(());
    }
    Ok(out)
}
