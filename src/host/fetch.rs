//! Fetch by difference: bring a version's objects into the host's store,
//! asking sources only for what the store lacks.
//!
//! Walks the target root top-down. A tree already in the store is complete
//! (store invariant), so the walk never descends into it: a backport costs
//! the trees on the changed paths plus the changed chunks. Missing trees are
//! fetched level by level (each level is one round of batches) and held in
//! memory; then the missing chunks are fetched; then the trees are stored
//! deepest first, so the invariant holds at every instant. An interrupted
//! fetch keeps the chunks it stored and re-asks only for trees.

use std::collections::{HashMap, HashSet};

use crate::net::client::{Client, FetchError};
use crate::store::disk::Writer;
use crate::store::{Content, ObjectId, ObjectKind, Store, StoreError, Tree, TreeId, VersionId};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Fetched {
    pub trees: u64,
    pub chunks: u64,
    /// Body bytes received from sources.
    pub bytes: u64,
    pub requests: u64,
}

pub async fn fetch_version(
    client: &Client,
    writer: &Writer<'_>,
    v: &VersionId,
) -> Result<Fetched, FetchError> {
    let store: &Store = writer.store();
    let mut out = Fetched::default();
    if store.has(&v.object()) {
        return Ok(out);
    }
    let stats_before = (
        client
            .stats
            .bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        client
            .stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    // Every fetched tree: its object file and the subtrees it lists.
    let mut fetched: HashMap<TreeId, (Vec<u8>, Vec<TreeId>)> = HashMap::new();
    let mut seen: HashSet<ObjectId> = HashSet::new();
    let mut chunks: Vec<(ObjectId, ObjectKind, u64)> = Vec::new();
    let mut frontier = vec![v.root()];
    seen.insert(v.object());
    while !frontier.is_empty() {
        let wanted: Vec<_> = frontier
            .iter()
            .map(|t| (t.object(), ObjectKind::Tree, 4096))
            .collect();
        let got = std::sync::Mutex::new(Vec::new());
        client
            .fetch(&wanted, &|id, kind, file| {
                // Verify now; store later, after everything below it.
                let data = crate::store::object::decode(id, kind, file).map_err(|source| {
                    StoreError::Object {
                        path: store.object_path(&id),
                        source,
                    }
                })?;
                let tree = Tree::decode(&data).map_err(|source| StoreError::BadTree {
                    id: TreeId::new(id),
                    source,
                })?;
                got.lock()
                    .expect("not poisoned")
                    .push((TreeId::new(id), file.to_vec(), tree));
                Ok(())
            })
            .await?;
        let mut next = Vec::new();
        for (id, file, tree) in got.into_inner().expect("not poisoned") {
            let mut subtrees = Vec::new();
            for e in tree.entries() {
                match &e.content {
                    Content::Dir { tree: sub, .. } => {
                        subtrees.push(*sub);
                        if !store.has(&sub.object()) && seen.insert(sub.object()) {
                            next.push(*sub);
                        }
                    }
                    Content::File { chunks: cs, .. } => {
                        for c in cs {
                            let o = c.id.object();
                            if seen.insert(o) && !store.has(&o) {
                                chunks.push((o, ObjectKind::Chunk, u64::from(c.len)));
                            }
                        }
                    }
                    Content::Symlink { .. } => {}
                }
            }
            if fetched.insert(id, (file, subtrees)).is_none() {
                out.trees += 1;
            }
        }
        frontier = next;
    }
    out.chunks = chunks.len() as u64;
    client
        .fetch(&chunks, &|id, kind, file| {
            writer.put_verified(id, kind, file).map(|_| ())
        })
        .await?;
    // Trees in post-order: each after every subtree it lists, so that a
    // tree in the store always has everything below it, even if this loop
    // stops half-way (a full disk). A subtree listed at several depths is
    // stored once, before the first tree that needs it.
    let mut stored: HashSet<TreeId> = HashSet::new();
    let mut stack: Vec<(TreeId, bool)> = vec![(v.root(), false)];
    while let Some((id, children_done)) = stack.pop() {
        let Some((file, subtrees)) = fetched.get(&id) else {
            continue; // was in the store already
        };
        if stored.contains(&id) {
            continue;
        }
        if children_done {
            writer
                .put_verified(id.object(), ObjectKind::Tree, file)
                .map_err(FetchError::Store)?;
            stored.insert(id);
        } else {
            stack.push((id, true));
            stack.extend(
                subtrees
                    .iter()
                    .filter(|s| !stored.contains(s))
                    .map(|s| (*s, false)),
            );
        }
    }
    out.bytes = client
        .stats
        .bytes
        .load(std::sync::atomic::Ordering::Relaxed)
        - stats_before.0;
    out.requests = client
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        - stats_before.1;
    Ok(out)
}
