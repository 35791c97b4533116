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

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::proto::Fetched;
use crate::cancel::Cancel;
use crate::net::client::{Client, FetchError, PackItem};
use crate::store::disk::Writer;
use crate::store::disk::pack::Arriving;
use crate::store::tree::{MAX_DEPTH, MAX_TREE_LEN, TreeError};
use crate::store::{Content, ObjectId, ObjectKind, Store, StoreError, Tree, TreeId, VersionId};

/// Most bytes of fetched trees held in memory before they are stored (a
/// 263k-file MediaWiki tree has about 20 MB of them).
pub const MAX_HELD_TREE_BYTES: usize = 512 << 20;

/// Fetches the delta pack from `from` (what this host holds; `None` for a
/// fresh host) to `v`, storing each object as it arrives: every chunk
/// (verified, bounded by the largest chunk there can be) at once; each
/// tree (which the pack sends before what it lists) once everything it
/// lists is stored, so the store's invariant holds at every instant.
/// Trees waiting for that are held in memory (the directories on the path
/// the pack is at: a few, as the pack is in walk order) and shown to
/// `arrivals`, with each object stored, for a release being written at the
/// same time. What the pack did not complete (a host whose store differs
/// from `from`, a source without packs) is left to [`fetch_version`].
/// Returns whether a pack came, and the trees and chunks it stored.
pub async fn fetch_pack(
    client: &Client,
    writer: &Writer<'_>,
    from: Option<&VersionId>,
    v: &VersionId,
    arrivals: Option<&Arrivals>,
) -> Result<(bool, u64, u64), FetchError> {
    let store: &Store = writer.store();
    if store.has(&v.object()) {
        return Ok((false, 0, 0));
    }
    let trees = std::sync::atomic::AtomicU64::new(0);
    let chunks = std::sync::atomic::AtomicU64::new(0);
    let held = Mutex::new(HeldTrees::default());
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
                if let Some(a) = arrivals {
                    a.chunk_stored();
                }
            }
            ObjectKind::Tree => {
                let data = got.content(store, id)?;
                let tree = Tree::decode(&data).map_err(|source| StoreError::BadTree {
                    id: TreeId::new(id),
                    source,
                })?;
                drop(data);
                let mut held = held.lock().expect("not poisoned");
                // What the pack sent since the last tree is below it, or
                // below a sibling: those siblings are whole now.
                let n = held.settle(writer, arrivals, false)?;
                trees.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                held.hold(TreeId::new(id), got.into_owned(), tree, arrivals);
            }
        }
        Ok(())
    };
    let came = client.pack(from, v, &sink).await;
    // Whatever the pack's end: store what is whole, forget the rest (the
    // walk of `fetch_version` asks for it again).
    let n = held
        .lock()
        .expect("not poisoned")
        .settle(writer, arrivals, true)
        .map_err(FetchError::Store)?;
    trees.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    Ok((came?, trees.into_inner(), chunks.into_inner()))
}

/// Trees a pack sent that list objects not all stored yet, in the order
/// they came: with the pack in walk order, each one's parent is below it.
#[derive(Default)]
struct HeldTrees {
    stack: Vec<HeldTree>,
    bytes: usize,
}

struct HeldTree {
    id: TreeId,
    got: Arrived<'static>,
    tree: Arc<Tree>,
    /// Entries known to be in the store already (a tree is checked again
    /// as each child arrives: this keeps that linear).
    present: usize,
}

impl HeldTrees {
    /// Holds a tree (within [`MAX_HELD_TREE_BYTES`]: past that, it is
    /// fetched again by the walk that follows the pack).
    fn hold(&mut self, id: TreeId, got: Arrived<'static>, tree: Tree, arrivals: Option<&Arrivals>) {
        let len = got.len();
        if self.bytes + len > MAX_HELD_TREE_BYTES {
            return;
        }
        self.bytes += len;
        let tree = Arc::new(tree);
        if let Some(a) = arrivals {
            a.held(id, tree.clone());
        }
        self.stack.push(HeldTree {
            id,
            got,
            tree,
            present: 0,
        });
    }

