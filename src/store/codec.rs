//! The byte codec every scap format shares: little-endian fixed-width
//! integers and minimal unsigned LEB128 varints (store-format.md,
//! "Conventions"), written by [`put_varint`] and read by [`Reader`].
//!
//! The reader never panics and never allocates on the input's say-so: every
//! length is checked against the bytes actually left.

use super::id::{ID_LEN, ObjectId};

/// Appends `v` as unsigned LEB128 (7 bits a byte, low bits first).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Why a read failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("truncated")]
    Truncated,
    #[error("varint not minimal")]
    NotMinimal,
    #[error("varint overflows 64 bits")]
    Overflow,
    #[error("length over its limit")]
    TooLong,
}

/// Reads from a byte slice, front to back.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        if self.buf.len() < n {
            return Err(ReadError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.take(1)?[0])
    }

    pub fn u32_le(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn u64_le(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn id(&mut self) -> Result<ObjectId, ReadError> {
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(self.take(ID_LEN)?);
        Ok(ObjectId::from_bytes(id))
    }

    /// A varint that must be at most `max`, as a length.
    pub fn len(&mut self, max: u64) -> Result<usize, ReadError> {
        let v = self.varint()?;
        if v > max {
            return Err(ReadError::TooLong);
        }
        usize::try_from(v).map_err(|_| ReadError::TooLong)
    }

    /// A minimal LEB128 varint of at most 10 bytes.
    pub fn varint(&mut self) -> Result<u64, ReadError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            if i == 9 && b > 1 {
                return Err(ReadError::Overflow);
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(ReadError::NotMinimal);
                }
                return Ok(v);
            }
        }
        Err(ReadError::Overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_only_minimal_forms_read() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut r = Reader::new(&out);
            assert_eq!(r.varint(), Ok(v));
            assert!(r.is_empty());
        }
        assert_eq!(
            Reader::new(&[0x80, 0x00]).varint(),
            Err(ReadError::NotMinimal)
        );
        assert_eq!(Reader::new(&[0xff; 10]).varint(), Err(ReadError::Overflow));
        assert_eq!(Reader::new(&[0x80]).varint(), Err(ReadError::Truncated));
        assert_eq!(Reader::new(&[5]).len(4), Err(ReadError::TooLong));
    }
}
