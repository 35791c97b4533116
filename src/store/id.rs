//! Object IDs: BLAKE3 digests with one derive-key context per object kind.
//!
//! A chunk and a tree holding the same bytes get different IDs, because each
//! kind is hashed in BLAKE3's key-derivation mode with its own context string
//! (see store-format.md, "Object IDs"). IDs are shown as 64 lowercase hex
//! digits everywhere a person or a program sees them.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Length of every object ID, in bytes.
pub const ID_LEN: usize = 32;

/// Fewest hex digits accepted as a version prefix.
pub const MIN_PREFIX_LEN: usize = 8;

/// The kind of an object. The kind is part of the ID (via the hash context)
/// and of the object file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Chunk,
    Tree,
}

impl ObjectKind {
    /// BLAKE3 derive-key context. Changing one changes every ID: never do.
    pub(crate) fn context(self) -> &'static str {
        match self {
            ObjectKind::Chunk => "scap 2026-11-26 object chunk v1",
            ObjectKind::Tree => "scap 2026-11-26 object tree v1",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            ObjectKind::Chunk => 1,
            ObjectKind::Tree => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<ObjectKind> {
        match code {
            1 => Some(ObjectKind::Chunk),
            2 => Some(ObjectKind::Tree),
            _ => None,
        }
    }

    /// Hashes `data` as an object of this kind.
    pub fn hash(self, data: &[u8]) -> ObjectId {
        let mut hasher = blake3::Hasher::new_derive_key(self.context());
        // Multi-threaded hashing only pays off on large inputs.
        if data.len() >= 1 << 20 {
            hasher.update_rayon(data);
        } else {
            hasher.update(data);
        }
        ObjectId(*hasher.finalize().as_bytes())
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Chunk => "chunk",
            ObjectKind::Tree => "tree",
        })
    }
}

/// The digest of an object of any kind. Prefer the typed IDs below in
/// signatures; this is what the store files objects under.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub(crate) [u8; ID_LEN]);

impl ObjectId {
    pub fn from_bytes(bytes: [u8; ID_LEN]) -> ObjectId {
        ObjectId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    /// Its loose object's path under `objects/`, `xx/` and the other 62
    /// hex digits, NUL-terminated (for a system call, without allocating).
    pub fn loose_name(&self) -> [u8; ID_LEN * 2 + 2] {
        let mut out = [0u8; ID_LEN * 2 + 2];
        let mut at = 0;
        for (i, b) in self.0.iter().enumerate() {
            for nibble in [b >> 4, b & 0xf] {
                out[at] = HEX[usize::from(nibble)];
                at += 1;
                if at == 2 && i == 0 {
                    out[at] = b'/';
                    at += 1;
                }
            }
        }
        out
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(ID_LEN * 2);
        for b in self.0 {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 0xf) as usize] as char);
        }
        s
    }

    /// The first `n` hex digits, for display.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(12);
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A string that is not a valid ID or ID prefix.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{0:?} is not a version ID: expected hex digits (0-9, a-f)")]
    NotHex(String),
    #[error("{0:?} is not a full ID: expected 64 hex digits, got {1}")]
    WrongLength(String, usize),
    #[error("{0:?} is too short to name a version: give at least {MIN_PREFIX_LEN} hex digits")]
    PrefixTooShort(String),
}

impl FromStr for ObjectId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<ObjectId, IdError> {
        let digits = hex_digits(s)?;
        if digits.len() != ID_LEN * 2 {
            return Err(IdError::WrongLength(s.to_string(), s.len()));
        }
        let mut out = [0u8; ID_LEN];
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            out[i] = (pair[0] << 4) | pair[1];
        }
        Ok(ObjectId(out))
    }
}

fn hex_digits(s: &str) -> Result<Vec<u8>, IdError> {
    s.bytes()
        .map(|c| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(IdError::NotHex(s.to_string())),
        })
        .collect()
}

/// A hex prefix of a version ID as a user typed it, lowercased and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdPrefix(String);

impl IdPrefix {
    pub fn parse(s: &str) -> Result<IdPrefix, IdError> {
        hex_digits(s)?;
        if s.len() < MIN_PREFIX_LEN {
            return Err(IdError::PrefixTooShort(s.to_string()));
        }
        if s.len() > ID_LEN * 2 {
            return Err(IdError::WrongLength(s.to_string(), s.len()));
        }
        Ok(IdPrefix(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, id: &ObjectId) -> bool {
        id.to_hex().starts_with(&self.0)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", self.short())
    }
}

/// Defines a typed ID over [`ObjectId`] (after rustic_core's `define_new_id_struct!`).
macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(ObjectId);

        impl $name {
            pub const KIND: ObjectKind = $kind;

            pub fn new(id: ObjectId) -> Self {
                $name(id)
            }

            pub fn object(&self) -> ObjectId {
                self.0
            }

            pub fn to_hex(&self) -> String {
                self.0.to_hex()
            }

            pub fn short(&self) -> String {
                self.0.short()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.short())
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                s.parse().map($name)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

typed_id!(
    /// ID of a chunk: a piece of a file's content.
    ChunkId,
    ObjectKind::Chunk
);
typed_id!(
    /// ID of a tree: one directory's canonical listing.
    TreeId,
    ObjectKind::Tree
);
typed_id!(
    /// ID of a version: the root tree over all deployed components. The
    /// version record (label, author, ...) is kept beside it, not hashed in.
    VersionId,
    ObjectKind::Tree
);

impl VersionId {
    pub fn root(&self) -> TreeId {
        TreeId(self.0)
    }
}

impl From<TreeId> for VersionId {
    fn from(t: TreeId) -> VersionId {
        VersionId(t.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_name_is_the_fan_out_path() {
        for data in [&b""[..], b"a", b"<?php"] {
            let id = ObjectKind::Chunk.hash(data);
            let hex = id.to_hex();
            let want = format!("{}/{}\0", &hex[..2], &hex[2..]);
            assert_eq!(id.loose_name().as_slice(), want.as_bytes());
        }
    }

    #[test]
    fn kinds_are_domain_separated() {
        let data = b"<?php echo 'hello';";
        assert_ne!(ObjectKind::Chunk.hash(data), ObjectKind::Tree.hash(data));
        // Not plain BLAKE3 either: b3sum output must not name a scap object.
        assert_ne!(
            ObjectKind::Chunk.hash(data).0,
            *blake3::hash(data).as_bytes()
        );
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let id = ObjectKind::Chunk.hash(b"x");
        let hex = id.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex.parse::<ObjectId>().unwrap(), id);
        assert_eq!(hex.to_uppercase().parse::<ObjectId>().unwrap(), id);
        assert!(matches!("zz".parse::<ObjectId>(), Err(IdError::NotHex(_))));
        assert!(matches!(
            "abcd".parse::<ObjectId>(),
            Err(IdError::WrongLength(_, 4))
        ));
        assert!(matches!(
            IdPrefix::parse("abc"),
            Err(IdError::PrefixTooShort(_))
        ));
        let p = IdPrefix::parse(&hex[..8].to_uppercase()).unwrap();
        assert!(p.matches(&id));
    }
}
