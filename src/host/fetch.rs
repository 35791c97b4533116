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
//!
//! Bounds, whatever a source sends: each tree at most `MAX_TREE_LEN`
//! bytes, each chunk exactly the length its tree gives it, trees nested at
//! most `MAX_DEPTH` deep, and at most [`MAX_HELD_TREE_BYTES`] of trees held
//! while the walk runs.

use std::collections::{HashMap, HashSet};

use super::proto::Fetched;
use crate::net::client::{Client, FetchError, PackItem};
use crate::store::disk::Writer;
use crate::store::tree::{MAX_DEPTH, MAX_TREE_LEN, TreeError};
use crate::store::{Content, ObjectId, ObjectKind, Store, StoreError, Tree, TreeId, VersionId};

/// Most bytes of fetched trees held in memory before they are stored (a
/// 263k-file MediaWiki tree has about 20 MB of them).
pub const MAX_HELD_TREE_BYTES: usize = 512 << 20;

/// Fetches the delta pack from `from` (what this host holds; `None` for a
/// fresh host) to `v`, storing each object as it arrives: every chunk
/// (verified, bounded by the largest chunk there can be), and each tree
/// whose children are all in the store already (the pack sends children
/// first), so the store's invariant holds at every instant. What the pack
/// did not complete (a host whose store differs from `from`, a source
/// without packs) is left to [`fetch_version`]. Returns whether a pack
/// came, and the trees and chunks it stored.
pub async fn fetch_pack(
    client: &Client,
    writer: &Writer<'_>,
    from: Option<&VersionId>,
    v: &VersionId,
) -> Result<(bool, u64, u64), FetchError> {
    let store: &Store = writer.store();
    if store.has(&v.object()) {
        return Ok((false, 0, 0));
    }
    let trees = std::sync::atomic::AtomicU64::new(0);
    let chunks = std::sync::atomic::AtomicU64::new(0);
    let sink = |id: ObjectId, item: PackItem<'_>| -> Result<(), StoreError> {
        if store.has(&id) {
            return Ok(());
        }
        let Some(got) = Arrived::of(store, id, item)? else {
            // A delta whose base this host lacks: fetched whole later.
            return Ok(());
        };
        match got.kind {
            ObjectKind::Chunk => {
                got.store(writer, id)?;
                chunks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            ObjectKind::Tree => {
                let data = got.content(store, id)?;
                let tree = Tree::decode(&data).map_err(|source| StoreError::BadTree {
                    id: TreeId::new(id),
                    source,
                })?;
                let complete = tree.entries().iter().all(|e| match &e.content {
                    Content::Dir { tree, .. } => store.has(&tree.object()),
                    Content::File { chunks, .. } => {
                        chunks.iter().all(|c| store.has(&c.id.object()))
                    }
                    Content::Symlink { .. } => true,
                });
                if complete {
                    got.store(writer, id)?;
                    trees.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        Ok(())
    };
    let came = client.pack(from, v, &sink).await?;
    Ok((came, trees.into_inner(), chunks.into_inner()))
}

/// Largest content of an object of `kind`.
fn max_len(kind: ObjectKind) -> u64 {
    match kind {
        ObjectKind::Chunk => u64::from(crate::store::chunk::CDC_MAX),
        ObjectKind::Tree => MAX_TREE_LEN,
    }
}

/// One object of a pack as the sink handles it.
struct Arrived<'a> {
    kind: ObjectKind,
    got: Got<'a>,
}

enum Got<'a> {
    /// An object file sent uncompressed (as a pack's are: its segments are
    /// compressed), verified: stored as it is; gc compresses it later
    /// ([`Writer::put_checked`]).
    Raw(&'a [u8]),
    /// An object file as the source's store keeps it (compressed): stored
    /// as it is once verified.
    File(&'a [u8]),
    /// Content this module verified against the ID (an object sent
    /// uncompressed, a delta's result): compressed as it is stored.
    Verified(Vec<u8>),
}

impl<'a> Arrived<'a> {
    /// Verifies what the pack gave for `id` where that costs nothing more
    /// than decoding it; `None` for a delta whose base this host lacks.
    fn of(
        store: &Store,
        id: ObjectId,
        item: PackItem<'a>,
    ) -> Result<Option<Arrived<'a>>, StoreError> {
        let bad_object = |source| StoreError::Object {
            path: store.object_path(&id),
            source,
        };
        Ok(Some(match item {
            PackItem::Object { kind, file } if crate::store::object::is_uncompressed(file) => {
                crate::store::object::decode_borrowed(id, kind, file, max_len(kind))
                    .map_err(bad_object)?;
                Arrived {
                    kind,
                    got: Got::Raw(file),
                }
            }
            PackItem::Object { kind, file } => Arrived {
                kind,
                got: Got::File(file),
            },
            PackItem::Delta { base, kind, zstd } => {
                let Ok(dict) = store.read(&base, kind) else {
                    return Ok(None);
                };
                let bad = |why: String| {
                    bad_object(crate::store::object::ObjectError::Corrupt { id, why })
                };
                let mut d = zstd::bulk::Decompressor::with_dictionary(&dict)
                    .map_err(|e| bad(format!("delta: {e}")))?;
                // The frame declares its size (the builder writes it):
                // allocate that, never more than the kind allows.
                let declared = zstd::zstd_safe::get_frame_content_size(zstd)
                    .ok()
                    .flatten()
                    .unwrap_or(max_len(kind));
                let content = d
                    .decompress(zstd, declared.min(max_len(kind)) as usize)
                    .map_err(|e| bad(format!("delta against {base}: {e}")))?;
                if kind.hash(&content) != id {
                    return Err(bad(format!(
                        "delta against {base} does not give the object"
                    )));
                }
                Arrived {
                    kind,
                    got: Got::Verified(content),
                }
            }
        }))
    }

    /// Its content (decoding, and so verifying, an object file).
    fn content(
        &self,
        store: &Store,
        id: ObjectId,
    ) -> Result<std::borrow::Cow<'_, [u8]>, StoreError> {
        match &self.got {
            Got::Verified(d) => Ok(std::borrow::Cow::Borrowed(d)),
            Got::Raw(f) => Ok(std::borrow::Cow::Borrowed(
                &f[crate::store::object::HEADER_LEN..],
            )),
            Got::File(f) => {
                crate::store::object::decode_within(id, self.kind, f, max_len(self.kind))
                    .map(std::borrow::Cow::Owned)
                    .map_err(|source| StoreError::Object {
                        path: store.object_path(&id),
                        source,
                    })
            }
        }
    }

    fn store(&self, writer: &Writer<'_>, id: ObjectId) -> Result<(), StoreError> {
        match &self.got {
            Got::Verified(d) => writer.put_decoded(id, self.kind, d),
            Got::Raw(f) => writer.put_checked(id, f),
            Got::File(f) => writer
                .put_verified(id, self.kind, f, max_len(self.kind))
                .map(|_| ()),
        }
    }
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
    let mut depth = 0;
    let mut held: usize = 0;
    while !frontier.is_empty() {
        if depth > MAX_DEPTH {
            return Err(FetchError::Store(StoreError::BadTree {
                id: frontier[0],
                source: TreeError::NotCanonical("directories nested deeper than 256 levels"),
            }));
        }
        depth += 1;
        let wanted: Vec<_> = frontier
            .iter()
            .map(|t| (t.object(), ObjectKind::Tree, MAX_TREE_LEN))
            .collect();
        let got = std::sync::Mutex::new(Vec::new());
        client
            .fetch(&wanted, &|id, kind, max_len, file| {
                // Verify now; store later, after everything below it.
                let data = crate::store::object::decode_within(id, kind, file, max_len).map_err(
                    |source| StoreError::Object {
                        path: store.object_path(&id),
                        source,
                    },
                )?;
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
            held += file.len();
            if held > MAX_HELD_TREE_BYTES {
                return Err(FetchError::Store(StoreError::BadTree {
                    id,
                    source: TreeError::NotCanonical("the version's trees exceed 512 MiB"),
                }));
            }
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
        .fetch(&chunks, &|id, kind, max_len, file| {
            let data = writer.put_verified(id, kind, file, max_len)?;
            // A chunk is exactly as long as its tree says (the hash ties
            // the two together too, but this names the fault).
            if data.len() as u64 != max_len {
                return Err(StoreError::Object {
                    path: store.object_path(&id),
                    source: crate::store::object::ObjectError::Corrupt {
                        id,
                        why: format!("{} bytes, its tree says {max_len}", data.len()),
                    },
                });
            }
            Ok(())
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
                .put_verified(id.object(), ObjectKind::Tree, file, MAX_TREE_LEN)
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
