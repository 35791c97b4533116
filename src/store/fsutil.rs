//! Durability helpers shared by the store and the host's release slots:
//! atomic replacement of a small file, and the rule that makes a batch of
//! new files durable (an fsync each when few, one `syncfs` when many).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::disk::{IoContext, Result};

/// Up to this many files and directories, making them durable costs an
/// fsync each; past it, one `syncfs` is cheaper. (`syncfs` is
/// filesystem-wide: it also waits for every other writer's dirty data, which
/// would make a three-file backport pay for whatever else the host wrote
/// lately.)
pub const FSYNC_EACH_MAX: usize = 256;

/// Writes `path` atomically and durably: temp file beside it, fsync,
/// rename, fsync of the directory. Readers see the old or the new content.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).at(&tmp);
    }
    fs::rename(&tmp, path).at(path)?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// `syncfs(2)` of the filesystem holding `fd`'s file.
pub fn syncfs(fd: impl AsFd, shown: &Path) -> Result<()> {
    rustix::fs::syncfs(fd).map_err(io::Error::from).at(shown)
}

/// Files and directories written together, to make durable together: an
/// fsync each while there are at most [`FSYNC_EACH_MAX`] of them, else one
/// `syncfs`. Every directory that gained or lost a name must be added (its
/// entry is what a crash would lose). Safe to fill from many threads.
#[derive(Default)]
pub struct SyncSet {
    held: Mutex<Vec<OwnedFd>>,
    count: AtomicUsize,
}

impl SyncSet {
    /// Adds an open file or directory (kept only while the set is small).
    pub fn add(&self, fd: impl Into<OwnedFd>) {
        if self.count.fetch_add(1, Ordering::Relaxed) < FSYNC_EACH_MAX {
            self.held.lock().expect("not poisoned").push(fd.into());
        }
    }

    /// Opens `path` (a file or directory) and adds it; once the set is
    /// large, only counts it.
    pub fn add_path(&self, path: &Path) -> Result<()> {
        if self.count.load(Ordering::Relaxed) >= FSYNC_EACH_MAX {
            self.count.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let f = File::open(path).at(path)?;
        self.add(f);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes everything added durable; `anchor` is any fd on the same
    /// filesystem (for `syncfs`), `shown` names it in errors.
    pub fn sync(&self, anchor: impl AsFd, shown: &Path) -> Result<()> {
        if self.len() > FSYNC_EACH_MAX {
            return syncfs(anchor, shown);
        }
        for fd in self.held.lock().expect("not poisoned").iter() {
            rustix::fs::fsync(fd).map_err(io::Error::from).at(shown)?;
        }
        Ok(())
    }
}

/// The first `n` bytes of a file (fewer if it is shorter).
pub fn read_head(path: &Path, n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(n);
    File::open(path)
        .and_then(|f| f.take(n as u64).read_to_end(&mut head))
        .at(path)?;
    Ok(head)
}
