//! Pack files: many objects in one file, so a session that writes
//! thousands of objects (a cold build, a fresh host's fetch) creates one
//! file instead of one per object. File creation, not bytes, is what a
//! fresh host and a cold build spend their time on (BENCHMARKS.md).
//!
//! `STORE/objects/pack/<name>.pack` (format in store-format.md, "Pack files"):
//! a 16-byte header, the object files back to back exactly as loose
//! objects hold them, an index of 48-byte entries sorted by ID, and a
//! 48-byte footer with the index's offset, count and BLAKE3 hash. A pack is
//! written whole under a temp name and renamed in once durable, so it is in
//! the store entirely or not at all; it is never modified afterwards.
//! `<name>.dead` beside it lists trees gc found unreachable in a pack it
//! kept: those are not in the store (their children may be gone).
//!
//! A fresh host's fetch also stores the compressed **segments** of the
//! delta pack it receives as they came (pack format 2): an entry then
//! names a segment and where the object file is in its content, and a
//! read decompresses that segment (the last few are kept, so reading a
//! pack in its order decompresses each once). The bytes a host receives
//! are written once, compressed; gc rewrites such a pack (flagged
//! [`FLAG_RAW`]) as a format 1 pack after the switch.
//!
//! Everything read from a pack is checked before use: the footer's bounds,
//! the index's hash, order and bounds (each entry inside the body, or
//! inside its segment's declared content), the segment table's bounds,
//! each segment's content length when decompressed, and each object, as
//! every object, against its ID when decoded.
//!
//! In memory a loaded pack keeps the first 8 bytes of each ID (8 bytes an
//! object: 2 MB for a 263k-file tree); a lookup confirms the whole ID by
//! reading its index entry.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use super::staged::Staged;
use super::{IoContext, Result, StoreError};
use crate::store::id::ObjectId;

pub const PACK_MAGIC: &[u8; 8] = b"SCAPPACK";
/// Newest pack format this scap reads (in each pack's header). A pack
/// without segments is written as format 1, which older scaps read too.
pub const PACK_FORMAT: u32 = 2;
const PACK_FORMAT_PLAIN: u32 = 1;
pub const PACK_HEADER_LEN: u64 = 16;
/// Header flag (the u32 at offset 12): the pack holds objects stored
/// uncompressed as they arrived, for speed (a fresh host's fetch), that gc
/// compresses into a new pack. Readers ignore flags they do not know.
pub const FLAG_RAW: u32 = 1;
pub const ENTRY_LEN: usize = 48;
pub const FOOTER_LEN: u64 = 48;
/// Format 2's footer: format 1's, then the segment table's length.
const FOOTER_LEN_SEGMENTS: u64 = 56;
const SEGMENT_ENTRY_LEN: usize = 16;
/// Most content one segment may hold (a delta pack's are at most
/// `net::pack::MAX_SEGMENT`).
pub const MAX_SEGMENT_CONTENT: u32 = 8 << 20;
/// Decompressed segments a pack keeps: a reader going through a pack in
/// its order (gc's rewrite, a release written as the pack arrives, which
/// the fetch keeps within two segments of: `host::fetch::AHEAD`)
/// decompresses each once.
pub const SEGMENTS_KEPT: usize = 6;
/// Largest object file a pack may hold (a chunk is at most 4 MiB before
/// compression, a tree at most 64 MiB).
const MAX_OBJECT_FILE: u64 = 80 << 20;
/// A directory changed this recently may change again within the same
/// tick of the kernel's file clock, unseen by an mtime comparison: until
/// it is older, every miss rescans it.
const RACY: Duration = Duration::from_millis(100);

fn bad(path: &Path, why: impl Into<String>) -> StoreError {
    StoreError::BadRecord {
        path: path.to_path_buf(),
        why: format!(
            "{}: run `scap verify`; a damaged pack can be removed and its versions re-fetched or rebuilt",
            why.into()
        ),
    }
}

fn prefix(id: &ObjectId) -> u64 {
    u64::from_be_bytes(id.as_bytes()[..8].try_into().expect("IDs are 32 bytes"))
}

/// Where one object is in its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// In the file, or (`seg` > 0) in the segment's content.
    pub offset: u64,
    pub len: u32,
    /// 0: the object file is in the pack file itself; n: it is in the
    /// content of segment n (1-based) of the segment table.
    pub seg: u32,
}

/// One entry of a pack's segment table: a zstd frame in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    zlen: u32,
    /// Its content's length, which it must decompress to.
    len: u32,
}

/// The table entry of the segment `slot` is in (`None`: in the file).
fn segment_of(segments: &[Segment], slot: Slot, path: &Path) -> Result<Option<Segment>> {
    match slot.seg {
        0 => Ok(None),
        n => segments
            .get(n as usize - 1)
            .copied()
            .map(Some)
            .ok_or_else(|| bad(path, format!("no segment {n}"))),
    }
}

/// A pack's file, for reading objects, with the segments decompressed
/// last.
#[derive(Debug)]
struct Body {
    file: File,
    path: PathBuf,
    /// The last segments decompressed.
    kept: Mutex<VecDeque<Kept>>,
    /// The highest segment an object was read from: how far the readers
    /// of a pack being written are ([`PackWriter::segments_unread`]).
    read_upto: AtomicU32,
    /// A pack being written: its end, not all in the file yet
    /// ([`Staged`]). `None` for a pack opened to be read.
    staged: Option<Mutex<Staged>>,
}

/// A segment's content, decompressed.
#[derive(Debug)]
struct Kept {
    n: u32,
    content: Arc<Vec<u8>>,
    /// The content a receiver stored ([`PackWriter::append_segment`]),
    /// whose objects were verified from these very bytes before any was
    /// indexed (`host::fetch`); not a segment read back from the file.
    received: bool,
}

impl Body {
    fn new(file: File, path: PathBuf, staged: Option<Staged>) -> Body {
        Body {
            file,
            path,
            kept: Mutex::new(VecDeque::new()),
            read_upto: AtomicU32::new(0),
            staged: staged.map(Mutex::new),
        }
    }

    /// Reads `buf.len()` bytes at `offset`: from the file, or, of a pack
    /// being written, partly from its staged end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(staged) = &self.staged {
            let staged = staged.lock().expect("not poisoned");
            if offset.saturating_add(buf.len() as u64) > staged.at() {
                return staged.read_at(&self.file, &self.path, buf, offset);
            }
        }
        self.file.read_exact_at(buf, offset).at(&self.path)
    }

    /// The staged end of a pack being written.
    fn staged(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.staged
            .as_ref()
            .expect("a pack being written has a staged end")
            .lock()
            .expect("not poisoned")
    }

    /// The object file at `slot`; `seg` is its segment's table entry.
    /// True with it when it comes from a segment as its receiver stored
    /// it (verified: see [`Kept::received`]).
    fn read(&self, slot: Slot, seg: Option<Segment>) -> Result<(FileBytes, bool)> {
        let Some(seg) = seg else {
            let mut buf = vec![0u8; slot.len as usize];
            self.read_exact_at(&mut buf, slot.offset)?;
            return Ok((FileBytes::Own(buf), false));
        };
        let (content, received) = self.segment(slot.seg, seg)?;
        self.read_upto.fetch_max(slot.seg, Ordering::Relaxed);
        let range = usize::try_from(slot.offset)
            .ok()
            .and_then(|o| Some(o..o.checked_add(slot.len as usize)?))
            .filter(|r| r.end <= content.len())
            .ok_or_else(|| bad(&self.path, format!("an object out of segment {}", slot.seg)))?;
        Ok((FileBytes::InSegment(content, range), received))
    }

    /// Segment `n`'s content: kept (and whether as received), or read and
    /// decompressed (bounded by its declared length, which it must have).
    fn segment(&self, n: u32, seg: Segment) -> Result<(Arc<Vec<u8>>, bool)> {
        if let Some(hit) = self.kept(n) {
            return Ok(hit);
        }
        let mut z = vec![0u8; seg.zlen as usize];
        self.read_exact_at(&mut z, seg.offset)?;
        let content = zstd::bulk::decompress(&z, seg.len as usize)
            .map_err(|e| bad(&self.path, format!("segment {n} does not decompress: {e}")))?;
        if content.len() != seg.len as usize {
            return Err(bad(
                &self.path,
                format!(
                    "segment {n} decompresses to {} bytes, not the {} its table says",
                    content.len(),
                    seg.len
                ),
            ));
        }
        let content = Arc::new(content);
        self.keep(n, content.clone(), false);
        Ok((content, false))
    }

    fn kept(&self, n: u32) -> Option<(Arc<Vec<u8>>, bool)> {
        let kept = self.kept.lock().expect("not poisoned");
        kept.iter()
            .find(|k| k.n == n)
            .map(|k| (k.content.clone(), k.received))
    }

    fn keep(&self, n: u32, content: Arc<Vec<u8>>, received: bool) {
        let mut kept = self.kept.lock().expect("not poisoned");
        if kept.iter().any(|k| k.n == n) {
            return;
        }
        if kept.len() == SEGMENTS_KEPT {
            kept.pop_front();
        }
        kept.push_back(Kept {
            n,
            content,
            received,
        });
    }
}

/// Where an object of a pack being written is: read it without holding
/// the writer ([`PackWriter::locate`]).
pub struct Located {
    body: Arc<Body>,
    slot: Slot,
    seg: Option<Segment>,
}

impl Located {
    /// The object file, as stored.
    pub fn read(&self) -> Result<Vec<u8>> {
        self.body
            .read(self.slot, self.seg)
            .map(|(file, _)| file.into_vec())
    }

    /// The object file, and whether it was verified against its ID from
    /// these very bytes: read from a segment its receiver stored, kept in
    /// memory since (never one read back from the file). An object of a
    /// segment is not copied out of it.
    pub fn read_verified(&self) -> Result<(FileBytes, bool)> {
        self.body.read(self.slot, self.seg)
    }
}

/// An object file's bytes: its own, or its place in a segment's content
/// held in memory (shared, not copied).
pub enum FileBytes {
    Own(Vec<u8>),
    InSegment(Arc<Vec<u8>>, std::ops::Range<usize>),
}

