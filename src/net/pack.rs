//! Delta packs: every object a host that holds version `from` needs for
//! version `to`, as one immutable file with a cacheable URL
//! (`GET /v1/pack4/<from>/<to>`, `/v1/pack4/empty/<to>` for a fresh host).
//! Every host that moves between the same two versions makes the same
//! request, so an ordinary HTTP cache in front of `scap serve` answers all
//! but the first.
//!
//! A pack (format 3) is a batch body (store-format.md, "HTTP protocol"):
//! the batch magic, one frame per object, the end frame, cut at frame
//! boundaries into segments of about [`SEGMENT`] bytes, each compressed as
//! one zstd frame and written as its compressed length (u32 LE) and that
//! frame. Objects inside are uncompressed (compression byte 0), so small
//! files compress against each other, as in rsync's `--compress` stream:
//! a fresh host receives fewer bytes than rsync sends. A segment is also
//! the unit of resumption: an interrupted pack is asked for again from the
//! end of the last whole segment. An object that replaces one at the same
//! place in `from` (a chunk of an edited file, a tree on a changed path)
//! is sent as a zstd delta against it when that is smaller: a one-line
//! change to a 400 KB config file costs tens of bytes, not a 64 KiB chunk.
//! The order is the materializer's walk (format 4): depth first, each
//! directory's tree, then its entries in name order (a file's chunks, a
//! subdirectory's objects), so a fresh host writes its release as the pack
//! arrives instead of after it; it holds each tree until everything below
//! it is stored, so its store's invariant holds throughout. The order and
//! the segments are a pure function of the two versions, so a pack's
//! bytes, and its ETag, are too.
//!
//! Packs are built on first request (one build per pack, however many
//! requests wait for it) into `STORE/packs/<from>-<to>.pack`, written to a
//! temporary name and renamed: the first host of a transition nobody
//! built ahead waits for the build (a fresh host's pack takes seconds at
//! 30k files), every later one reads the file. `scap serve` builds a new
//! version's delta packs ahead, as soon as the version is in the store,
//! from the versions hosts are likely to run ([`Ahead`]), so that the
//! first host of a deploy usually finds its pack built. A fresh host's
//! pack (`empty`) is never built ahead: fresh hosts are rare, and the
//! pack is the size of the version.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{BATCH_MAGIC, encode_end, encode_frame_header};
use crate::store::tree::Content;
use crate::store::{ObjectId, Store, StoreError, TreeId, VersionId};

/// Pack format version, in the URL, the file name and the ETag (a change of
/// order or encoding makes new ones). 2: objects changed in place (a chunk
/// or tree at the same path in `from`) may be sent as deltas against their
/// predecessor. 3: the body is cut into zstd-compressed segments, objects
/// inside them uncompressed. 4: the objects in the materializer's order
/// (each tree before what it lists), no longer chunks then trees.
pub const PACK_FORMAT: u32 = 4;

/// Raw bytes of batch body per segment, at least (a segment ends at the
/// first frame boundary past it).
pub const SEGMENT: usize = 1 << 20;

/// Most raw bytes a segment may hold (a receiver refuses more): the target
/// plus the largest frame (a tree).
pub const MAX_SEGMENT: usize = SEGMENT + crate::store::tree::MAX_TREE_LEN as usize + (64 << 10);

// A receiver stores segments as they came: a store's pack holds any.
const _: () = assert!(MAX_SEGMENT <= crate::store::disk::pack::MAX_SEGMENT_CONTENT as usize);

/// zstd level of segments (as a compressed batch stream).
const SEGMENT_LEVEL: i32 = super::STREAM_ZSTD_LEVEL;

/// zstd level of delta frames (small inputs: the best ratio is cheap).
const DELTA_LEVEL: i32 = 19;

/// Where a pack is kept.
pub fn path(store: &Store, from: Option<&VersionId>, to: &VersionId) -> PathBuf {
    store.root().join("packs").join(name(from, to))
}

/// The URL path of a pack: `/v1/pack4/<from>/<to>`.
pub fn url_path(from: Option<&VersionId>, to: &VersionId) -> String {
    format!(
        "/v1/pack{PACK_FORMAT}/{}/{}",
        from.map_or_else(|| "empty".to_string(), VersionId::to_hex),
        to.to_hex()
    )
}

/// `<from>-<to>.4.pack` (`empty-<to>.4.pack`): the format is in the name,
/// so that a pack of an older format left in the store is never served.
pub fn name(from: Option<&VersionId>, to: &VersionId) -> String {
    format!(
        "{}-{}.{PACK_FORMAT}.pack",
        from.map_or_else(|| "empty".to_string(), VersionId::to_hex),
        to.to_hex()
    )
}

/// The pack's strong ETag.
pub fn etag(from: Option<&VersionId>, to: &VersionId) -> String {
    format!(
        "\"pack{PACK_FORMAT}-{}-{}\"",
        from.map_or_else(|| "empty".to_string(), VersionId::to_hex),
        to.to_hex()
    )
}

