//! Where the deploy state lives: the deploy lock, a held lock, the
//! rollout record, the desired state, a pending change, the audit history
//! and the deploy orders' sequence.
//!
//! Two places, one interface ([`DeployState`]):
//!
//! - **Files** in `STORE/fleet/` (the default, when scap.toml names no
//!   etcd): one deploy host, a lab, the demo. The deploy lock is a file
//!   created with `O_EXCL`, and it is what serializes writers.
//! - **etcd** (`[state] etcd = [...]`, the v3 API): the site's replicated
//!   store, so that a second deploy host sees the same lock, rollout and
//!   intent, and can finish a rollout when the first is lost. Keys under
//!   one prefix (store-format.md, "Deploy state in etcd"):
//!   `lock/deploy` (held with a lease), `lock/held`, `rollout`, `desired`,
//!   `change`, `history/<time>-<host>-<pid>`, `orders/seq`.
//!
//! **Invariant (etcd): a command writes only while it holds the deploy
//! lock it took.** The lock is a key bound to a lease the holder renews
//! ([`LeaseLock`]); every write of the record, the desired state or a
//! pending change is a transaction that compares the lock key's create
//! revision with the one the holder made, and a rollout reads the lock
//! before each step, each rollback of a failed step and its last writes. A
//! holder whose lease expired (it hung, or lost etcd for longer than the
//! lease) finds it gone at the first of these, writes and sends nothing
//! more, and stops naming whoever holds the lock now.

pub mod etcd;
mod http;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd::{Compare, Etcd, EtcdError, Op};

use super::lock::{Held, Holder};
use crate::config::StateConfig;
use crate::store::VersionId;
use crate::store::disk::{LabelMove, SharedLabel, SharedLabels};

/// The deploy state's documents, each one JSON value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doc {
    /// The rollout in progress (`super::record`).
    Rollout,
    /// What each host should run (`super::desired`).
    Desired,
    /// A change (sync-file) not yet settled (`super::change`).
    Change,
}

impl Doc {
    fn file(self) -> &'static str {
        match self {
            Doc::Rollout => "rollout.json",
            Doc::Desired => "desired.json",
            Doc::Change => "change.json",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Doc::Rollout => "rollout",
            Doc::Desired => "desired",
            Doc::Change => "change",
        }
    }
}

/// The deploy lock's lease, unless `[state] lease` says.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);
/// One etcd request's deadline, unless `[state] timeout` says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// History entries read from etcd at most (the newest).
pub const HISTORY_READ: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "this command lost the deploy lock ({why}){now}: it stops here and writes nothing more; see `scap status`, and continue with `scap sync --resume` once the lock is free",
        now = match holder { Some(h) => format!("; it is now held by {h}"), None => String::new() }
    )]
    LockLost {
        why: String,
        holder: Option<Box<Holder>>,
    },
    #[error(
        "{what} changed in etcd ({endpoints}) while this command was changing it, {tries} times: another deploy host is writing it; run again"
    )]
    Contended {
        what: String,
        endpoints: String,
        tries: u32,
    },
}

/// The deploy state of one fleet. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DeployState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `STORE/fleet`: the files, or (with etcd) what stays local (the
    /// orders' file lock, gc's pins).
    dir: PathBuf,
    etcd: Option<EtcdState>,
}

#[derive(Debug)]
struct EtcdState {
    client: Etcd,
    /// Without its trailing slash.
    prefix: String,
    lease: Duration,
    /// The deploy lock this process holds, that its writes are fenced by.
    fence: Mutex<Option<Arc<Fence>>>,
}

/// The deploy lock as held: its key's create revision and its lease.
#[derive(Debug)]
struct Fence {
    create_revision: i64,
    lease: i64,
    /// Set by the keepalive thread once the lease is known gone, or not
    /// renewed for its whole TTL.
    lost: Mutex<Option<String>>,
    stop: AtomicBool,
}

