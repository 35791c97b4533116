//! The stat cache: lets a rebuild skip re-reading files that did not change,
//! like git's index.
//!
//! One cache file per store and component path, in `STORE/cache/stat-<hash>`.
//! An entry is trusted only if size, mtime, ctime, inode and device all
//! match, the store's gc generation is the one the cache was written under
//! (otherwise each chunk's presence is re-checked), and the file was last
//! changed long enough before the walk that recorded it began that a later
//! change must move its timestamps (a file changed just before could change
//! again within the same timestamp tick, so it is not cached; git calls
//! this "racily clean"). How long is the filesystem's timestamp tick: one
//! whose ctimes have nanoseconds (ext4, xfs, btrfs: the kernel's coarse
//! clock, a jiffy of at most 10 ms) is trusted after [`FINE_WINDOW_NS`];
//! one whose ctimes are whole seconds (ext3's small inodes, some network
//! filesystems) after [`COARSE_WINDOW_NS`]. A ctime, unlike an mtime, is
//! set only by the kernel, so whole seconds there mean the filesystem's.
//! A build right after a `git pull` then re-reads only what the pull
//! touched in its last 100 ms, not everything of its last second.
//!
//! Layout (all integers little-endian or LEB128 varints, see store-format.md):
//! `"scapstat"`, u32 version, u64 gc generation, u64 entry count, entries,
//! then the BLAKE3 hash of everything before it. A cache that fails to parse
//! is ignored and rebuilt: it is only ever an optimization.
//!
//! Entries are in walk order ([`walk_cmp`]), the order a build visits files
//! in, so a build reads its cache front to back beside the walk: no table of
//! 263k paths is built (at production size that table was ~80 MB and a
//! tenth of an incremental build's time), and an entry is decoded only when
//! its file is looked up.

use std::cmp::Ordering;
use std::fs;
use std::path::Path;

use crate::store::codec::{ReadError, Reader, put_varint};
use crate::store::id::ChunkId;
use crate::store::tree::ChunkRef;

const MAGIC: &[u8; 8] = b"scapstat";
const VERSION: u32 = 1;
/// How long before a walk a file with sub-second timestamps must have last
/// changed to be cached: ten jiffies at HZ=100, the coarsest kernel tick.
pub const FINE_WINDOW_NS: i64 = 100_000_000;
/// The same for a filesystem whose timestamps are whole seconds.
pub const COARSE_WINDOW_NS: i64 = 1_000_000_000;

/// Magic, version, generation and count.
const HEADER_LEN: usize = 8 + 4 + 8 + 8;

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

/// The order of a walk: pre-order, siblings by name bytes. For two paths
/// relative to one root that is a byte comparison in which `/` sorts before
/// every other byte (a name never holds `/` or NUL): `a/b` before `a-c`,
/// `foo/x` before `foo.php`.
pub fn walk_cmp(a: &[u8], b: &[u8]) -> Ordering {
    let key = |c: u8| if c == b'/' { 0 } else { c };
    let n = a.len().min(b.len());
    match a[..n].iter().zip(&b[..n]).find(|(x, y)| x != y) {
        Some((&x, &y)) => key(x).cmp(&key(y)),
        None => a.len().cmp(&b.len()),
    }
}

/// A loaded cache, read by a cursor that moves forward only.
#[derive(Default)]
pub struct StatCache {
    pub generation: u64,
    /// The whole file, checksum verified.
    bytes: Vec<u8>,
    /// Where the next entry starts.
    at: usize,
    /// Entries at and after `at`.
    left: u64,
}

/// One entry, parsed as far as its stamp.
struct Head<'a> {
    key: &'a [u8],
    stamp: Stamp,
    /// Its chunk list (count and entries).
    chunks: &'a [u8],
    /// Where the next entry starts.
    end: usize,
}

impl StatCache {
    /// Loads a cache; a missing or unreadable one is an empty cache.
    pub fn load(path: &Path) -> StatCache {
        fs::read(path)
            .ok()
            .and_then(StatCache::from_bytes)
            .unwrap_or_default()
    }

    fn from_bytes(mut bytes: Vec<u8>) -> Option<StatCache> {
        let body_len = bytes.len().checked_sub(32)?;
        let (body, sum) = bytes.split_at(body_len);
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let mut r = Reader::new(body);
        if r.take(8).ok()? != MAGIC || r.u32_le().ok()? != VERSION {
            return None;
        }
        let generation = r.u64_le().ok()?;
        let left = r.u64_le().ok()?;
        bytes.truncate(body_len);
        Some(StatCache {
            generation,
            bytes,
            at: HEADER_LEN,
            left,
        })
    }

