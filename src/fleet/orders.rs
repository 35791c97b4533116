//! Deploy orders: every sync, stage and rollback the controller sends
//! carries an order signed by the deploy key, naming the host, the action,
//! the version and a sequence number (`store::signature::Order`).
//!
//! The sequence is what makes a request fresh, not the version: an agent
//! takes an order only if its `seq` is no lower than the newest it took,
//! so a replayed or delayed request from an earlier command can never move
//! a host, while going back to a version the host ran before (a revert, an
//! ID deployed on purpose) is just a newer order.
//!
//! Sequence numbers are handed out in blocks: each command reserves one
//! block of [`BLOCK`] numbers, starting above both the last block reserved
//! (`STORE/fleet/orders.seq`, written under `orders.lock`; with the deploy
//! state in etcd, `orders/seq` there, by compare-and-swap) and the clock in
//! microseconds, so they grow across commands, controller restarts and a
//! clock that goes back, and (while clocks agree) across deploy hosts (and, with etcd, whatever their clocks).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::state::DeployState;
use crate::store::VersionId;
use crate::store::signature::{ORDER_KIND, Order, SignedOrder, SigningKey};

/// Orders one command may give.
pub const BLOCK: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a sequence number ({text:?}): move it aside (the next block starts at the clock)"
    )]
    Corrupt { path: PathBuf, text: String },
    #[error("this command gave {BLOCK} deploy orders, all it may: run it again")]
    Exhausted,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    State(#[from] super::state::StateError),
}

/// The orders of one command: a block of sequence numbers and the key.
pub struct Orders {
    key: std::sync::Arc<SigningKey>,
    next: AtomicU64,
    end: u64,
}

impl std::fmt::Debug for Orders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orders")
            .field("key", &self.key.public.id)
            .field("next", &self.next)
            .field("end", &self.end)
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OrdersError + '_ {
    move |source| OrdersError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Orders {
    /// Reserves a block of sequence numbers in `fleet_dir`.
    pub fn reserve(
        key: impl Into<std::sync::Arc<SigningKey>>,
        state: &DeployState,
    ) -> Result<Orders, OrdersError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        if let Some(start) = state.reserve_orders(now, BLOCK)? {
            return Ok(Orders {
                key: key.into(),
                next: AtomicU64::new(start),
                end: start.saturating_add(BLOCK),
            });
        }
        let fleet_dir = state.dir();
        std::fs::create_dir_all(fleet_dir).map_err(io(fleet_dir))?;
        let lock_path = fleet_dir.join("orders.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        let path = fleet_dir.join("orders.seq");
        let last = match std::fs::read_to_string(&path) {
            Ok(t) => t.trim().parse::<u64>().map_err(|_| OrdersError::Corrupt {
                path: path.clone(),
                text: crate::text::clip(&t, 40),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io(&path)(e)),
        };
        let start = last.max(now).saturating_add(1);
        let end = start.saturating_add(BLOCK);
        crate::store::fsutil::atomic_write(&path, format!("{end}\n").as_bytes())?;
        Ok(Orders {
            key: key.into(),
            next: AtomicU64::new(start),
            end,
        })
    }

    /// A signed order for `host` (its agent's own name) to `action`
    /// `version`.
    pub fn sign(
        &self,
        host: &str,
        version: VersionId,
        action: &str,
    ) -> Result<SignedOrder, OrdersError> {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        if seq >= self.end {
            return Err(OrdersError::Exhausted);
        }
        Ok(self.key.sign_order(&Order {
            scap: ORDER_KIND.into(),
            host: host.to_string(),
            version,
            action: action.to_string(),
            seq,
            time: crate::time::unix_now(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectKind;
    use crate::store::signature::Trust;

    #[test]
    fn blocks_grow_across_commands_and_orders_verify_only_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let key_dir = tempfile::tempdir().unwrap();
        let (pem, public) = SigningKey::generate("test").unwrap();
        let key_path = key_dir.path().join("key");
        std::fs::write(&key_path, pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let load = || SigningKey::load(&key_path).unwrap();
        let v = VersionId::new(ObjectKind::Tree.hash(b"v"));
        let w = VersionId::new(ObjectKind::Tree.hash(b"w"));
        let a = Orders::reserve(load(), &DeployState::files(dir.path())).unwrap();
        // A clock far in the future for the first block, then the file
        // alone must keep the next one above it.
        std::fs::write(dir.path().join("orders.seq"), format!("{}\n", u64::MAX / 2)).unwrap();
        let b = Orders::reserve(load(), &DeployState::files(dir.path())).unwrap();
        let trust = Trust {
            keys: vec![public.clone()],
            revoked: vec![],
        };
        let oa = trust
            .verify_order(&a.sign("mw1", v, "sync").unwrap(), "mw1", &v, "sync")
            .unwrap();
        let ob = trust
            .verify_order(&b.sign("mw1", v, "sync").unwrap(), "mw1", &v, "sync")
            .unwrap();
        assert!(ob.seq > u64::MAX / 2 && ob.seq > oa.seq);
        let ob2 = trust
            .verify_order(&b.sign("mw1", v, "sync").unwrap(), "mw1", &v, "sync")
            .unwrap();
        assert_eq!(ob2.seq, ob.seq + 1);
        // Another host, version or action: refused, naming why.
        let o = b.sign("mw1", v, "sync").unwrap();
        let e = trust.verify_order(&o, "mw2", &v, "sync").unwrap_err();
        assert!(
            e.to_string()
                .contains("for host \"mw1\", not this host (mw2)"),
            "{e}"
        );
        assert!(trust.verify_order(&o, "mw1", &w, "sync").is_err());
        assert!(trust.verify_order(&o, "mw1", &v, "rollback").is_err());
        // An altered order, or one by a revoked key.
        let mut bad = o.clone();
        bad.statement = bad.statement.replace('A', "B");
        assert!(trust.verify_order(&bad, "mw1", &v, "sync").is_err());
        let revoked = Trust {
            keys: vec![public.clone()],
            revoked: vec![public.id],
        };
        let e = revoked.verify_order(&o, "mw1", &v, "sync").unwrap_err();
        assert!(e.to_string().contains("revoked"), "{e}");
        // A corrupt sequence file is named.
        std::fs::write(dir.path().join("orders.seq"), "nope").unwrap();
        let e = Orders::reserve(load(), &DeployState::files(dir.path())).unwrap_err();
        assert!(e.to_string().contains("orders.seq"), "{e}");
    }
}
