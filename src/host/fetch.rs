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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::cancel::Cancel;
use crate::net::client::{Client, FetchError, PackItem};
use crate::proto::Fetched;
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
    let trees = AtomicU64::new(0);
    let chunks = AtomicU64::new(0);
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
                if let Some(a) = arrivals {
                    a.pace(writer);
                }
                got.store(writer, id)?;
                client.progressed();
                chunks.fetch_add(1, Ordering::Relaxed);
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
                trees.fetch_add(n, Ordering::Relaxed);
                if held.hold(TreeId::new(id), got.into_owned(), tree, arrivals) {
                    client.progressed();
                }
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
    trees.fetch_add(n, Ordering::Relaxed);
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
    /// fetched again by the walk that follows the pack). False if it held
    /// nothing new (the tree is held already: a source sending it again).
    fn hold(
        &mut self,
        id: TreeId,
        got: Arrived<'static>,
        tree: Tree,
        arrivals: Option<&Arrivals>,
    ) -> bool {
        let len = got.len();
        if self.bytes + len > MAX_HELD_TREE_BYTES || self.stack.iter().any(|h| h.id == id) {
            return false;
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
        true
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
///
/// While a release is being written with it ([`Arrivals::writing`]), the
/// fetch also keeps within [`AHEAD`] segments of the last one the release
/// read: the release then reads what it writes from the segments the store
/// keeps decompressed ([`crate::store::disk::pack::SEGMENTS_KEPT`]), not by
/// decompressing them a second time. The fetch never waits while a release
/// thread waits for an object (which may be the next one), nor once the
/// release stopped.
#[derive(Default)]
pub struct Arrivals {
    state: Mutex<ArrivalState>,
    changed: Condvar,
    chunks: AtomicU64,
    /// A release is being written with this fetch.
    writing: AtomicBool,
}

/// Segments of the pack the fetch may store past the last one a release
/// written with it has read from.
const AHEAD: usize = 2;

/// How often a fetch waiting for the release looks again.
const PACE_POLL: Duration = Duration::from_millis(1);

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
        let n = self.chunks.fetch_add(1, Ordering::Relaxed);
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

    /// A release is being written with this fetch until the guard is
    /// dropped (however its writing ends): the fetch keeps within
    /// [`AHEAD`] of it meanwhile.
    pub fn writing(&self) -> Writing<'_> {
        self.writing.store(true, Ordering::Relaxed);
        Writing(self)
    }

    /// Waits, before the fetch stores a chunk, while it has stored more
    /// than [`AHEAD`] segments past the last one the release read from,
    /// unless a release thread is waiting for an object or the release
    /// has stopped.
    fn pace(&self, writer: &Writer<'_>) {
        if !self.writing.load(Ordering::Relaxed) {
            return;
        }
        while writer.segments_unread() > AHEAD {
            let st = self.state.lock().expect("not poisoned");
            if st.waiting > 0 || !self.writing.load(Ordering::Relaxed) {
                return;
            }
            drop(st);
            std::thread::sleep(PACE_POLL);
        }
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

    /// Waits until chunk `id` is in the store.
    pub fn chunk(&self, store: &Store, id: &ObjectId, cancel: &Cancel) -> Result<(), StoreError> {
        if store.has(id) {
            return Ok(());
        }
        let mut st = self.state.lock().expect("not poisoned");
        while !store.has(id) {
            st = self.wait(st, id, cancel)?;
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

/// A release being written with a fetch ([`Arrivals::writing`]).
pub struct Writing<'a>(&'a Arrivals);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.writing.store(false, Ordering::Relaxed);
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
        client.stats.bytes.load(Ordering::Relaxed),
        client.stats.requests.load(Ordering::Relaxed),
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
    out.bytes = client.stats.bytes.load(Ordering::Relaxed) - stats_before.0;
    out.requests = client.stats.requests.load(Ordering::Relaxed) - stats_before.1;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::store::disk::Role;
    use crate::store::object;

    /// A chunk in a segment: its ID, object file and place.
    type Placed = (ObjectId, Vec<u8>, usize);

    /// Segments of `per` chunks each as a delta pack carries them, with
    /// the chunks of each.
    fn segments(n: usize, per: usize) -> (Vec<Arriving>, Vec<Vec<Placed>>) {
        let mut segs = Vec::new();
        let mut objects = Vec::new();
        for s in 0..n {
            let mut content = b"scapbat1".to_vec();
            let mut these = Vec::new();
            for k in 0..per {
                let data = format!("segment {s} chunk {k} ").repeat(40).into_bytes();
                let id = ObjectKind::Chunk.hash(&data);
                let file = object::uncompressed(id, &object::encode(ObjectKind::Chunk, &data));
                content.extend_from_slice(&[7u8; 11]);
                these.push((id, file.clone(), content.len()));
                content.extend_from_slice(&file);
            }
            let z = zstd::bulk::compress(&content, 3).unwrap();
            segs.push(Arriving::new(z, Arc::new(content)));
            objects.push(these);
        }
        (segs, objects)
    }

    /// Runs `pace` on a thread of `s`; the receiver hears when it returns.
    fn pacing<'s>(
        s: &'s std::thread::Scope<'s, '_>,
        a: &'s Arrivals,
        w: &'s Writer<'_>,
    ) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        s.spawn(move || {
            a.pace(w);
            tx.send(()).unwrap();
        });
        rx
    }

    const HELD: Duration = Duration::from_millis(200);
    const SOON: Duration = Duration::from_secs(10);

    /// The fetch waits for a release written with it only while it has
    /// stored more than `AHEAD` segments past the last one the release
    /// read from; never while a release thread waits for an object (which
    /// may be the very next one), and not once the release has stopped.
    #[test]
    fn a_fetch_keeps_within_a_few_segments_of_the_release_written_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir.path(), Role::Host).unwrap();
        let w = store.writer().unwrap();
        let (segs, objects) = segments(AHEAD + 5, 4);
        let store_segment = |s: usize| {
            for (id, file, at) in &objects[s] {
                w.put_in_segment(*id, file, &segs[s], *at).unwrap();
            }
        };
        for s in 0..AHEAD + 2 {
            store_segment(s);
        }
        assert_eq!(w.segments_unread(), AHEAD + 2);
        let a = Arrivals::default();
        let cancel = Cancel::new();
        std::thread::scope(|s| {
            // No release is being written: the fetch goes on.
            pacing(s, &a, &w).recv_timeout(SOON).unwrap();

            let writing = a.writing();
            let done = pacing(s, &a, &w);
            assert!(done.recv_timeout(HELD).is_err(), "ahead: the fetch waits");
            // The release reads from segment 2 (of AHEAD + 2): it is
            // AHEAD behind now.
            let (id, ..) = &objects[1][0];
            w.store().read(id, ObjectKind::Chunk).unwrap();
            done.recv_timeout(SOON).unwrap();
            assert_eq!(w.segments_unread(), AHEAD);

            // A release thread waiting for an object lets the fetch go on.
            store_segment(AHEAD + 2);
            store_segment(AHEAD + 3);
            let done = pacing(s, &a, &w);
            assert!(done.recv_timeout(HELD).is_err(), "ahead: the fetch waits");
            let (next, ..) = &objects[AHEAD + 4][0];
            let waiter = s.spawn(|| a.chunk(w.store(), next, &cancel));
            done.recv_timeout(SOON).unwrap();
            store_segment(AHEAD + 4);
            waiter.join().unwrap().unwrap();

            // Once the release stops, however, the fetch goes on.
            assert!(w.segments_unread() > AHEAD);
            let done = pacing(s, &a, &w);
            assert!(done.recv_timeout(HELD).is_err(), "ahead: the fetch waits");
            drop(writing);
            done.recv_timeout(SOON).unwrap();
        });
    }
}
