//! Tree objects: one directory's sorted, canonical listing.
//!
//! The byte layout is specified in store-format.md ("Tree encoding"). There
//! is exactly one encoding of a given listing, so a directory has exactly one
//! ID; [`Tree::decode`] rejects every other byte sequence, whatever its
//! origin (a corrupt disk, a hostile server).

use std::fmt;

use thiserror::Error;

use super::codec::{ReadError, Reader, put_varint};
use super::id::{ChunkId, ID_LEN, ObjectId, ObjectKind, TreeId};

/// Version byte at the start of every encoded tree.
pub const TREE_FORMAT: u8 = 1;
/// Longest name accepted (Linux NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target accepted (Linux PATH_MAX less the NUL).
pub const MAX_TARGET_LEN: usize = 4095;
/// Most entries in one tree; a deploy tree with more in one directory is a mistake.
pub const MAX_ENTRIES: u64 = 1 << 20;
/// Largest tree object (its uncompressed content) a host accepts: about
/// 60,000 entries of ordinary names (MediaWiki's largest directory has a
/// few hundred), and small enough that a hostile source cannot make a host
/// buffer much while the walk checks it.
pub const MAX_TREE_LEN: u64 = 4 << 20;
/// Deepest nesting of directories in a version (the root's entries are at
/// depth 1). MediaWiki's deepest path is about 15 levels; the bound keeps
/// every recursive walk of a hostile tree within a thread's stack.
pub const MAX_DEPTH: usize = 256;

/// One path component: non-empty, at most 255 bytes, not `.` or `..`, no `/`
/// and no NUL. Any other bytes (non-UTF-8 included) are allowed.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TreeName(Vec<u8>);

impl TreeName {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<TreeName, TreeError> {
        let bytes = bytes.into();
        let bad = |why| TreeError::BadName {
            name: String::from_utf8_lossy(&bytes).into_owned(),
            why,
        };
        if bytes.is_empty() {
            return Err(bad("empty"));
        }
        if bytes == b"." || bytes == b".." {
            return Err(bad("'.' and '..' are not names"));
        }
        if bytes.len() > MAX_NAME_LEN {
            return Err(bad("longer than 255 bytes"));
        }
        if bytes.contains(&b'/') {
            return Err(bad("contains '/'"));
        }
        if bytes.contains(&0) {
            return Err(bad("contains NUL"));
        }
        Ok(TreeName(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_os_string(&self) -> std::ffi::OsString {
        use std::os::unix::ffi::OsStringExt;
        std::ffi::OsString::from_vec(self.0.clone())
    }
}

impl fmt::Display for TreeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for TreeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// A piece of a file: its chunk and how many bytes of the file it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// What a name points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// A regular file. `executable` is the only mode bit a version records.
    File {
        executable: bool,
        size: u64,
        chunks: Vec<ChunkRef>,
    },
    /// A symlink, stored as its target bytes and never followed.
    Symlink { target: Vec<u8> },
    /// A subdirectory, with the totals of the regular files below it.
    Dir { tree: TreeId, size: u64, files: u64 },
}

impl Content {
    /// One-letter kind, as `ls` and `diff` print it.
    pub fn kind_char(&self) -> char {
        match self {
            Content::File {
                executable: false, ..
            } => 'f',
            Content::File {
                executable: true, ..
            } => 'x',
            Content::Symlink { .. } => 'l',
            Content::Dir { .. } => 'd',
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Content::File {
                executable: false, ..
            } => "file",
            Content::File {
                executable: true, ..
            } => "executable",
            Content::Symlink { .. } => "symlink",
            Content::Dir { .. } => "dir",
        }
    }

