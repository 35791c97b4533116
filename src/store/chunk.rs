//! Splitting file content into chunks.
//!
//! A file of at most [`SMALL_FILE_MAX`] bytes is one chunk: most of a
//! MediaWiki tree is 1-30 KB source files, and one object per file keeps the
//! object count near the file count. Larger files (l10n CDB and JSON files
//! are megabytes) are cut with FastCDC (2020) so that an edit in the middle
//! re-sends only the chunks around it. The parameters are part of the
//! format: changing them changes the version ID of every large file's tree.

use std::io::Read;

/// Files up to this size are stored as a single chunk.
pub const SMALL_FILE_MAX: usize = 64 * 1024;
/// FastCDC 2020 parameters for larger files.
pub const CDC_MIN: u32 = 16 * 1024;
pub const CDC_AVG: u32 = 64 * 1024;
pub const CDC_MAX: u32 = 256 * 1024;

/// Calls `f` with each chunk of the content read from `reader`, in order.
/// `size_hint` picks single-chunk or content-defined mode; the bytes read
/// decide the chunks, so a file that grew meanwhile is still cut correctly
/// (and the caller notices the change from its before/after stat).
pub fn for_each_chunk<R: Read, E>(
    mut reader: R,
    size_hint: u64,
    mut f: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), ChunkError<E>> {
    if size_hint as usize <= SMALL_FILE_MAX {
        let mut buf = Vec::with_capacity(size_hint as usize);
        reader.read_to_end(&mut buf).map_err(ChunkError::Read)?;
        if buf.len() <= SMALL_FILE_MAX {
            if !buf.is_empty() {
                f(&buf).map_err(ChunkError::Sink)?;
            }
            return Ok(());
        }
        return for_each_chunk(std::io::Cursor::new(buf), u64::MAX, f);
    }
    let chunker = fastcdc::v2020::StreamCDC::new(reader, CDC_MIN, CDC_AVG, CDC_MAX);
    for chunk in chunker {
        let chunk = chunk.map_err(|e| {
            ChunkError::Read(match e {
                fastcdc::v2020::Error::IoError(io) => io,
                other => std::io::Error::other(other.to_string()),
            })
        })?;
        f(&chunk.data).map_err(ChunkError::Sink)?;
    }
    Ok(())
}

/// Reading the content failed, or the chunk consumer did.
#[derive(Debug)]
pub enum ChunkError<E> {
    Read(std::io::Error),
    Sink(E),
}

/// `n` bytes of xorshift noise from `seed` (not 0), which no compressor
/// shrinks: for tests.
#[cfg(test)]
pub(crate) fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8]) -> Vec<usize> {
        let mut lens = Vec::new();
        for_each_chunk::<_, ()>(data, data.len() as u64, |c| {
            lens.push(c.len());
            Ok(())
        })
        .unwrap();
        lens
    }

    #[test]
    fn small_files_are_one_chunk() {
        assert_eq!(chunks(b""), Vec::<usize>::new());
        assert_eq!(chunks(b"abc"), vec![3]);
        assert_eq!(chunks(&vec![7u8; SMALL_FILE_MAX]), vec![SMALL_FILE_MAX]);
    }

    /// Pins chunk boundaries: a change to chunking changes version IDs, so it
    /// must be deliberate (update this snapshot and store-format.md together).
    #[test]
    fn boundaries_are_pinned() {
        let data = noise(1 << 20, 0x5eed);
        let lens = chunks(&data);
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        assert!(lens.iter().all(|&l| l <= CDC_MAX as usize));
        assert_eq!(
            lens,
            [
                127249, 68954, 58074, 44101, 82660, 150695, 77148, 100913, 96501, 74128, 123442,
                44711
            ]
        );
    }

    #[test]
    fn an_edit_in_the_middle_keeps_most_chunks() {
        let data = noise(2 << 20, 42);
        let mut edited = data.clone();
        edited.splice(1_000_000..1_000_010, b"inserted bytes!".iter().copied());
        let ids = |d: &[u8]| {
            let mut v = Vec::new();
            for_each_chunk::<_, ()>(d, d.len() as u64, |c| {
                v.push(blake3::hash(c));
                Ok(())
            })
            .unwrap();
            v
        };
        let (a, b) = (ids(&data), ids(&edited));
        let shared = b.iter().filter(|h| a.contains(h)).count();
        assert!(
            shared + 3 >= b.len(),
            "{shared} of {} chunks shared",
            b.len()
        );
    }
}