/// The objects of a pack, in pack order: the order the agent's
/// materializer walks a version in, so that a fresh host writes its
/// release while the pack arrives. Depth first, each directory's tree
/// first, then its entries in name order: a file's chunks, a
/// subdirectory's objects. Found by walking both versions side by side,
/// path by path, skipping every subtree whose ID is the same on both
/// sides, and every object `from` holds anywhere (a moved file, a new
/// branch copied from the old one): the pack is exactly what a host
/// holding `from` lacks. An object that occurs twice is sent at its first
/// place. Each with the object it replaces at the same place in `from`
/// (a chunk of the file at the same path, a tree at the same path), if
/// any: the base a delta can be made against.
pub fn objects(
    store: &Store,
    from: Option<&VersionId>,
    to: &VersionId,
) -> Result<Vec<(ObjectId, Option<ObjectId>)>, StoreError> {
    // Everything a host holding `from` has, wherever it is in `from`: a
    // train's new php-* branch is mostly the old branch's files at new
    // paths, and none of those may travel again. Asked only about what is
    // at a path `from` does not have (so a backport never walks all of
    // `from`), and computed on the first such question.
    let mut held: Option<HashSet<ObjectId>> = None;
    let mut holds = |id: &ObjectId| -> Result<bool, StoreError> {
        let Some(f) = from else { return Ok(false) };
        if held.is_none() {
            held = Some(reachable(store, f)?);
        }
        Ok(held.as_ref().is_some_and(|h| h.contains(id)))
    };
    let mut out: Vec<(ObjectId, Option<ObjectId>)> = Vec::new();
    let mut seen: HashSet<ObjectId> = HashSet::new();
    // The directories being walked: (old tree at this path, new tree, next
    // entry of the new one).
    let mut stack: Vec<(Option<crate::store::Tree>, crate::store::Tree, usize)> = Vec::new();
    let mut visit = |old: Option<TreeId>,
                     new: TreeId,
                     stack: &mut Vec<_>,
                     out: &mut Vec<_>,
                     holds: &mut dyn FnMut(&ObjectId) -> Result<bool, StoreError>|
     -> Result<(), StoreError> {
        if old == Some(new) || seen.contains(&new.object()) {
            return Ok(());
        }
        if old.is_none() && holds(&new.object())? {
            return Ok(());
        }
        seen.insert(new.object());
        out.push((new.object(), old.map(|o| o.object())));
        let old_tree = old.map(|o| store.tree(&o)).transpose()?;
        stack.push((old_tree, store.tree(&new)?, 0));
        Ok(())
    };
    visit(
        from.map(|f| f.root()),
        to.root(),
        &mut stack,
        &mut out,
        &mut holds,
    )?;
    let mut chunks_seen: HashSet<ObjectId> = HashSet::new();
    while let Some((old_tree, new_tree, next)) = stack.last_mut() {
        let Some(e) = new_tree.entries().get(*next) else {
            stack.pop();
            continue;
        };
        *next += 1;
        let old_entry = old_tree
            .as_ref()
            .and_then(|t| t.get(e.name.as_bytes()))
            .map(|e| e.content.clone());
        match e.content.clone() {
            Content::File { chunks: cs, .. } => {
                let old_chunks: Vec<ObjectId> = match old_entry {
                    Some(Content::File { chunks: oc, .. }) => {
                        oc.iter().map(|c| c.id.object()).collect()
                    }
                    _ => Vec::new(),
                };
                let had: HashSet<ObjectId> = old_chunks.iter().copied().collect();
                for (k, c) in cs.iter().enumerate() {
                    let o = c.id.object();
                    if had.contains(&o) || (old_chunks.is_empty() && holds(&o)?) {
                        continue;
                    }
                    if chunks_seen.insert(o) {
                        // The chunk it most likely replaces: the one at
                        // the same index (content-defined boundaries
                        // resynchronise after an edit), else the last.
                        let base = old_chunks.get(k).or(old_chunks.last()).copied();
                        out.push((o, base));
                    }
                }
            }
            Content::Dir { tree: sub, .. } => {
                let old_sub = match old_entry {
                    Some(Content::Dir { tree, .. }) => Some(tree),
                    _ => None,
                };
                visit(old_sub, sub, &mut stack, &mut out, &mut holds)?;
            }
            Content::Symlink { .. } => {}
        }
    }
    Ok(out)
}

/// Every object (trees and chunks) reachable from `v`'s root.
fn reachable(store: &Store, v: &VersionId) -> Result<HashSet<ObjectId>, StoreError> {
    let mut out: HashSet<ObjectId> = HashSet::new();
    let mut stack = vec![v.root()];
    out.insert(v.root().object());
    while let Some(t) = stack.pop() {
        for e in store.tree(&t)?.entries() {
            match &e.content {
                Content::File { chunks, .. } => {
                    out.extend(chunks.iter().map(|c| c.id.object()));
                }
                Content::Dir { tree, .. } => {
                    if out.insert(tree.object()) {
                        stack.push(*tree);
                    }
                }
                Content::Symlink { .. } => {}
            }
        }
    }
    Ok(out)
}

/// Builds the pack file (if it is not there yet) and returns its path.
/// Fails if either version is not in the store.
pub fn build(
    store: &Store,
    from: Option<&VersionId>,
    to: &VersionId,
) -> Result<PathBuf, StoreError> {
    let p = path(store, from, to);
    if p.exists() {
        return Ok(p);
    }
    for v in from.into_iter().chain(std::iter::once(to)) {
        if !store.has(&v.object()) {
            return Err(StoreError::UnknownVersion(v.to_hex()));
        }
    }
    let list = objects(store, from, to)?;
    let mut dictionaries: HashMap<ObjectId, Vec<u8>> = HashMap::new();
    let dir = p.parent().expect("packs/").to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| StoreError::Io {
        path: dir.clone(),
        source: e,
    })?;
    // Its own temp file, whatever else runs: two writers of one file
    // would interleave their segments.
    static BUILT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        "{}{}.tmp",
        building_prefix(from, to),
        BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let io = |e: std::io::Error| StoreError::Io {
        path: tmp.clone(),
        source: e,
    };
    let written = (|| -> Result<(), StoreError> {
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = Segments::new(f);
        for (id, base) in &list {
            let file = store
                .read_raw(id)?
                .ok_or_else(|| StoreError::UnknownVersion(format!("{id} (an object of {to})")))?;
            match base.and_then(|b| delta(store, id, &b, &file, &mut dictionaries).transpose()) {
                Some(payload) => {
                    let payload = payload?;
                    let at = w.raw.len() + crate::store::id::ID_LEN;
                    encode_frame_header(&mut w.raw, id, Some(&payload));
                    w.raw[at] = super::DELTA;
                    w.raw.extend_from_slice(&payload);
                }
                None => {
                    let file = crate::store::object::uncompressed(*id, &file);
                    encode_frame_header(&mut w.raw, id, Some(&file));
                    w.raw.extend_from_slice(&file);
                }
            }
            w.frame_done().map_err(io)?;
        }
        encode_end(&mut w.raw);
        let f = w.finish().map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &p).map_err(io)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(p)
}