    /// Bytes of regular-file content this entry stands for.
    pub fn size(&self) -> u64 {
        match self {
            Content::File { size, .. } | Content::Dir { size, .. } => *size,
            Content::Symlink { .. } => 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: TreeName,
    pub content: Content,
}

/// A directory listing, sorted by name bytes, names unique.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tree {
    entries: Vec<Entry>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("bad name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("tree is not canonical: {0}")]
    NotCanonical(&'static str),
    #[error("tree is truncated")]
    Truncated,
    #[error("tree format {0} is newer than this scap reads (up to {TREE_FORMAT}): upgrade scap")]
    NewerFormat(u8),
    #[error("unknown entry kind {0}")]
    UnknownKind(u8),
    #[error("entry {0:?} appears twice or out of order")]
    Unsorted(String),
}

impl From<ReadError> for TreeError {
    fn from(e: ReadError) -> TreeError {
        match e {
            ReadError::Truncated => TreeError::Truncated,
            ReadError::NotMinimal => TreeError::NotCanonical("varint not minimal"),
            ReadError::Overflow => TreeError::NotCanonical("varint overflows 64 bits"),
            ReadError::TooLong => TreeError::NotCanonical("length over its limit"),
        }
    }
}

impl Tree {
    /// Builds a tree from entries in any order; fails on a duplicate name.
    pub fn new(mut entries: Vec<Entry>) -> Result<Tree, TreeError> {
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = entries.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(TreeError::Unsorted(w[0].name.to_string()));
        }
        Ok(Tree { entries })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, name: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.name.as_bytes().cmp(name))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// IDs of every object this tree references directly.
    pub fn children(&self) -> impl Iterator<Item = ObjectId> + '_ {
        self.entries.iter().flat_map(|e| {
            let ids: Vec<ObjectId> = match &e.content {
                Content::File { chunks, .. } => chunks.iter().map(|c| c.id.object()).collect(),
                Content::Dir { tree, .. } => vec![tree.object()],
                Content::Symlink { .. } => Vec::new(),
            };
            ids
        })
    }

    /// Total regular-file bytes and count directly and below this tree.
    pub fn totals(&self) -> (u64, u64) {
        self.entries
            .iter()
            .fold((0, 0), |(size, files), e| match &e.content {
                Content::File { size: s, .. } => (size + s, files + 1),
                Content::Dir {
                    size: s, files: f, ..
                } => (size + s, files + f),
                Content::Symlink { .. } => (size, files),
            })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.entries.len() * 64);
        out.push(TREE_FORMAT);
        put_varint(&mut out, self.entries.len() as u64);
        for e in &self.entries {
            put_varint(&mut out, e.name.0.len() as u64);
            out.extend_from_slice(&e.name.0);
            match &e.content {
                Content::File {
                    executable,
                    size,
                    chunks,
                } => {
                    out.push(if *executable { 2 } else { 1 });
                    put_varint(&mut out, *size);
                    put_varint(&mut out, chunks.len() as u64);
                    for c in chunks {
                        out.extend_from_slice(c.id.object().as_bytes());
                        put_varint(&mut out, u64::from(c.len));
                    }
                }
                Content::Symlink { target } => {
                    out.push(3);
                    put_varint(&mut out, target.len() as u64);
                    out.extend_from_slice(target);
                }
                Content::Dir { tree, size, files } => {
                    out.push(4);
                    out.extend_from_slice(tree.object().as_bytes());
                    put_varint(&mut out, *size);
                    put_varint(&mut out, *files);
                }
            }
        }
        out
    }

    pub fn id(&self) -> TreeId {
        TreeId::new(ObjectKind::Tree.hash(&self.encode()))
    }

