//! Differences between two trees, skipping every subtree whose ID is the
//! same on both sides: the cost is in what changed, not in the tree's size.

use std::collections::HashSet;

use super::disk::{Store, StoreError};
use super::id::{ChunkId, TreeId};
use super::tree::{Content, Entry};
use super::{TreePath, join};

/// git's `--name-status` letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Status {
    /// Only in the new tree.
    #[serde(rename = "A")]
    Added,
    /// Content or executable bit differs.
    #[serde(rename = "M")]
    Modified,
    /// Only in the old tree.
    #[serde(rename = "D")]
    Deleted,
    /// File became symlink or the other way round.
    #[serde(rename = "T")]
    TypeChanged,
}

impl Status {
    pub fn letter(self) -> char {
        match self {
            Status::Added => 'A',
            Status::Modified => 'M',
            Status::Deleted => 'D',
            Status::TypeChanged => 'T',
        }
    }
}

/// One changed non-directory path. Directories themselves are not listed;
/// a directory added or removed lists everything inside it (like git).
#[derive(Clone, Debug)]
pub struct Change {
    pub status: Status,
    pub path: TreePath,
    pub old: Option<Content>,
    pub new: Option<Content>,
}

/// Calls `f` for each change from `a` to `b`, in path order.
pub fn diff(
    store: &Store,
    a: &TreeId,
    b: &TreeId,
    f: &mut dyn FnMut(Change) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if a == b {
        return Ok(());
    }
    diff_at(store, a, b, &[], f)
}

fn diff_at(
    store: &Store,
    a: &TreeId,
    b: &TreeId,
    prefix: &[u8],
    f: &mut dyn FnMut(Change) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let (ta, tb) = (store.tree(a)?, store.tree(b)?);
    let (ea, eb) = (ta.entries(), tb.entries());
    let (mut i, mut j) = (0, 0);
    while i < ea.len() || j < eb.len() {
        let order = match (ea.get(i), eb.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                one_side(store, &ea[i], prefix, Status::Deleted, f)?;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                one_side(store, &eb[j], prefix, Status::Added, f)?;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                both(store, &ea[i], &eb[j], prefix, f)?;
                i += 1;
                j += 1;
            }
        }
    }
    Ok(())
}

fn both(
    store: &Store,
    x: &Entry,
    y: &Entry,
    prefix: &[u8],
    f: &mut dyn FnMut(Change) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let path = join(prefix, &x.name);
    match (&x.content, &y.content) {
        (Content::Dir { tree: ta, .. }, Content::Dir { tree: tb, .. }) => {
            if ta != tb {
                diff_at(store, ta, tb, &path, f)?;
            }
        }
        (Content::Dir { .. }, _) => {
            one_side(store, x, prefix, Status::Deleted, f)?;
            one_side(store, y, prefix, Status::Added, f)?;
        }
        (_, Content::Dir { .. }) => {
            one_side(store, x, prefix, Status::Deleted, f)?;
            one_side(store, y, prefix, Status::Added, f)?;
        }
        (old, new) if old == new => {}
        (old, new) => {
            let status = if matches!(old, Content::Symlink { .. })
                == matches!(new, Content::Symlink { .. })
            {
                Status::Modified
            } else {
                Status::TypeChanged
            };
            f(Change {
                status,
                path,
                old: Some(old.clone()),
                new: Some(new.clone()),
            })?;
        }
    }
    Ok(())
}

/// Reports an entry present on one side only, recursing into directories.
fn one_side(
    store: &Store,
    e: &Entry,
    prefix: &[u8],
    status: Status,
    f: &mut dyn FnMut(Change) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let path = join(prefix, &e.name);
    let change = |path: TreePath, c: &Content| Change {
        status,
        path,
        old: (status == Status::Deleted).then(|| c.clone()),
        new: (status == Status::Added).then(|| c.clone()),
    };
    match &e.content {
        Content::Dir { tree, .. } => store.walk_at_path(tree, &path, &mut |p, entry| {
            if matches!(entry.content, Content::Dir { .. }) {
                return Ok(());
            }
            f(change(p.to_vec(), &entry.content))
        }),
        c => f(change(path, c)),
    }
}

/// Totals of a diff, for `--stat`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DiffStat {
    pub added: u64,
    pub modified: u64,
    pub deleted: u64,
    pub type_changed: u64,
    /// Bytes of regular-file content in added and modified files (new side).
    pub bytes_changed: u64,
    /// Bytes of regular-file content removed (deleted files, old side).
    pub bytes_deleted: u64,
    /// Distinct chunks a host on the old version lacks for the new one.
    pub fetch_chunks: u64,
    /// Their uncompressed size: what a host on `a` would fetch to reach `b`
    /// (before compression on the wire).
    pub fetch_bytes: u64,
}

impl DiffStat {
    pub fn add(&mut self, c: &Change) {
        match c.status {
            Status::Added => self.added += 1,
            Status::Modified => self.modified += 1,
            Status::Deleted => self.deleted += 1,
            Status::TypeChanged => self.type_changed += 1,
        }
        if let Some(new) = &c.new {
            self.bytes_changed += new.size();
        }
        if c.status == Status::Deleted
            && let Some(old) = &c.old
        {
            self.bytes_deleted += old.size();
        }
    }
}

/// Chunks (with lengths) that the new side of `changes` needs and that
/// nothing in version `a` already has. Walks all of `a` once, unless no
/// change brings content.
pub fn fetch_cost(store: &Store, a: &TreeId, changes: &[Change]) -> Result<(u64, u64), StoreError> {
    let mut wanted: std::collections::HashMap<ChunkId, u32> = Default::default();
    for c in changes {
        if let Some(Content::File { chunks, .. }) = &c.new {
            for ch in chunks {
                wanted.insert(ch.id, ch.len);
            }
        }
    }
    if !wanted.is_empty() {
        let mut seen_trees = HashSet::new();
        chunks_of(store, a, &mut seen_trees, &mut |id| {
            wanted.remove(id);
        })?;
    }
    Ok((
        wanted.len() as u64,
        wanted.values().map(|&l| u64::from(l)).sum(),
    ))
}

/// Calls `f` with every chunk ID below `tree`, visiting each subtree once.
pub fn chunks_of(
    store: &Store,
    tree: &TreeId,
    seen: &mut HashSet<TreeId>,
    f: &mut dyn FnMut(&ChunkId),
) -> Result<(), StoreError> {
    if !seen.insert(*tree) {
        return Ok(());
    }
    for e in store.tree(tree)?.entries() {
        match &e.content {
            Content::File { chunks, .. } => chunks.iter().for_each(|c| f(&c.id)),
            Content::Dir { tree: sub, .. } => chunks_of(store, sub, seen, f)?,
            Content::Symlink { .. } => {}
        }
    }
    Ok(())
}
