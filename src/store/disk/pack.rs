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
//! Everything read from a pack is checked before use: the footer's bounds,
//! the index's hash, order and bounds (each entry inside the body), and
//! each object, as every object, against its ID when decoded.
//!
//! In memory a loaded pack keeps the first 8 bytes of each ID (8 bytes an
//! object: 2 MB for a 263k-file tree); a lookup confirms the whole ID by
//! reading its index entry.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::{IoContext, Result, StoreError};
use crate::store::id::ObjectId;

pub const PACK_MAGIC: &[u8; 8] = b"SCAPPACK";
/// Version of the pack format, in each pack's header.
pub const PACK_FORMAT: u32 = 1;
pub const PACK_HEADER_LEN: u64 = 16;
/// Header flag (the u32 at offset 12): the pack holds objects stored
/// uncompressed as they arrived, for speed (a fresh host's fetch), that gc
/// compresses into a new pack. Readers ignore flags they do not know.
pub const FLAG_RAW: u32 = 1;
pub const ENTRY_LEN: usize = 48;
pub const FOOTER_LEN: u64 = 48;
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
    pub offset: u64,
    pub len: u32,
}

/// One pack file, open and indexed.
#[derive(Debug)]
pub struct Pack {
    path: PathBuf,
    /// Shared with the copy [`Pack::with_dead`] makes when gc changes the
    /// dead list: the index is read and hashed once per pack, not per gc.
    file: Arc<File>,
    prefixes: Arc<Vec<u64>>,
    index_offset: u64,
    /// The header's flags ([`FLAG_RAW`]).
    flags: u32,
    /// Trees listed in `<name>.dead`, sorted: not in the store.
    dead: Vec<ObjectId>,
}

impl Pack {
    /// Opens and checks a pack: footer bounds, index hash, order, bounds.
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
        let mut footer = [0u8; FOOTER_LEN as usize];
        file.read_exact_at(&mut footer, len - FOOTER_LEN).at(path)?;
        let index_offset = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(footer[8..16].try_into().expect("8 bytes"));
        let want_hash: [u8; 32] = footer[16..48].try_into().expect("32 bytes");
        count
            .checked_mul(ENTRY_LEN as u64)
            .filter(|l| {
                index_offset >= PACK_HEADER_LEN
                    && index_offset
                        .checked_add(*l)
                        .and_then(|e| e.checked_add(FOOTER_LEN))
                        == Some(len)
            })
            .ok_or_else(|| bad(path, "footer does not match the file's length"))?;
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
                if slot.offset < PACK_HEADER_LEN
                    || u64::from(slot.len) > MAX_OBJECT_FILE
                    || slot.offset + u64::from(slot.len) > index_offset
                {
                    return Err(bad(path, format!("index entry for {id} out of bounds")));
                }
                last = Some(*id.as_bytes());
                prefixes.push(prefix(&id));
            }
            Ok(())
        })?;
        if *hasher.finalize().as_bytes() != want_hash {
            return Err(bad(path, "index hash mismatch"));
        }
        let dead = read_dead(&dead_path(path))?;
        Ok(Pack {
            path: path.to_path_buf(),
            file: Arc::new(file),
            prefixes: Arc::new(prefixes),
            index_offset,
            flags,
            dead,
        })
    }

    /// This pack with another dead list (gc changed it on disk).
    fn with_dead(&self, dead: Vec<ObjectId>) -> Pack {
        Pack {
            path: self.path.clone(),
            file: self.file.clone(),
            prefixes: self.prefixes.clone(),
            index_offset: self.index_offset,
            flags: self.flags,
            dead,
        }
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

    fn entry(&self, i: usize) -> Result<(ObjectId, Slot)> {
        let mut e = [0u8; ENTRY_LEN];
        self.file
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
        let mut buf = vec![0u8; slot.len as usize];
        self.file
            .read_exact_at(&mut buf, slot.offset)
            .at(&self.path)?;
        Ok(buf)
    }

    /// The first bytes of the object file at `slot` (its header, for
    /// [`crate::store::object::peek`]).
    pub fn read_head(&self, slot: Slot) -> Result<Vec<u8>> {
        self.read(Slot {
            offset: slot.offset,
            len: slot.len.min(crate::store::object::HEADER_LEN as u32),
        })
    }

    /// Every entry, in ID order, dead ones included.
    pub fn for_each_entry(&self, mut f: impl FnMut(ObjectId, Slot) -> Result<()>) -> Result<()> {
        let count = self.prefixes.len() as u64;
        for_each_block(&self.file, &self.path, self.index_offset, count, |block| {
            for e in block.chunks_exact(ENTRY_LEN) {
                let (id, slot) = decode_entry(e);
                f(id, slot)?;
            }
            Ok(())
        })
    }

    pub fn is_dead(&self, id: &ObjectId) -> bool {
        self.dead.binary_search(id).is_ok()
    }

    /// Bytes of object files in the pack.
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
    (id, Slot { offset, len })
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
    file: File,
    tmp: PathBuf,
    offset: u64,
    index: PendingIndex,
    flags: u32,
    /// Bytes before this offset have been handed to the disk
    /// ([`crate::sys::start_writeback`]).
    written_back: u64,
}

