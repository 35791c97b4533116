//! Object files: the byte layout of one stored object, on disk and on the wire.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "scap"
//!      4     1  object format version (1)
//!      5     1  kind: 1 chunk, 2 tree
//!      6     1  compression: 0 none, 1 zstd (one frame)
//!      7     1  reserved, 0
//!      8     8  uncompressed length, u64 little-endian
//!     16     …  payload
//! ```
//!
//! The ID is the kind's BLAKE3 hash of the uncompressed payload, so a reader
//! checks an object by decoding it and hashing the result; the file name (or
//! the URL) says which ID to expect.

use thiserror::Error;

use super::id::{ObjectId, ObjectKind};

pub const MAGIC: &[u8; 4] = b"scap";
pub const OBJECT_FORMAT: u8 = 1;
pub const HEADER_LEN: usize = 16;
/// Largest uncompressed object accepted: bounds memory on hostile input.
pub const MAX_OBJECT_LEN: u64 = 64 << 20;
/// zstd level for stored objects. On MediaWiki-like source, level 2
/// compresses about 25% faster than 3 for 5% more bytes; what crosses the
/// network is compressed again as one stream (see `net`).
pub const ZSTD_LEVEL: i32 = 2;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("object {id} is truncated ({len} bytes)")]
    Truncated { id: ObjectId, len: usize },
    #[error("object {id} has no scap header (bad magic)")]
    BadMagic { id: ObjectId },
    #[error("object {id} is format v{found}, this scap reads up to v{OBJECT_FORMAT}: upgrade scap")]
    NewerFormat { id: ObjectId, found: u8 },
    #[error("object {id} is a {found}, expected a {expected}")]
    WrongKind {
        id: ObjectId,
        expected: ObjectKind,
        found: String,
    },
    #[error("object {id} has a bad header: {why}")]
    BadHeader { id: ObjectId, why: &'static str },
    #[error("object {id} does not decompress: {why}")]
    Corrupt { id: ObjectId, why: String },
    #[error("object {id} is corrupt: its content hashes to {actual}")]
    HashMismatch { id: ObjectId, actual: ObjectId },
}

thread_local! {
    // zstd contexts are costly to set up (about as costly as compressing a
    // small file), so each thread keeps one of each.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut()?.compress(data).ok()
    })
}

fn decompress(payload: &[u8], len: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("set above").decompress(payload, len)
    })
}

