//! The end of a file being appended to (a pack being written), gathered in
//! memory and written a block-aligned run at a time.
//!
//! Two things come of it. Appends of small objects (a cold build's tens of
//! thousands) become one `pwrite` a [`CAP_CACHED`] instead of one each. And a
//! writer may bypass the page cache (`O_DIRECT`, [`Staged::bypass_cache`]):
//! what an app server receives is written once and not read again soon
//! (the release holds its files), so copying it into new page-cache pages
//! only costs CPU; on a virtual machine whose balloon hands free pages
//! back to its host, each new page costs a fault in the host too
//! (BENCHMARKS.md). Direct I/O needs the memory, offset and length of each
//! write aligned to the device's block: the staged bytes start at a
//! multiple of [`BLOCK`] in the file and in memory, a flush writes their
//! whole blocks and keeps the partial last one, and only the very end is
//! written through the cache ([`Staged::flush_all`]). A filesystem that
//! refuses direct I/O (at the open or at a write) gets cached writes
//! instead, said once.
//!
//! Readers see every byte appended: what is below [`Staged::at`] is in
//! the file, the rest is read from memory ([`Staged::read_at`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::{IoContext, Result};

/// Alignment of direct writes: a page, which is a multiple of every
/// common device's logical block.
pub const BLOCK: usize = 4096;

/// Bytes staged before a flush (plus a partial block carried over), when
/// writing past the cache: a direct write waits for the device, so each
/// is large.
pub const CAP: usize = 2 << 20;

/// The same through the cache, where a write returns once copied: small,
/// so that a deploy host's build holds little more than before.
pub const CAP_CACHED: usize = 256 << 10;

/// Bytes written through the cache accumulate this much before their
/// writeback is started ([`crate::sys::start_writeback`]), so that the
/// final `fsync` finds little left to write.
const WRITEBACK_EVERY: u64 = 32 << 20;

pub struct Staged {
    /// Offset in the file of the first staged byte: a multiple of
    /// [`BLOCK`] (bytes before it are in the file).
    at: u64,
    /// `buf[start..start + len]` are the staged bytes; `start` makes
    /// their address a multiple of [`BLOCK`]. Never reallocated (but
    /// replaced by a larger one when the cache is bypassed).
    buf: Vec<u8>,
    start: usize,
    len: usize,
    /// [`CAP`] or [`CAP_CACHED`].
    cap: usize,
    /// The file opened again with `O_DIRECT`, when bypassing the cache.
    direct: Option<File>,
    /// Where writeback was last started (cached writes).
    written_back: u64,
}

/// Its offsets and mode, not the bytes (up to 2 MiB of them).
impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("at", &self.at)
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

impl Staged {
    /// An empty end at offset 0 of a new file.
    pub fn new() -> Staged {
        let (buf, start) = aligned(CAP_CACHED);
        Staged {
            at: 0,
            buf,
            start,
            len: 0,
            cap: CAP_CACHED,
            direct: None,
            written_back: 0,
        }
    }