    /// Stores the trees on top of the stack that are whole, children
    /// before parents; stops at the first that is not, unless `all` (the
    /// pack ended): then those are dropped. Returns how many it stored.
    fn settle(
        &mut self,
        writer: &Writer<'_>,
        arrivals: Option<&Arrivals>,
        all: bool,
    ) -> Result<u64, StoreError> {
        let store = writer.store();
        let mut stored = 0;
        while let Some(top) = self.stack.last_mut() {
            let whole = top.whole(store);
            if !whole && !all {
                break;
            }
            let top = self.stack.pop().expect("a top");
            self.bytes -= top.got.len();
            if whole {
                top.got.store(writer, top.id.object())?;
                stored += 1;
            }
            if let Some(a) = arrivals {
                a.stored(&top.id);
            }
        }
        Ok(stored)
    }
}

impl HeldTree {
    fn whole(&mut self, store: &Store) -> bool {
        let entries = self.tree.entries();
        while let Some(e) = entries.get(self.present) {
            let here = match &e.content {
                Content::Dir { tree, .. } => store.has(&tree.object()),
                Content::File { chunks, .. } => chunks.iter().all(|c| store.has(&c.id.object())),
                Content::Symlink { .. } => true,
            };
            if !here {
                return false;
            }
            self.present += 1;
        }
        true
    }
}

/// What a fetch has brought so far, for a release written while it runs
/// ([`crate::host::materialize`]): the trees it holds (not in the store
/// yet: what they list has not all arrived), and a wake-up each time it
/// stores an object. Whatever is in neither is waited for, until the
/// fetch ends ([`Arrivals::end`]): an object still missing then is an
/// error, and the release is written again after the fetch.
#[derive(Default)]
pub struct Arrivals {
    state: Mutex<ArrivalState>,
    changed: Condvar,
    chunks: std::sync::atomic::AtomicU64,
}

/// Chunks stored between two wake-ups of a release waiting for one: the
/// writer trails the fetch by about that much (and polls, see
/// [`POLL`]), instead of every waiter waking for every chunk (on two
/// cores, that took as much time as the fetch itself).
const CHUNKS_PER_WAKEUP: u64 = 64;

/// How often a release waiting for an object looks again whatever wakes
/// it (a cancel, chunks between wake-ups).
const POLL: Duration = Duration::from_millis(5);

#[derive(Default)]
struct ArrivalState {
    trees: HashMap<TreeId, Arc<Tree>>,
    ended: bool,
    waiting: usize,
}

impl Arrivals {
    fn held(&self, id: TreeId, tree: Arc<Tree>) {
        let mut st = self.state.lock().expect("not poisoned");
        st.trees.insert(id, tree);
        if st.waiting > 0 {
            self.changed.notify_all();
        }
    }

    /// A tree is in the store: no longer held.
    fn stored(&self, tree: &TreeId) {
        let mut st = self.state.lock().expect("not poisoned");
        st.trees.remove(tree);
        if st.waiting > 0 {
            self.changed.notify_all();
        }
    }

    /// A chunk is in the store.
    fn chunk_stored(&self) {
        let n = self
            .chunks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % CHUNKS_PER_WAKEUP == CHUNKS_PER_WAKEUP - 1 {
            let st = self.state.lock().expect("not poisoned");
            if st.waiting > 0 {
                self.changed.notify_all();
            }
        }
    }

    /// The fetch is over: what is missing now will not come.
    pub fn end(&self) {
        self.state.lock().expect("not poisoned").ended = true;
        self.changed.notify_all();
    }

    /// Tree `id`: from the store, or as the fetch holds it; waits for it.
    pub fn tree(&self, store: &Store, id: &TreeId, cancel: &Cancel) -> Result<Tree, StoreError> {
        let mut st = self.state.lock().expect("not poisoned");
        loop {
            if let Some(t) = st.trees.get(id) {
                return Ok(Tree::clone(t));
            }
            // Stored before it leaves `trees`: absent from both, it has
            // not arrived.
            if store.has(&id.object()) {
                drop(st);
                return store.tree(id);
            }
            st = self.wait(st, &id.object(), cancel)?;
        }
    }

