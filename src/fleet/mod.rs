//! The fleet controller: talks to many agents at once.
//!
//! **Invariant:** what each host runs is read from the host (its state
//! file, over its API) every time, never remembered: a rollout can be
//! continued from another shell, hours later, or after a crash. What the
//! deploy host keeps in `STORE/fleet/` is its own: the deploy lock, the
//! audit log, the rollout in progress (`record`), and its intent for each
//! host (`desired`), which hosts read to converge by themselves and which
//! is never counted as a host being on a version.

pub mod agents;
pub mod announce;
pub mod catchup;
pub mod change;
pub mod deploy;
pub mod desired;
pub mod gates;
pub mod history;
pub mod inventory;
pub mod keep;
pub mod lineage;
pub mod lock;
pub mod operator;
pub mod orders;
pub mod policy;
pub mod poll;
pub mod pools;
pub mod prom;
pub mod promote;
pub mod record;
pub mod restart;
pub mod rollback;
pub mod rollout;
pub mod stage;
pub mod standby;
pub mod state;
pub mod status;
pub mod trains;