    /// Writes whole blocks with `O_DIRECT` from here on (the file at
    /// `path`, opened again), if its filesystem allows it; says once per
    /// process when it does not.
    pub fn bypass_cache(&mut self, path: &Path) {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => {
                self.direct = Some(f);
                let (mut buf, start) = aligned(CAP);
                buf[start..start + self.len]
                    .copy_from_slice(&self.buf[self.start..self.start + self.len]);
                (self.buf, self.start, self.cap) = (buf, start, CAP);
            }
            Err(e) => no_direct(path, &e),
        }
    }

    /// Whether whole blocks are written with `O_DIRECT`.
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The offset after the last byte appended.
    pub fn end(&self) -> u64 {
        self.at + self.len as u64
    }

    /// Offset of the first byte not yet in the file.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// Appends `data` at [`Staged::end`], writing whole blocks to `file`
    /// as the stage fills. On an error (a full disk) the end is where it
    /// was: what was appended before is kept, staged or in the file, and
    /// the next append overwrites whatever of `data` reached the file.
    pub fn append(&mut self, file: &File, path: &Path, mut data: &[u8]) -> Result<()> {
        let end = self.end();
        while !data.is_empty() {
            if self.len >= self.cap
                && let Err(e) = self.flush_blocks(file, path)
            {
                self.set_end(file, path, end)?;
                return Err(e);
            }
            let n = (self.cap + BLOCK - self.len).min(data.len());
            let at = self.start + self.len;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
        }
        Ok(())
    }

    /// Sets the end back to `end`, the end before an append that failed
    /// part way or whose bytes are not wanted after all: the next append
    /// overwrites them.
    pub fn set_end(&mut self, file: &File, path: &Path, end: u64) -> Result<()> {
        if end >= self.at {
            self.len = (end - self.at).min(self.len as u64) as usize;
            return Ok(());
        }
        // Whole blocks of this append reached the file: stage again the
        // partial block `end` is in, read back from the file.
        let at = end - end % BLOCK as u64;
        let len = (end - at) as usize;
        file.read_exact_at(&mut self.buf[self.start..self.start + len], at)
            .at(path)?;
        self.at = at;
        self.len = len;
        Ok(())
    }

    /// Writes the staged whole blocks to the file and keeps the rest.
    fn flush_blocks(&mut self, file: &File, path: &Path) -> Result<()> {
        let n = self.len - self.len % BLOCK;
        if n == 0 {
            return Ok(());
        }
        let blocks = &self.buf[self.start..self.start + n];
        let written = match &self.direct {
            Some(d) => match d.write_all_at(blocks, self.at) {
                // The filesystem takes no direct writes (or not with this
                // alignment): through the cache from here on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    no_direct(path, &e);
                    self.direct = None;
                    file.write_all_at(blocks, self.at)
                }
                r => r,
            },
            None => file.write_all_at(blocks, self.at),
        };
        written.at(path)?;
        self.buf
            .copy_within(self.start + n..self.start + self.len, self.start);
        self.at += n as u64;
        self.len -= n;
        if self.direct.is_none() && self.at - self.written_back >= WRITEBACK_EVERY {
            crate::sys::start_writeback(file, self.written_back, self.at - self.written_back);
            self.written_back = self.at;
        }
        Ok(())
    }

    /// Writes everything staged to the file (the last partial block
    /// through the cache). The bytes stay staged too, and the end where
    /// it is: nothing is appended after this.
    pub fn flush_all(&mut self, file: &File, path: &Path) -> Result<()> {
        self.flush_blocks(file, path)?;
        file.write_all_at(&self.buf[self.start..self.start + self.len], self.at)
            .at(path)
    }

    /// Reads `buf.len()` bytes at `offset` of what was appended: the part
    /// below [`Staged::at`] from `file`, the rest from the stage.
    pub fn read_at(&self, file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
        let in_file = self.at.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (low, high) = buf.split_at_mut(in_file);
        file.read_exact_at(low, offset).at(path)?;
        if high.is_empty() {
            return Ok(());
        }
        let from = (offset + in_file as u64 - self.at) as usize;
        match self.buf[self.start..self.start + self.len].get(from..from + high.len()) {
            Some(staged) => {
                high.copy_from_slice(staged);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "a read of {} bytes at {offset} goes past the end ({})",
                    buf.len(),
                    self.end()
                ),
            ))
            .at(path),
        }
    }
}

/// A zeroed buffer with room for `cap` bytes and a partial block after
/// an offset that is a multiple of [`BLOCK`] in memory, and that offset.
fn aligned(cap: usize) -> (Vec<u8>, usize) {
    let buf = vec![0u8; cap + 2 * BLOCK];
    let start = buf.as_ptr().align_offset(BLOCK);
    (buf, start)
}

