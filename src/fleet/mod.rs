//! The fleet controller: talks to many agents at once.
//!
//! **Invariant:** the controller keeps no state of its own about hosts:
//! what each host runs is read from the host (its state file, over its
//! API) every time. A rollout can be continued from another shell, hours
//! later, or after a crash. What it does keep, beside the store in
//! `STORE/fleet/`, is about deploys, not hosts: the deploy lock and the
//! audit log.

pub mod agents;
pub mod deploy;
pub mod gates;
pub mod history;
pub mod inventory;
pub mod lock;
pub mod poll;
pub mod promote;
pub mod rollback;
pub mod rollout;
pub mod status;