/// Encodes `data` as an object file, compressing it when that saves space.
pub fn encode(kind: ObjectKind, data: &[u8]) -> Vec<u8> {
    let compressed = compress(data);
    let (compression, payload) = match &compressed {
        Some(c) if c.len() < data.len() => (1u8, c.as_slice()),
        _ => (0u8, data),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(OBJECT_FORMAT);
    out.push(kind.code());
    out.push(compression);
    out.push(0);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// An object file stored uncompressed as it arrived (see
/// [`crate::store::disk::Writer::put_checked`]), checked against `id` and
/// encoded as [`encode`] would have: compressed when that saves space.
/// Any other file is checked and returned as it is.
pub fn compressed(id: ObjectId, file: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, ObjectError> {
    let (kind, _) = peek(id, file)?;
    let data = decode_borrowed(id, kind, file, MAX_OBJECT_LEN)?;
    Ok(if is_uncompressed(file) {
        std::borrow::Cow::Owned(encode(kind, &data))
    } else {
        std::borrow::Cow::Borrowed(file)
    })
}

/// The same object with its payload stored uncompressed, for a stream that
/// is compressed as a whole. Not verified (the receiver verifies); a file
/// that does not decompress is returned as it is, for the receiver to reject.
pub fn uncompressed(id: ObjectId, file: &[u8]) -> Vec<u8> {
    let Ok((_, len)) = peek(id, file) else {
        return file.to_vec();
    };
    if file[6] == 0 {
        return file.to_vec();
    }
    match decompress(&file[HEADER_LEN..], len as usize) {
        Ok(data) if data.len() as u64 == len => {
            let mut out = Vec::with_capacity(HEADER_LEN + data.len());
            out.extend_from_slice(&file[..HEADER_LEN]);
            out[6] = 0;
            out.extend_from_slice(&data);
            out
        }
        _ => file.to_vec(),
    }
}

/// Whether `file` (an object file, not yet verified) says its payload is
/// stored uncompressed.
pub fn is_uncompressed(file: &[u8]) -> bool {
    file.get(6) == Some(&0)
}

/// Reads only the header: the kind and uncompressed length.
pub fn peek(id: ObjectId, file: &[u8]) -> Result<(ObjectKind, u64), ObjectError> {
    if file.len() < HEADER_LEN {
        return Err(ObjectError::Truncated {
            id,
            len: file.len(),
        });
    }
    if &file[..4] != MAGIC {
        return Err(ObjectError::BadMagic { id });
    }
    if file[4] > OBJECT_FORMAT {
        return Err(ObjectError::NewerFormat { id, found: file[4] });
    }
    if file[4] != OBJECT_FORMAT {
        return Err(ObjectError::BadHeader {
            id,
            why: "format 0",
        });
    }
    let kind = ObjectKind::from_code(file[5]).ok_or(ObjectError::BadHeader {
        id,
        why: "unknown kind",
    })?;
    if file[7] != 0 {
        return Err(ObjectError::BadHeader {
            id,
            why: "reserved byte is not 0",
        });
    }
    let len = u64::from_le_bytes(file[8..16].try_into().expect("8 bytes"));
    if len > MAX_OBJECT_LEN {
        return Err(ObjectError::BadHeader {
            id,
            why: "length over 64 MiB",
        });
    }
    Ok((kind, len))
}

/// Decodes an object file and checks that it is object `id` of kind `expected`.
pub fn decode(id: ObjectId, expected: ObjectKind, file: &[u8]) -> Result<Vec<u8>, ObjectError> {
    decode_within(id, expected, file, MAX_OBJECT_LEN)
}

/// [`decode`] for an object file already verified against `id` from
/// these very bytes (by the receiver that stored it): its header is
/// checked, its content not hashed again, and an uncompressed payload is
/// moved to the front of `file`, not copied.
pub fn decode_verified(
    id: ObjectId,
    expected: ObjectKind,
    mut file: Vec<u8>,
) -> Result<Vec<u8>, ObjectError> {
    let len = check_header(id, expected, &file, MAX_OBJECT_LEN)?;
    if file[6] != 0 || (file.len() - HEADER_LEN) as u64 != len {
        return decode(id, expected, &file);
    }
    file.copy_within(HEADER_LEN.., 0);
    file.truncate(len as usize);
    Ok(file)
}

/// The content of an object file already verified against `id` from these
/// very bytes, where it lies in them (stored uncompressed); `None` when it
/// must be decoded ([`decode_verified`]).
pub fn verified_payload(
    id: ObjectId,
    expected: ObjectKind,
    file: &[u8],
) -> Result<Option<&[u8]>, ObjectError> {
    let len = check_header(id, expected, file, MAX_OBJECT_LEN)?;
    Ok((file[6] == 0 && (file.len() - HEADER_LEN) as u64 == len).then(|| &file[HEADER_LEN..]))
}

/// The content length an object file's header gives, once the header is
/// checked: well formed, of kind `expected`, at most `max_len` bytes.
fn check_header(
    id: ObjectId,
    expected: ObjectKind,
    file: &[u8],
    max_len: u64,
) -> Result<u64, ObjectError> {
    let (kind, len) = peek(id, file)?;
    if len > max_len {
        return Err(ObjectError::BadHeader {
            id,
            why: "longer than its tree says",
        });
    }
    if kind != expected {
        return Err(ObjectError::WrongKind {
            id,
            expected,
            found: kind.to_string(),
        });
    }
    Ok(len)
}

/// Like [`decode`], refusing (before decompressing anything) an object
/// whose header claims more than `max_len` bytes of content: a chunk must
/// be the length its tree gives it.
pub fn decode_within(
    id: ObjectId,
    expected: ObjectKind,
    file: &[u8],
    max_len: u64,
) -> Result<Vec<u8>, ObjectError> {
    decode_borrowed(id, expected, file, max_len).map(std::borrow::Cow::into_owned)
}

/// [`decode_within`] without a copy of an uncompressed payload: the content
/// borrowed from `file`, checked against `id`.
pub fn decode_borrowed(
    id: ObjectId,
    expected: ObjectKind,
    file: &[u8],
    max_len: u64,
) -> Result<std::borrow::Cow<'_, [u8]>, ObjectError> {
    use std::borrow::Cow;
    let len = check_header(id, expected, file, max_len)?;
    let payload = &file[HEADER_LEN..];
    let data = match file[6] {
        0 => Cow::Borrowed(payload),
        1 => Cow::Owned(
            decompress(payload, len as usize).map_err(|e| ObjectError::Corrupt {
                id,
                why: e.to_string(),
            })?,
        ),
        _ => {
            return Err(ObjectError::BadHeader {
                id,
                why: "unknown compression",
            });
        }
    };
    if data.len() as u64 != len {
        return Err(ObjectError::Corrupt {
            id,
            why: format!("{} bytes, header says {len}", data.len()),
        });
    }
    let actual = expected.hash(&data);
    if actual != id {
        return Err(ObjectError::HashMismatch { id, actual });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_compressed_and_raw() {
        let text = b"<?php\n".repeat(1000);
        let id = ObjectKind::Chunk.hash(&text);
        let file = encode(ObjectKind::Chunk, &text);
        assert_eq!(file[6], 1, "text compresses");
        assert_eq!(decode(id, ObjectKind::Chunk, &file).unwrap(), text);

        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let id = ObjectKind::Chunk.hash(&noise);
        let file = encode(ObjectKind::Chunk, &noise);
        assert_eq!(decode(id, ObjectKind::Chunk, &file).unwrap(), noise);
    }

    /// What the `object_decode` fuzz target checks: random bytes with a
    /// plausible header never panic and never pass as an object.
    #[test]
    fn random_files_never_panic() {
        let id = ObjectKind::Chunk.hash(b"x");
        let mut x: u64 = 42;
        for n in 0..5_000usize {
            let mut f: Vec<u8> = (0..n % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if f.len() >= HEADER_LEN {
                f[..4].copy_from_slice(MAGIC);
                f[4] = OBJECT_FORMAT;
                f[5] = 1;
                f[6] = (n % 2) as u8;
                f[7] = 0;
            }
            assert!(decode(id, ObjectKind::Chunk, &f).is_err());
            let _ = uncompressed(id, &f);
        }
    }

    #[test]
    fn every_corruption_is_caught() {
        let text = b"wfLoadExtension( 'Echo' );\n".repeat(50);
        let id = ObjectKind::Chunk.hash(&text);
        let file = encode(ObjectKind::Chunk, &text);
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            assert!(decode(id, ObjectKind::Chunk, &bad).is_err(), "flip at {i}");
        }
        for n in 0..file.len() {
            assert!(
                decode(id, ObjectKind::Chunk, &file[..n]).is_err(),
                "cut at {n}"
            );
        }
        assert!(matches!(
            decode(id, ObjectKind::Tree, &file),
            Err(ObjectError::WrongKind { .. })
        ));
        let mut newer = file.clone();
        newer[4] = 2;
        assert!(matches!(
            decode(id, ObjectKind::Chunk, &newer),
            Err(ObjectError::NewerFormat { found: 2, .. })
        ));
    }
}