    /// Entries not yet passed by the cursor.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// The entry for `rel`, if its stamp matches. Lookups must come in walk
    /// order: entries before `rel` are passed over for good. An entry that
    /// does not parse ends the cache (every later file is read again).
    pub fn take(&mut self, rel: &[u8], stamp: &Stamp) -> Option<Cached> {
        while self.left > 0 {
            let head = match self.head() {
                Ok(head) => head,
                Err(e) => {
                    tracing::debug!(
                        "stat cache entry at byte {}: {e}; ignoring the rest",
                        self.at
                    );
                    self.left = 0;
                    return None;
                }
            };
            let order = walk_cmp(head.key, rel);
            if order == Ordering::Greater {
                return None;
            }
            let found = (order == Ordering::Equal && head.stamp == *stamp)
                .then(|| decode_chunks(head.chunks).ok())
                .flatten()
                .map(|chunks| Cached {
                    stamp: head.stamp,
                    chunks,
                });
            self.at = head.end;
            self.left -= 1;
            if order == Ordering::Equal {
                return found;
            }
        }
        None
    }

    fn head(&self) -> Result<Head<'_>, ReadError> {
        let rest = &self.bytes[self.at..];
        let mut r = Reader::new(rest);
        let n = r.len(u64::MAX)?;
        let key = r.take(n)?;
        let size = r.varint()?;
        let mtime_ns = r.u64_le()? as i64;
        let ctime_ns = r.u64_le()? as i64;
        let ino = r.u64_le()?;
        let dev = r.u64_le()?;
        let chunks_from = rest.len() - r.rest().len();
        let nchunks = r.len(u64::MAX)?;
        for _ in 0..nchunks {
            r.take(32)?;
            r.varint()?;
        }
        let end = rest.len() - r.rest().len();
        Ok(Head {
            key,
            stamp: Stamp {
                size,
                mtime_ns,
                ctime_ns,
                ino,
                dev,
            },
            chunks: &rest[chunks_from..end],
            end: self.at + end,
        })
    }
}

fn decode_chunks(bytes: &[u8]) -> Result<Vec<ChunkRef>, ReadError> {
    let mut r = Reader::new(bytes);
    let n = r.len(u64::MAX)?;
    let mut chunks = Vec::with_capacity(n.min(bytes.len() / 33));
    for _ in 0..n {
        let id = r.id()?;
        let len = u32::try_from(r.varint()?).map_err(|_| ReadError::TooLong)?;
        chunks.push(ChunkRef {
            id: ChunkId::new(id),
            len,
        });
    }
    Ok(chunks)
}

/// Writes a cache's entries as a build visits its files (in walk order),
/// leaving out those changed too close to the walk's start to be trusted
/// (see the module docs).
pub struct Encoder {
    out: Vec<u8>,
    count: u64,
    walk_start_ns: i64,
}

impl Encoder {
    pub fn new(generation: u64, walk_start_ns: i64) -> Encoder {
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&generation.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        Encoder {
            out,
            count: 0,
            walk_start_ns,
        }
    }

    /// Whether a file last changed at `stamp` is "racily clean": it could
    /// change again without its timestamps moving.
    fn racy(&self, stamp: &Stamp) -> bool {
        let fine = stamp.ctime_ns.rem_euclid(1_000_000_000) != 0;
        let cutoff = self.walk_start_ns
            - if fine {
                FINE_WINDOW_NS
            } else {
                COARSE_WINDOW_NS
            };
        stamp.mtime_ns >= cutoff || stamp.ctime_ns >= cutoff
    }

    /// Adds a file's entry; `key` must come after the last one in walk order.
    pub fn push(&mut self, key: &[u8], c: &Cached) {
        if self.racy(&c.stamp) {
            return;
        }
        self.count += 1;
        let out = &mut self.out;
        put_varint(out, key.len() as u64);
        out.extend_from_slice(key);
        put_varint(out, c.stamp.size);
        out.extend_from_slice(&c.stamp.mtime_ns.to_le_bytes());
        out.extend_from_slice(&c.stamp.ctime_ns.to_le_bytes());
        out.extend_from_slice(&c.stamp.ino.to_le_bytes());
        out.extend_from_slice(&c.stamp.dev.to_le_bytes());
        put_varint(out, c.chunks.len() as u64);
        for ch in &c.chunks {
            out.extend_from_slice(ch.id.object().as_bytes());
            put_varint(out, u64::from(ch.len));
        }
    }

    /// The encoded cache, checksum included.
    pub fn finish(mut self) -> Vec<u8> {
        self.out[HEADER_LEN - 8..HEADER_LEN].copy_from_slice(&self.count.to_le_bytes());
        let sum = blake3::hash(&self.out);
        self.out.extend_from_slice(sum.as_bytes());
        self.out
    }
}