impl FileBytes {
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            FileBytes::Own(v) => v,
            FileBytes::InSegment(content, range) => content[range].to_vec(),
        }
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Own(v) => v,
            FileBytes::InSegment(content, range) => &content[range.clone()],
        }
    }
}

/// A segment of a delta pack as it arrived (`net::pack`): its zstd frame
/// and its content, which a receiver stores as they came
/// ([`super::Writer::put_in_segment`]).
pub struct Arriving {
    pub compressed: Vec<u8>,
    pub content: Arc<Vec<u8>>,
    /// Its number in the session's pack once stored there.
    pub(super) stored: Mutex<Option<u32>>,
}

impl Arriving {
    pub fn new(compressed: Vec<u8>, content: Arc<Vec<u8>>) -> Arriving {
        Arriving {
            compressed,
            content,
            stored: Mutex::new(None),
        }
    }
}

/// One pack file, open and indexed.
#[derive(Debug)]
pub struct Pack {
    path: PathBuf,
    /// Shared with the copy [`Pack::with_dead`] makes when gc changes the
    /// dead list: the index is read and hashed once per pack, not per gc.
    body: Arc<Body>,
    prefixes: Arc<Vec<u64>>,
    index_offset: u64,
    /// The segment table (format 2; empty for format 1).
    segments: Arc<Vec<Segment>>,
    /// The header's flags ([`FLAG_RAW`]).
    flags: u32,
    /// Trees listed in `<name>.dead`, sorted: not in the store.
    dead: Vec<ObjectId>,
}

impl Pack {
    /// Opens and checks a pack: footer bounds, index hash, order, bounds,
    /// and the segment table's bounds.
    pub fn open(path: &Path) -> Result<Pack> {
        let file = File::open(path).at(path)?;
        let len = file.metadata().at(path)?.len();
        if len < PACK_HEADER_LEN + FOOTER_LEN {
            return Err(bad(path, format!("{len} bytes: too short for a pack")));
        }
        let mut header = [0u8; PACK_HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0).at(path)?;
        if &header[..8] != PACK_MAGIC {
            return Err(bad(path, "not a scap pack (bad magic)"));
        }
        let format = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
        if format > PACK_FORMAT {
            return Err(bad(
                path,
                format!(
                    "pack format v{format}, this scap reads up to v{PACK_FORMAT}: upgrade scap"
                ),
            ));
        }
        let footer_len = match format {
            2 => FOOTER_LEN_SEGMENTS,
            _ => FOOTER_LEN,
        };
        if len < PACK_HEADER_LEN + footer_len {
            return Err(bad(path, format!("{len} bytes: too short for a pack")));
        }
        let mut footer = vec![0u8; footer_len as usize];
        file.read_exact_at(&mut footer, len - footer_len).at(path)?;
        let index_offset = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(footer[8..16].try_into().expect("8 bytes"));
        let want_hash: [u8; 32] = footer[16..48].try_into().expect("32 bytes");
        let nseg = match format {
            2 => u64::from_le_bytes(footer[48..56].try_into().expect("8 bytes")),
            _ => 0,
        };
        let table_offset = count
            .checked_mul(ENTRY_LEN as u64)
            .and_then(|l| index_offset.checked_add(l));
        table_offset
            .zip(nseg.checked_mul(SEGMENT_ENTRY_LEN as u64))
            .and_then(|(t, l)| t.checked_add(l)?.checked_add(footer_len))
            .filter(|end| index_offset >= PACK_HEADER_LEN && *end == len)
            .ok_or_else(|| bad(path, "footer does not match the file's length"))?;
        let table_offset = table_offset.expect("checked above");
        // The segment table (small: one entry per ~1 MiB of content).
        let mut table = vec![0u8; nseg as usize * SEGMENT_ENTRY_LEN];
        file.read_exact_at(&mut table, table_offset).at(path)?;
        let max_z = zstd::zstd_safe::compress_bound(MAX_SEGMENT_CONTENT as usize) as u64;
        let mut segments = Vec::with_capacity(nseg as usize);
        for (i, e) in table.chunks_exact(SEGMENT_ENTRY_LEN).enumerate() {
            let seg = Segment {
                offset: u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                zlen: u32::from_le_bytes(e[8..12].try_into().expect("4 bytes")),
                len: u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")),
            };
            if seg.offset < PACK_HEADER_LEN
                || seg.zlen == 0
                || u64::from(seg.zlen) > max_z
                || seg.len == 0
                || seg.len > MAX_SEGMENT_CONTENT
                || seg
                    .offset
                    .checked_add(u64::from(seg.zlen))
                    .is_none_or(|end| end > index_offset)
            {
                return Err(bad(path, format!("segment {} out of bounds", i + 1)));
            }
            segments.push(seg);
        }
        // Stream the index: hash it, check it, keep the prefixes.
        let mut prefixes = Vec::with_capacity(count as usize);
        let mut hasher = blake3::Hasher::new();
        let mut last: Option<[u8; 32]> = None;
        for_each_block(&file, path, index_offset, count, |block| {
            hasher.update(block);
            for e in block.chunks_exact(ENTRY_LEN) {
                let (id, slot) = decode_entry(e);
                if last.is_some_and(|l| l >= *id.as_bytes()) {
                    return Err(bad(path, "index not sorted by ID"));
                }
                let end = slot.offset.checked_add(u64::from(slot.len));
                let inside = match slot.seg {
                    0 => slot.offset >= PACK_HEADER_LEN && end.is_some_and(|e| e <= index_offset),
                    n => segments
                        .get(n as usize - 1)
                        .is_some_and(|s| end.is_some_and(|e| e <= u64::from(s.len))),
                };
                if !inside || u64::from(slot.len) > MAX_OBJECT_FILE {
                    return Err(bad(path, format!("index entry for {id} out of bounds")));
                }
                last = Some(*id.as_bytes());
                prefixes.push(prefix(&id));
            }
            Ok(())
        })?;
        hasher.update(&table);
        if *hasher.finalize().as_bytes() != want_hash {
            return Err(bad(path, "index hash mismatch"));
        }
        let dead = read_dead(&dead_path(path))?;
        Ok(Pack {
            path: path.to_path_buf(),
            body: Arc::new(Body::new(file, path.to_path_buf(), None)),
            prefixes: Arc::new(prefixes),
            index_offset,
            segments: Arc::new(segments),
            flags,
            dead,
        })
    }

    /// This pack with another dead list (gc changed it on disk).
    fn with_dead(&self, dead: Vec<ObjectId>) -> Pack {
        Pack {
            path: self.path.clone(),
            body: self.body.clone(),
            prefixes: self.prefixes.clone(),
            index_offset: self.index_offset,
            segments: self.segments.clone(),
            flags: self.flags,
            dead,
        }
    }

    /// Whether it holds segments (format 2): reading an object means
    /// decompressing its segment, so a reader of many goes in
    /// [`Pack::order`].
    pub fn has_segments(&self) -> bool {
        !self.segments.is_empty()
    }

    /// Whether it holds objects stored uncompressed for gc to compress
    /// ([`FLAG_RAW`]).
    pub fn holds_raw(&self) -> bool {
        self.flags & FLAG_RAW != 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// Index entry `i` (in ID order).
    pub fn entry(&self, i: usize) -> Result<(ObjectId, Slot)> {
        let mut e = [0u8; ENTRY_LEN];
        self.body
            .file
            .read_exact_at(&mut e, self.index_offset + (i * ENTRY_LEN) as u64)
            .at(&self.path)?;
        Ok(decode_entry(&e))
    }

    /// Where `id` is in this pack, if it is (and not listed dead).
    pub fn find(&self, id: &ObjectId) -> Result<Option<Slot>> {
        let p = prefix(id);
        let mut i = self.prefixes.partition_point(|x| *x < p);
        while i < self.prefixes.len() && self.prefixes[i] == p {
            let (got, slot) = self.entry(i)?;
            if got == *id {
                if self.dead.binary_search(id).is_ok() {
                    return Ok(None);
                }
                return Ok(Some(slot));
            }
            i += 1;
        }
        Ok(None)
    }

    /// The object file at `slot`, as stored.
    pub fn read(&self, slot: Slot) -> Result<Vec<u8>> {
        self.read_shared(slot).map(FileBytes::into_vec)
    }

    /// [`Pack::read`], an object of a segment not copied out of it.
    pub fn read_shared(&self, slot: Slot) -> Result<FileBytes> {
        self.body
            .read(slot, segment_of(&self.segments, slot, &self.path)?)
            .map(|(file, _)| file)
    }

    /// The first bytes of the object file at `slot` (its header, for
    /// [`crate::store::object::peek`]).
    pub fn read_head(&self, slot: Slot) -> Result<Vec<u8>> {
        let head = crate::store::object::HEADER_LEN as u32;
        if slot.seg != 0 {
            let mut file = self.read(slot)?;
            file.truncate(head as usize);
            return Ok(file);
        }
        self.read(Slot {
            len: slot.len.min(head),
            ..slot
        })
    }

    /// The positions of the index entries `keep` accepts, in the order a
    /// reader of their objects should go: the pack's own (by segment and
    /// place in it) for a pack with segments, so each segment is
    /// decompressed once; ID order otherwise. 16 bytes an entry, for
    /// [`Pack::entry`].
    pub fn order(&self, mut keep: impl FnMut(&ObjectId, Slot) -> bool) -> Result<Vec<u32>> {
        let mut at: Vec<(u32, u64, u32)> = Vec::new();
        let mut i = 0u32;
        self.for_each_entry(|id, slot| {
            if keep(&id, slot) {
                at.push((slot.seg, slot.offset, i));
            }
            i += 1;
            Ok(())
        })?;
        if self.has_segments() {
            at.sort_unstable();
        }
        Ok(at.into_iter().map(|(_, _, i)| i).collect())
    }

    /// Every entry, in ID order, dead ones included.
    pub fn for_each_entry(&self, mut f: impl FnMut(ObjectId, Slot) -> Result<()>) -> Result<()> {
        let count = self.prefixes.len() as u64;
        for_each_block(
            &self.body.file,
            &self.path,
            self.index_offset,
            count,
            |block| {
                for e in block.chunks_exact(ENTRY_LEN) {
                    let (id, slot) = decode_entry(e);
                    f(id, slot)?;
                }
                Ok(())
            },
        )
    }

    pub fn is_dead(&self, id: &ObjectId) -> bool {
        self.dead.binary_search(id).is_ok()
    }

    /// Bytes of object files and segments in the pack.
    pub fn body_len(&self) -> u64 {
        self.index_offset - PACK_HEADER_LEN
    }
}

/// Calls `f` with the `count` index entries of `file` (at `path`) from
/// offset `at`, a block of up to 4096 at a time.
fn for_each_block(
    file: &File,
    path: &Path,
    at: u64,
    count: u64,
    mut f: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; ENTRY_LEN * 4096];
    let (mut at, mut left) = (at, count * ENTRY_LEN as u64);
    while left > 0 {
        let n = (left as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at).at(path)?;
        f(&buf[..n])?;
        at += n as u64;
        left -= n as u64;
    }
    Ok(())
}

