//! One deploy at a time per fleet: a lock file on the deploy host that
//! names its holder.
//!
//! `STORE/fleet/deploy.lock` is created with `O_EXCL` and holds JSON: user,
//! host, pid, time, command. A second deploy fails at once with that
//! information. A lock whose process is gone (same host, no such pid) is
//! reported as stale, and only `scap lock --break` removes it: scap never
//! takes over another deploy's lock on its own.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub user: String,
    pub host: String,
    pub pid: u32,
    pub time: u64,
    pub command: String,
}

impl Holder {
    /// Whether the holding process still runs (only knowable on its host).
    pub fn alive(&self) -> Option<bool> {
        (self.host == hostname()).then(|| Path::new(&format!("/proc/{}", self.pid)).exists())
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {} on {}) since {}: {}",
            self.user,
            self.pid,
            self.host,
            crate::time::fmt_utc(self.time),
            self.command
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another deploy is running: {0}; wait for it, or ask them")]
    Held(Holder),
    #[error(
        "a deploy lock is left from a process that is gone: {holder}; if that deploy is really over, run `scap lock --break` (lock file {path})"
    )]
    Stale { holder: Holder, path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Holds the fleet lock until dropped.
#[derive(Debug)]
pub struct DeployLock {
    path: PathBuf,
}

pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join("deploy.lock")
}

use crate::sys::{hostname, user};

/// Reads the current holder, if any.
pub fn holder(dir: &Path) -> Result<Option<Holder>, LockError> {
    let path = lock_path(dir);
    match fs::read(&path) {
        Ok(b) => Ok(serde_json::from_slice(&b).ok().or_else(|| {
            Some(Holder {
                user: "?".into(),
                host: "?".into(),
                pid: 0,
                time: 0,
                command: "(unreadable lock file)".into(),
            })
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LockError::Io { path, source }),
    }
}

pub fn acquire(dir: &Path, command: &str) -> Result<DeployLock, LockError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LockError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = lock_path(dir);
    let me = Holder {
        user: user(),
        host: hostname(),
        pid: std::process::id(),
        time: crate::time::unix_now(),
        command: command.to_string(),
    };
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(mut f) => {
            f.write_all(&serde_json::to_vec(&me).expect("serializes"))
                .and_then(|()| f.sync_all())
                .map_err(io(&path))?;
            Ok(DeployLock { path })
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let h = holder(dir)?.expect("the lock file exists");
            if h.alive() == Some(false) {
                Err(LockError::Stale { holder: h, path })
            } else {
                Err(LockError::Held(h))
            }
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// Removes a lock, whoever holds it. Returns the holder it removed.
pub fn break_lock(dir: &Path) -> Result<Option<Holder>, LockError> {
    let h = holder(dir)?;
    let path = lock_path(dir);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(LockError::Io { path, source: e })
        }
        _ => Ok(h),
    }
}

impl Drop for DeployLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Takes the lock to continue the work of the controller `pid` on `host`:
/// over a stale lock only if it is that controller's, on this host, and
/// its process is gone (a controller that died mid-rollout). Returns the
/// lock and whether a stale one was taken over.
pub fn take_over(
    dir: &Path,
    command: &str,
    pid: u32,
    host: &str,
) -> Result<(DeployLock, bool), LockError> {
    match acquire(dir, command) {
        Ok(l) => Ok((l, false)),
        Err(LockError::Stale { holder, .. })
            if holder.pid == pid && holder.host == host && host == crate::sys::hostname() =>
        {
            break_lock(dir)?;
            Ok((acquire(dir, command)?, true))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_then_stale_then_broken() {
        let dir = tempfile::tempdir().unwrap();
        let lock = acquire(dir.path(), "scap sync --canary=10%").unwrap();
        match acquire(dir.path(), "scap sync --canary=20%") {
            Err(LockError::Held(h)) => {
                assert_eq!(h.command, "scap sync --canary=10%");
                assert_eq!(h.pid, std::process::id());
            }
            other => panic!("{other:?}"),
        }
        drop(lock);
        let _again = acquire(dir.path(), "x").unwrap();
        drop(_again);
        // A lock from a dead process.
        let dead = Holder {
            user: "jdoe".into(),
            host: hostname(),
            pid: u32::MAX - 1,
            time: 0,
            command: "scap sync".into(),
        };
        fs::write(lock_path(dir.path()), serde_json::to_vec(&dead).unwrap()).unwrap();
        let e = acquire(dir.path(), "y").unwrap_err();
        assert!(matches!(e, LockError::Stale { .. }), "{e}");
        assert!(e.to_string().contains("scap lock --break"));
        assert_eq!(break_lock(dir.path()).unwrap(), Some(dead));
        assert!(acquire(dir.path(), "z").is_ok());
    }
}
