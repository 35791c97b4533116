//! Durability helpers shared by the store and the host's release slots:
//! atomic replacement of a small file, and the rule that makes a batch of
//! new files durable (an fsync each when few, one `syncfs` when many).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

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

/// Makes `files` and `dirs` durable: an fsync each when there are at most
/// [`FSYNC_EACH_MAX`] of them, else one `syncfs` of the filesystem that
/// holds `anchor`. Every directory that gained or lost a name must be in
/// `dirs` (its entry is what a crash would lose).
pub fn make_durable(files: &[PathBuf], dirs: &[PathBuf], anchor: &Path) -> Result<()> {
    if files.len() + dirs.len() > FSYNC_EACH_MAX {
        let f = File::open(anchor).at(anchor)?;
        return syncfs(&f, anchor);
    }
    for f in files {
        File::open(f).and_then(|f| f.sync_all()).at(f)?;
    }
    let mut dirs: Vec<&PathBuf> = dirs.iter().collect();
    dirs.sort();
    dirs.dedup();
    dirs.into_iter().try_for_each(|d| sync_dir(d))
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