impl DeployState {
    /// The deploy state in files under `dir` (`STORE/fleet`).
    pub fn files(dir: &Path) -> DeployState {
        DeployState {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                etcd: None,
            }),
        }
    }

    /// The deploy state in etcd, as `[state]` says; `dir` for what stays
    /// local.
    pub fn from_config(dir: &Path, cfg: &StateConfig) -> Result<DeployState, String> {
        let tls = match (&cfg.ca, &cfg.cert, &cfg.key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(Arc::new(
                crate::net::tls::client_config(&crate::net::tls::TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                })
                .map_err(|e| format!("[state]: {e}"))?,
            )),
            (Some(ca), None, None) => Some(Arc::new(
                crate::net::tls::ca_client_config(ca).map_err(|e| format!("[state]: {e}"))?,
            )),
            _ => {
                return Err("[state]: give cert and key together, with ca (or ca alone)".into());
            }
        };
        let timeout = match &cfg.timeout {
            Some(t) => {
                crate::time::parse_duration(t).map_err(|e| format!("[state] timeout: {e}"))?
            }
            None => DEFAULT_TIMEOUT,
        };
        let lease = match &cfg.lease {
            Some(t) => crate::time::parse_duration(t).map_err(|e| format!("[state] lease: {e}"))?,
            None => DEFAULT_LEASE,
        };
        if lease < Duration::from_secs(2) || lease < timeout * 2 {
            return Err(format!(
                "[state] lease = {:?} is too short: it must be at least 2 s and twice the timeout ({} s), or the lock is lost between two renewals",
                cfg.lease.as_deref().unwrap_or_default(),
                timeout.as_secs()
            ));
        }
        let prefix = cfg.prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') || prefix.len() < 2 {
            return Err(format!(
                "[state] prefix = {:?}: give an absolute key prefix, e.g. \"/scap/mediawiki\"",
                cfg.prefix
            ));
        }
        let client =
            Etcd::new(&cfg.etcd, tls, timeout).map_err(|e| format!("[state] etcd: {e}"))?;
        Ok(DeployState {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                etcd: Some(EtcdState {
                    client,
                    prefix,
                    lease,
                    fence: Mutex::new(None),
                }),
            }),
        })
    }

    /// `STORE/fleet`.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn is_etcd(&self) -> bool {
        self.inner.etcd.is_some()
    }

    /// Where `doc` is, for people: a path, or a key and the endpoints.
    pub fn location(&self, doc: Doc) -> String {
        match &self.inner.etcd {
            None => self.inner.dir.join(doc.file()).display().to_string(),
            Some(e) => format!(
                "etcd key {}/{} (at {})",
                e.prefix,
                doc.key(),
                e.client.endpoints_text()
            ),
        }
    }

    /// What the state is kept in, for `scap status`.
    pub fn describe(&self) -> String {
        match &self.inner.etcd {
            None => format!("files in {}", self.inner.dir.display()),
            Some(e) => format!("etcd {} under {}", e.client.endpoints_text(), e.prefix),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
        move |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Replaces the file `name` in the directory whole (atomically).
    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        let dir = &self.inner.dir;
        std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
        let p = dir.join(name);
        crate::store::fsutil::atomic_write(&p, bytes).map_err(|e| StateError::Io {
            path: p,
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// `doc`'s bytes, if it exists.
    pub fn read(&self, doc: Doc) -> Result<Option<Vec<u8>>, StateError> {
        match &self.inner.etcd {
            None => {
                let p = self.inner.dir.join(doc.file());
                match std::fs::read(&p) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Self::io(&p)(e)),
                }
            }
            Some(e) => Ok(e
                .client
                .get(e.key(doc.key()).as_bytes())?
                .map(|kv| kv.value)),
        }
    }

    /// A stamp that changes whenever `doc` does (`None`: it does not
    /// exist), cheaper than reading it.
    pub fn stamp(&self, doc: Doc) -> Result<Option<String>, StateError> {
        use std::os::unix::fs::MetadataExt;
        match &self.inner.etcd {
            None => Ok(std::fs::metadata(self.inner.dir.join(doc.file()))
                .ok()
                .map(|m| format!("{}:{}:{:?}", m.ino(), m.len(), m.modified().ok()))),
            Some(e) => {
                let r = e.client.mod_revision(e.key(doc.key()).as_bytes())?;
                Ok((r != 0).then(|| r.to_string()))
            }
        }
    }

    /// Replaces `doc` whole (atomically). With etcd, only while this
    /// process still holds the deploy lock it took, if it took one.
    pub fn write(&self, doc: Doc, bytes: &[u8]) -> Result<(), StateError> {
        match &self.inner.etcd {
            None => self.write_file(doc.file(), bytes),
            Some(e) => e.fenced(Op::Put {
                key: e.key(doc.key()).into_bytes(),
                value: bytes.to_vec(),
                lease: 0,
            }),
        }
    }

    /// Removes `doc` (fenced as [`DeployState::write`] is).
    pub fn remove(&self, doc: Doc) -> Result<(), StateError> {
        match &self.inner.etcd {
            None => {
                let p = self.inner.dir.join(doc.file());
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Self::io(&p)(e)),
                    _ => Ok(()),
                }
            }
            Some(e) => e.fenced(Op::Delete(e.key(doc.key()).into_bytes())),
        }
    }

    /// Appends one line (JSON, no newline) to the audit history.
    pub fn append_history(&self, line: &[u8]) -> Result<(), StateError> {
        match &self.inner.etcd {
            None => {
                use std::io::Write;
                let dir = &self.inner.dir;
                std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
                let p = dir.join("history.jsonl");
                let mut l = line.to_vec();
                l.push(b'\n');
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(Self::io(&p))?;
                f.write_all(&l)
                    .and_then(|()| f.sync_data())
                    .map_err(Self::io(&p))
            }
            Some(e) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos();
                let key = format!(
                    "{}/history/{now:020}-{}-{}",
                    e.prefix,
                    crate::sys::hostname(),
                    std::process::id()
                );
                e.client.txn(
                    &[],
                    &[Op::Put {
                        key: key.into_bytes(),
                        value: line.to_vec(),
                        lease: 0,
                    }],
                    &[],
                )?;
                Ok(())
            }
        }
    }

    /// The newest `n` lines of the audit history, oldest first (with
    /// etcd, at most [`HISTORY_READ`]).
    pub fn history_last(&self, n: usize) -> Result<Vec<Vec<u8>>, StateError> {
        match &self.inner.etcd {
            None => {
                let p = self.inner.dir.join("history.jsonl");
                match std::fs::read(&p) {
                    Ok(b) => {
                        let lines: Vec<&[u8]> =
                            b.split(|&c| c == b'\n').filter(|l| !l.is_empty()).collect();
                        let skip = lines.len().saturating_sub(n);
                        Ok(lines[skip..].iter().map(|l| l.to_vec()).collect())
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                    Err(e) => Err(Self::io(&p)(e)),
                }
            }
            Some(e) => Ok(e
                .client
                .list(
                    format!("{}/history/", e.prefix).as_bytes(),
                    n.clamp(1, HISTORY_READ as usize) as i64,
                )?
                .into_iter()
                .map(|kv| kv.value)
                .collect()),
        }
    }

    /// Writes a standby deploy host's report (`super::standby`): in etcd
    /// for every deploy host to see, or in this host's files.
    pub fn report_standby(&self, host: &str, report: &[u8]) -> Result<(), StateError> {
        match &self.inner.etcd {
            None => self.write_file(&format!("standby-{host}.json"), report),
            Some(e) => {
                e.client.txn(
                    &[],
                    &[Op::Put {
                        key: e.key(&format!("standby/{host}")).into_bytes(),
                        value: report.to_vec(),
                        lease: 0,
                    }],
                    &[],
                )?;
                Ok(())
            }
        }
    }

    /// Every standby's last report.
    pub fn standby_reports(&self) -> Result<Vec<Vec<u8>>, StateError> {
        match &self.inner.etcd {
            None => {
                let dir = &self.inner.dir;
                let mut out = Vec::new();
                let Ok(entries) = std::fs::read_dir(dir) else {
                    return Ok(out);
                };
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with("standby-") && name.ends_with(".json") {
                        out.push(std::fs::read(entry.path()).map_err(Self::io(&entry.path()))?);
                    }
                }
                Ok(out)
            }
            Some(e) => Ok(e
                .client
                .list(format!("{}/standby/", e.prefix).as_bytes(), 1000)?
                .into_iter()
                .map(|kv| kv.value)
                .collect()),
        }
    }

    /// Reserves `block` deploy-order sequence numbers above both `floor`
    /// (the clock) and every block reserved before, by any deploy host
    /// sharing this state; the first. `None`: the files hold the sequence
    /// (`super::orders` keeps it there).
    pub fn reserve_orders(&self, floor: u64, block: u64) -> Result<Option<u64>, StateError> {
        let Some(e) = &self.inner.etcd else {
            return Ok(None);
        };
        let key = e.key("orders/seq").into_bytes();
        for _ in 0..20 {
            let (last, rev) = match e.client.get(&key)? {
                Some(kv) => (
                    std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .unwrap_or(0),
                    kv.mod_revision,
                ),
                None => (0, 0),
            };
            let start = last.max(floor).saturating_add(1);
            let end = start.saturating_add(block);
            let t = e.client.txn(
                &[Compare::Modified(key.clone(), rev)],
                &[Op::Put {
                    key: key.clone(),
                    value: end.to_string().into_bytes(),
                    lease: 0,
                }],
                &[],
            )?;
            if t.succeeded {
                return Ok(Some(start));
            }
        }
        Err(StateError::Contended {
            what: e.key("orders/seq"),
            endpoints: e.client.endpoints_text(),
            tries: 20,
        })
    }

    /// Whether this process still holds the deploy lock it took: a
    /// linearizable read of the lock in etcd (nothing to check in files,
    /// or when no lock was taken). A rollout asks before each step, so a
    /// holder whose lease expired stops before it moves another host.
    pub fn check_lock(&self) -> Result<(), StateError> {
        let Some(e) = &self.inner.etcd else {
            return Ok(());
        };
        let Some(fence) = e.fence.lock().expect("not poisoned").clone() else {
            return Ok(());
        };
        let now = e.client.get(e.key("lock/deploy").as_bytes())?;
        e.judge(&fence, now)
    }

    // The locks, with etcd (`super::lock` keeps the files').

    /// The deploy lock's holder, and for how many more seconds its lease
    /// runs if it stops renewing.
    pub(super) fn etcd_holder(&self) -> Result<Option<(Holder, i64)>, StateError> {
        let Some(e) = &self.inner.etcd else {
            return Ok(None);
        };
        let Some(kv) = e.client.get(e.key("lock/deploy").as_bytes())? else {
            return Ok(None);
        };
        let ttl = if kv.lease != 0 {
            e.client.time_to_live(kv.lease)?
        } else {
            0
        };
        Ok(Some((holder_of(&kv.value), ttl)))
    }

    /// Takes the deploy lock for `me`: a key under a new lease, renewed
    /// by a thread until the lock is dropped; every fenced write of this
    /// process compares it. `Err(holder)`: held.
    pub(super) fn etcd_acquire(
        &self,
        me: &Holder,
    ) -> Result<Result<LeaseLock, Box<Holder>>, StateError> {
        let value = serde_json::to_vec(me).expect("serializes");
        Ok(self
            .claim("lock/deploy", &value, true)?
            .map_err(|v| Box::new(holder_of(&v))))
    }

    /// Claims the key `name` (under the prefix) with `value` under a new
    /// lease, renewed by a thread until the claim is dropped, if no one
    /// holds it; `fence`: this process's fenced writes compare it (the
    /// deploy lock). `Err(value)`: held, with its holder's value. Without
    /// etcd there is nothing to claim: `Ok(None)`.
    pub fn claim_lease(
        &self,
        name: &str,
        value: &[u8],
    ) -> Result<Result<Option<LeaseLock>, Vec<u8>>, StateError> {
        if self.inner.etcd.is_none() {
            return Ok(Ok(None));
        }
        Ok(self.claim(name, value, false)?.map(Some))
    }

    /// The value of the key `name` (under the prefix), with etcd.
    pub fn get_key(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        match &self.inner.etcd {
            None => Ok(None),
            Some(e) => Ok(e.client.get(e.key(name).as_bytes())?.map(|kv| kv.value)),
        }
    }

    fn claim(
        &self,
        name: &str,
        value: &[u8],
        fence: bool,
    ) -> Result<Result<LeaseLock, Vec<u8>>, StateError> {
        let e = self.inner.etcd.as_ref().expect("etcd state");
        let ttl = e.lease.as_secs().max(2) as i64;
        let lease = e.client.grant(ttl)?;
        let key = e.key(name).into_bytes();
        let t = e.client.txn(
            &[Compare::Created(key.clone(), 0)],
            &[
                Op::Put {
                    key: key.clone(),
                    value: value.to_vec(),
                    lease,
                },
                Op::Get(key.clone()),
            ],
            &[Op::Get(key.clone())],
        );
        let t = match t {
            Ok(t) => t,
            Err(err) => {
                let _ = e.client.revoke(lease);
                return Err(err.into());
            }
        };
        let kv = t.reads.into_iter().flatten().last();
        match kv {
            Some(kv) if kv.lease == lease => {
                let held = Arc::new(Fence {
                    create_revision: kv.create_revision,
                    lease,
                    lost: Mutex::new(None),
                    stop: AtomicBool::new(false),
                });
                if fence {
                    *e.fence.lock().expect("not poisoned") = Some(held.clone());
                }
                let thread = {
                    let state = self.clone();
                    let held = held.clone();
                    let key = name.to_string();
                    std::thread::Builder::new()
                        .name("scap-lease".into())
                        .spawn(move || {
                            state.keep_alive(&held, &key, Duration::from_secs(ttl as u64))
                        })
                };
                let thread = match thread {
                    Ok(t) => Some(t),
                    Err(err) => {
                        // Nothing would renew it: give it back now.
                        if fence {
                            *e.fence.lock().expect("not poisoned") = None;
                        }
                        let _ = e.client.revoke(lease);
                        return Err(StateError::Io {
                            path: PathBuf::from("(a thread to renew the lease)"),
                            source: err,
                        });
                    }
                };
                Ok(Ok(LeaseLock {
                    state: self.clone(),
                    fence: held,
                    thread,
                }))
            }
            Some(kv) => {
                let _ = e.client.revoke(lease);
                Ok(Err(kv.value))
            }
            None => {
                // Taken and expired between the compare and the read.
                let _ = e.client.revoke(lease);
                Ok(Err(Vec::new()))
            }
        }
    }

    /// Renews the lease a third of its TTL apart, each try within what is
    /// left of the TTL; marks the fence lost once etcd says it is gone, or
    /// once a whole TTL went by unrenewed.
    fn keep_alive(&self, fence: &Fence, key: &str, ttl: Duration) {
        let e = self.inner.etcd.as_ref().expect("etcd state");
        let mut renewed = Instant::now();
        let step = ttl / 3;
        loop {
            let until = Instant::now() + step;
            while Instant::now() < until {
                if fence.stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let left = ttl
                .saturating_sub(renewed.elapsed())
                .max(Duration::from_millis(100));
            match e.client.keep_alive(fence.lease, left) {
                Ok(0) => {
                    *fence.lost.lock().expect("not poisoned") =
                        Some("etcd says its lease has expired".into());
                    return;
                }
                Ok(_) => renewed = Instant::now(),
                Err(err) => {
                    tracing::warn!("cannot renew the lease of {key} in etcd: {err}");
                    if renewed.elapsed() >= ttl {
                        *fence.lost.lock().expect("not poisoned") = Some(format!(
                            "its lease was not renewed for {} s: {err}",
                            ttl.as_secs()
                        ));
                        return;
                    }
                }
            }
        }
    }

    /// Removes the deploy lock, whoever holds it (its lease is revoked:
    /// the holder's next write fails).
    pub(super) fn etcd_break(&self) -> Result<Option<Holder>, StateError> {
        let e = self.inner.etcd.as_ref().expect("etcd state");
        let Some(kv) = e.client.get(e.key("lock/deploy").as_bytes())? else {
            return Ok(None);
        };
        if kv.lease != 0 {
            e.client.revoke(kv.lease)?;
        }
        e.client.txn(
            &[Compare::Modified(kv.key.clone(), kv.mod_revision)],
            &[Op::Delete(kv.key.clone())],
            &[],
        )?;
        Ok(Some(holder_of(&kv.value)))
    }

    /// The held lock (`scap lock`), if any.
    pub(super) fn etcd_held(&self) -> Result<Option<Held>, StateError> {
        let e = self.inner.etcd.as_ref().expect("etcd state");
        Ok(e.client.get(e.key("lock/held").as_bytes())?.map(|kv| {
            serde_json::from_slice(&kv.value).unwrap_or_else(|err| Held {
                user: "?".into(),
                host: "?".into(),
                time: 0,
                message: format!("(unreadable lock in etcd: {err})"),
                global: false,
            })
        }))
    }

    /// Creates the held lock unless one exists; `Err(theirs)` if so.
    pub(super) fn etcd_hold(&self, me: &Held) -> Result<Result<(), Held>, StateError> {
        let e = self.inner.etcd.as_ref().expect("etcd state");
        let key = e.key("lock/held").into_bytes();
        let value = serde_json::to_vec(me).expect("serializes");
        let t = e.client.txn(
            &[Compare::Created(key.clone(), 0)],
            &[Op::Put {
                key: key.clone(),
                value: value.clone(),
                lease: 0,
            }],
            &[Op::Get(key)],
        )?;
        if t.succeeded {
            return Ok(Ok(()));
        }
        match t.reads.into_iter().flatten().next() {
            // Ours already: a retry after a write that did land.
            Some(kv) if kv.value == value => Ok(Ok(())),
            Some(kv) => Ok(Err(
                serde_json::from_slice(&kv.value).unwrap_or_else(|_| me.clone())
            )),
            None => Ok(Err(me.clone())),
        }
    }

    pub(super) fn etcd_unhold(&self) -> Result<(), StateError> {
        let e = self.inner.etcd.as_ref().expect("etcd state");
        e.client
            .txn(&[], &[Op::Delete(e.key("lock/held").into_bytes())], &[])?;
        Ok(())
    }
}

