//! One deploy at a time per fleet, and locks a person holds.
//!
//! - **The deploy lock**, `STORE/fleet/deploy.lock`, is held by a running
//!   command: created with `O_EXCL`, it holds JSON (user, host, pid, time,
//!   command, message) and goes when the command ends. A second deploy
//!   fails at once with that information. A lock whose process is gone
//!   (same host, no such pid) is reported as stale, and only `scap lock
//!   --break` removes it: scap never takes over another deploy's lock on
//!   its own.
//! - **A held lock**, `scap lock MESSAGE`: `STORE/fleet/held.lock`, kept
//!   until `scap lock --release`, stops this fleet's deploys; with `--all`,
//!   the global lock file (scap.toml's `global_lock`, default
//!   [`DEFAULT_GLOBAL_LOCK`]) stops every deploy on this deploy host,
//!   whatever its store. Whoever is refused is told who holds it, since
//!   when and why. The holder's own deploys go on (with a note): the lock
//!   keeps others out while they work.
//!
//! With the deploy state in etcd (`super::state`), the deploy lock is a
//! key bound to a lease its holder renews: it goes when the holder exits,
//! or within the lease (`[state] lease`, 15 s) of its death, never before;
//! there is no stale lock to break by hand, and `--resume` on another
//! deploy host waits out a dead controller's lease. The held lock is a key
//! too; the global lock stays a file of this deploy host.
//!
//! **Invariant:** a deploy and a held lock never both go ahead: each side
//! creates its lock first (`O_EXCL`, or an etcd transaction that creates
//! the key only if absent) and then looks for the other's, and removes its
//! own if it finds one, so of two that race at least one sees the other.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::state::{DeployState, LeaseLock, StateError};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub user: String,
    pub host: String,
    pub pid: u32,
    pub time: u64,
    pub command: String,
    /// The deployer's message (the SAL line), if the command took one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a held lock of all deploys is, unless scap.toml says
/// `global_lock` (scap's own place for it).
pub const DEFAULT_GLOBAL_LOCK: &str = "/var/lock/scap-global-lock";

/// A lock a person holds (`scap lock MESSAGE`) until they release it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Held {
    pub user: String,
    pub host: String,
    pub time: u64,
    pub message: String,
    /// `--all`: every deploy on this deploy host.
    #[serde(default)]
    pub global: bool,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {} since {}: {}",
            self.user,
            self.host,
            crate::time::fmt_utc(self.time),
            self.message
        )
    }
}

/// The locks of one fleet: its deploy state, and the global lock file.
#[derive(Clone, Debug)]
pub struct Locks {
    pub state: DeployState,
    pub global: PathBuf,
}

impl Locks {
    pub fn new(state: &DeployState, global: Option<&Path>) -> Locks {
        Locks {
            state: state.clone(),
            global: global.map_or_else(|| PathBuf::from(DEFAULT_GLOBAL_LOCK), Path::to_path_buf),
        }
    }

    /// Where `scap lock` (with `global`: `--all`) keeps its lock, for
    /// people.
    pub fn held_place(&self, global: bool) -> String {
        if global {
            format!("lock file {}", self.global.display())
        } else if self.state.is_etcd() {
            format!("{}: lock/held", self.state.describe())
        } else {
            format!("lock file {}", self.state.dir().join("held.lock").display())
        }
    }

    fn held_file(&self, global: bool) -> Option<PathBuf> {
        if global {
            Some(self.global.clone())
        } else if self.state.is_etcd() {
            None
        } else {
            Some(self.state.dir().join("held.lock"))
        }
    }

