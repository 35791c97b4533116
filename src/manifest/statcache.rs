//! The stat cache: lets a rebuild skip re-reading files that did not change,
//! like git's index.
//!
//! One cache file per store and component path, in `STORE/cache/stat-<hash>`.
//! An entry is trusted only if size, mtime, ctime, inode and device all
//! match, the store's gc generation is the one the cache was written under
//! (otherwise each chunk's presence is re-checked), and the file was last
//! changed at least a second before the walk that recorded it began (a file
//! changed in the same second could change again without its mtime moving,
//! so it is not cached; git calls this "racily clean").
//!
//! Layout (all integers little-endian or LEB128 varints, see store-format.md):
//! `"scapstat"`, u32 version, u64 gc generation, u64 entry count, entries,
//! then the BLAKE3 hash of everything before it. A cache that fails to parse
//! is ignored and rebuilt: it is only ever an optimization.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use crate::store::codec::{Reader, put_varint};
use crate::store::id::ChunkId;
use crate::store::tree::ChunkRef;

const MAGIC: &[u8; 8] = b"scapstat";
const VERSION: u32 = 1;

/// What identifies a file's content without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

impl Stamp {
    pub fn of(meta: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Cached {
    pub stamp: Stamp,
    pub chunks: Vec<ChunkRef>,
}

#[derive(Default)]
pub struct StatCache {
    pub generation: u64,
    pub entries: HashMap<Vec<u8>, Cached>,
}

impl StatCache {
    /// Loads a cache; a missing or unreadable one is an empty cache.
    pub fn load(path: &Path) -> StatCache {
        fs::read(path)
            .ok()
            .and_then(|b| decode(&b))
            .unwrap_or_default()
    }

    /// Moves an entry out if its stamp matches.
    pub fn take(&mut self, rel: &[u8], stamp: &Stamp) -> Option<Cached> {
        match self.entries.get(rel) {
            Some(c) if c.stamp == *stamp => self.entries.remove(rel),
            _ => None,
        }
    }
}

/// Encodes a cache of `entries`, leaving out those changed at or after
/// `walk_start_ns - 1s` (see the module docs).
pub fn encode<'a>(
    generation: u64,
    walk_start_ns: i64,
    entries: impl Iterator<Item = (&'a [u8], &'a Cached)>,
) -> Vec<u8> {
    let cutoff = walk_start_ns - 1_000_000_000;
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    let count_at = out.len();
    out.extend_from_slice(&0u64.to_le_bytes());
    let mut count: u64 = 0;
    for (key, c) in entries {
        if c.stamp.mtime_ns >= cutoff || c.stamp.ctime_ns >= cutoff {
            continue;
        }
        count += 1;
        put_varint(&mut out, key.len() as u64);
        out.extend_from_slice(key);
        put_varint(&mut out, c.stamp.size);
        out.extend_from_slice(&c.stamp.mtime_ns.to_le_bytes());
        out.extend_from_slice(&c.stamp.ctime_ns.to_le_bytes());
        out.extend_from_slice(&c.stamp.ino.to_le_bytes());
        out.extend_from_slice(&c.stamp.dev.to_le_bytes());
        put_varint(&mut out, c.chunks.len() as u64);
        for ch in &c.chunks {
            out.extend_from_slice(ch.id.object().as_bytes());
            put_varint(&mut out, u64::from(ch.len));
        }
    }
    out[count_at..count_at + 8].copy_from_slice(&count.to_le_bytes());
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Writes an encoded cache. Not fsynced: a torn cache fails its checksum
/// and is ignored.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

fn decode(bytes: &[u8]) -> Option<StatCache> {
    let (body, sum) = bytes.split_at(bytes.len().checked_sub(32)?);
    if blake3::hash(body).as_bytes() != sum {
        return None;
    }
    let mut r = Reader::new(body);
    if r.take(8).ok()? != MAGIC || r.u32_le().ok()? != VERSION {
        return None;
    }
    let generation = r.u64_le().ok()?;
    let count = r.u64_le().ok()?;
    let mut entries = HashMap::with_capacity((count as usize).min(r.rest().len() / 40));
    for _ in 0..count {
        let n = r.len(u64::MAX).ok()?;
        let key = r.take(n).ok()?.to_vec();
        let size = r.varint().ok()?;
        let mtime_ns = r.u64_le().ok()? as i64;
        let ctime_ns = r.u64_le().ok()? as i64;
        let ino = r.u64_le().ok()?;
        let dev = r.u64_le().ok()?;
        let nchunks = r.len(u64::MAX).ok()?;
        let mut chunks = Vec::with_capacity(nchunks.min(r.rest().len() / 33));
        for _ in 0..nchunks {
            let id = r.id().ok()?;
            let len = u32::try_from(r.varint().ok()?).ok()?;
            chunks.push(ChunkRef {
                id: ChunkId::new(id),
                len,
            });
        }
        let stamp = Stamp {
            size,
            mtime_ns,
            ctime_ns,
            ino,
            dev,
        };
        entries.insert(key, Cached { stamp, chunks });
    }
    r.is_empty().then_some(StatCache {
        generation,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::id::ObjectKind;

    #[test]
    fn round_trip_skips_racy_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let mut c = StatCache {
            generation: 7,
            ..Default::default()
        };
        let chunk = ChunkRef {
            id: ChunkId::new(ObjectKind::Chunk.hash(b"x")),
            len: 1,
        };
        let old = Stamp {
            size: 1,
            mtime_ns: 1_000_000_000_000,
            ctime_ns: 1_000_000_000_000,
            ino: 5,
            dev: 1,
        };
        let racy = Stamp {
            mtime_ns: 1_999_500_000_000,
            ..old
        };
        c.entries.insert(
            b"a/old.php".to_vec(),
            Cached {
                stamp: old,
                chunks: vec![chunk],
            },
        );
        c.entries.insert(
            b"a/racy.php".to_vec(),
            Cached {
                stamp: racy,
                chunks: vec![chunk],
            },
        );
        let entries = c.entries.iter().map(|(k, v)| (k.as_slice(), v));
        write(&path, &encode(c.generation, 2_000_000_000_000, entries)).unwrap();
        let mut back = StatCache::load(&path);
        assert_eq!(back.generation, 7);
        assert!(
            back.take(b"a/racy.php", &racy).is_none(),
            "racily clean entry was kept"
        );
        assert!(back.take(b"a/old.php", &Stamp { size: 2, ..old }).is_none());
        assert_eq!(
            back.take(b"a/old.php", &old).map(|c| c.chunks),
            Some(vec![chunk])
        );
        // A flipped byte makes the whole cache ignored, never misread.
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(StatCache::load(&path).entries.is_empty());
    }
}