fn holder_of(value: &[u8]) -> Holder {
    serde_json::from_slice(value).unwrap_or_else(|_| Holder {
        user: "?".into(),
        host: "?".into(),
        pid: 0,
        time: 0,
        command: "(unreadable lock in etcd)".into(),
        message: None,
    })
}

impl EtcdState {
    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// `op` on a document, if this process still holds the deploy lock it
    /// took (or holds none). A write retried after its answer was lost
    /// (`Etcd::call` tries the next member) compares the same lock, so it
    /// succeeds again if the lock is still this process's.
    fn fenced(&self, op: Op) -> Result<(), StateError> {
        let fence = self.fence.lock().expect("not poisoned").clone();
        let Some(fence) = fence else {
            self.client.txn(&[], &[op], &[])?;
            return Ok(());
        };
        let lock_key = self.key("lock/deploy").into_bytes();
        if fence.lost.lock().expect("not poisoned").is_some() {
            let now = self.client.get(&lock_key).ok().flatten();
            return self.judge(&fence, now);
        }
        let t = self.client.txn(
            &[Compare::Created(lock_key.clone(), fence.create_revision)],
            &[op],
            &[Op::Get(lock_key)],
        )?;
        if t.succeeded {
            return Ok(());
        }
        let now = t.reads.into_iter().flatten().next();
        self.judge(&fence, now)
    }