/// Bytes a pack being written accumulates before their writeback starts.
const WRITEBACK_EVERY: u64 = 32 << 20;

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
        let mut e = [0u8; ENTRY_LEN];
        e[..32].copy_from_slice(id.as_bytes());
        e[32..40].copy_from_slice(&slot.offset.to_le_bytes());
        e[40..44].copy_from_slice(&slot.len.to_le_bytes());
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
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .at(&tmp)?;
        let mut header = [0u8; PACK_HEADER_LEN as usize];
        header[..8].copy_from_slice(PACK_MAGIC);
        header[8..12].copy_from_slice(&PACK_FORMAT.to_le_bytes());
        let index = file
            .write_all(&header)
            .at(&tmp)
            .and_then(|()| PendingIndex::create(side_path));
        let index = match index {
            Ok(i) => i,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        Ok(PackWriter {
            file,
            tmp,
            offset: PACK_HEADER_LEN,
            index,
            flags: 0,
            written_back: PACK_HEADER_LEN,
        })
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
        let len = u32::try_from(file.len())
            .ok()
            .filter(|l| u64::from(*l) <= MAX_OBJECT_FILE)
            .ok_or_else(|| bad(&self.tmp, format!("object {id} too large for a pack")))?;
        if self.index.n == u32::MAX {
            return Err(bad(&self.tmp, "more objects than one pack holds"));
        }
        // A short write (a full disk) leaves the offset where it was; the
        // next append overwrites the torn bytes.
        self.file.write_all_at(file, self.offset).at(&self.tmp)?;
        self.index.insert(
            &id,
            Slot {
                offset: self.offset,
                len,
            },
        )?;
        self.offset += u64::from(len);
        if self.offset - self.written_back >= WRITEBACK_EVERY {
            crate::sys::start_writeback(
                &self.file,
                self.written_back,
                self.offset - self.written_back,
            );
            self.written_back = self.offset;
        }
        Ok(())
    }

    /// An object this writer holds, as stored.
    pub fn read(&self, id: &ObjectId) -> Result<Option<Vec<u8>>> {
        let Some(slot) = self.index.find(id)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; slot.len as usize];
        self.file
            .read_exact_at(&mut buf, slot.offset)
            .at(&self.tmp)?;
        Ok(Some(buf))
    }

    /// The IDs of the objects written, in write order (for a session
    /// small enough to keep them loose).
    pub fn ids(&self) -> Result<Vec<ObjectId>> {
        (0..self.index.n)
            .map(|pos| Ok(decode_entry(&self.index.entry(pos)?).0))
            .collect()
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
        &self.tmp
    }

    /// Writes the index and footer. The caller makes the file durable
    /// (`syncfs`, or [`File::sync_all`]) before [`PackWriter::publish`].
    pub fn seal(&mut self) -> Result<()> {
        self.index.fold();
        let index_offset = self.offset;
        let mut hasher = blake3::Hasher::new();
        if self.flags != 0 {
            self.file
                .write_all_at(&self.flags.to_le_bytes(), 12)
                .at(&self.tmp)?;
        }
        let mut out = io::BufWriter::with_capacity(1 << 20, &self.file);
        use std::io::Seek;
        out.get_mut()
            .seek(io::SeekFrom::Start(index_offset))
            .at(&self.tmp)?;
        let count = u64::from(self.index.n);
        if self.index.in_order.is_some() {
            // The side file is the index, in order: copied as it is.
            let index = &self.index;
            for_each_block(&index.side, &index.side_path, 0, count, |block| {
                hasher.update(block);
                out.write_all(block).at(&self.tmp)
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
                out.write_all(e).at(&self.tmp)?;
            }
            i = j;
        }
        let mut footer = [0u8; FOOTER_LEN as usize];
        footer[..8].copy_from_slice(&index_offset.to_le_bytes());
        footer[8..16].copy_from_slice(&count.to_le_bytes());
        footer[16..48].copy_from_slice(hasher.finalize().as_bytes());
        out.write_all(&footer).at(&self.tmp)?;
        out.flush().at(&self.tmp)?;
        drop(out);
        let end = index_offset + count * ENTRY_LEN as u64 + FOOTER_LEN;
        self.file.set_len(end).at(&self.tmp)?;
        Ok(())
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Renames the sealed, durable pack into `dir` under its name (the
    /// index hash): from here on it is in the store. The caller syncs
    /// `dir`.
    pub fn publish(self, dir: &Path) -> Result<PathBuf> {
        let mut footer = [0u8; FOOTER_LEN as usize];
        let len = self.file.metadata().at(&self.tmp)?.len();
        self.file
            .read_exact_at(&mut footer, len - FOOTER_LEN)
            .at(&self.tmp)?;
        let name: String = footer[16..32].iter().map(|b| format!("{b:02x}")).collect();
        let dest = dir.join(format!("{name}.pack"));
        fs::rename(&self.tmp, &dest).at(&dest)?;
        let _ = fs::remove_file(&self.index.side_path);
        Ok(dest)
    }

    /// Drops the temp files (a session that wrote few objects keeps them
    /// loose instead; a failed seal).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.tmp);
        let _ = fs::remove_file(&self.index.side_path);
    }
}

/// The packs of one store as this process has loaded them, shared by every
/// clone of the [`super::Store`].
#[derive(Debug, Default)]
pub struct PackSet {
    inner: RwLock<Loaded>,
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
    /// Where `id` is, in the packs loaded so far.
    fn find_loaded(&self, id: &ObjectId) -> Result<Option<(Arc<Pack>, Slot)>> {
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
        let mtime = match fs::metadata(dir) {
            Ok(m) => m.modified().ok(),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e).at(dir),
        };
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
    fn a_pack_gives_back_each_object_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let objects: Vec<Vec<u8>> = (0..1000).map(chunk).collect();
        let path = packed(dir.path(), &objects);
        let pack = Pack::open(&path).unwrap();
        assert_eq!(pack.len(), 1000);
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

    /// The writer's compact index: thousands of objects (several folds of
    /// the tail), and IDs that share their first 8 bytes.
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