    /// Waits until every chunk of `content` is in the store.
    pub fn chunks(
        &self,
        store: &Store,
        content: &Content,
        cancel: &Cancel,
    ) -> Result<(), StoreError> {
        let Content::File { chunks, .. } = content else {
            return Ok(());
        };
        for c in chunks {
            let id = c.id.object();
            if store.has(&id) {
                continue;
            }
            let mut st = self.state.lock().expect("not poisoned");
            while !store.has(&id) {
                st = self.wait(st, &id, cancel)?;
            }
        }
        Ok(())
    }

    fn wait<'g>(
        &self,
        mut st: MutexGuard<'g, ArrivalState>,
        what: &ObjectId,
        cancel: &Cancel,
    ) -> Result<MutexGuard<'g, ArrivalState>, StoreError> {
        if st.ended {
            return Err(StoreError::Cancelled(format!(
                "the fetch ended without object {what}: the release is written after it"
            )));
        }
        cancel.check()?;
        st.waiting += 1;
        let (mut st, _) = self.changed.wait_timeout(st, POLL).expect("not poisoned");
        st.waiting -= 1;
        Ok(st)
    }
}

/// Ends [`Arrivals`] when dropped: however the fetch ends, a release
/// being written with it stops waiting.
pub struct EndOnDrop<'a>(pub &'a Arrivals);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        self.0.end();
    }
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
    /// The pack segment a raw object file came in, and where in it: the
    /// store keeps the segment as it came ([`Writer::put_in_segment`]).
    at: Option<(&'a Arriving, usize)>,
}

enum Got<'a> {
    /// An object file sent uncompressed (as a pack's are: its segments are
    /// compressed), verified: stored as it is; gc compresses it later
    /// ([`Writer::put_checked`]).
    Raw(Cow<'a, [u8]>),
    /// An object file as the source's store keeps it (compressed): stored
    /// as it is once verified.
    File(Cow<'a, [u8]>),
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
            PackItem::Object { kind, file, at } if crate::store::object::is_uncompressed(file) => {
                crate::store::object::decode_borrowed(id, kind, file, max_len(kind))
                    .map_err(bad_object)?;
                Arrived {
                    kind,
                    got: Got::Raw(Cow::Borrowed(file)),
                    at,
                }
            }
            PackItem::Object { kind, file, .. } => Arrived {
                kind,
                got: Got::File(Cow::Borrowed(file)),
                at: None,
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
                    at: None,
                }
            }
        }))
    }

    /// The same, owning its bytes (to be held; stored on its own, not as
    /// a part of its segment).
    fn into_owned(self) -> Arrived<'static> {
        let own = |c: Cow<'a, [u8]>| -> Cow<'static, [u8]> { Cow::Owned(c.into_owned()) };
        Arrived {
            kind: self.kind,
            at: None,
            got: match self.got {
                Got::Raw(c) => Got::Raw(own(c)),
                Got::File(c) => Got::File(own(c)),
                Got::Verified(d) => Got::Verified(d),
            },
        }
    }

    /// Bytes it holds.
    fn len(&self) -> usize {
        match &self.got {
            Got::Raw(c) | Got::File(c) => c.len(),
            Got::Verified(d) => d.len(),
        }
    }

    /// Its content (decoding, and so verifying, an object file).
    fn content(&self, store: &Store, id: ObjectId) -> Result<Cow<'_, [u8]>, StoreError> {
        match &self.got {
            Got::Verified(d) => Ok(Cow::Borrowed(d)),
            Got::Raw(f) => Ok(Cow::Borrowed(&f[crate::store::object::HEADER_LEN..])),
            Got::File(f) => {
                crate::store::object::decode_within(id, self.kind, f, max_len(self.kind))
                    .map(Cow::Owned)
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
            Got::Raw(f) => match self.at {
                Some((seg, offset)) => writer.put_in_segment(id, f, seg, offset),
                None => writer.put_checked(id, f),
            },
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