    /// Whether `fence` still holds the lock, `now` being the lock key as
    /// read: `Ok` if it is the fence's own and not known lost; else the
    /// fence is marked lost and the error names why, and who holds the
    /// lock now.
    fn judge(&self, fence: &Fence, now: Option<etcd::Kv>) -> Result<(), StateError> {
        let known = fence.lost.lock().expect("not poisoned").clone();
        let why = match (known, &now) {
            (Some(why), _) => why,
            (None, Some(kv)) if kv.create_revision == fence.create_revision => return Ok(()),
            (None, Some(_)) => "its lease expired, and another command took the lock".into(),
            (None, None) => "its lease expired (or `scap lock --break` removed it)".into(),
        };
        *fence.lost.lock().expect("not poisoned") = Some(why.clone());
        Err(StateError::LockLost {
            why,
            holder: now
                .filter(|kv| kv.create_revision != fence.create_revision)
                .map(|kv| Box::new(holder_of(&kv.value))),
        })
    }
}

/// The deploy lock held in etcd: renewed until dropped, then revoked
/// (which deletes the key at once, rather than after the lease).
#[derive(Debug)]
pub struct LeaseLock {
    state: DeployState,
    fence: Arc<Fence>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseLock {
    /// Why the lock is known lost, if it is.
    pub fn lost(&self) -> Option<String> {
        self.fence.lost.lock().expect("not poisoned").clone()
    }
}

impl Drop for LeaseLock {
    fn drop(&mut self) {
        self.fence.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(e) = &self.state.inner.etcd {
            let mut f = e.fence.lock().expect("not poisoned");
            if f.as_ref().is_some_and(|f| Arc::ptr_eq(f, &self.fence)) {
                *f = None;
            }
            drop(f);
            if let Err(err) = e.client.revoke(self.fence.lease) {
                tracing::warn!(
                    "cannot release the deploy lock in etcd ({err}): it goes when its lease expires, within {} s",
                    e.lease.as_secs()
                );
            }
        }
    }
}

/// The trains' heads and histories in etcd (`labels/<name>`: a
/// [`SharedLabel`]), shared by the deploy hosts' stores: a label moves
/// there first, by compare-and-swap against the head the store saw, then
/// in the store (`Store::with_shared_labels`).
#[derive(Debug)]
pub struct EtcdLabels(DeployState);

impl EtcdLabels {
    /// The shared labels of `state`, if it is in etcd.
    pub fn of(state: &DeployState) -> Option<EtcdLabels> {
        state.is_etcd().then(|| EtcdLabels(state.clone()))
    }
}

impl SharedLabels for EtcdLabels {
    fn move_label(
        &self,
        label: &str,
        head: Option<VersionId>,
        log: &[LabelMove],
        mv: &LabelMove,
    ) -> Result<(), String> {
        let e = self.0.inner.etcd.as_ref().expect("etcd state");
        let key = e.key(&format!("labels/{label}")).into_bytes();
        for _ in 0..20 {
            let kv = e.client.get(&key).map_err(|e| e.to_string())?;
            let (mut shared, rev) = match &kv {
                Some(kv) => (
                    serde_json::from_slice::<SharedLabel>(&kv.value).map_err(|err| {
                        format!(
                            "its record in etcd ({}) does not parse: {err}",
                            e.key(&format!("labels/{label}"))
                        )
                    })?,
                    kv.mod_revision,
                ),
                // Shared for the first time: with the store's history.
                None => (
                    SharedLabel {
                        name: label.to_string(),
                        head: mv.to,
                        log: log.to_vec(),
                    },
                    0,
                ),
            };
            if kv.is_some() {
                if shared.head == mv.to {
                    return Ok(());
                }
                if Some(shared.head) != head {
                    let by = shared
                        .log
                        .last()
                        .map(|m| {
                            format!(
                                " by {} at {}: {} {}",
                                m.user,
                                crate::time::fmt_utc(m.time),
                                m.action,
                                m.message
                            )
                        })
                        .unwrap_or_default();
                    return Err(format!(
                        "moved on another deploy host to {}{by}, while this store had it at {}: run the command again (it starts from the shared head), or copy that version here first",
                        shared.head.short(),
                        head.map_or_else(|| "nothing".into(), |h| h.short())
                    ));
                }
            }
            shared.head = mv.to;
            shared.log.push(mv.clone());
            let t = e
                .client
                .txn(
                    &[Compare::Modified(key.clone(), rev)],
                    &[Op::Put {
                        key: key.clone(),
                        value: serde_json::to_vec(&shared).expect("serializes"),
                        lease: 0,
                    }],
                    &[],
                )
                .map_err(|e| e.to_string())?;
            if t.succeeded {
                return Ok(());
            }
        }
        Err("its record in etcd changed 20 times while this command moved it: run it again".into())
    }