/// Writes a pack's segments: frames accumulate in `raw`; each time it
/// passes [`SEGMENT`] it becomes a segment, compressed on rayon's pool
/// while the build reads on, and written in order as each is done (at
/// most [`IN_FLIGHT`] at once). Compressing a batch at a time instead
/// left the cores idle while the build read the next one: the first host
/// of a version waits for the whole build.
struct Segments {
    out: std::io::BufWriter<std::fs::File>,
    raw: Vec<u8>,
    in_flight: std::collections::VecDeque<std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>>,
    /// Segments written.
    segments: u64,
}

/// Segments being compressed at once, at most (each holds its raw and
/// compressed bytes: ~1.5 MiB).
const IN_FLIGHT: usize = 8;

impl Segments {
    fn new(f: std::fs::File) -> Segments {
        let mut raw = Vec::with_capacity(SEGMENT + (64 << 10));
        raw.extend_from_slice(BATCH_MAGIC);
        Segments {
            out: std::io::BufWriter::with_capacity(1 << 20, f),
            raw,
            in_flight: Default::default(),
            segments: 0,
        }
    }

    /// Called after each whole frame.
    fn frame_done(&mut self) -> std::io::Result<()> {
        if self.raw.len() >= SEGMENT {
            let next = Vec::with_capacity(SEGMENT + (64 << 10));
            let full = std::mem::replace(&mut self.raw, next);
            self.compress(full)?;
        }
        Ok(())
    }

    fn compress(&mut self, raw: Vec<u8>) -> std::io::Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rayon::spawn(move || {
            // A panic in a spawned job would abort the process (rayon's
            // default): it becomes this build's error instead.
            let z = std::panic::catch_unwind(|| zstd::bulk::compress(&raw, SEGMENT_LEVEL))
                .unwrap_or_else(|_| Err(std::io::Error::other("a segment's compression panicked")));
            let _ = tx.send(z);
        });
        self.in_flight.push_back(rx);
        while self.in_flight.len() > IN_FLIGHT {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> std::io::Result<()> {
        let Some(rx) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let z = rx
            .recv()
            .map_err(|_| std::io::Error::other("a segment's compression stopped"))??;
        // A test's failing disk: the third segment's write fails (two
        // were sent to a host streaming the pack).
        if let Some(e) = crate::failpoint::errno("pack:segment")
            && self.segments >= 2
        {
            return Err(std::io::Error::from_raw_os_error(e));
        }
        self.segments += 1;
        self.out.write_all(&(z.len() as u32).to_le_bytes())?;
        self.out.write_all(&z)?;
        // Whole segments reach the file as they are made: a request
        // streams the pack from it while it is built.
        self.out.flush()?;
        crate::failpoint::hit("pack:segment");
        Ok(())
    }

    /// Writes what is left (the last segment holds the end frame).
    fn finish(mut self) -> std::io::Result<std::fs::File> {
        let last = std::mem::take(&mut self.raw);
        self.compress(last)?;
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        self.out.into_inner().map_err(|e| e.into_error())
    }
}

/// Reads a pack's segments as its bytes arrive: each whole segment,
/// decompressed (bounded by [`MAX_SEGMENT`]), is a piece of a batch body.
#[derive(Default)]
pub struct SegmentReader {
    /// Pack bytes taken out as whole segments: where to resume.
    pub consumed: u64,
    buf: Vec<u8>,
    pos: usize,
}

/// What is wrong with a pack's segments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("pack segment of {0} compressed bytes: more than a segment can be")]
    TooLarge(u64),
    #[error("pack segment does not decompress within {MAX_SEGMENT} bytes: {0}")]
    Corrupt(String),
}