fn decode_entry(e: &[u8]) -> (ObjectId, Slot) {
    let id = ObjectId::from_bytes(e[..32].try_into().expect("32 bytes"));
    let offset = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(e[40..44].try_into().expect("4 bytes"));
    let seg = u32::from_le_bytes(e[44..48].try_into().expect("4 bytes"));
    (id, Slot { offset, len, seg })
}

fn encode_entry(id: &ObjectId, slot: Slot) -> [u8; ENTRY_LEN] {
    let mut e = [0u8; ENTRY_LEN];
    e[..32].copy_from_slice(id.as_bytes());
    e[32..40].copy_from_slice(&slot.offset.to_le_bytes());
    e[40..44].copy_from_slice(&slot.len.to_le_bytes());
    e[44..48].copy_from_slice(&slot.seg.to_le_bytes());
    e
}

pub fn dead_path(pack: &Path) -> PathBuf {
    pack.with_extension("dead")
}

/// `<name>.dead`: 32-byte IDs back to back, sorted, then their BLAKE3.
fn read_dead(path: &Path) -> Result<Vec<ObjectId>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).at(path),
    };
    if bytes.len() < 32 || (bytes.len() - 32) % 32 != 0 {
        return Err(bad(path, "not a list of IDs"));
    }
    let (ids, hash) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(ids).as_bytes() != hash {
        return Err(bad(path, "hash mismatch"));
    }
    let mut out: Vec<ObjectId> = ids
        .chunks_exact(32)
        .map(|c| ObjectId::from_bytes(c.try_into().expect("32 bytes")))
        .collect();
    out.sort();
    Ok(out)
}

/// Writes `<name>.dead` for `pack` atomically and durably.
pub fn write_dead(pack: &Path, mut dead: Vec<ObjectId>) -> Result<()> {
    dead.sort();
    dead.dedup();
    let mut bytes: Vec<u8> = dead.iter().flat_map(|id| *id.as_bytes()).collect();
    let hash = *blake3::hash(&bytes).as_bytes();
    bytes.extend_from_slice(&hash);
    crate::store::fsutil::atomic_write(&dead_path(pack), &bytes)
}

/// A pack being written: objects appended to a temp file, then sealed.
#[derive(Debug)]
pub struct PackWriter {
    /// The temp file (`body.path`), shared with readers of what it holds;
    /// its end is staged ([`Body::staged`]).
    body: Arc<Body>,
    index: PendingIndex,
    /// Segments stored as they arrived ([`PackWriter::append_segment`]).
    segments: Vec<Segment>,
    flags: u32,
}

/// What a pack being written holds, in about 12 bytes an object (a hash
/// map of whole IDs took ~100 bytes, 26 MB at 263k files): each entry, in
/// its final 48-byte form, goes to a side file (`.idx.<session>.tmp`) in
/// write order; memory keeps the first 8 bytes of each ID with the
/// entry's position there, sorted, plus an unsorted tail folded in as it
/// grows. A lookup confirms the whole ID by reading the entry.
///
/// A writer whose objects come in ascending ID order (a repack copies a
/// pack's objects in its index's order) keeps nothing in memory: the side
/// file is the index, in order, and a lookup is a binary search of it.
#[derive(Debug)]
struct PendingIndex {
    side: File,
    side_path: PathBuf,
    n: u32,
    prefixes: Vec<u64>,
    positions: Vec<u32>,
    tail: HashMap<u64, u32>,
    /// `Some` for a writer made by [`PackWriter::create_in_order`]: the
    /// last ID appended.
    in_order: Option<Option<ObjectId>>,
}