    /// The held locks now (global first).
    pub fn held(&self) -> Result<Vec<Held>, LockError> {
        let mut out = Vec::new();
        for global in [true, false] {
            let Some(path) = self.held_file(global) else {
                out.extend(self.state.etcd_held()?);
                continue;
            };
            match fs::read(&path) {
                Ok(b) => out.push(serde_json::from_slice(&b).unwrap_or_else(|e| Held {
                    user: "?".into(),
                    host: "?".into(),
                    time: 0,
                    message: format!("(unreadable lock file {}: {e})", path.display()),
                    global,
                })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(LockError::Io { path, source }),
            }
        }
        Ok(out)
    }

    /// A held lock of someone else's that stops a deploy, if any.
    fn blocking(&self) -> Result<Option<(Box<Held>, String)>, LockError> {
        let me = user();
        Ok(self.held()?.into_iter().find(|h| h.user != me).map(|h| {
            let place = self.held_place(h.global);
            (Box::new(h), place)
        }))
    }

    /// `scap lock MESSAGE` (`--all`: `global`): holds a lock until
    /// [`Locks::release`]. Refused while someone holds one already, or a
    /// deploy runs.
    pub fn hold(&self, message: &str, global: bool) -> Result<Held, LockError> {
        let me = Held {
            user: user(),
            host: hostname(),
            time: crate::time::unix_now(),
            message: message.to_string(),
            global,
        };
        match self.held_file(global) {
            None => {
                if let Err(theirs) = self.state.etcd_hold(&me)? {
                    return Err(LockError::Locked {
                        held: Box::new(theirs),
                        place: self.held_place(global),
                    });
                }
            }
            Some(path) => {
                let io = |source| LockError::Io {
                    path: path.clone(),
                    source,
                };
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io)?;
                }
                match OpenOptions::new().write(true).create_new(true).open(&path) {
                    Ok(mut f) => {
                        f.write_all(&serde_json::to_vec(&me).expect("serializes"))
                            .and_then(|()| f.sync_all())
                            .map_err(io)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let held = self
                            .held()?
                            .into_iter()
                            .find(|h| h.global == global)
                            .expect("the file exists");
                        return Err(LockError::Locked {
                            held: Box::new(held),
                            place: self.held_place(global),
                        });
                    }
                    Err(e) => return Err(io(e)),
                }
            }
        }
        // A deploy that started before the lock was there goes on: refuse.
        if let Some(h) = holder(&self.state)? {
            self.remove_held(global)?;
            return Err(LockError::Held(Box::new(h)));
        }
        Ok(me)
    }

    fn remove_held(&self, global: bool) -> Result<(), LockError> {
        match self.held_file(global) {
            None => Ok(self.state.etcd_unhold()?),
            Some(path) => match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(LockError::Io { path, source: e })
                }
                _ => Ok(()),
            },
        }
    }

    /// `scap lock --release` (`--all`: `global`): removes the held lock,
    /// only the caller's own unless `force`. Returns what it removed.
    pub fn release(&self, global: bool, force: bool) -> Result<Option<Held>, LockError> {
        let Some(h) = self.held()?.into_iter().find(|h| h.global == global) else {
            return Ok(None);
        };
        if h.user != user() && !force {
            return Err(LockError::NotYours {
                held: Box::new(h),
                place: self.held_place(global),
            });
        }
        self.remove_held(global)?;
        Ok(Some(h))
    }

    /// Takes the deploy lock for `command`, unless someone else holds a
    /// lock (this fleet's, or the global one) or another deploy runs.
    /// Returns the lock, and the caller's own held lock it goes through,
    /// if any.
    pub fn acquire(
        &self,
        command: &str,
        message: Option<&str>,
    ) -> Result<(DeployLock, Option<Held>), LockError> {
        if let Some((held, place)) = self.blocking()? {
            return Err(LockError::Locked { held, place });
        }
        let lock = acquire_with(&self.state, command, message)?;
        // A lock taken while this one was being created.
        if let Some((held, place)) = self.blocking()? {
            drop(lock);
            return Err(LockError::Locked { held, place });
        }
        let own = self.held()?.into_iter().next();
        Ok((lock, own))
    }

    /// [`take_over`], with the held locks respected as [`Locks::acquire`]
    /// does.
    pub fn take_over(
        &self,
        command: &str,
        pid: u32,
        host: &str,
    ) -> Result<(DeployLock, bool), LockError> {
        if let Some((held, place)) = self.blocking()? {
            return Err(LockError::Locked { held, place });
        }
        take_over(&self.state, command, pid, host)
    }
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
    Held(Box<Holder>),
    #[error(
        "a deploy lock is left from a process that is gone: {holder}; if that deploy is really over, run `scap lock --break` (lock file {path})"
    )]
    Stale { holder: Box<Holder>, path: PathBuf },
    #[error(
        "the deploy lock is held by {holder}, whose rollout this is; its lease in etcd did not expire within {waited} s, so that controller still runs: stop it, or wait for it"
    )]
    StillRenewed { holder: Box<Holder>, waited: u64 },
    #[error(
        "deploys are locked by {held} ({which}); wait for `scap lock --release{all}` by {user}, or ask them ({place})",
        which = if held.global { "every deploy on this host: scap lock --all" } else { "scap lock" },
        all = if held.global { " --all" } else { "" },
        user = held.user
    )]
    Locked { held: Box<Held>, place: String },
    #[error(
        "the lock is {held}, not yours: ask {user} to release it, or pass --force once you are sure ({place})",
        user = held.user
    )]
    NotYours { held: Box<Held>, place: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

/// Holds the fleet lock until dropped.
#[derive(Debug)]
pub struct DeployLock {
    kind: LockKind,
}

#[derive(Debug)]
enum LockKind {
    File(PathBuf),
    Lease(LeaseLock),
}

impl DeployLock {
    /// Why the lock is known lost (etcd: its lease expired), if it is.
    pub fn lost(&self) -> Option<String> {
        match &self.kind {
            LockKind::File(_) => None,
            LockKind::Lease(l) => l.lost(),
        }
    }
}

pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join("deploy.lock")
}