/// Writes an encoded cache. Not fsynced: a torn cache fails its checksum
/// and is ignored.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::id::ObjectKind;

    fn chunk(b: &[u8]) -> ChunkRef {
        ChunkRef {
            id: ChunkId::new(ObjectKind::Chunk.hash(b)),
            len: b.len() as u32,
        }
    }

    const OLD: Stamp = Stamp {
        size: 1,
        mtime_ns: 1_000_000_000_000,
        ctime_ns: 1_000_000_000_000,
        ino: 5,
        dev: 1,
    };

    fn entry(chunks: Vec<ChunkRef>) -> Cached {
        Cached { stamp: OLD, chunks }
    }

    #[test]
    fn walk_order_puts_a_directory_before_its_siblings_that_extend_its_name() {
        let walk = [
            "a/b",
            "a/b.php",
            "a-c",
            "foo/x/y",
            "foo/x.php",
            "foo.php",
            "foo0",
            "z",
        ];
        for w in walk.windows(2) {
            assert_eq!(
                walk_cmp(w[0].as_bytes(), w[1].as_bytes()),
                Ordering::Less,
                "{w:?}"
            );
            assert_eq!(
                walk_cmp(w[1].as_bytes(), w[0].as_bytes()),
                Ordering::Greater
            );
        }
        assert_eq!(walk_cmp(b"a/b", b"a/b"), Ordering::Equal);
    }

    #[test]
    fn the_racy_window_is_the_filesystem_timestamp_tick() {
        let start = 2_000_300_000_000;
        let enc = Encoder::new(1, start);
        let at = |ns: i64| Stamp {
            mtime_ns: ns,
            ctime_ns: ns,
            ..OLD
        };
        // Nanosecond timestamps: trusted 100 ms before the walk.
        assert!(!enc.racy(&at(start - 150_000_123)));
        assert!(enc.racy(&at(start - 50_000_123)));
        assert!(enc.racy(&at(start + 7)));
        // Whole-second ctimes (a coarse filesystem): a second, as git.
        assert!(enc.racy(&at(2_000_000_000_000)));
        assert!(enc.racy(&Stamp {
            mtime_ns: start - 200_000_000,
            ctime_ns: 1_999_000_000_000,
            ..OLD
        }));
        assert!(!enc.racy(&at(1_998_000_000_000)));
        // An mtime set to whole seconds (tar, rsync -t) with the kernel's
        // fine ctime is a fine filesystem.
        assert!(!enc.racy(&Stamp {
            mtime_ns: 1_995_000_000_000,
            ctime_ns: start - 150_000_001,
            ..OLD
        }));
    }

    #[test]
    fn round_trip_skips_racy_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let racy = Stamp {
            mtime_ns: 1_999_500_000_000,
            ..OLD
        };
        let mut enc = Encoder::new(7, 2_000_000_000_000);
        enc.push(b"a/old.php", &entry(vec![chunk(b"x")]));
        enc.push(
            b"a/racy.php",
            &Cached {
                stamp: racy,
                chunks: vec![chunk(b"x")],
            },
        );
        enc.push(b"b.php", &entry(vec![chunk(b"y"), chunk(b"zz")]));
        write(&path, &enc.finish()).unwrap();

        let mut back = StatCache::load(&path);
        assert_eq!(back.generation, 7);
        assert_eq!(back.left(), 2, "the racily clean entry was written");
        assert_eq!(
            back.take(b"a/old.php", &OLD).map(|c| c.chunks),
            Some(vec![chunk(b"x")])
        );
        assert!(back.take(b"a/racy.php", &racy).is_none());
        assert_eq!(
            back.take(b"b.php", &OLD).map(|c| c.chunks),
            Some(vec![chunk(b"y"), chunk(b"zz")])
        );

        let mut back = StatCache::load(&path);
        assert!(back.take(b"a/old.php", &Stamp { size: 2, ..OLD }).is_none());
        // A path that is not there passes over nothing after it.
        assert!(back.take(b"a/p.php", &OLD).is_none());
        assert!(back.take(b"b.php", &OLD).is_some());
        assert_eq!(back.left(), 0);

        // A flipped byte makes the whole cache ignored, never misread.
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER_LEN + 3] ^= 1;
        fs::write(&path, bytes).unwrap();
        let mut torn = StatCache::load(&path);
        assert_eq!(torn.left(), 0);
        assert!(torn.take(b"a/old.php", &OLD).is_none());
    }

    #[test]
    fn a_lookup_behind_the_cursor_finds_nothing_and_never_a_wrong_entry() {
        let mut enc = Encoder::new(1, 2_000_000_000_000);
        for name in ["a", "b", "c"] {
            enc.push(name.as_bytes(), &entry(vec![chunk(name.as_bytes())]));
        }
        let mut back = StatCache::from_bytes(enc.finish()).unwrap();
        assert_eq!(back.take(b"b", &OLD).unwrap().chunks, vec![chunk(b"b")]);
        assert!(back.take(b"a", &OLD).is_none(), "passed over for good");
        assert_eq!(back.take(b"c", &OLD).unwrap().chunks, vec![chunk(b"c")]);
    }

    #[test]
    fn any_bytes_with_a_good_checksum_load_without_panicking() {
        // A checksum over garbage: the cursor gives up, never panics.
        for seed in 0..200u64 {
            let mut body = Vec::new();
            body.extend_from_slice(MAGIC);
            body.extend_from_slice(&VERSION.to_le_bytes());
            body.extend_from_slice(&0u64.to_le_bytes());
            body.extend_from_slice(&u64::MAX.to_le_bytes());
            body.extend_from_slice(&crate::store::chunk::noise(seed as usize, seed + 1));
            let sum = blake3::hash(&body);
            body.extend_from_slice(sum.as_bytes());
            let mut c = StatCache::from_bytes(body).unwrap();
            for key in [&b""[..], b"a", b"zzzz", b"\xff\xff"] {
                let _ = c.take(key, &OLD);
            }
        }
    }
}