impl SegmentReader {
    /// A reader for the rest of a pack whose first `consumed` bytes (whole
    /// segments) were read before.
    pub fn resumed(consumed: u64) -> SegmentReader {
        SegmentReader {
            consumed,
            ..SegmentReader::default()
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next whole segment's raw bytes, if it has arrived.
    pub fn next_segment(&mut self) -> Result<Option<Vec<u8>>, SegmentError> {
        match self.next_compressed()? {
            Some((z, _)) => decompress_segment(&z).map(Some),
            None => Ok(None),
        }
    }

    /// The next whole segment as it arrived (compressed), if it has, and
    /// the pack's bytes consumed up to its end; [`decompress_segment`]
    /// gives its raw bytes.
    pub fn next_compressed(&mut self) -> Result<Option<(Vec<u8>, u64)>, SegmentError> {
        let avail = &self.buf[self.pos..];
        let Some(len) = avail.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if len > zstd::zstd_safe::compress_bound(MAX_SEGMENT) {
            return Err(SegmentError::TooLarge(len as u64));
        }
        // Every segment holds at least one frame: an empty one is garbage
        // (and a stream of them would be consumed forever).
        if len == 0 {
            return Err(SegmentError::Corrupt("an empty segment".into()));
        }
        let Some(z) = avail.get(4..4 + len) else {
            return Ok(None);
        };
        let z = z.to_vec();
        self.pos += 4 + len;
        self.consumed += 4 + len as u64;
        Ok(Some((z, self.consumed)))
    }

    /// Whether every byte received was part of a whole segment.
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }
}

/// A segment's raw bytes (a piece of a batch body), bounded by
/// [`MAX_SEGMENT`].
pub fn decompress_segment(z: &[u8]) -> Result<Vec<u8>, SegmentError> {
    let mut raw = Vec::new();
    decompress_segment_into(z, &mut raw)?;
    Ok(raw)
}

/// [`decompress_segment`] into `raw`, replacing what it held: a receiver
/// reuses a few buffers for a whole pack instead of allocating a new one
/// of ~1 MiB per segment (each a fresh mapping whose every page faults in).
pub fn decompress_segment_into(z: &[u8], raw: &mut Vec<u8>) -> Result<(), SegmentError> {
    // The size the frame declares (the sender writes it), else the most a
    // segment may be: never more.
    let want = zstd::zstd_safe::get_frame_content_size(z)
        .ok()
        .flatten()
        .map_or(MAX_SEGMENT, |n| (n as usize).min(MAX_SEGMENT));
    raw.clear();
    raw.reserve_exact(want);
    zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress_to_buffer(z, raw))
        .map_err(|e| SegmentError::Corrupt(e.to_string()))?;
    if raw.is_empty() {
        return Err(SegmentError::Corrupt("an empty segment".into()));
    }
    // A reused buffer may be larger than the bound: the bound still holds.
    if raw.len() > MAX_SEGMENT {
        return Err(SegmentError::Corrupt(format!(
            "{} bytes decompressed",
            raw.len()
        )));
    }
    Ok(())
}

/// A delta frame's payload for object `id` (its object file `file`)
/// against `base`: base ID, kind, zstd with the base's content as the
/// dictionary; `None` when that is no smaller than the object file (or the
/// base is not in the store).
fn delta(
    store: &Store,
    id: &ObjectId,
    base: &ObjectId,
    file: &[u8],
    cache: &mut HashMap<ObjectId, Vec<u8>>,
) -> Result<Option<Vec<u8>>, StoreError> {
    let head = &file[..file.len().min(crate::store::object::HEADER_LEN)];
    let Ok((kind, _)) = crate::store::object::peek(*id, head) else {
        return Ok(None);
    };
    let Some(base_raw) = store.read_raw(base)? else {
        return Ok(None);
    };
    let base_head = &base_raw[..base_raw.len().min(crate::store::object::HEADER_LEN)];
    match crate::store::object::peek(*base, base_head) {
        Ok((k, _)) if k == kind => {}
        _ => return Ok(None),
    }
    if !cache.contains_key(base) {
        cache.clear(); // one base at a time is enough: they are used in order
        cache.insert(*base, store.read(base, kind)?);
    }
    let dict = &cache[base];
    let content = store.read(id, kind)?;
    let mut c =
        zstd::bulk::Compressor::with_dictionary(DELTA_LEVEL, dict).map_err(|e| StoreError::Io {
            path: store.object_path(id),
            source: e,
        })?;
    let z = c.compress(&content).map_err(|e| StoreError::Io {
        path: store.object_path(id),
        source: e,
    })?;
    if z.len() + 33 >= file.len() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(33 + z.len());
    out.extend_from_slice(base.as_bytes());
    out.push(match kind {
        crate::store::ObjectKind::Chunk => 0,
        crate::store::ObjectKind::Tree => 1,
    });
    out.extend_from_slice(&z);
    Ok(Some(out))
}

/// The start of the name of the temp file this process writes the pack
/// from `from` to `to` into while it builds it (in the pack's directory):
/// a request for that pack streams it from there as it grows.
pub fn building_prefix(from: Option<&VersionId>, to: &VersionId) -> String {
    format!(".{}.{}.", name(from, to), std::process::id())
}

/// One build per pack at a time: requests for a pack being built wait for
/// it instead of building it again. A build holds its pack's lock until it
/// ends, even when the request that started it is gone (a client that
/// disconnected, a fetch a rollback cancelled): the next request then
/// finds the pack built, never a second build beside the first.
#[derive(Default)]
pub struct Builds {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Builds {
    pub async fn build(
        &self,
        store: Store,
        from: Option<VersionId>,
        to: VersionId,
    ) -> Result<PathBuf, StoreError> {
        let key = name(from.as_ref(), &to);
        let lock = self
            .locks
            .lock()
            .expect("not poisoned")
            .entry(key.clone())
            .or_default()
            .clone();
        let held = lock.lock_owned().await;
        let r = tokio::task::spawn_blocking(move || {
            let _held = held;
            build(&store, from.as_ref(), &to)
        })
        .await
        .map_err(|e| StoreError::Io {
            path: PathBuf::from(&key),
            source: std::io::Error::other(e),
        })?;
        self.locks.lock().expect("not poisoned").remove(&key);
        r
    }
}

/// What one client may have built on its requests, per [`BUDGET_WINDOW`]:
/// packs already built cost nothing; a build counts once it starts, its
/// bytes once it is done.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Builds at once.
    pub concurrent: usize,
    /// Builds per window.
    pub builds: u32,
    /// Bytes of packs built per window.
    pub bytes: u64,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            concurrent: 2,
            builds: 64,
            bytes: 32 << 30,
        }
    }
}

/// The window a client's [`Budget`] is counted over.
pub const BUDGET_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Default)]
struct Spent {
    since: Option<std::time::Instant>,
    running: usize,
    builds: u32,
    bytes: u64,
}

/// Every client's [`Budget`], by IP address (a cache in front of many
/// hosts is one client: its requests are mostly for packs already built).
pub struct Budgets {
    budget: Budget,
    spent: Mutex<HashMap<Option<std::net::IpAddr>, Spent>>,
}

