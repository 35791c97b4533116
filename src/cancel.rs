//! Cooperative cancellation. Long work (a fetch, writing a release slot,
//! gc, re-hashing the live tree) checks a [`Cancel`] between small steps,
//! so that a rollback pre-empts it within a fraction of a second and the
//! work stops at a point where everything on disk is still valid.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::store::StoreError;

#[derive(Clone, Default)]
pub struct Cancel(Arc<Inner>);

#[derive(Default)]
struct Inner {
    flag: AtomicBool,
    why: Mutex<String>,
    notify: tokio::sync::Notify,
}

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Asks the work to stop; `why` ends up in its error.
    pub fn cancel(&self, why: &str) {
        *self.0.why.lock().expect("not poisoned") = why.to_string();
        self.0.flag.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    pub fn why(&self) -> String {
        self.0.why.lock().expect("not poisoned").clone()
    }

    /// `Err(Cancelled)` once cancelled: call between steps.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.is_cancelled() {
            return Err(StoreError::Cancelled(self.why()));
        }
        Ok(())
    }

    /// Resolves once cancelled (for `select!` around network waits).
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cancel({})", self.is_cancelled())
    }
}