use crate::sys::{hostname, user};

/// Reads the current holder, if any.
pub fn holder(state: &DeployState) -> Result<Option<Holder>, LockError> {
    if state.is_etcd() {
        return Ok(state.etcd_holder()?.map(|(h, _)| h));
    }
    let path = lock_path(state.dir());
    match fs::read(&path) {
        Ok(b) => Ok(serde_json::from_slice(&b).ok().or_else(|| {
            Some(Holder {
                user: "?".into(),
                host: "?".into(),
                pid: 0,
                time: 0,
                command: "(unreadable lock file)".into(),
                message: None,
            })
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LockError::Io { path, source }),
    }
}

/// The holder, and (etcd) the seconds its lease has left if it stops
/// renewing it.
pub fn holder_and_lease(state: &DeployState) -> Result<Option<(Holder, Option<i64>)>, LockError> {
    if state.is_etcd() {
        return Ok(state.etcd_holder()?.map(|(h, t)| (h, Some(t))));
    }
    Ok(holder(state)?.map(|h| (h, None)))
}

pub fn acquire(state: &DeployState, command: &str) -> Result<DeployLock, LockError> {
    acquire_with(state, command, None)
}

fn acquire_with(
    state: &DeployState,
    command: &str,
    message: Option<&str>,
) -> Result<DeployLock, LockError> {
    let me = Holder {
        user: user(),
        host: hostname(),
        pid: std::process::id(),
        time: crate::time::unix_now(),
        command: command.to_string(),
        message: message.map(str::to_string),
    };
    if state.is_etcd() {
        return match state.etcd_acquire(&me)? {
            Ok(l) => Ok(DeployLock {
                kind: LockKind::Lease(l),
            }),
            Err(h) => Err(LockError::Held(h)),
        };
    }
    let dir = state.dir();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LockError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = lock_path(dir);
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(mut f) => {
            f.write_all(&serde_json::to_vec(&me).expect("serializes"))
                .and_then(|()| f.sync_all())
                .map_err(io(&path))?;
            Ok(DeployLock {
                kind: LockKind::File(path),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let h = holder(state)?.expect("the lock file exists");
            if h.alive() == Some(false) {
                Err(LockError::Stale {
                    holder: Box::new(h),
                    path,
                })
            } else {
                Err(LockError::Held(Box::new(h)))
            }
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// Removes a lock, whoever holds it. Returns the holder it removed.
pub fn break_lock(state: &DeployState) -> Result<Option<Holder>, LockError> {
    if state.is_etcd() {
        return Ok(state.etcd_break()?);
    }
    let h = holder(state)?;
    let path = lock_path(state.dir());
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(LockError::Io { path, source: e })
        }
        _ => Ok(h),
    }
}

impl Drop for DeployLock {
    fn drop(&mut self) {
        if let LockKind::File(path) = &self.kind {
            let _ = fs::remove_file(path);
        }
    }
}

/// Takes the lock to continue the work of the controller `pid` on `host`.
///
/// In files: over a stale lock only if it is that controller's, on this
/// host, and its process is gone (a controller that died mid-rollout).
/// In etcd: a dead controller's lock goes when its lease expires, so while
/// that controller holds it this waits (up to twice the lease) for it to
/// expire; a lease still renewed at the end means the controller runs.
/// Returns the lock and whether a dead controller's was taken over.
pub fn take_over(
    state: &DeployState,
    command: &str,
    pid: u32,
    host: &str,
) -> Result<(DeployLock, bool), LockError> {
    if state.is_etcd() {
        let mut waited_for = None;
        let start = Instant::now();
        loop {
            match acquire(state, command) {
                Ok(l) => return Ok((l, waited_for.is_some())),
                Err(LockError::Held(h)) if h.pid == pid && h.host == host => {
                    let left = state.etcd_holder()?.map_or(0, |(_, t)| t.max(0) as u64);
                    let limit = waited_for.get_or_insert(left * 2 + 5);
                    if start.elapsed().as_secs() > *limit {
                        return Err(LockError::StillRenewed {
                            holder: h,
                            waited: start.elapsed().as_secs(),
                        });
                    }
                    if start.elapsed() < Duration::from_millis(100) {
                        eprintln!(
                            "waiting for the deploy lock of the controller that ran this rollout ({h}): its lease expires within {left} s if it is gone"
                        );
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }
    match acquire(state, command) {
        Ok(l) => Ok((l, false)),
        Err(LockError::Stale { holder, .. })
            if holder.pid == pid && holder.host == host && host == crate::sys::hostname() =>
        {
            break_lock(state)?;
            Ok((acquire(state, command)?, true))
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
        let st = DeployState::files(dir.path());
        let lock = acquire(&st, "scap sync --canary=10%").unwrap();
        match acquire(&st, "scap sync --canary=20%") {
            Err(LockError::Held(h)) => {
                assert_eq!(h.command, "scap sync --canary=10%");
                assert_eq!(h.pid, std::process::id());
            }
            other => panic!("{other:?}"),
        }
        drop(lock);
        let _again = acquire(&st, "x").unwrap();
        drop(_again);
        // A lock from a dead process.
        let dead = Holder {
            user: "jdoe".into(),
            host: hostname(),
            pid: u32::MAX - 1,
            time: 0,
            command: "scap sync".into(),
            message: None,
        };
        fs::write(lock_path(dir.path()), serde_json::to_vec(&dead).unwrap()).unwrap();
        let e = acquire(&st, "y").unwrap_err();
        assert!(matches!(e, LockError::Stale { .. }), "{e}");
        assert!(e.to_string().contains("scap lock --break"));
        assert_eq!(break_lock(&st).unwrap(), Some(dead));
        assert!(acquire(&st, "z").is_ok());
    }

    #[test]
    fn a_held_lock_stops_others_and_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let locks = Locks::new(
            &DeployState::files(&dir.path().join("fleet")),
            Some(&dir.path().join("global")),
        );
        // Someone else's lock, as its file says.
        let theirs = Held {
            user: "someone-else".into(),
            host: "deploy1002".into(),
            time: 0,
            message: "investigating 500s on group1".into(),
            global: true,
        };
        fs::write(&locks.global, serde_json::to_vec(&theirs).unwrap()).unwrap();
        let e = locks.acquire("scap sync", None).unwrap_err().to_string();
        assert!(
            e.contains("someone-else") && e.contains("investigating 500s") && e.contains("--all"),
            "{e}"
        );
        assert!(matches!(
            locks.release(true, false),
            Err(LockError::NotYours { .. })
        ));
        assert_eq!(locks.release(true, true).unwrap(), Some(theirs));
        // My own lock: my deploys go through it, with the lock named.
        let mine = locks.hold("train blocker", false).unwrap();
        let (lock, own) = locks.acquire("scap sync", Some("msg")).unwrap();
        assert_eq!(own, Some(mine));
        assert_eq!(
            holder(&locks.state).unwrap().unwrap().message.as_deref(),
            Some("msg")
        );
        // No lock while a deploy runs.
        assert!(matches!(locks.hold("x", true), Err(LockError::Held(_))));
        assert!(!locks.global.exists());
        drop(lock);
        assert!(matches!(
            locks.hold("again", false),
            Err(LockError::Locked { .. })
        ));
        assert!(locks.release(false, false).unwrap().is_some());
        assert!(locks.held().unwrap().is_empty());
    }
}