    /// Decodes a tree, accepting only the canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<Tree, TreeError> {
        let mut r = Reader::new(bytes);
        let format = r.u8()?;
        if format > TREE_FORMAT {
            return Err(TreeError::NewerFormat(format));
        }
        if format != TREE_FORMAT {
            return Err(TreeError::NotCanonical("format byte 0"));
        }
        let count = r.varint()?;
        if count > MAX_ENTRIES {
            return Err(TreeError::NotCanonical("more than 2^20 entries"));
        }
        // Every entry takes at least 4 bytes, so this never over-allocates
        // more than 16x the (already bounded) input.
        let mut entries: Vec<Entry> = Vec::with_capacity((count as usize).min(bytes.len() / 4));
        for _ in 0..count {
            let name_len = r.len(MAX_NAME_LEN as u64)?;
            let name = TreeName::new(r.take(name_len)?)?;
            if let Some(prev) = entries.last()
                && prev.name >= name
            {
                return Err(TreeError::Unsorted(name.to_string()));
            }
            let content = match r.u8()? {
                kind @ (1 | 2) => {
                    let size = r.varint()?;
                    let n = r.varint()?;
                    if n > (r.rest().len() / (ID_LEN + 1)) as u64 {
                        return Err(TreeError::Truncated);
                    }
                    let mut chunks = Vec::with_capacity(n as usize);
                    let mut sum: u64 = 0;
                    for _ in 0..n {
                        let id = ChunkId::new(r.id()?);
                        let len = r.varint()?;
                        if len == 0 || len > u64::from(u32::MAX) {
                            return Err(TreeError::NotCanonical("chunk length 0 or over 2^32"));
                        }
                        sum += len;
                        chunks.push(ChunkRef {
                            id,
                            len: len as u32,
                        });
                    }
                    if sum != size {
                        return Err(TreeError::NotCanonical(
                            "chunk lengths do not add up to size",
                        ));
                    }
                    Content::File {
                        executable: kind == 2,
                        size,
                        chunks,
                    }
                }
                3 => {
                    let len = r.len(MAX_TARGET_LEN as u64)?;
                    if len == 0 {
                        return Err(TreeError::NotCanonical("empty symlink target"));
                    }
                    let target = r.take(len)?.to_vec();
                    if target.contains(&0) {
                        return Err(TreeError::NotCanonical("NUL in symlink target"));
                    }
                    Content::Symlink { target }
                }
                4 => {
                    let tree = TreeId::new(r.id()?);
                    let size = r.varint()?;
                    let files = r.varint()?;
                    Content::Dir { tree, size, files }
                }
                k => return Err(TreeError::UnknownKind(k)),
            };
            entries.push(Entry { name, content });
        }
        if !r.is_empty() {
            return Err(TreeError::NotCanonical("trailing bytes"));
        }
        Ok(Tree { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TreeName {
        TreeName::new(s.as_bytes().to_vec()).unwrap()
    }

    fn sample() -> Tree {
        let chunk = ChunkId::new(ObjectKind::Chunk.hash(b"hello"));
        Tree::new(vec![
            Entry {
                name: name("b.php"),
                content: Content::File {
                    executable: false,
                    size: 5,
                    chunks: vec![ChunkRef { id: chunk, len: 5 }],
                },
            },
            Entry {
                name: name("a"),
                content: Content::Symlink {
                    target: b"../x".to_vec(),
                },
            },
            Entry {
                name: name("run.sh"),
                content: Content::File {
                    executable: true,
                    size: 0,
                    chunks: vec![],
                },
            },
            Entry {
                name: name("sub"),
                content: Content::Dir {
                    tree: TreeId::new(ObjectKind::Tree.hash(b"")),
                    size: 300,
                    files: 2,
                },
            },
        ])
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let bytes = t.encode();
        assert_eq!(Tree::decode(&bytes).unwrap(), t);
        assert_eq!(t.entries()[0].name, name("a"));
        assert_eq!(t.totals(), (305, 4));
        assert!(t.get(b"run.sh").is_some());
        assert!(t.get(b"nope").is_none());
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(TreeName::new(bad.as_bytes().to_vec()).is_err(), "{bad:?}");
        }
        assert!(TreeName::new(vec![b'x'; 256]).is_err());
        assert!(TreeName::new(vec![0xff, 0xfe]).is_ok());
    }

    #[test]
    fn rejects_non_canonical() {
        let good = sample().encode();
        // Trailing byte.
        let mut b = good.clone();
        b.push(0);
        assert_eq!(
            Tree::decode(&b),
            Err(TreeError::NotCanonical("trailing bytes"))
        );
        // Every truncation fails cleanly.
        for n in 0..good.len() {
            assert!(Tree::decode(&good[..n]).is_err(), "prefix {n}");
        }
        // Non-minimal varint for the count: 4 as [0x84, 0x00].
        let mut b = vec![TREE_FORMAT, 0x84, 0x00];
        b.extend_from_slice(&good[2..]);
        assert!(Tree::decode(&b).is_err());
        // Newer format.
        let mut b = good.clone();
        b[0] = 9;
        assert_eq!(Tree::decode(&b), Err(TreeError::NewerFormat(9)));
        // Duplicate names.
        let e = sample().entries()[0].clone();
        let dup = Tree {
            entries: vec![e.clone(), e],
        };
        assert!(matches!(
            Tree::decode(&dup.encode()),
            Err(TreeError::Unsorted(_))
        ));
        assert!(Tree::new(dup.entries.clone()).is_err());
        // Hostile names smuggled past the constructor.
        for bad in [&b".."[..], b"a/b", b""] {
            let t = Tree {
                entries: vec![Entry {
                    name: TreeName(bad.to_vec()),
                    content: Content::Symlink {
                        target: b"x".to_vec(),
                    },
                }],
            };
            assert!(matches!(
                Tree::decode(&t.encode()),
                Err(TreeError::BadName { .. })
            ));
        }
    }

    /// The example in store-format.md, byte for byte.
    #[test]
    fn documented_example() {
        let t = Tree::new(vec![
            Entry {
                name: name("b"),
                content: Content::File {
                    executable: false,
                    size: 0,
                    chunks: vec![],
                },
            },
            Entry {
                name: name("a"),
                content: Content::Symlink {
                    target: b"../x".to_vec(),
                },
            },
        ])
        .unwrap();
        assert_eq!(
            t.encode(),
            [
                1, 2, 1, b'a', 3, 4, b'.', b'.', b'/', b'x', 1, b'b', 1, 0, 0
            ]
        );
    }

    /// What the `tree_decode` fuzz target checks, on seeded mutations of a
    /// valid tree so it runs in every `cargo test`.
    #[test]
    fn mutated_trees_never_panic() {
        let good = sample().encode();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % b.len() as u64) as usize;
                match next() % 3 {
                    0 => b[i] = next() as u8,
                    1 => {
                        b.insert(i, next() as u8);
                    }
                    _ => {
                        b.remove(i);
                    }
                }
                if b.is_empty() {
                    break;
                }
            }
            if let Ok(t) = Tree::decode(&b) {
                assert_eq!(t.encode(), b, "accepted input must be canonical");
            }
        }
    }
}
