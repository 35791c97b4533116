//! The fleet controller: talks to many agents at once.
//!
//! **Invariant:** the controller keeps no state of its own about hosts:
//! what each host runs is read from the host (its state file, over its
//! API) every time. A rollout can be continued from another shell, hours
//! later, or after a crash.

pub mod inventory;
pub mod sync;
