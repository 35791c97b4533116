//! Drift: compare a live release directory with the version it claims to
//! be, re-hashing every file, and list what was edited by hand.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rayon::prelude::*;

use crate::store::chunk::{self, ChunkError};
use crate::store::tree::ChunkRef;
use crate::store::{Content, ObjectKind, Store, StoreError, TreeId, join};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Drift {
    pub checked_files: u64,
    /// `(status, path, what)`: M content or mode, A not in the version, D
    /// missing, T different kind.
    pub changes: Vec<(char, String, String)>,
}

pub fn check(store: &Store, dir: &Path, tree: &TreeId) -> Result<Drift, StoreError> {
    let mut drift = Drift::default();
    let mut files = Vec::new();
    walk(store, dir, tree, &[], &mut drift, &mut files)?;
    drift.checked_files = files.len() as u64;
    let bad: Vec<(char, String, String)> = files
        .par_iter()
        .filter_map(|(path, rel, content)| {
            let Content::File {
                chunks, executable, ..
            } = content
            else {
                return None;
            };
            let meta = fs::metadata(path).ok()?;
            let is_exec = meta.permissions().mode() & 0o111 != 0;
            let shown = String::from_utf8_lossy(rel).into_owned();
            if hash(path).as_deref() != Ok(chunks.as_slice()) {
                return Some(('M', shown, "content differs".into()));
            }
            (is_exec != *executable).then(|| ('M', shown, "executable bit differs".into()))
        })
        .collect();
    drift.changes.extend(bad);
    drift.changes.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(drift)
}

type FileCheck = (std::path::PathBuf, Vec<u8>, Content);

fn walk(
    store: &Store,
    dir: &Path,
    tree: &TreeId,
    rel: &[u8],
    drift: &mut Drift,
    files: &mut Vec<FileCheck>,
) -> Result<(), StoreError> {
    let t = store.tree(tree)?;
    let mut on_disk: Vec<Vec<u8>> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().as_bytes().to_vec())
            .collect(),
        Err(_) => Vec::new(),
    };
    on_disk.sort();
    for name in &on_disk {
        if t.get(name).is_none() {
            let mut p = rel.to_vec();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(name);
            drift.changes.push((
                'A',
                String::from_utf8_lossy(&p).into_owned(),
                "not in the version".into(),
            ));
        }
    }
    for e in t.entries() {
        let path = dir.join(e.name.to_os_string());
        let p = join(rel, &e.name);
        let shown = String::from_utf8_lossy(&p).into_owned();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            drift.changes.push(('D', shown, "missing".into()));
            continue;
        };
        match &e.content {
            Content::Dir { tree, .. } if meta.is_dir() => {
                walk(store, &path, tree, &p, drift, files)?
            }
            Content::Symlink { target } if meta.file_type().is_symlink() => {
                if fs::read_link(&path)
                    .map(|t| t.as_os_str().as_bytes() == target.as_slice())
                    .unwrap_or(false)
                {
                    continue;
                }
                drift
                    .changes
                    .push(('M', shown, "symlink target differs".into()));
            }
            c @ Content::File { .. } if meta.is_file() => files.push((path, p, c.clone())),
            c => drift
                .changes
                .push(('T', shown, format!("should be a {}", c.kind_name()))),
        }
    }
    Ok(())
}

fn hash(path: &Path) -> Result<Vec<ChunkRef>, ()> {
    let f = fs::File::open(path).map_err(|_| ())?;
    let size = f.metadata().map_err(|_| ())?.len();
    let mut out = Vec::new();
    chunk::for_each_chunk::<_, ()>(f, size, |data| {
        out.push(ChunkRef {
            id: crate::store::ChunkId::new(ObjectKind::Chunk.hash(data)),
            len: data.len() as u32,
        });
        Ok(())
    })
    .map_err(|_: ChunkError<()>| ())?;
    Ok(out)
}
