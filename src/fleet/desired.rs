//! What each host should run, as the deploy host last decided it: after a
//! rollout step, a rollback, a change (sync-file) or a catch-up.
//! In the deploy state (`super::state`: `STORE/fleet/desired.json`, or
//! etcd), replaced whole.
//!
//! Hosts read it through `scap serve` (`GET /v1/desired/<host>`) when their
//! agent starts and on `scap pull`, and converge by themselves: a reimaged
//! host, or one that was down during a step, catches up without a new
//! rollout. `scap status` shows hosts that are behind it.
//!
//! Every target carries a deploy order for action `desired`, signed by the
//! deploy key with a sequence number from the command that set it
//! ([`super::orders`]): an agent follows a target only if a key it trusts
//! signed it for this host and it is newer than every order the host took,
//! so a cache, a standby or a replayed answer that says an older thing is
//! ignored: a pull can never take a host where a sync could not.
//!
//! **Invariant:** the hosts' own state files remain the truth about what
//! runs; this file is the deploy host's *intent*, and nothing here is ever
//! counted as a host being on a version.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::orders::{Orders, OrdersError};
use super::state::{DeployState, Doc, StateError};
use crate::proto::DESIRED_ACTION;
use crate::store::VersionId;
use crate::store::signature::SignedOrder;

pub const DESIRED_FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub version: VersionId,
    /// Unix seconds when it became this host's target.
    pub since: u64,
    pub by: String,
    /// What made it so: "sync", "rollback", "change <id>", ...
    pub why: String,
    /// The deploy key's order for this host to run `version`, newer than
    /// any order given before it (none: written without a deploy key; an
    /// agent that trusts a key ignores the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<SignedOrder>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub format: u32,
    /// By host name (as the inventory names it, and as the host's agent
    /// calls itself).
    pub hosts: BTreeMap<String, Target>,
}

#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    #[error("{place}: {why}: move it aside (the next deploy writes it anew) or upgrade scap")]
    Bad { place: String, why: String },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("signing the desired state: {0}")]
    Orders(#[from] OrdersError),
    #[error(transparent)]
    Lock(#[from] super::lock::LockError),
}

impl Desired {
    pub fn load(state: &DeployState) -> Result<Desired, DesiredError> {
        let Some(bytes) = state.read(Doc::Desired)? else {
            return Ok(Desired::default());
        };
        Desired::parse(&bytes, || state.location(Doc::Desired))
    }

    /// The desired state from its bytes; `place` names where they came
    /// from in an error.
    pub fn parse(bytes: &[u8], place: impl Fn() -> String) -> Result<Desired, DesiredError> {
        let d: Desired = serde_json::from_slice(bytes).map_err(|e| DesiredError::Bad {
            place: place(),
            why: e.to_string(),
        })?;
        if d.format > DESIRED_FORMAT {
            return Err(DesiredError::Bad {
                place: place(),
                why: format!(
                    "format v{}, this scap reads up to v{DESIRED_FORMAT}",
                    d.format
                ),
            });
        }
        Ok(d)
    }

    pub fn save(&self, state: &DeployState) -> Result<(), DesiredError> {
        let mut d = self.clone();
        d.format = DESIRED_FORMAT;
        let mut json = serde_json::to_vec_pretty(&d).expect("serializes");
        json.push(b'\n');
        Ok(state.write(Doc::Desired, &json)?)
    }

    pub fn set(&mut self, host: &str, version: VersionId, by: &str, why: &str) {
        self.hosts.insert(
            host.to_string(),
            Target {
                version,
                since: crate::time::unix_now(),
                by: by.to_string(),
                why: why.to_string(),
                order: None,
            },
        );
    }

    pub fn get(&self, host: &str) -> Option<&Target> {
        self.hosts.get(host)
    }

    /// Every version some host should run.
    pub fn versions(&self) -> BTreeSet<VersionId> {
        self.hosts.values().map(|t| t.version).collect()
    }

    /// A change replaced versions by others (old -> new): every target on
    /// an old one moves to its new one.
    pub fn rewrite(&mut self, map: &BTreeMap<VersionId, VersionId>, by: &str, why: &str) {
        for t in self.hosts.values_mut() {
            if let Some(new) = map.get(&t.version) {
                *t = Target {
                    version: *new,
                    since: crate::time::unix_now(),
                    by: by.to_string(),
                    why: why.to_string(),
                    order: None,
                };
            }
        }
    }
}

/// Loads, changes and saves the desired state in one go; every target `f`
/// set or changed gets a new order from `orders` (none without a deploy
/// key).
pub fn update(
    state: &DeployState,
    orders: Option<&Orders>,
    f: impl FnOnce(&mut Desired),
) -> Result<(), DesiredError> {
    let mut d = Desired::load(state)?;
    let before = d.clone();
    f(&mut d);
    for (host, t) in &mut d.hosts {
        let same = before.hosts.get(host).is_some_and(|b| {
            (b.version, b.since, &b.why) == (t.version, t.since, &t.why) && b.order == t.order
        });
        // A target left as it was keeps its order, or stays without one:
        // signing it now would make an old decision newer than the orders
        // its host took since.
        if same {
            continue;
        }
        t.order = match orders {
            Some(o) => Some(o.sign(host, t.version, DESIRED_ACTION)?),
            None => None,
        };
    }
    d.save(state)
}

/// Signs every target anew with `key` (after a key rotation: targets
/// signed by the revoked key would be ignored by every agent), under the
/// deploy lock, so that no rollout changes them meanwhile. Safe, as the
/// targets are the deploy host's current intent. How many it signed.
pub fn resign(
    state: &DeployState,
    key: std::sync::Arc<crate::store::signature::SigningKey>,
) -> Result<usize, DesiredError> {
    let _lock = super::lock::acquire(state, "scap sign --desired")?;
    let orders = Orders::reserve(key, state)?;
    let mut d = Desired::load(state)?;
    for (host, t) in &mut d.hosts {
        t.order = Some(orders.sign(host, t.version, DESIRED_ACTION)?);
    }
    d.save(state)?;
    Ok(d.hosts.len())
}