/// A build being paid for; its end (drop) frees its place. It goes with
/// the build, not the request: a client that hangs up does not get its
/// place back while the build it started runs on.
pub struct Charge {
    budgets: Arc<Budgets>,
    client: Option<std::net::IpAddr>,
}

impl Budgets {
    pub fn new(budget: Budget) -> Budgets {
        Budgets {
            budget,
            spent: Mutex::new(HashMap::new()),
        }
    }

    /// Starts a build for `client`, or says which part of its budget is
    /// spent.
    pub fn start(self: &Arc<Self>, client: Option<std::net::IpAddr>) -> Result<Charge, String> {
        let mut all = self.spent.lock().expect("not poisoned");
        let now = std::time::Instant::now();
        // Forget clients whose window ended and that build nothing.
        all.retain(|_, s| s.running > 0 || s.since.is_some_and(|t| now - t < BUDGET_WINDOW));
        let s = all.entry(client).or_default();
        if s.since.is_none_or(|t| now - t >= BUDGET_WINDOW) {
            *s = Spent {
                since: Some(now),
                running: s.running,
                ..Spent::default()
            };
        }
        let b = &self.budget;
        if s.running >= b.concurrent {
            return Err(format!("{} pack builds of its own already run", s.running));
        }
        if s.builds >= b.builds {
            return Err(format!(
                "it had {} packs built this hour, its limit",
                s.builds
            ));
        }
        if s.bytes >= b.bytes {
            return Err(format!(
                "it had {} MB of packs built this hour, its limit",
                s.bytes >> 20
            ));
        }
        s.running += 1;
        s.builds += 1;
        Ok(Charge {
            budgets: self.clone(),
            client,
        })
    }
}

impl Charge {
    /// The build made `bytes` of pack.
    pub fn charge(self, bytes: u64) {
        self.spent(|s| s.bytes = s.bytes.saturating_add(bytes));
    }

    fn spent(&self, f: impl FnOnce(&mut Spent)) {
        if let Some(s) = self
            .budgets
            .spent
            .lock()
            .expect("not poisoned")
            .get_mut(&self.client)
        {
            f(s);
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.spent(|s| s.running = s.running.saturating_sub(1));
    }
}

/// Packs built ahead: the sources a new version's packs are built from
/// before any host asks (`scap serve` does it in the background, see
/// `net::server::build_ahead`), so that the first host of a deploy, often
/// its canary, does not wait for the build. A host asks for the pack from
/// the version it runs; what the deploy host can know of that without
/// asking the fleet is which versions hosts last moved to (the `to` of each
/// pack served, newest first) and the version the new one was built on
/// (its record's parent). A guess that misses costs one build nobody asks
/// for, and gc removes it with its versions.
pub struct Ahead {
    /// The `to` of the packs served most recently, newest first, at most
    /// `limit`.
    recent: Mutex<std::collections::VecDeque<VersionId>>,
    limit: usize,
}

impl Ahead {
    /// At most `limit` sources per new version (0: build nothing ahead),
    /// remembering the `to` of the packs already in the store, newest file
    /// first (what hosts last moved to before this process started).
    pub fn new(store: &Store, limit: usize) -> Ahead {
        let mut found: Vec<(std::time::SystemTime, VersionId)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(store.root().join("packs")) {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(to) = name.to_str().and_then(destination) else {
                    continue;
                };
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    found.push((t, to));
                }
            }
        }
        let ahead = Ahead {
            recent: Mutex::new(std::collections::VecDeque::new()),
            limit,
        };
        // As if served in the order the files were written; only packs to
        // versions this store recorded.
        found.retain(|(_, v)| matches!(store.record(v), Ok(Some(_))));
        found.sort_by_key(|f| f.0);
        for (_, v) in found {
            ahead.served(v);
        }
        ahead
    }

    /// How many sources a new version's packs are built from, at most.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A pack to `to` was served: hosts run `to` now.
    pub fn served(&self, to: VersionId) {
        if self.limit == 0 {
            return;
        }
        let mut recent = self.recent.lock().expect("not poisoned");
        recent.retain(|v| *v != to);
        recent.push_front(to);
        recent.truncate(self.limit);
    }

    /// The versions to build `v`'s packs from: its parent, then what hosts
    /// last moved to; never `v` itself, at most `limit`.
    pub fn sources(&self, v: &VersionId, parent: Option<VersionId>) -> Vec<VersionId> {
        let recent = self.recent.lock().expect("not poisoned");
        let mut out: Vec<VersionId> = Vec::new();
        for s in parent.into_iter().chain(recent.iter().copied()) {
            if out.len() == self.limit {
                break;
            }
            if s != *v && !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }
}

/// The `to` of a pack file name of this format (`<from>-<to>.4.pack`).
fn destination(file_name: &str) -> Option<VersionId> {
    let stem = file_name.strip_suffix(&format!(".{PACK_FORMAT}.pack"))?;
    let (_, to) = stem.split_once('-')?;
    to.parse().ok()
}

