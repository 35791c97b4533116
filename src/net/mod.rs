//! The HTTP object service and its verified batch client.
//!
//! Wire format (see store-format.md, "HTTP protocol"): the store's own file
//! layout served as static files (`/objects/ab/cdef…`, `/versions/<id>.json`,
//! `/refs/labels/<label>`), plus one scap-specific endpoint, `POST /batch`,
//! that streams many objects in one response.
//!
//! **Invariant:** nothing received is trusted: every object is verified
//! against the ID that was asked for before it is stored or used.

pub mod client;
pub mod conns;
pub mod local;
pub mod pack;
pub mod ratelimit;
pub mod server;
pub mod tls;

use crate::store::id::{ID_LEN, ObjectId};

/// First bytes of a batch response.
pub const BATCH_MAGIC: &[u8; 8] = b"scapbat1";
/// Most IDs one batch request may ask for.
pub const MAX_BATCH_IDS: usize = 4096;
/// Frame status: the object follows.
pub const FOUND: u8 = 0;
/// Frame status: the server does not have it.
pub const MISSING: u8 = 1;
/// Frame status: the last frame of a response (all-zero ID, length 0). A
/// response without it was cut off, even if it ended between frames.
pub const END: u8 = 2;
/// Frame status (packs only): the object as a delta against another the
/// receiver is expected to hold: base ID (32 bytes), kind (1 byte), then a
/// zstd frame of the content compressed with the base's content as its
/// dictionary.
pub const DELTA: u8 = 3;
/// zstd level of a compressed batch stream (`Accept-Encoding: zstd`).
pub const STREAM_ZSTD_LEVEL: i32 = 3;
/// Bytes before each frame's object: ID, status, u32 LE length.
pub const FRAME_HEADER: usize = ID_LEN + 1 + 4;

/// One object (or its absence) in a batch response.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub id: ObjectId,
    /// The object file's bytes, or `None` when the server lacks it. For a
    /// delta frame, its payload (see [`DELTA`]).
    pub file: Option<Vec<u8>>,
    /// Set for a delta frame.
    pub delta: bool,
}

pub fn encode_end(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0u8; ID_LEN]);
    out.push(END);
    out.extend_from_slice(&0u32.to_le_bytes());
}

pub fn encode_frame_header(out: &mut Vec<u8>, id: &ObjectId, file: Option<&[u8]>) {
    out.extend_from_slice(id.as_bytes());
    match file {
        Some(f) => {
            out.push(FOUND);
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        }
        None => {
            out.push(MISSING);
            out.extend_from_slice(&0u32.to_le_bytes());
        }
    }
}

/// Incremental parser of a batch response body: feed it bytes as they
/// arrive, take whole frames out.
#[derive(Default)]
pub struct BatchDecoder {
    /// Bytes taken out as whole frames (and the magic): where to resume a
    /// pack with a range request.
    pub consumed: u64,
    buf: Vec<u8>,
    pos: usize,
    saw_magic: bool,
    saw_end: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("not a scap batch response (bad magic)")]
    BadMagic,
    #[error("bad frame: {0}")]
    BadFrame(&'static str),
    #[error("response ended in the middle of a frame")]
    Truncated,
    #[error("object {id} is {len} bytes, more than its tree allows")]
    TooLarge { id: ObjectId, len: u32 },
}

/// The most bytes an object file may take on the wire when its content is
/// `len` bytes: the header, and zstd's worst case (incompressible input
/// grows a little).
pub fn max_file_len(len: u64) -> u64 {
    crate::store::object::HEADER_LEN as u64 + len + len / 128 + 1024
}

