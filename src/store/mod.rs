//! The content-addressed store: IDs, chunks, trees, object files on disk,
//! and the operations over them (walk, diff, verify, gc).
//!
//! **Invariant:** the store knows nothing about hosts, fleets or HTTP. It is
//! shared by the deploy host (which builds versions into it) and every agent
//! (which fetches objects into its own).
//!
//! **Invariant:** an object is only ever reachable (from a version record, a
//! ref, or a host's release) after it is durable and verified.

pub mod chunk;
pub mod codec;
pub mod diff;
pub mod disk;
pub mod fsutil;
pub mod gc;
pub mod id;
pub mod object;
pub mod signature;
pub mod tree;
pub mod verify;

pub use disk::{Store, StoreError};
pub use id::{ChunkId, ObjectId, ObjectKind, TreeId, VersionId};
pub use tree::{Content, Entry, Tree, TreeName};

use std::io::Write;

/// A path inside a version, as bytes (names may be any bytes but `/` and NUL).
pub type TreePath = Vec<u8>;

/// A visitor for [`Store::walk`]: called with each entry's path.
pub type Visit<'a> = dyn FnMut(&[u8], &Entry) -> Result<(), StoreError> + 'a;

pub fn join(parent: &[u8], name: &TreeName) -> TreePath {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.as_bytes().len());
    if !parent.is_empty() {
        p.extend_from_slice(parent);
        p.push(b'/');
    }
    p.extend_from_slice(name.as_bytes());
    p
}

impl Store {
    /// Calls `f` for every entry below `tree`, depth first in name order,
    /// with its path relative to `tree`.
    pub fn walk(&self, tree: &TreeId, f: &mut Visit<'_>) -> Result<(), StoreError> {
        self.walk_at_path(tree, &[], f)
    }

    /// Like `walk`, with paths prefixed by `prefix`.
    pub fn walk_at_path(
        &self,
        tree: &TreeId,
        prefix: &[u8],
        f: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        for entry in self.tree(tree)?.entries() {
            let path = join(prefix, &entry.name);
            f(&path, entry)?;
            if let Content::Dir { tree: sub, .. } = &entry.content {
                self.walk_at_path(sub, &path, f)?;
            }
        }
        Ok(())
    }

    /// Finds what `path` names ("" or "/" is the root itself, a directory).
    pub fn lookup(&self, root: &TreeId, path: &[u8]) -> Result<Option<Content>, StoreError> {
        let (size, files) = self.tree(root)?.totals();
        let mut current = Content::Dir {
            tree: *root,
            size,
            files,
        };
        for part in path
            .split(|&c| c == b'/')
            .filter(|p| !p.is_empty() && *p != b".")
        {
            let Content::Dir { tree, .. } = &current else {
                return Ok(None);
            };
            match self.tree(tree)?.get(part) {
                Some(e) => current = e.content.clone(),
                None => return Ok(None),
            }
        }
        Ok(Some(current))
    }

    /// Writes a file's content to `out` (named `out_path` in errors),
    /// verifying each chunk.
    pub fn write_file(
        &self,
        content: &Content,
        out: &mut dyn Write,
        out_path: &std::path::Path,
    ) -> Result<(), StoreError> {
        self.write_file_as_arriving(content, out, out_path, &|_| Ok(()))
    }

    /// [`Store::write_file`], calling `arrived` before each chunk is read
    /// (a release written while its version arrives waits there for the
    /// chunk, not for the whole file).
    pub fn write_file_as_arriving(
        &self,
        content: &Content,
        out: &mut dyn Write,
        out_path: &std::path::Path,
        arrived: &dyn Fn(&ObjectId) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let Content::File { chunks, .. } = content else {
            return Ok(());
        };
        for c in chunks {
            arrived(&c.id.object())?;
            self.read_with(&c.id.object(), ObjectKind::Chunk, |data| {
                out.write_all(data).map_err(|source| StoreError::Io {
                    path: out_path.to_path_buf(),
                    source,
                })
            })?;
        }
        Ok(())
    }
}