/// How long a pack build's temp file may go unwritten before gc takes it
/// for one a crashed `scap serve` left (a build writes its file
/// continuously: the largest, 263k files, takes about a minute).
const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes every pack that involves a version not in `keep` (gc), and the
/// temp files of builds that ended without a rename (a crash) an hour ago.
pub fn retain(store: &Store, keep: &[VersionId]) -> std::io::Result<u64> {
    let dir = store.root().join("packs");
    let keep: HashSet<String> = keep.iter().map(VersionId::to_hex).collect();
    let mut removed = 0;
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with('.') && n.ends_with(".tmp") {
            let age = e.metadata()?.modified()?.elapsed().unwrap_or_default();
            if age > STALE_TEMP {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
            continue;
        }
        let Some(stem) = n.strip_suffix(".pack") else {
            continue;
        };
        // `<from>-<to>.<format>` (format 2's had no suffix).
        let stem = stem.split_once('.').map_or(stem, |(s, _)| s);
        let ok = stem
            .split_once('-')
            .is_some_and(|(a, b)| (a == "empty" || keep.contains(a)) && keep.contains(b));
        if !ok {
            std::fs::remove_file(e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// A `Range` header that cannot be satisfied (answered with 416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Parses a `Range: bytes=N-` or `bytes=N-M` header against a length:
/// the inclusive range, or `None` when absent; `Err` when unsatisfiable.
pub fn range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(h) = header else {
        return Ok(None);
    };
    let spec = h.trim().strip_prefix("bytes=").ok_or(Unsatisfiable)?;
    if spec.contains(',') {
        // Several ranges: answer the whole file (allowed by RFC 9110).
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 {
                return Err(Unsatisfiable);
            }
            (len.saturating_sub(n), len.saturating_sub(1))
        }
        (s, "") => (s.parse().map_err(|_| Unsatisfiable)?, len.saturating_sub(1)),
        (s, e) => (
            s.parse().map_err(|_| Unsatisfiable)?,
            e.parse::<u64>()
                .map_err(|_| Unsatisfiable)?
                .min(len.saturating_sub(1)),
        ),
    };
    if len == 0 || start > end || start >= len {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

/// Whether `p` is a pack file name this module made.
pub fn is_pack(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "pack")
}

#[cfg(test)]
mod tests {
    use super::{MAX_SEGMENT, SegmentError, SegmentReader, Unsatisfiable, range};

    fn segment(raw: &[u8]) -> Vec<u8> {
        let z = zstd::bulk::compress(raw, 3).unwrap();
        let mut out = (z.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&z);
        out
    }

    #[test]
    fn segments_arrive_whole_and_bounded() {
        let mut pack = segment(b"first");
        pack.extend(segment(b"second"));
        let mut r = SegmentReader::default();
        // Byte by byte: a segment comes out only once it is whole.
        let mut got = Vec::new();
        for b in &pack {
            r.push(std::slice::from_ref(b));
            while let Some(raw) = r.next_segment().unwrap() {
                got.push(raw);
            }
        }
        assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec()]);
        assert_eq!(r.consumed, pack.len() as u64);
        assert!(r.is_empty());
        // A bomb: a few KB that would decompress past the bound.
        let mut r = SegmentReader::default();
        r.push(&segment(&vec![0u8; MAX_SEGMENT + 1]));
        assert!(matches!(r.next_segment(), Err(SegmentError::Corrupt(_))));
        // A length no segment can have, refused before it is buffered.
        let mut r = SegmentReader::default();
        r.push(&u32::MAX.to_le_bytes());
        assert!(matches!(r.next_segment(), Err(SegmentError::TooLarge(_))));
        // Empty segments (zeros), which would otherwise never end.
        let mut r = SegmentReader::default();
        r.push(&[0u8; 64]);
        assert!(matches!(r.next_segment(), Err(SegmentError::Corrupt(_))));
        // Garbage of a plausible length.
        let mut r = SegmentReader::default();
        r.push(&[3, 0, 0, 0, 1, 2, 3]);
        assert!(matches!(r.next_segment(), Err(SegmentError::Corrupt(_))));
    }

    #[test]
    fn a_reused_buffer_holds_each_segment_exactly() {
        let big: Vec<u8> = (0..MAX_SEGMENT / 2).map(|i| (i * 7 % 251) as u8).collect();
        let small = b"a small segment".to_vec();
        // A frame that does not declare its size (a streaming encoder's).
        let undeclared = zstd::stream::encode_all(&big[..1000], 3).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&undeclared)
                .ok()
                .flatten(),
            None
        );
        let mut buf = Vec::new();
        for (z, want) in [
            (zstd::bulk::compress(&big, 3).unwrap(), &big[..]),
            (zstd::bulk::compress(&small, 3).unwrap(), &small[..]),
            (undeclared, &big[..1000]),
            (zstd::bulk::compress(&big, 3).unwrap(), &big[..]),
        ] {
            super::decompress_segment_into(&z, &mut buf).unwrap();
            assert_eq!(buf, want);
        }
        // A bomb is refused into a reused buffer too.
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_SEGMENT + 1], 3).unwrap();
        assert!(matches!(
            super::decompress_segment_into(&bomb, &mut buf),
            Err(SegmentError::Corrupt(_))
        ));
    }

    #[test]
    fn ranges() {
        assert_eq!(range(None, 10), Ok(None));
        assert_eq!(range(Some("bytes=2-"), 10), Ok(Some((2, 9))));
        assert_eq!(range(Some("bytes=2-4"), 10), Ok(Some((2, 4))));
        assert_eq!(range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(range(Some("bytes=2-40"), 10), Ok(Some((2, 9))));
        assert_eq!(range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(range(Some("bytes=5-2"), 10), Err(Unsatisfiable));
        assert_eq!(range(Some("items=1-2"), 10), Err(Unsatisfiable));
        assert_eq!(range(Some("bytes=0-1,4-5"), 10), Ok(None));
    }
}

#[cfg(test)]
mod order_tests {
    use std::collections::HashSet;

    use crate::store::disk::{Role, Writer};
    use crate::store::tree::{ChunkRef, Content, Entry, Tree, TreeName};
    use crate::store::{ChunkId, ObjectId, ObjectKind, Store, TreeId, VersionId};

    fn file(w: &Writer<'_>, parts: &[&[u8]]) -> Content {
        let chunks = parts
            .iter()
            .map(|p| ChunkRef {
                id: ChunkId::new(w.put(ObjectKind::Chunk, p).unwrap().id),
                len: p.len() as u32,
            })
            .collect();
        Content::File {
            executable: false,
            size: parts.iter().map(|p| p.len() as u64).sum(),
            chunks,
        }
    }

    fn dir(w: &Writer<'_>, entries: Vec<(&str, Content)>) -> Content {
        let tree = Tree::new(
            entries
                .into_iter()
                .map(|(n, content)| Entry {
                    name: TreeName::new(n.as_bytes().to_vec()).unwrap(),
                    content,
                })
                .collect(),
        )
        .unwrap();
        let id = TreeId::new(w.put(ObjectKind::Tree, &tree.encode()).unwrap().id);
        Content::Dir {
            tree: id,
            size: 0,
            files: 0,
        }
    }

    fn version(c: &Content) -> VersionId {
        let Content::Dir { tree, .. } = c else {
            unreachable!()
        };
        VersionId::from(*tree)
    }

    /// The materializer's walk, written recursively: each tree, then its
    /// entries in order; each object at its first place.
    fn walk(store: &Store, t: &TreeId, seen: &mut HashSet<ObjectId>, out: &mut Vec<ObjectId>) {
        if !seen.insert(t.object()) {
            return;
        }
        out.push(t.object());
        for e in store.tree(t).unwrap().entries() {
            match &e.content {
                Content::File { chunks, .. } => {
                    for c in chunks {
                        if seen.insert(c.id.object()) {
                            out.push(c.id.object());
                        }
                    }
                }
                Content::Dir { tree, .. } => walk(store, tree, seen, out),
                Content::Symlink { .. } => {}
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_whose_request_went_away_is_not_built_again_beside_it() {
        let dir_ = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir_.path(), Role::Deploy).unwrap();
        // 24 MiB that does not compress: its build takes a while.
        let v = {
            let w = store.writer().unwrap();
            let files: Vec<(String, Content)> = (1..=96)
                .map(|n| {
                    let c = crate::store::chunk::noise(256 << 10, n);
                    (format!("f{n}.php"), file(&w, &[&c]))
                })
                .collect();
            let v = version(&dir(
                &w,
                files.iter().map(|(n, c)| (n.as_str(), c.clone())).collect(),
            ));
            drop(w.commit().unwrap());
            v
        };
        let builds = super::Builds::default();
        // A request that goes away while its pack is being built (a fetch
        // a rollback cancelled), then another for the same pack at once.
        let gone = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            builds.build(store.clone(), None, v),
        )
        .await;
        assert!(gone.is_err(), "the build took under 20 ms: make it larger");
        let path = builds.build(store.clone(), None, v).await.unwrap();
        // The pack reads back whole: each segment decompresses, and its
        // frames are the version's objects, then the end.
        let bytes = std::fs::read(&path).unwrap();
        let mut segments = super::SegmentReader::default();
        segments.push(&bytes);
        let mut frames = crate::net::BatchDecoder::default();
        let mut ids = Vec::new();
        while let Some(raw) = segments.next_segment().unwrap() {
            frames.push(&raw);
            while let Some(f) = frames.next_frame().unwrap() {
                ids.push(f.id);
            }
        }
        assert!(segments.is_empty());
        frames.finish().unwrap();
        // In the walk's order, though its segments (24 of them) were
        // compressed several at once.
        let want: Vec<ObjectId> = super::objects(&store, None, &v)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, want);
        // Built again, the same bytes (its ETag is a promise of that).
        let again = tempfile::tempdir().unwrap();
        let copy = Store::open_or_init(again.path(), Role::Deploy).unwrap();
        {
            let w = copy.writer().unwrap();
            for id in &want {
                let kind = match store.tree(&TreeId::new(*id)) {
                    Ok(_) => ObjectKind::Tree,
                    Err(_) => ObjectKind::Chunk,
                };
                w.put(kind, &store.read(id, kind).unwrap()).unwrap();
            }
            drop(w.commit().unwrap());
        }
        assert_eq!(
            std::fs::read(super::build(&copy, None, &v).unwrap()).unwrap(),
            bytes
        );
        // No temp file left once the first build is done too.
        let packs = path.parent().unwrap().to_path_buf();
        let left = || {
            std::fs::read_dir(&packs)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .count()
        };
        let t = std::time::Instant::now();
        while left() > 0 && t.elapsed().as_secs() < 30 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(left(), 0);
    }

    /// Sets `p`'s mtime `secs` seconds back.
    fn backdate(p: &std::path::Path, secs: u64) {
        let then = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(then)
            .unwrap();
    }

    #[test]
    fn packs_ahead_come_from_the_parent_then_what_hosts_last_moved_to() {
        let dir_ = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir_.path(), Role::Deploy).unwrap();
        let w = store.writer().unwrap();
        let v: Vec<VersionId> = (0..5u8)
            .map(|i| version(&dir(&w, vec![("a.php", file(&w, &[&[i]]))])))
            .collect();
        let sub = version(&dir(&w, vec![("b.php", file(&w, &[b"sub"]))]));
        drop(w.commit().unwrap());
        for (i, version) in v.iter().enumerate() {
            store
                .write_record(&crate::store::disk::VersionRecord::bare(*version, i as u64))
                .unwrap();
        }
        // A pack to a tree nobody recorded (a subdirectory, asked for by
        // anyone) never feeds the packs built ahead.
        super::build(&store, None, &sub).unwrap();
        // Packs already in the store: what hosts moved to before this
        // process started, the newest file first (v[2], then v[1]).
        let older = super::build(&store, Some(&v[0]), &v[1]).unwrap();
        super::build(&store, None, &v[2]).unwrap();
        backdate(&older, 3600);
        std::fs::write(older.with_file_name("notes.txt"), b"not a pack").unwrap();
        let ahead = super::Ahead::new(&store, 2);
        assert_eq!(ahead.sources(&v[4], None), vec![v[2], v[1]]);
        // The parent first; never the version itself; at most the limit.
        assert_eq!(ahead.sources(&v[4], Some(v[3])), vec![v[3], v[2]]);
        assert_eq!(ahead.sources(&v[2], Some(v[2])), vec![v[1]]);
        assert_eq!(ahead.sources(&v[4], Some(v[2])), vec![v[2], v[1]]);
        // A pack served: its `to` goes first, and the oldest falls off.
        ahead.served(v[3]);
        assert_eq!(ahead.sources(&v[4], None), vec![v[3], v[2]]);
        ahead.served(v[2]);
        assert_eq!(ahead.sources(&v[4], None), vec![v[2], v[3]]);
        // 0: nothing is built ahead, whatever was served.
        let none = super::Ahead::new(&store, 0);
        none.served(v[3]);
        assert_eq!(none.sources(&v[4], Some(v[3])), Vec::<VersionId>::new());
    }

    #[test]
    fn gc_keeps_the_packs_of_kept_versions_and_sweeps_a_crashed_builds_temp_file() {
        let dir_ = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir_.path(), Role::Deploy).unwrap();
        let w = store.writer().unwrap();
        let v1 = version(&dir(&w, vec![("a.php", file(&w, &[b"one"]))]));
        let v2 = version(&dir(&w, vec![("a.php", file(&w, &[b"two"]))]));
        drop(w.commit().unwrap());
        let kept = super::build(&store, None, &v2).unwrap();
        let gone = super::build(&store, Some(&v1), &v2).unwrap();
        let packs = kept.parent().unwrap().to_path_buf();
        let old_temp = packs.join(format!(".{}.4242.0.tmp", super::name(None, &v2)));
        let new_temp = packs.join(format!(".{}.4243.0.tmp", super::name(None, &v2)));
        for t in [&old_temp, &new_temp] {
            std::fs::write(t, b"half a pack").unwrap();
        }
        backdate(&old_temp, 7200);
        let removed = super::retain(&store, &[v2]).unwrap();
        assert_eq!(removed, 2, "the pack from v1 and the old temp file");
        assert!(kept.exists(), "v2's pack from nothing is kept");
        assert!(!gone.exists(), "v1 is gone, and so is a delta from it");
        assert!(!old_temp.exists(), "a build's temp file unwritten for 2 h");
        assert!(
            new_temp.exists(),
            "a build's temp file may still be written"
        );
    }

    #[test]
    fn a_pack_comes_in_the_order_a_release_is_written() {
        let dir_ = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir_.path(), Role::Deploy).unwrap();
        let w = store.writer().unwrap();
        let shared = dir(&w, vec![("s.php", file(&w, &[b"shared"]))]);
        // A tree whose a/deep/y.php starts with `y`: two files share a
        // chunk, two directories a subtree.
        let version_with = |y: &[u8]| {
            version(&dir(
                &w,
                vec![
                    ("b.php", file(&w, &[b"b1", b"b2"])),
                    (
                        "a",
                        dir(
                            &w,
                            vec![
                                ("x.php", file(&w, &[b"x"])),
                                ("deep", dir(&w, vec![("y.php", file(&w, &[y, b"b2"]))])),
                                ("z.php", file(&w, &[b"z"])),
                            ],
                        ),
                    ),
                    ("c", shared.clone()),
                    ("d", shared.clone()),
                    (
                        "link",
                        Content::Symlink {
                            target: b"a/x.php".to_vec(),
                        },
                    ),
                ],
            ))
        };
        let v1 = version_with(b"y");
        // The session's own view: its objects are not committed.
        let store = w.store();
        // A fresh host's pack: the walk, each object once (a subtree at two
        // paths, a chunk in two files), every tree before what it lists.
        let list: Vec<ObjectId> = super::objects(store, None, &v1)
            .unwrap()
            .into_iter()
            .map(|(id, base)| {
                assert_eq!(base, None, "nothing to make a delta against");
                id
            })
            .collect();
        let mut want = Vec::new();
        walk(store, &v1.root(), &mut HashSet::new(), &mut want);
        assert_eq!(list, want);
        assert_eq!(list.len(), 10, "4 trees (the shared one once), 6 chunks");
        assert_eq!(list[0], v1.root().object());
        let at = |id: &ObjectId| list.iter().position(|x| x == id).unwrap();
        for id in &list {
            if let Ok(t) = store.tree(&TreeId::new(*id)) {
                for e in t.entries() {
                    let below: Vec<ObjectId> = match &e.content {
                        Content::File { chunks, .. } => {
                            chunks.iter().map(|c| c.id.object()).collect()
                        }
                        Content::Dir { tree, .. } => vec![tree.object()],
                        Content::Symlink { .. } => vec![],
                    };
                    for b in below {
                        assert!(at(&b) > at(id), "{b} comes after the tree listing it");
                    }
                }
            }
        }
        // A backport: only the changed path, deltas against what it
        // replaces, still tree before content.
        let v2 = version_with(b"y2");
        let list = super::objects(store, Some(&v1), &v2).unwrap();
        let kinds: Vec<bool> = list
            .iter()
            .map(|(id, _)| store.tree(&TreeId::new(*id)).is_ok())
            .collect();
        assert_eq!(
            kinds,
            [true, true, true, false],
            "root, a, deep, then y2: {list:?}"
        );
        assert!(list.iter().all(|(_, base)| base.is_some()), "{list:?}");
    }
}