impl PendingIndex {
    fn create(side_path: PathBuf) -> Result<PendingIndex> {
        let side = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&side_path)
            .at(&side_path)?;
        Ok(PendingIndex {
            side,
            side_path,
            n: 0,
            prefixes: Vec::new(),
            positions: Vec::new(),
            tail: HashMap::new(),
            in_order: None,
        })
    }

    fn entry(&self, pos: u32) -> Result<[u8; ENTRY_LEN]> {
        let mut e = [0u8; ENTRY_LEN];
        self.side
            .read_exact_at(&mut e, u64::from(pos) * ENTRY_LEN as u64)
            .at(&self.side_path)?;
        Ok(e)
    }

    fn find(&self, id: &ObjectId) -> Result<Option<Slot>> {
        if self.in_order.is_some() {
            return self.search(id);
        }
        let p = prefix(id);
        let check = |pos: u32| -> Result<Option<Slot>> {
            let e = self.entry(pos)?;
            let (got, slot) = decode_entry(&e);
            Ok((got == *id).then_some(slot))
        };
        if let Some(&pos) = self.tail.get(&p)
            && let Some(slot) = check(pos)?
        {
            return Ok(Some(slot));
        }
        let mut i = self.prefixes.partition_point(|x| *x < p);
        while i < self.prefixes.len() && self.prefixes[i] == p {
            if let Some(slot) = check(self.positions[i])? {
                return Ok(Some(slot));
            }
            i += 1;
        }
        Ok(None)
    }

    /// Whether an object being appended is held already. A writer in ID
    /// order knows without reading anything for an ID at or past its last
    /// one (a repack's every append); below it, it searches.
    fn holds(&self, id: &ObjectId) -> Result<bool> {
        match self.in_order {
            Some(None) => Ok(false),
            Some(Some(last)) if *id > last => Ok(false),
            Some(Some(last)) if *id == last => Ok(true),
            _ => Ok(self.find(id)?.is_some()),
        }
    }

    /// Binary search of the side file, for a writer in ID order.
    fn search(&self, id: &ObjectId) -> Result<Option<Slot>> {
        let (mut lo, mut hi) = (0, self.n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (got, slot) = decode_entry(&self.entry(mid)?);
            match got.cmp(id) {
                std::cmp::Ordering::Equal => return Ok(Some(slot)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    fn insert(&mut self, id: &ObjectId, slot: Slot) -> Result<()> {
        if let Some(last) = &mut self.in_order {
            if last.is_some_and(|l| l >= *id) {
                return Err(bad(
                    &self.side_path,
                    format!("object {id} appended out of ID order (a bug in scap)"),
                ));
            }
            *last = Some(*id);
        }
        let e = encode_entry(id, slot);
        let pos = self.n;
        self.side
            .write_all_at(&e, u64::from(pos) * ENTRY_LEN as u64)
            .at(&self.side_path)?;
        self.n += 1;
        if self.in_order.is_some() {
            return Ok(());
        }
        let p = prefix(id);
        match self.tail.entry(p) {
            std::collections::hash_map::Entry::Occupied(_) => {
                // Two IDs with the same first 8 bytes: the tail holds one
                // per prefix, so this one goes straight into the sorted part.
                let i = self.prefixes.partition_point(|x| *x <= p);
                self.prefixes.insert(i, p);
                self.positions.insert(i, pos);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(pos);
            }
        }
        if self.tail.len() > (self.prefixes.len() / 4).max(4096) {
            self.fold();
        }
        Ok(())
    }

    /// Merges the tail into the sorted part.
    fn fold(&mut self) {
        if self.tail.is_empty() {
            return;
        }
        let mut tail: Vec<(u64, u32)> = self.tail.drain().collect();
        tail.sort_unstable();
        self.tail.shrink_to(4096);
        let total = self.prefixes.len() + tail.len();
        let mut prefixes = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let (mut a, mut b) = (0, 0);
        while a < self.prefixes.len() || b < tail.len() {
            let take_old =
                b == tail.len() || (a < self.prefixes.len() && self.prefixes[a] <= tail[b].0);
            if take_old {
                prefixes.push(self.prefixes[a]);
                positions.push(self.positions[a]);
                a += 1;
            } else {
                prefixes.push(tail[b].0);
                positions.push(tail[b].1);
                b += 1;
            }
        }
        self.prefixes = prefixes;
        self.positions = positions;
    }
}

impl PackWriter {
    /// Creates `tmp`, `.pack.<name>.tmp` (a name recovery recognises as
    /// this session's), and its side index `.idx.<name>.tmp`.
    pub fn create(tmp: PathBuf) -> Result<PackWriter> {
        if let Some(dir) = tmp.parent() {
            fs::create_dir_all(dir).at(dir)?;
        }
        let name = tmp.file_name().unwrap_or_default().to_string_lossy();
        let side_path = tmp.with_file_name(name.replacen(".pack.", ".idx.", 1));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .at(&tmp)?;
        let mut header = [0u8; PACK_HEADER_LEN as usize];
        header[..8].copy_from_slice(PACK_MAGIC);
        header[8..12].copy_from_slice(&PACK_FORMAT_PLAIN.to_le_bytes());
        let mut staged = Staged::new();
        let index = staged
            .append(&file, &tmp, &header)
            .and_then(|()| PendingIndex::create(side_path));
        let index = match index {
            Ok(i) => i,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        Ok(PackWriter {
            body: Arc::new(Body::new(file, tmp, Some(staged))),
            index,
            segments: Vec::new(),
            flags: 0,
        })
    }

    /// Writes the pack's body with direct I/O, past the page cache, where
    /// the filesystem allows it: an app server's store, whose objects the
    /// release already holds as files, so that what it receives is not
    /// copied into new page-cache pages ([`Staged::bypass_cache`]).
    pub fn bypass_cache(&mut self) {
        self.body.staged().bypass_cache(&self.body.path);
    }

    /// The offset after the last byte appended.
    fn end(&self) -> u64 {
        self.body.staged().end()
    }

    /// A writer for objects appended in strictly ascending ID order (a
    /// repack copying another pack's objects in its index's order): it
    /// holds no index in memory, where [`PackWriter::create`]'s takes about
    /// 12 bytes an object, and twice that while it folds. An append out of
    /// order is an error.
    pub fn create_in_order(tmp: PathBuf) -> Result<PackWriter> {
        let mut w = PackWriter::create(tmp)?;
        w.index.in_order = Some(None);
        Ok(w)
    }

    /// Whether the pack holds `id`. An unreadable side file counts as no
    /// (the object is written again, harmlessly).
    pub fn contains(&self, id: &ObjectId) -> bool {
        matches!(self.index.find(id), Ok(Some(_)))
    }

    pub fn len(&self) -> usize {
        self.index.n as usize
    }

    pub fn is_empty(&self) -> bool {
        self.index.n == 0
    }

    /// Appends one object file (unless the pack has it).
    pub fn append(&mut self, id: ObjectId, file: &[u8]) -> Result<()> {
        if self.index.holds(&id)? {
            return Ok(());
        }
        let len = self.object_len(&id, file.len())?;
        let offset = self.push(file)?;
        let slot = Slot {
            offset,
            len,
            seg: 0,
        };
        // Not indexed (out of order, or the side file's write failed): not
        // in the pack either.
        self.index.insert(&id, slot).or_else(|e| {
            self.body
                .staged()
                .set_end(&self.body.file, &self.body.path, offset)?;
            Err(e)
        })
    }

    /// Appends `bytes` to the body; returns where they start. A short
    /// write (a full disk) leaves the end where it was; the next append
    /// overwrites the torn bytes.
    fn push(&mut self, bytes: &[u8]) -> Result<u64> {
        let mut staged = self.body.staged();
        let offset = staged.end();
        staged.append(&self.body.file, &self.body.path, bytes)?;
        Ok(offset)
    }

    /// Checks an object file's length, and that the pack has room for
    /// one more entry.
    fn object_len(&self, id: &ObjectId, len: usize) -> Result<u32> {
        if self.index.n == u32::MAX {
            return Err(bad(&self.body.path, "more objects than one pack holds"));
        }
        u32::try_from(len)
            .ok()
            .filter(|l| u64::from(*l) <= MAX_OBJECT_FILE)
            .ok_or_else(|| bad(&self.body.path, format!("object {id} too large for a pack")))
    }

    /// Appends a segment as it arrived (its zstd frame; `content` what it
    /// decompressed to, kept for readers of the objects in it). Returns
    /// its number, for [`PackWriter::append_in_segment`].
    pub fn append_segment(&mut self, compressed: &[u8], content: Arc<Vec<u8>>) -> Result<u32> {
        let max_z = zstd::zstd_safe::compress_bound(MAX_SEGMENT_CONTENT as usize);
        let len = u32::try_from(content.len())
            .ok()
            .filter(|l| *l > 0 && *l <= MAX_SEGMENT_CONTENT);
        let (Some(len), true) = (len, !compressed.is_empty() && compressed.len() <= max_z) else {
            return Err(bad(
                &self.body.path,
                format!(
                    "a segment of {} bytes ({} compressed) does not fit a pack",
                    content.len(),
                    compressed.len()
                ),
            ));
        };
        let n = u32::try_from(self.segments.len() + 1)
            .map_err(|_| bad(&self.body.path, "more segments than one pack holds"))?;
        let offset = self.push(compressed)?;
        self.segments.push(Segment {
            offset,
            zlen: compressed.len() as u32,
            len,
        });
        self.body.keep(n, content, true);
        Ok(n)
    }

    /// Segments stored after the highest one an object was read from (by
    /// a release written while they arrive).
    pub fn segments_unread(&self) -> usize {
        let read = self.body.read_upto.load(Ordering::Relaxed) as usize;
        self.segments.len().saturating_sub(read)
    }

    /// Adds object `id`, whose file is `len` bytes at `offset` in the
    /// content of segment `seg` (unless the pack has it). The caller has
    /// verified the object from those very bytes of the content it gave
    /// [`PackWriter::append_segment`]: a read of it while that content is
    /// kept is not hashed again ([`Kept::received`]).
    pub fn append_in_segment(
        &mut self,
        id: ObjectId,
        seg: u32,
        offset: u32,
        len: usize,
    ) -> Result<()> {
        if self.index.holds(&id)? {
            return Ok(());
        }
        let len = self.object_len(&id, len)?;
        let inside = seg
            .checked_sub(1)
            .and_then(|i| self.segments.get(i as usize))
            .is_some_and(|s| u64::from(offset) + u64::from(len) <= u64::from(s.len));
        if !inside {
            return Err(bad(
                &self.body.path,
                format!("object {id} is not inside segment {seg} (a bug in scap)"),
            ));
        }
        self.index.insert(
            &id,
            Slot {
                offset: u64::from(offset),
                len,
                seg,
            },
        )
    }

    /// Where an object this writer holds is, to be read without holding
    /// the writer (a lock around it, while the fetch appends).
    pub fn locate(&self, id: &ObjectId) -> Result<Option<Located>> {
        let Some(slot) = self.index.find(id)? else {
            return Ok(None);
        };
        let seg = segment_of(&self.segments, slot, &self.body.path)?;
        Ok(Some(Located {
            body: self.body.clone(),
            slot,
            seg,
        }))
    }

    /// An object this writer holds, as stored.
    pub fn read(&self, id: &ObjectId) -> Result<Option<Vec<u8>>> {
        self.locate(id)?.map(|at| at.read()).transpose()
    }

    /// The IDs of the objects written, in write order (for a session
    /// small enough to keep them loose).
    pub fn ids(&self) -> Result<Vec<ObjectId>> {
        (0..self.index.n)
            .map(|pos| Ok(decode_entry(&self.index.entry(pos)?).0))
            .collect()
    }

    /// Bytes of object files and segments written so far.
    pub fn body_len(&self) -> u64 {
        self.end() - PACK_HEADER_LEN
    }

    /// Flags the pack [`FLAG_RAW`] when it is sealed.
    pub fn mark_raw(&mut self) {
        self.flags |= FLAG_RAW;
    }

    /// Whether [`PackWriter::mark_raw`] was called.
    pub fn is_raw(&self) -> bool {
        self.flags & FLAG_RAW != 0
    }

    /// The temp file's path.
    pub fn path(&self) -> &Path {
        &self.body.path
    }

    /// The footer's length: format 2's when the pack holds segments.
    fn footer_len(&self) -> u64 {
        match self.segments.is_empty() {
            true => FOOTER_LEN,
            false => FOOTER_LEN_SEGMENTS,
        }
    }

    /// Writes the index, the segment table and the footer. The caller
    /// makes the file durable (`syncfs`, or [`File::sync_all`]) before
    /// [`PackWriter::publish`].
    pub fn seal(&mut self) -> Result<()> {
        self.index.fold();
        let tmp = &self.body.path;
        let index_offset = {
            let mut staged = self.body.staged();
            staged.flush_all(&self.body.file, tmp)?;
            staged.end()
        };
        let mut hasher = blake3::Hasher::new();
        let mut header = [0u8; 8];
        let format = match self.segments.is_empty() {
            true => PACK_FORMAT_PLAIN,
            false => PACK_FORMAT,
        };
        header[..4].copy_from_slice(&format.to_le_bytes());
        header[4..].copy_from_slice(&self.flags.to_le_bytes());
        self.body.file.write_all_at(&header, 8).at(tmp)?;
        let mut out = io::BufWriter::with_capacity(1 << 20, &self.body.file);
        use std::io::Seek;
        out.get_mut()
            .seek(io::SeekFrom::Start(index_offset))
            .at(tmp)?;
        let count = u64::from(self.index.n);
        if self.index.in_order.is_some() {
            // The side file is the index, in order: copied as it is.
            let index = &self.index;
            for_each_block(&index.side, &index.side_path, 0, count, |block| {
                hasher.update(block);
                out.write_all(block).at(tmp)
            })?;
        }
        let (prefixes, positions) = (&self.index.prefixes, &self.index.positions);
        let mut i = 0;
        while i < prefixes.len() {
            // IDs sharing a prefix (rare): ordered by the whole ID.
            let mut j = i + 1;
            while j < prefixes.len() && prefixes[j] == prefixes[i] {
                j += 1;
            }
            let mut run: Vec<[u8; ENTRY_LEN]> = positions[i..j]
                .iter()
                .map(|&pos| self.index.entry(pos))
                .collect::<Result<_>>()?;
            run.sort_unstable_by(|a, b| a[..32].cmp(&b[..32]));
            for e in &run {
                hasher.update(e);
                out.write_all(e).at(tmp)?;
            }
            i = j;
        }
        for seg in &self.segments {
            let mut e = [0u8; SEGMENT_ENTRY_LEN];
            e[..8].copy_from_slice(&seg.offset.to_le_bytes());
            e[8..12].copy_from_slice(&seg.zlen.to_le_bytes());
            e[12..16].copy_from_slice(&seg.len.to_le_bytes());
            hasher.update(&e);
            out.write_all(&e).at(tmp)?;
        }
        let mut footer = Vec::with_capacity(FOOTER_LEN_SEGMENTS as usize);
        footer.extend_from_slice(&index_offset.to_le_bytes());
        footer.extend_from_slice(&count.to_le_bytes());
        footer.extend_from_slice(hasher.finalize().as_bytes());
        if !self.segments.is_empty() {
            footer.extend_from_slice(&(self.segments.len() as u64).to_le_bytes());
        }
        out.write_all(&footer).at(tmp)?;
        out.flush().at(tmp)?;
        drop(out);
        let end = index_offset
            + count * ENTRY_LEN as u64
            + (self.segments.len() * SEGMENT_ENTRY_LEN) as u64
            + self.footer_len();
        self.body.file.set_len(end).at(tmp)?;
        Ok(())
    }

    pub fn file(&self) -> &File {
        &self.body.file
    }

    /// Renames the sealed, durable pack into `dir` under its name (the
    /// index hash): from here on it is in the store. The caller syncs
    /// `dir`.
    pub fn publish(self, dir: &Path) -> Result<PathBuf> {
        let tmp = &self.body.path;
        let footer_len = self.footer_len();
        let mut footer = vec![0u8; footer_len as usize];
        let len = self.body.file.metadata().at(tmp)?.len();
        self.body
            .file
            .read_exact_at(&mut footer, len - footer_len)
            .at(tmp)?;
        let name: String = footer[16..32].iter().map(|b| format!("{b:02x}")).collect();
        let dest = dir.join(format!("{name}.pack"));
        fs::rename(tmp, &dest).at(&dest)?;
        let _ = fs::remove_file(&self.index.side_path);
        Ok(dest)
    }

    /// Drops the temp files (a session that wrote few objects keeps them
    /// loose instead; a failed seal).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.body.path);
        let _ = fs::remove_file(&self.index.side_path);
    }
}

/// The packs of one store as this process has loaded them, shared by every
/// clone of the [`super::Store`].
#[derive(Debug, Default)]
pub struct PackSet {
    inner: RwLock<Loaded>,
    /// The store's `objects/` directory, opened once (`O_PATH`): a lookup
    /// that misses stats the packs directory and the loose object's path
    /// relative to it, two components instead of every one from `/` (on
    /// a fresh host's fetch, each of its ~30k objects misses twice).
    objects: std::sync::OnceLock<std::os::fd::OwnedFd>,
    /// Whether a lookup's error was logged already (once per process: a
    /// damaged pack would otherwise log on every lookup).
    warned: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct Loaded {
    packs: Vec<Arc<Pack>>,
    /// The packs directory's mtime at the last scan, and whether that scan
    /// was too soon after it to trust.
    scanned: Option<SystemTime>,
    racy: bool,
}

impl PackSet {
    /// The `objects/` directory of the store at `root` (`O_PATH`), opened
    /// on first use; `None` if it cannot be (then paths are used whole).
    pub(crate) fn objects_dir(&self, root: &Path) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        if let Some(fd) = self.objects.get() {
            return Some(fd.as_fd());
        }
        let flags =
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
        let fd = rustix::fs::open(root.join("objects"), flags, rustix::fs::Mode::empty()).ok()?;
        Some(self.objects.get_or_init(|| fd).as_fd())
    }

    /// The modification time of `dir`, the store's packs directory
    /// (`objects/pack`), or `None` if there is none yet.
    fn mtime(&self, dir: &Path) -> Result<Option<SystemTime>> {
        let root = dir.parent().and_then(Path::parent);
        let at = root.and_then(|root| self.objects_dir(root));
        let (Some(at), Some(name)) = (at, dir.file_name()) else {
            return match fs::metadata(dir) {
                Ok(m) => Ok(m.modified().ok()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).at(dir),
            };
        };
        match rustix::fs::statat(at, name, rustix::fs::AtFlags::empty()) {
            Ok(st) => Ok(Some(
                SystemTime::UNIX_EPOCH
                    + Duration::new(
                        u64::try_from(st.st_mtime).unwrap_or(0),
                        u32::try_from(st.st_mtime_nsec).unwrap_or(0),
                    ),
            )),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(io::Error::from(e)).at(dir),
        }
    }

    /// Where `id` is, in the packs loaded so far.
    pub(crate) fn find_loaded(&self, id: &ObjectId) -> Result<Option<(Arc<Pack>, Slot)>> {
        let loaded = self.inner.read().expect("not poisoned");
        for p in loaded.packs.iter().rev() {
            if let Some(slot) = p.find(id)? {
                return Ok(Some((p.clone(), slot)));
            }
        }
        Ok(None)
    }

    /// Where `id` is; on a miss, rescans `dir` first if it changed.
    pub fn find(&self, dir: &Path, id: &ObjectId) -> Result<Option<(Arc<Pack>, Slot)>> {
        if let Some(hit) = self.find_loaded(id)? {
            return Ok(Some(hit));
        }
        if self.refresh(dir, false)? {
            return self.find_loaded(id);
        }
        Ok(None)
    }

    /// Every loaded pack, after a rescan if `dir` changed.
    pub fn all(&self, dir: &Path) -> Result<Vec<Arc<Pack>>> {
        self.refresh(dir, false)?;
        Ok(self.inner.read().expect("not poisoned").packs.clone())
    }

    /// Rescans `dir` if it changed since the last scan (or `force`):
    /// loads new packs, drops removed ones, reloads ones whose dead list
    /// changed. Returns whether it scanned.
    pub fn refresh(&self, dir: &Path, force: bool) -> Result<bool> {
        let mtime = self.mtime(dir)?;
        {
            let loaded = self.inner.read().expect("not poisoned");
            if !force && !loaded.racy && loaded.scanned == mtime {
                return Ok(false);
            }
        }
        let mut loaded = self.inner.write().expect("not poisoned");
        let mut names: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pack"))
                .collect(),
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).at(dir),
        };
        names.sort();
        let mut packs = Vec::with_capacity(names.len());
        for path in names {
            if let Some(p) = loaded.packs.iter().find(|p| p.path == path) {
                // Only the dead list can change once a pack has its name.
                let dead = read_dead(&dead_path(&path))?;
                packs.push(if dead == p.dead {
                    p.clone()
                } else {
                    Arc::new(p.with_dead(dead))
                });
                continue;
            }
            match Pack::open(&path) {
                Ok(p) => packs.push(Arc::new(p)),
                // Removed by gc between the listing and the open.
                Err(StoreError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        loaded.packs = packs;
        loaded.scanned = mtime;
        loaded.racy = mtime.is_none_or(|m| {
            SystemTime::now()
                .duration_since(m)
                .map_or(true, |age| age < RACY)
        });
        Ok(true)
    }

    /// Logs `e` the first time only; returns whether it did.
    pub fn warn_once(&self, e: &StoreError) -> bool {
        let first = !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed);
        if first {
            tracing::error!("{e} (objects not found meanwhile count as missing)");
        }
        first
    }

    /// Adds a pack this process just published (no rescan needed to see it).
    pub fn add(&self, pack: Pack) {
        let mut loaded = self.inner.write().expect("not poisoned");
        loaded.packs.retain(|p| p.path != pack.path);
        loaded.packs.push(Arc::new(pack));
        loaded.racy = true;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Role, Store};
    use super::*;
    use crate::store::id::ObjectKind;
    use crate::store::object;
    use crate::store::tree::{Content, Entry, Tree, TreeName};

    fn chunk(n: u32) -> Vec<u8> {
        format!("chunk {n} ")
            .repeat(50 + n as usize % 7)
            .into_bytes()
    }

    fn packed(dir: &Path, objects: &[Vec<u8>]) -> PathBuf {
        let mut w = PackWriter::create(dir.join(".pack.t.tmp")).unwrap();
        for o in objects {
            let id = ObjectKind::Chunk.hash(o);
            w.append(id, &object::encode(ObjectKind::Chunk, o)).unwrap();
        }
        w.seal().unwrap();
        w.publish(dir).unwrap()
    }

    #[test]
    fn a_writer_in_id_order_makes_the_same_pack_and_refuses_an_object_out_of_order() {
        let dir = tempfile::tempdir().unwrap();
        // More than one block of the index (4096 entries) when sealed.
        let mut objects: Vec<(ObjectId, Vec<u8>)> = (0..5000)
            .map(|n| {
                let o = chunk(n);
                (
                    ObjectKind::Chunk.hash(&o),
                    object::encode(ObjectKind::Chunk, &o),
                )
            })
            .collect();
        objects.sort_by_key(|a| a.0);
        let mut w = PackWriter::create_in_order(dir.path().join(".pack.o.tmp")).unwrap();
        for (id, file) in &objects {
            w.append(*id, file).unwrap();
        }
        // Appending what it holds again is a no-op, as for any writer.
        w.append(objects[10].0, &objects[10].1).unwrap();
        assert_eq!(w.len(), 5000);
        for (id, file) in objects.iter().step_by(97) {
            assert!(w.contains(id));
            assert_eq!(w.read(id).unwrap().as_ref(), Some(file));
        }
        assert!(!w.contains(&ObjectKind::Chunk.hash(b"never")));
        // An object below the last one is refused, naming it.
        let low = (0..)
            .map(|n: u32| ObjectKind::Chunk.hash(&n.to_le_bytes()))
            .find(|id| *id < objects[4999].0 && objects.binary_search_by(|o| o.0.cmp(id)).is_err())
            .unwrap();
        let err = w.append(low, b"x").unwrap_err().to_string();
        assert!(
            err.contains(&low.to_string()) && err.contains("out of ID order"),
            "{err}"
        );
        w.seal().unwrap();
        let in_order = w.publish(dir.path()).unwrap();
        // The same bytes as the pack the general writer makes.
        let other = tempfile::tempdir().unwrap();
        let mut g = PackWriter::create(other.path().join(".pack.g.tmp")).unwrap();
        for (id, file) in &objects {
            g.append(*id, file).unwrap();
        }
        g.seal().unwrap();
        let general = g.publish(other.path()).unwrap();
        assert_eq!(fs::read(&in_order).unwrap(), fs::read(&general).unwrap());
        assert_eq!(in_order.file_name(), general.file_name());
        let pack = Pack::open(&in_order).unwrap();
        for (id, file) in &objects {
            assert_eq!(pack.read(pack.find(id).unwrap().unwrap()).unwrap(), *file);
        }
    }

    #[test]
    fn an_app_servers_pack_is_written_past_the_page_cache() {
        // How much of a file is in the page cache, as fincore (util-linux)
        // tells it.
        let resident = |p: &Path| -> u64 {
            let out = std::process::Command::new("fincore")
                .args(["--bytes", "--noheadings", "--output", "RES"])
                .arg(p)
                .output()
                .unwrap_or_else(|e| panic!("run fincore (apt-get install util-linux): {e}"));
            assert!(out.status.success(), "fincore {}: {out:?}", p.display());
            let text = String::from_utf8_lossy(&out.stdout);
            text.trim()
                .parse()
                .unwrap_or_else(|e| panic!("fincore said {text:?}: {e}"))
        };
        for role in [Role::Deploy, Role::Host] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open_or_init(dir.path(), role).unwrap();
            let w = store.writer().unwrap();
            // 8 MiB of chunks that do not compress.
            let chunks: Vec<Vec<u8>> = (1..=2000)
                .map(|n| crate::store::chunk::noise(4096, n))
                .collect();
            for c in &chunks {
                w.put(ObjectKind::Chunk, c).unwrap();
            }
            drop(w.commit().unwrap());
            let packs: Vec<PathBuf> = fs::read_dir(store.packs_dir())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "pack"))
                .collect();
            assert_eq!(packs.len(), 1, "{packs:?}");
            let (len, res) = (fs::metadata(&packs[0]).unwrap().len(), resident(&packs[0]));
            assert!(len > 8_000_000, "{len}");
            match role {
                // A deploy host's pack stays cached, to be served.
                Role::Deploy => assert!(res > len / 2, "{res} of {len} bytes cached"),
                // An app server's: only what was written last through the
                // cache (the index, the footer, the first and last block).
                Role::Host => assert!(res < len / 10, "{res} of {len} bytes cached"),
            }
            // Both read back whole, from another process's view.
            let other = Store::open(dir.path()).unwrap();
            for c in chunks.iter().step_by(101) {
                let id = ObjectKind::Chunk.hash(c);
                assert_eq!(other.read(&id, ObjectKind::Chunk).unwrap(), *c);
            }
        }
    }

    #[test]
    fn a_pack_gives_back_each_object_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let objects: Vec<Vec<u8>> = (0..1000).map(chunk).collect();
        let path = packed(dir.path(), &objects);
        let pack = Pack::open(&path).unwrap();
        assert_eq!(pack.len(), 1000);
        // No segments: format 1, which older scaps read.
        assert_eq!(&fs::read(&path).unwrap()[8..12], &1u32.to_le_bytes());
        assert!(!pack.has_segments());
        for o in &objects {
            let id = ObjectKind::Chunk.hash(o);
            let slot = pack.find(&id).unwrap().expect("packed");
            let file = pack.read(slot).unwrap();
            assert_eq!(object::decode(id, ObjectKind::Chunk, &file).unwrap(), *o);
        }
        assert_eq!(pack.find(&ObjectKind::Chunk.hash(b"never")).unwrap(), None);
        let mut n = 0;
        pack.for_each_entry(|_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 1000);
    }

    /// `objects` as a delta pack's segments carry them: uncompressed
    /// object files behind some other bytes (frame headers), cut into
    /// `per` objects a segment. Returns each segment and, for each object,
    /// its segment (0-based) and offset in that segment's content.
    fn segments(objects: &[Vec<u8>], per: usize) -> (Vec<Arriving>, Vec<(usize, usize)>) {
        let mut out = Vec::new();
        let mut at = Vec::new();
        for (s, group) in objects.chunks(per).enumerate() {
            let mut content = b"scapbat1".to_vec();
            for o in group {
                content.extend_from_slice(&[7u8; 37]);
                at.push((s, content.len()));
                content.extend_from_slice(&raw(ObjectKind::Chunk, o));
            }
            let z = zstd::bulk::compress(&content, 3).unwrap();
            out.push(Arriving::new(z, Arc::new(content)));
        }
        (out, at)
    }

    #[test]
    fn a_pack_with_segments_gives_back_each_object_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let objects: Vec<Vec<u8>> = (0..600).map(chunk).collect();
        let (segs, at) = segments(&objects[100..], 125);
        let mut w = PackWriter::create(dir.path().join(".pack.t.tmp")).unwrap();
        // Some objects in the file itself, the rest in segments.
        for o in &objects[..100] {
            let id = ObjectKind::Chunk.hash(o);
            w.append(id, &object::encode(ObjectKind::Chunk, o)).unwrap();
        }
        let mut numbers = Vec::new();
        for seg in &segs {
            numbers.push(
                w.append_segment(&seg.compressed, seg.content.clone())
                    .unwrap(),
            );
        }
        for (o, (s, offset)) in objects[100..].iter().zip(&at) {
            let id = ObjectKind::Chunk.hash(o);
            let len = raw(ObjectKind::Chunk, o).len();
            w.append_in_segment(id, numbers[*s], *offset as u32, len)
                .unwrap();
        }
        // Nothing outside a segment's content, nor a segment it lacks.
        let id = ObjectKind::Chunk.hash(b"x");
        let last = segs.last().unwrap().content.len() as u32;
        assert!(w.append_in_segment(id, numbers[3], last - 10, 11).is_err());
        assert!(w.append_in_segment(id, 99, 0, 11).is_err());
        assert!(w.append_in_segment(id, 0, 0, 11).is_err());
        // Read back while written, and once published.
        let check = |read: &dyn Fn(&ObjectId) -> Vec<u8>| {
            for o in &objects {
                let id = ObjectKind::Chunk.hash(o);
                assert_eq!(
                    object::decode(id, ObjectKind::Chunk, &read(&id)).unwrap(),
                    *o
                );
            }
        };
        check(&|id| w.read(id).unwrap().expect("written"));
        w.seal().unwrap();
        let path = w.publish(dir.path()).unwrap();
        let good = fs::read(&path).unwrap();
        assert_eq!(&good[8..12], &2u32.to_le_bytes(), "pack format 2");
        let pack = Pack::open(&path).unwrap();
        assert!(pack.has_segments());
        assert_eq!(pack.len(), 600);
        check(&|id| pack.read(pack.find(id).unwrap().unwrap()).unwrap());
        // In the pack's order: the file's objects, then by segment.
        let order = pack.order(|_, _| true).unwrap();
        let slots: Vec<Slot> = order
            .iter()
            .map(|&i| pack.entry(i as usize).unwrap().1)
            .collect();
        assert!(
            slots
                .windows(2)
                .all(|p| (p[0].seg, p[0].offset) < (p[1].seg, p[1].offset))
        );
        assert_eq!(slots.iter().filter(|s| s.seg == 0).count(), 100);

        // Damage anywhere in the index, table or footer is refused, with
        // the path; a damaged segment fails the reads of its objects.
        let footer = good.len() - 56;
        let index_offset =
            u64::from_le_bytes(good[footer..footer + 8].try_into().unwrap()) as usize;
        let table = index_offset + 600 * ENTRY_LEN;
        let mut cases: Vec<(&str, Vec<u8>)> = vec![("truncated", good[..good.len() - 1].to_vec())];
        for (why, at) in [
            ("index", index_offset + 40),
            ("segment table offset", table + 2),
            ("segment table length", table + 13),
            ("segment count", footer + 48),
            ("footer hash", footer + 20),
        ] {
            let mut b = good.clone();
            b[at] ^= 1;
            cases.push((why, b));
        }
        let mut newer = good.clone();
        newer[8] = 3;
        cases.push(("format 3", newer));
        // Fields out of bounds under a hash that matches (the hash is no
        // MAC): refused by the bounds checks, never an overflow.
        for (why, at, value) in [
            (
                "a segment at the end of the address space",
                table,
                u64::MAX.to_le_bytes().to_vec(),
            ),
            (
                "a segment frame too long",
                table + 8,
                u32::MAX.to_le_bytes().to_vec(),
            ),
            (
                "a segment of no content",
                table + 12,
                0u32.to_le_bytes().to_vec(),
            ),
            (
                "an entry in a segment that is not there",
                index_offset + 44,
                99u32.to_le_bytes().to_vec(),
            ),
            (
                "an entry past its segment's content",
                index_offset + 32,
                u64::MAX.to_le_bytes().to_vec(),
            ),
        ] {
            let mut b = good.clone();
            b[at..at + value.len()].copy_from_slice(&value);
            let hash = blake3::hash(&b[index_offset..footer]);
            b[footer + 16..footer + 48].copy_from_slice(hash.as_bytes());
            cases.push((why, b));
        }
        for cut in (0..good.len()).step_by(4099) {
            cases.push(("cut", good[..cut].to_vec()));
        }
        for (why, bytes) in cases {
            fs::write(&path, &bytes).unwrap();
            let err = Pack::open(&path).expect_err(why).to_string();
            assert!(err.contains(&*path.to_string_lossy()), "{why}: {err}");
        }
        let mut body = good.clone();
        let first_segment = PACK_HEADER_LEN as usize
            + objects[..100]
                .iter()
                .map(|o| object::encode(ObjectKind::Chunk, o).len())
                .sum::<usize>();
        body[first_segment + 30] ^= 0xff;
        fs::write(&path, &body).unwrap();
        let pack = Pack::open(&path).unwrap();
        let mut failed = 0;
        for o in &objects[100..] {
            let id = ObjectKind::Chunk.hash(o);
            match pack.read(pack.find(&id).unwrap().unwrap()) {
                Err(e) => {
                    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
                    failed += 1;
                }
                Ok(file) => {
                    let _ = object::decode(id, ObjectKind::Chunk, &file);
                }
            }
        }
        assert!(
            failed >= 125,
            "the damaged segment's objects fail: {failed}"
        );
    }

    /// The writer's compact index: thousands of objects (several folds of
    /// the tail), and IDs that share their first 8 bytes.
    #[test]
    fn only_an_object_read_from_a_segment_as_received_counts_as_verified() {
        let dir = tempfile::tempdir().unwrap();
        let objects: Vec<Vec<u8>> = (0..400).map(chunk).collect();
        // More segments than are kept: the first is read back from the file.
        let per = objects.len() / (SEGMENTS_KEPT + 2);
        let (segs, at) = segments(&objects, per);
        let mut w = PackWriter::create(dir.path().join(".pack.v.tmp")).unwrap();
        let numbers: Vec<u32> = segs
            .iter()
            .map(|seg| {
                w.append_segment(&seg.compressed, seg.content.clone())
                    .unwrap()
            })
            .collect();
        for (o, (s, off)) in objects.iter().zip(&at) {
            let id = ObjectKind::Chunk.hash(o);
            w.append_in_segment(
                id,
                numbers[*s],
                *off as u32,
                raw(ObjectKind::Chunk, o).len(),
            )
            .unwrap();
        }
        let read = |o: &Vec<u8>| {
            let id = ObjectKind::Chunk.hash(o);
            let (file, verified) = w.locate(&id).unwrap().unwrap().read_verified().unwrap();
            let file = file.into_vec();
            assert_eq!(object::decode(id, ObjectKind::Chunk, &file).unwrap(), *o);
            assert_eq!(
                object::decode_verified(id, ObjectKind::Chunk, file).unwrap(),
                *o
            );
            verified
        };
        assert!(
            read(objects.last().unwrap()),
            "the last segment, kept as received"
        );
        assert!(
            !read(&objects[0]),
            "the first, evicted: read back from the file"
        );
        // And read back, it is kept, still not as received.
        assert!(!read(&objects[1]));
        // decode_verified checks what it can without hashing: the header,
        // the kind; a compressed file it decodes, and so verifies, in full.
        let id = ObjectKind::Chunk.hash(&objects[0]);
        let tree =
            object::decode_verified(id, ObjectKind::Tree, raw(ObjectKind::Chunk, &objects[0]));
        assert!(
            matches!(tree, Err(object::ObjectError::WrongKind { .. })),
            "{tree:?}"
        );
        let mut wrong = object::encode(ObjectKind::Chunk, &objects[0]);
        let n = wrong.len();
        wrong[n - 1] ^= 1;
        assert!(object::decode_verified(id, ObjectKind::Chunk, wrong).is_err());
        assert!(object::decode_verified(id, ObjectKind::Chunk, vec![0; 3]).is_err());
    }

    #[test]
    fn the_pending_index_finds_every_object_across_folds_and_shared_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PackWriter::create(dir.path().join(".pack.t.tmp")).unwrap();
        let id = |n: u32, tail: u8| {
            let mut b = [tail; 32];
            // Every 7th shares its prefix with the one before.
            b[..8].copy_from_slice(&u64::from(n - n % 7 / 6).to_be_bytes());
            b[31] = n as u8;
            ObjectId::from_bytes(b)
        };
        let mut ids = Vec::new();
        for n in 0..20_000u32 {
            let i = id(n, (n % 3) as u8);
            if n % 7 == 6 {
                assert_eq!(i.as_bytes()[..8], id(n - 1, 0).as_bytes()[..8]);
            }
            w.append(i, &n.to_le_bytes()).unwrap();
            w.append(i, b"a repeat is not stored again").unwrap();
            ids.push((i, n));
        }
        assert_eq!(w.len(), 20_000);
        for (i, n) in ids.iter().step_by(7) {
            assert_eq!(w.read(i).unwrap().unwrap(), n.to_le_bytes());
        }
        assert!(!w.contains(&id(3, 9)));
        w.seal().unwrap();
        let path = w.publish(dir.path()).unwrap();
        assert!(
            !dir.path().join(".idx.t.tmp").exists(),
            "side index removed"
        );
        let pack = Pack::open(&path).unwrap();
        assert_eq!(pack.len(), 20_000);
        for (i, n) in &ids {
            let slot = pack.find(i).unwrap().expect("packed");
            assert_eq!(pack.read(slot).unwrap(), n.to_le_bytes());
        }
    }

    #[test]
    fn a_writer_knows_what_the_store_held_when_it_started_and_writes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir.path(), Role::Host).unwrap();
        let put =
            |w: &super::super::Writer<'_>, n: u32| w.put(ObjectKind::Chunk, &chunk(n)).unwrap();
        // Three loose objects, then 300 in a pack.
        let w = store.writer().unwrap();
        for n in 0..3 {
            assert!(put(&w, n).new);
        }
        drop(w.commit().unwrap());
        let w = store.writer().unwrap();
        for n in 3..303 {
            assert!(put(&w, n).new);
        }
        drop(w.commit().unwrap());
        assert!(
            store
                .object_path(&ObjectKind::Chunk.hash(&chunk(0)))
                .exists(),
            "loose"
        );

        let w = store.writer().unwrap();
        for n in 0..303 {
            assert!(!put(&w, n).new, "chunk {n} is in the store already");
        }
        assert!(put(&w, 1000).new);
        assert!(
            w.store().has(&ObjectKind::Chunk.hash(&chunk(1000))),
            "its own"
        );
        assert!(!put(&w, 1000).new, "its own, once");
        // Another session commits an object meanwhile: this one may write
        // it again, and the store holds it either way.
        let other = store.writer().unwrap();
        assert!(put(&other, 2000).new);
        drop(other.commit().unwrap());
        put(&w, 2000);
        drop(w.commit().unwrap());
        let fresh = Store::open(dir.path()).unwrap();
        for n in (0..303).chain([1000, 2000]) {
            let id = ObjectKind::Chunk.hash(&chunk(n));
            assert!(fresh.has(&id), "chunk {n}");
            assert_eq!(fresh.read(&id, ObjectKind::Chunk).unwrap(), chunk(n));
            assert!(store.has(&id), "chunk {n}, in the view that wrote them");
        }
        // After its commit, a writer's view asks the store again.
        let w = store.writer().unwrap();
        let view = w.store().clone();
        assert!(put(&w, 3000).new);
        drop(w.commit().unwrap());
        assert!(view.has(&ObjectKind::Chunk.hash(&chunk(3000))));
    }

    #[test]
    fn a_damaged_pack_is_refused_with_its_path_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = packed(dir.path(), &(0..50).map(chunk).collect::<Vec<_>>());
        let good = fs::read(&path).unwrap();
        let index_offset =
            u64::from_le_bytes(good[good.len() - 48..good.len() - 40].try_into().unwrap()) as usize;
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() - 1].to_vec()),
            ("empty", Vec::new()),
            ("bad magic", [b"NOTAPACK", &good[8..]].concat()),
        ];
        let mut flipped = good.clone();
        flipped[index_offset + 3] ^= 1; // an ID in the index
        cases.push(("index bit flip", flipped));
        let mut huge = good.clone();
        let n = huge.len();
        huge[n - 40..n - 32].copy_from_slice(&u64::MAX.to_le_bytes()); // count
        cases.push(("count overflow", huge));
        // Every single-byte truncation and a sweep of bit flips.
        for cut in (0..good.len()).step_by(97) {
            cases.push(("cut", good[..cut].to_vec()));
        }
        for (why, bytes) in cases {
            fs::write(&path, &bytes).unwrap();
            let err = Pack::open(&path).expect_err(why).to_string();
            assert!(err.contains(&*path.to_string_lossy()), "{why}: {err}");
        }
        // Through a store: a lookup misses, and says so once.
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(store_dir.path(), Role::Host).unwrap();
        fs::create_dir_all(store.packs_dir()).unwrap();
        fs::write(store.packs_dir().join("0badbad0.pack"), b"SCAPPACK").unwrap();
        let id = ObjectKind::Chunk.hash(&chunk(1));
        assert!(!store.has(&id));
        assert!(
            !store.pack_set().warn_once(&bad(&path, "again")),
            "said once"
        );
        let err = store.read(&id, ObjectKind::Chunk).unwrap_err().to_string();
        assert!(err.contains("0badbad0.pack"), "{err}");
        // Objects whose bytes are damaged are refused when read.
        let mut body = good.clone();
        body[PACK_HEADER_LEN as usize + 20] ^= 0xff;
        fs::write(&path, &body).unwrap();
        let pack = Pack::open(&path).unwrap();
        let bad = (0..50).map(chunk).any(|o| {
            let id = ObjectKind::Chunk.hash(&o);
            let file = pack.read(pack.find(&id).unwrap().unwrap()).unwrap();
            object::decode(id, ObjectKind::Chunk, &file).is_err()
        });
        assert!(bad, "the flipped object fails its hash");
    }

    #[test]
    fn a_large_session_writes_one_pack_a_small_one_loose_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir.path(), Role::Deploy).unwrap();
        let w = store.writer().unwrap();
        let ids: Vec<ObjectId> = (0..600)
            .map(|n| w.put(ObjectKind::Chunk, &chunk(n)).unwrap().id)
            .collect();
        // The session sees its objects; another view does not, yet.
        assert!(w.store().has(&ids[0]));
        let other = Store::open(dir.path()).unwrap();
        assert!(!other.has(&ids[0]));
        let _c = w.commit().unwrap();
        assert!(
            other.has(&ids[599]),
            "seen once published (a rescan on a miss)"
        );
        let packs: Vec<_> = fs::read_dir(store.packs_dir()).unwrap().flatten().collect();
        assert_eq!(packs.len(), 1);
        assert_eq!(store.objects().unwrap().count(), 0, "no loose object");
        assert!(
            fs::read_to_string(dir.path().join("scap-store"))
                .unwrap()
                .contains("format 2")
        );
        drop(_c);
        let w = store.writer().unwrap();
        let small: Vec<ObjectId> = (600..610)
            .map(|n| w.put(ObjectKind::Chunk, &chunk(n)).unwrap().id)
            .collect();
        // Already packed: not written again.
        assert!(!w.put(ObjectKind::Chunk, &chunk(5)).unwrap().new);
        drop(w.commit().unwrap());
        assert_eq!(store.objects().unwrap().count(), 10);
        for id in small.iter().chain(&ids) {
            assert_eq!(
                other.read(id, ObjectKind::Chunk).unwrap().len(),
                object::decode(
                    *id,
                    ObjectKind::Chunk,
                    &other.read_raw(id).unwrap().unwrap()
                )
                .unwrap()
                .len()
            );
        }
    }

    fn file_entry(name: &str, data: &[u8], w: &super::super::Writer<'_>) -> Entry {
        let c = w.put(ObjectKind::Chunk, data).unwrap().id;
        one_chunk_entry(name, c, data.len())
    }

    /// A file `name` of one chunk, `id`, of `len` bytes.
    fn one_chunk_entry(name: &str, id: ObjectId, len: usize) -> Entry {
        Entry {
            name: TreeName::new(name.as_bytes().to_vec()).unwrap(),
            content: Content::File {
                chunks: vec![crate::store::tree::ChunkRef {
                    id: crate::store::id::ChunkId::new(id),
                    len: len as u32,
                }],
                size: len as u64,
                executable: false,
            },
        }
    }

    /// gc keeps a mostly reachable pack whole, but a tree in it that is
    /// unreachable, whose children gc deletes, must leave the store with
    /// them: else a later sync would take it for complete.
    #[test]
    fn gc_lists_dead_trees_of_a_pack_it_keeps_and_rewrites_a_mostly_dead_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir.path(), Role::Deploy).unwrap();
        // v1: 600 chunks in a pack, plus one tree naming a loose chunk.
        let w = store.writer().unwrap();
        let mut entries: Vec<Entry> = (0..600)
            .map(|n| file_entry(&format!("f{n:04}"), &chunk(n), &w))
            .collect();
        let v1 = w
            .put(
                ObjectKind::Tree,
                &Tree::new(entries.clone()).unwrap().encode(),
            )
            .unwrap()
            .id;
        drop(w.commit().unwrap());
        // v2: one file changed (a small session: loose), so v1's root tree
        // (in the pack) is unreachable once v1 goes, and so is the chunk.
        let w = store.writer().unwrap();
        entries[0] = file_entry("f0000", b"changed", &w);
        let v2 = w
            .put(ObjectKind::Tree, &Tree::new(entries).unwrap().encode())
            .unwrap()
            .id;
        drop(w.commit().unwrap());
        let roots = [crate::store::id::VersionId::new(v2)];
        crate::store::gc::mark_and_sweep(&store, &roots, false, &crate::cancel::Cancel::new())
            .unwrap();
        assert!(!store.has(&v1), "v1's tree is listed dead");
        assert!(store.has(&v2));
        assert!(store.read(&v2, ObjectKind::Tree).is_ok());
        let packs: Vec<_> = fs::read_dir(store.packs_dir()).unwrap().flatten().collect();
        assert_eq!(packs.len(), 2, "the pack is kept, with its .dead list");
        // A fresh process sees the same.
        assert!(!Store::open(dir.path()).unwrap().has(&v1));
        // With nothing kept, the pack goes; with a little kept, it is
        // rewritten to what is kept.
        let w = store.writer().unwrap();
        let tiny = w
            .put(
                ObjectKind::Tree,
                &Tree::new(vec![file_entry("f0001", &chunk(1), &w)])
                    .unwrap()
                    .encode(),
            )
            .unwrap()
            .id;
        drop(w.commit().unwrap());
        let roots = [crate::store::id::VersionId::new(tiny)];
        crate::store::gc::mark_and_sweep(&store, &roots, false, &crate::cancel::Cancel::new())
            .unwrap();
        let packs: Vec<_> = fs::read_dir(store.packs_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(packs.len(), 1, "{packs:?}");
        let pack = Pack::open(&packs[0]).unwrap();
        assert_eq!(pack.len(), 1, "only the kept chunk");
        assert!(store.has(&tiny));
        assert!(
            store
                .read(&ObjectKind::Chunk.hash(&chunk(1)), ObjectKind::Chunk)
                .is_ok()
        );
        assert!(!store.has(&ObjectKind::Chunk.hash(&chunk(2))));
    }

    /// Objects received uncompressed are stored as they came (no zstd on a
    /// fresh host's path): a large session flags its pack, and gc
    /// compresses it into a new one; a small session compresses its loose
    /// objects as it commits. Every object reads back the same throughout.
    #[test]
    fn received_uncompressed_objects_are_compressed_by_gc_or_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(dir.path(), Role::Host).unwrap();
        let w = store.writer().unwrap();
        let mut entries = Vec::new();
        for n in 0..600u32 {
            let data = chunk(n);
            let id = ObjectKind::Chunk.hash(&data);
            let file = raw(ObjectKind::Chunk, &data);
            assert!(object::is_uncompressed(&file));
            w.put_checked(id, &file).unwrap();
            entries.push(one_chunk_entry(&format!("f{n:04}"), id, data.len()));
        }
        let tree = Tree::new(entries).unwrap().encode();
        let root = ObjectKind::Tree.hash(&tree);
        w.put_checked(root, &raw(ObjectKind::Tree, &tree)).unwrap();
        drop(w.commit().unwrap());
        let packs = store.pack_set().all(&store.packs_dir()).unwrap();
        assert_eq!(packs.len(), 1);
        assert!(packs[0].holds_raw(), "flagged for gc");
        let raw_len = packs[0].body_len();
        let check = |store: &Store| {
            for n in 0..600u32 {
                let id = ObjectKind::Chunk.hash(&chunk(n));
                assert_eq!(store.read(&id, ObjectKind::Chunk).unwrap(), chunk(n));
            }
            assert_eq!(store.read(&root, ObjectKind::Tree).unwrap(), tree);
        };
        check(&store);

        let report = crate::store::gc::mark_and_sweep(
            &store,
            &[crate::store::id::VersionId::new(root)],
            false,
            &crate::cancel::Cancel::new(),
        )
        .unwrap();
        assert_eq!(report.compressed_bytes, raw_len);
        let packs = store.pack_set().all(&store.packs_dir()).unwrap();
        assert_eq!(packs.len(), 1, "the raw pack is replaced");
        assert!(!packs[0].holds_raw());
        assert!(
            packs[0].body_len() * 2 < raw_len,
            "compressed: {} of {raw_len} bytes",
            packs[0].body_len()
        );
        check(&store);
        check(&Store::open(dir.path()).unwrap());
        // Nothing left to compress: the next gc keeps the pack.
        let again = crate::store::gc::mark_and_sweep(
            &store,
            &[crate::store::id::VersionId::new(root)],
            false,
            &crate::cancel::Cancel::new(),
        )
        .unwrap();
        assert_eq!(again.compressed_bytes, 0);

        // Objects that came in a delta pack's segments: stored in them,
        // as they came, and rewritten by gc in the pack's order.
        let more: Vec<Vec<u8>> = (600..1200).map(chunk).collect();
        let (segs, at) = segments(&more, 100);
        let w = store.writer().unwrap();
        let mut entries = Vec::new();
        for (n, (o, (s, offset))) in more.iter().zip(&at).enumerate() {
            let id = ObjectKind::Chunk.hash(o);
            w.put_in_segment(id, &raw(ObjectKind::Chunk, o), &segs[*s], *offset)
                .unwrap();
            entries.push(one_chunk_entry(&format!("g{n:04}"), id, o.len()));
        }
        // An object whose place is wrong is stored on its own.
        let odd = chunk(5000);
        let odd_id = ObjectKind::Chunk.hash(&odd);
        w.put_in_segment(odd_id, &raw(ObjectKind::Chunk, &odd), &segs[0], 3)
            .unwrap();
        entries.push(one_chunk_entry("odd", odd_id, odd.len()));
        let tree2 = Tree::new(entries).unwrap().encode();
        let root2 = ObjectKind::Tree.hash(&tree2);
        w.put_checked(root2, &raw(ObjectKind::Tree, &tree2))
            .unwrap();
        assert_eq!(
            w.store().read(&odd_id, ObjectKind::Chunk).unwrap(),
            odd,
            "read while the session writes"
        );
        drop(w.commit().unwrap());
        let packs = store.pack_set().all(&store.packs_dir()).unwrap();
        let segmented: Vec<_> = packs.iter().filter(|p| p.has_segments()).collect();
        assert_eq!(segmented.len(), 1);
        let stored: u64 = segs.iter().map(|s| s.compressed.len() as u64).sum();
        assert_eq!(
            segmented[0].body_len(),
            stored
                + (raw(ObjectKind::Chunk, &odd).len() + raw(ObjectKind::Tree, &tree2).len()) as u64,
            "the segments as they came (not their objects), the odd one and the tree"
        );
        let check2 = |store: &Store| {
            for o in more.iter().chain([&odd]) {
                let id = ObjectKind::Chunk.hash(o);
                assert_eq!(store.read(&id, ObjectKind::Chunk).unwrap(), *o);
            }
        };
        check2(&store);
        let roots = [
            crate::store::id::VersionId::new(root),
            crate::store::id::VersionId::new(root2),
        ];
        let report =
            crate::store::gc::mark_and_sweep(&store, &roots, false, &crate::cancel::Cancel::new())
                .unwrap();
        assert!(report.compressed_bytes > 0);
        let packs = store.pack_set().all(&store.packs_dir()).unwrap();
        assert!(packs.iter().all(|p| !p.has_segments() && !p.holds_raw()));
        check(&store);
        check2(&store);
        check2(&Store::open(dir.path()).unwrap());

        // A small session: its loose objects are compressed at commit.
        let w = store.writer().unwrap();
        let data = "a small session's object ".repeat(200).into_bytes();
        let id = ObjectKind::Chunk.hash(&data);
        w.put_checked(id, &raw(ObjectKind::Chunk, &data)).unwrap();
        drop(w.commit().unwrap());
        let file = store.read_raw(&id).unwrap().unwrap();
        assert!(!object::is_uncompressed(&file), "compressed at commit");
        assert_eq!(store.read(&id, ObjectKind::Chunk).unwrap(), data);
    }

    /// `data` as an object file of `kind` sent uncompressed (a pack's).
    fn raw(kind: ObjectKind, data: &[u8]) -> Vec<u8> {
        object::uncompressed(kind.hash(data), &object::encode(kind, data))
    }
}