/// Says once per process that a store's packs are written through the
/// page cache after all.
fn no_direct(path: &Path, e: &io::Error) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::info!(
            "{}: the filesystem takes no direct I/O ({e}): packs are written through the page cache",
            path.display()
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes `0..n` of a recognisable sequence (no run repeats a block).
    fn bytes(from: usize, n: usize) -> Vec<u8> {
        (from..from + n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// A new empty file, open to read and write, in a temp directory.
    fn new_file() -> (tempfile::TempDir, std::path::PathBuf, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        (dir, p, f)
    }

    fn read_all(s: &Staged, f: &File, p: &Path) -> Vec<u8> {
        let mut out = vec![0u8; s.end() as usize];
        s.read_at(f, p, &mut out, 0).unwrap();
        out
    }

    #[test]
    fn what_is_appended_reads_back_whole_before_and_after_the_flush() {
        for direct in [false, true] {
            let (_dir, p, f) = new_file();
            let mut s = Staged::new();
            if direct {
                s.bypass_cache(&p);
                // The suite's temp directory is on a filesystem that
                // takes direct I/O (ext4 here; tmpfs since Linux 6.6).
                assert!(s.is_direct(), "{}: no O_DIRECT", p.display());
            }
            let mut want = Vec::new();
            // Small appends, then ones larger than the stage, at
            // unaligned ends.
            for n in [
                16,
                1,
                4095,
                5000,
                300_000,
                CAP + 3 * BLOCK + 17,
                9,
                CAP / 2 + 1,
            ] {
                let data = bytes(want.len(), n);
                s.append(&f, &p, &data).unwrap();
                want.extend_from_slice(&data);
                assert_eq!(s.end(), want.len() as u64);
                assert_eq!(s.at() % BLOCK as u64, 0);
                assert_eq!(read_all(&s, &f, &p), want, "direct: {direct}");
            }
            assert!(s.at() > 0, "whole blocks reached the file");
            // A read across the boundary between file and stage.
            let mut mid = vec![0u8; 2 * BLOCK];
            let off = s.at() - BLOCK as u64 - 3;
            s.read_at(&f, &p, &mut mid, off).unwrap();
            assert_eq!(mid, want[off as usize..off as usize + 2 * BLOCK]);
            // Past the end: an error naming the file, not a panic.
            let mut past = vec![0u8; 10];
            let e = s.read_at(&f, &p, &mut past, s.end() - 5).unwrap_err();
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
            s.flush_all(&f, &p).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), want, "direct: {direct}");
        }
    }

    #[test]
    fn a_failed_append_leaves_the_end_where_it_was() {
        let (_dir, p, f) = new_file();
        let mut s = Staged::new();
        let first = bytes(0, s.cap + 100);
        s.append(&f, &p, &first).unwrap();
        // A file open only for reading: every write fails, as on a full
        // disk. An append that needs no flush still stages.
        let ro = File::open(&p).unwrap();
        let more = bytes(first.len(), BLOCK * 3);
        assert!(s.append(&ro, &p, &more).is_err());
        assert_eq!(s.end(), first.len() as u64, "the end stays put");
        assert_eq!(read_all(&s, &f, &p), first, "what came before is kept");
        // Then the disk has room again: the next append lands right after
        // what came before.
        s.append(&f, &p, &more).unwrap();
        let big = bytes(0, 3 * CAP);
        s.append(&f, &p, &big).unwrap();
        let mut want = first.clone();
        want.extend_from_slice(&more);
        want.extend_from_slice(&big);
        s.flush_all(&f, &p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), want);
    }

    #[test]
    fn an_append_cut_off_after_reaching_the_file_rolls_back() {
        // The stage fills and flushes in the middle of one append; a later
        // flush of the same append fails, and `append` sets the end back
        // before the blocks of it already written: the partial block the
        // end is in is staged again from the file.
        let (_dir, p, f) = new_file();
        let mut s = Staged::new();
        let first = bytes(0, 1000);
        s.append(&f, &p, &first).unwrap();
        s.append(&f, &p, &bytes(1000, 3 * CAP)).unwrap();
        assert!(s.at() > 1000);
        s.set_end(&f, &p, 1000).unwrap();
        assert_eq!((s.end(), s.at()), (1000, 0));
        assert_eq!(read_all(&s, &f, &p), first);
        let tail = bytes(7, 5000);
        s.append(&f, &p, &tail).unwrap();
        s.flush_all(&f, &p).unwrap();
        let mut want = first.clone();
        want.extend_from_slice(&tail);
        let mut got = std::fs::read(&p).unwrap();
        got.truncate(want.len());
        assert_eq!(got, want);
    }
}