impl BatchDecoder {
    /// A decoder for the rest of a body whose first `consumed` bytes (the
    /// magic and whole frames) were decoded earlier: a range request that
    /// resumes a pack.
    pub fn resumed(consumed: u64) -> BatchDecoder {
        BatchDecoder {
            consumed,
            saw_magic: consumed > 0,
            ..BatchDecoder::default()
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > (1 << 20) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived, refusing (before its body
    /// is buffered) an object longer than `limit(id)` bytes.
    pub fn next_frame_within(
        &mut self,
        limit: &dyn Fn(&ObjectId) -> u64,
    ) -> Result<Option<Frame>, BatchError> {
        let avail = &self.buf[self.pos..];
        if self.saw_magic
            && !self.saw_end
            && avail.len() >= FRAME_HEADER
            && (avail[ID_LEN] == FOUND || avail[ID_LEN] == DELTA)
        {
            let id = ObjectId::from_bytes(avail[..ID_LEN].try_into().expect("32 bytes"));
            let len =
                u32::from_le_bytes(avail[ID_LEN + 1..FRAME_HEADER].try_into().expect("4 bytes"));
            if u64::from(len) > limit(&id) {
                return Err(BatchError::TooLarge { id, len });
            }
        }
        self.next_frame()
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, BatchError> {
        let avail = &self.buf[self.pos..];
        if self.saw_end {
            return if avail.is_empty() {
                Ok(None)
            } else {
                Err(BatchError::BadFrame("bytes after the end frame"))
            };
        }
        if !self.saw_magic {
            if avail.len() < BATCH_MAGIC.len() {
                return Ok(None);
            }
            if &avail[..BATCH_MAGIC.len()] != BATCH_MAGIC {
                return Err(BatchError::BadMagic);
            }
            self.pos += BATCH_MAGIC.len();
            self.consumed += BATCH_MAGIC.len() as u64;
            self.saw_magic = true;
            return self.next_frame();
        }
        if avail.len() < FRAME_HEADER {
            return Ok(None);
        }
        let id = ObjectId::from_bytes(avail[..ID_LEN].try_into().expect("32 bytes"));
        let status = avail[ID_LEN];
        let len = u32::from_le_bytes(avail[ID_LEN + 1..FRAME_HEADER].try_into().expect("4 bytes"))
            as usize;
        match status {
            FOUND if len as u64 > crate::store::object::MAX_OBJECT_LEN + 64 => {
                Err(BatchError::BadFrame("object larger than any object can be"))
            }
            DELTA if len <= ID_LEN || len as u64 > crate::store::object::MAX_OBJECT_LEN + 64 => {
                Err(BatchError::BadFrame(
                    "a delta frame of an impossible length",
                ))
            }
            FOUND | DELTA => {
                if avail.len() < FRAME_HEADER + len {
                    return Ok(None);
                }
                let file = avail[FRAME_HEADER..FRAME_HEADER + len].to_vec();
                self.pos += FRAME_HEADER + len;
                self.consumed += (FRAME_HEADER + len) as u64;
                Ok(Some(Frame {
                    id,
                    file: Some(file),
                    delta: status == DELTA,
                }))
            }
            MISSING if len == 0 => {
                self.pos += FRAME_HEADER;
                self.consumed += FRAME_HEADER as u64;
                Ok(Some(Frame {
                    id,
                    file: None,
                    delta: false,
                }))
            }
            END if len == 0 && !self.saw_end => {
                self.pos += FRAME_HEADER;
                self.consumed += FRAME_HEADER as u64;
                self.saw_end = true;
                Ok(None)
            }
            MISSING | END => Err(BatchError::BadFrame(
                "a frame without an object has a length",
            )),
            _ => Err(BatchError::BadFrame("unknown status")),
        }
    }

    /// Call at the end of the body: errors if a frame was cut off.
    pub fn finish(&self) -> Result<(), BatchError> {
        if self.pos == self.buf.len() && self.saw_end {
            Ok(())
        } else {
            Err(BatchError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::id::ObjectKind;

    #[test]
    fn frames_split_anywhere() {
        let a = ObjectKind::Chunk.hash(b"a");
        let b = ObjectKind::Chunk.hash(b"b");
        let mut body = BATCH_MAGIC.to_vec();
        encode_frame_header(&mut body, &a, Some(b"hello"));
        body.extend_from_slice(b"hello");
        encode_frame_header(&mut body, &b, None);
        encode_end(&mut body);
        for split in 0..body.len() {
            let mut d = BatchDecoder::default();
            let mut frames = Vec::new();
            for part in [&body[..split], &body[split..]] {
                d.push(part);
                while let Some(f) = d.next_frame().unwrap() {
                    frames.push(f);
                }
            }
            d.finish().unwrap();
            assert_eq!(
                frames,
                vec![
                    Frame {
                        delta: false,
                        id: a,
                        file: Some(b"hello".to_vec())
                    },
                    Frame {
                        id: b,
                        file: None,
                        delta: false
                    }
                ]
            );
        }
        // Cut anywhere, between frames too, is detected.
        for cut in [body.len() - 1, body.len() - FRAME_HEADER] {
            let mut d = BatchDecoder::default();
            d.push(&body[..cut]);
            while d.next_frame().unwrap().is_some() {}
            assert_eq!(d.finish(), Err(BatchError::Truncated));
        }
        let mut d = BatchDecoder::default();
        d.push(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(d.next_frame(), Err(BatchError::BadMagic));
    }
}

#[cfg(test)]
mod stream_tests {
    use std::io::Write;

    #[test]
    fn zstd_stream_round_trip_in_pieces() {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.write_all(b"scapbat1hello").unwrap();
        enc.flush().unwrap();
        let first = std::mem::take(enc.get_mut());
        enc.write_all(b" world").unwrap();
        let mut all = first.clone();
        all.extend(enc.finish().unwrap());
        for split in 0..all.len() {
            let mut dec = zstd::stream::write::Decoder::new(Vec::new()).unwrap();
            let mut out = Vec::new();
            for piece in [&all[..split], &all[split..]] {
                dec.write_all(piece).unwrap();
                dec.flush().unwrap();
                out.extend_from_slice(dec.get_ref());
                dec.get_mut().clear();
            }
            assert_eq!(out, b"scapbat1hello world", "split {split}");
        }
    }
}