    fn labels(&self) -> Result<Vec<SharedLabel>, String> {
        let e = self.0.inner.etcd.as_ref().expect("etcd state");
        let kvs = e
            .client
            .list(format!("{}/labels/", e.prefix).as_bytes(), 0)
            .map_err(|e| e.to_string())?;
        Ok(kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<SharedLabel>(&kv.value).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_hold_documents_history_and_reports_and_need_no_lock_checks() {
        let dir = tempfile::tempdir().unwrap();
        let st = DeployState::files(&dir.path().join("fleet"));
        assert!(!st.is_etcd());
        assert_eq!(st.read(Doc::Rollout).unwrap(), None);
        assert_eq!(st.stamp(Doc::Desired).unwrap(), None);
        st.write(Doc::Rollout, b"{\"a\":1}").unwrap();
        assert_eq!(st.read(Doc::Rollout).unwrap().unwrap(), b"{\"a\":1}");
        assert!(st.stamp(Doc::Rollout).unwrap().is_some());
        assert!(st.location(Doc::Rollout).ends_with("fleet/rollout.json"));
        st.remove(Doc::Rollout).unwrap();
        st.remove(Doc::Rollout).unwrap();
        assert_eq!(st.read(Doc::Rollout).unwrap(), None);
        for i in 0..5 {
            st.append_history(format!("{{\"n\":{i}}}").as_bytes())
                .unwrap();
        }
        let last = st.history_last(2).unwrap();
        assert_eq!(last, vec![b"{\"n\":3}".to_vec(), b"{\"n\":4}".to_vec()]);
        assert_eq!(st.history_last(100).unwrap().len(), 5);
        assert_eq!(st.reserve_orders(1, 10).unwrap(), None);
        st.check_lock().unwrap();
        st.report_standby("deploy2002", b"{}").unwrap();
        assert_eq!(st.standby_reports().unwrap(), vec![b"{}".to_vec()]);
        assert!(matches!(
            st.claim_lease("serve/primary", b"x").unwrap(),
            Ok(None)
        ));
        assert_eq!(st.get_key("serve/primary").unwrap(), None);
    }

    #[test]
    fn a_bad_state_config_is_refused_naming_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |etcd: &[&str], prefix: &str, lease: Option<&str>| StateConfig {
            etcd: etcd.iter().map(|s| s.to_string()).collect(),
            prefix: prefix.into(),
            lease: lease.map(str::to_string),
            timeout: None,
            ca: None,
            cert: None,
            key: None,
        };
        let e = DeployState::from_config(dir.path(), &cfg(&[], "/scap", None)).unwrap_err();
        assert!(e.contains("[state] etcd"), "{e}");
        let e =
            DeployState::from_config(dir.path(), &cfg(&["http://h:1"], "scap", None)).unwrap_err();
        assert!(e.contains("[state] prefix"), "{e}");
        let e = DeployState::from_config(dir.path(), &cfg(&["http://h:1"], "/scap", Some("1s")))
            .unwrap_err();
        assert!(e.contains("[state] lease"), "{e}");
        let mut c = cfg(&["https://h:1"], "/scap", None);
        c.cert = Some("/x.pem".into());
        let e = DeployState::from_config(dir.path(), &c).unwrap_err();
        assert!(e.contains("cert and key together"), "{e}");
        let st =
            DeployState::from_config(dir.path(), &cfg(&["http://h:1"], "/scap/x/", None)).unwrap();
        assert!(st.is_etcd());
        assert_eq!(
            st.describe(),
            "etcd http://h:2379 under /scap/x".replace("2379", "1")
        );
    }
}
