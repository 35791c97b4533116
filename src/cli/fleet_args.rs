//! Which hosts a fleet command talks to, and how.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::ctx::Ctx;
use super::output::{clock, runtime};
use crate::fleet::agents::Agents;
use crate::fleet::deploy::PoolFleet;
use crate::fleet::inventory::{Member, fleet};
use crate::fleet::pools::Pools;

/// Which hosts, and how to reach them.
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// dsh-style group file of hosts, one host[:port] a line (repeatable) [default: scap.toml's hosts]
    #[arg(long = "hosts", value_name = "GROUPFILE")]
    hosts: Vec<PathBuf>,
    /// TOML inventory with per-host weights, dc, cluster, canary flags [default: scap.toml's inventory]
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// dsh group file of canary hosts: chosen before all others (repeatable) [default: scap.toml's canary_groups]
    #[arg(long = "canary-group", value_name = "GROUPFILE")]
    canary_groups: Vec<PathBuf>,
    /// Only this cluster of the pools (appserver, api_appserver, ...)
    #[arg(long)]
    cluster: Option<String>,
    /// Seconds to wait for one host's answer
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

impl FleetArgs {
    /// The fleet: from the load balancer's pools when scap.toml has
    /// `[pools]` (joined with the static sources for addresses and canary
    /// flags), else from the flags, else from scap.toml.
    pub(super) fn members(&self, ctx: &Ctx) -> anyhow::Result<Vec<Member>> {
        match self.pool_fleet(ctx)? {
            Some(pf) => {
                let rt = runtime()?;
                let (members, notes) = rt.block_on(pf.members()).map_err(anyhow::Error::msg)?;
                for n in notes {
                    eprintln!("{} {n}", clock());
                }
                Ok(members)
            }
            None => {
                let mut m = self.statics(ctx)?;
                if let Some(c) = &self.cluster {
                    m.retain(|x| &x.cluster == c);
                    if m.is_empty() {
                        bail!("no host of the fleet is in cluster {c:?}");
                    }
                }
                Ok(m)
            }
        }
    }

    /// The static sources: group files and the TOML inventory.
    fn statics(&self, ctx: &Ctx) -> anyhow::Result<Vec<Member>> {
        let (hosts, inventory) = if self.hosts.is_empty() && self.inventory.is_none() {
            (&ctx.config.hosts, ctx.config.inventory.as_deref())
        } else {
            (&self.hosts, self.inventory.as_deref())
        };
        let canaries = if self.canary_groups.is_empty() {
            &ctx.config.canary_groups
        } else {
            &self.canary_groups
        };
        Ok(fleet(hosts, inventory, canaries)?)
    }

    /// The pools as the fleet's source, if scap.toml has `[pools]`.
    pub(super) fn pool_fleet(&self, ctx: &Ctx) -> anyhow::Result<Option<PoolFleet>> {
        let Some(cfg) = &ctx.config.pools else {
            return Ok(None);
        };
        let statics = if self.configured_statics(ctx) {
            self.statics(ctx)?
        } else {
            Vec::new()
        };
        Ok(Some(PoolFleet {
            pools: Pools::new(cfg.clone())?,
            statics,
            cluster: self.cluster.clone(),
        }))
    }

    fn configured_statics(&self, ctx: &Ctx) -> bool {
        !self.hosts.is_empty()
            || self.inventory.is_some()
            || !ctx.config.hosts.is_empty()
            || ctx.config.inventory.is_some()
            || !self.canary_groups.is_empty()
            || !ctx.config.canary_groups.is_empty()
    }

    /// Whether a fleet is configured at all (flags or scap.toml).
    pub(super) fn configured(&self, ctx: &Ctx) -> bool {
        self.configured_statics(ctx) || ctx.config.pools.is_some()
    }

    /// A client whose syncs, stages and rollbacks carry deploy orders
    /// signed by the deploy key (`key`, else scap.toml's `sign_key`),
    /// unless this is a dry run. Without a key, requests carry none: agents
    /// then refuse a version signed before the one they run (a revert) as
    /// a replay.
    pub(super) fn ordering_agents(
        &self,
        ctx: &Ctx,
        dry_run: bool,
        key: Option<&std::path::Path>,
    ) -> anyhow::Result<Agents> {
        let agents = self.agents(ctx)?;
        let Some(path) = key.or(ctx.config.sign_key.as_deref()).filter(|_| !dry_run) else {
            return Ok(agents);
        };
        let key = crate::store::signature::SigningKey::load(path)?;
        let orders = crate::fleet::orders::Orders::reserve(key, &fleet_state(ctx)?)?;
        Ok(agents.with_orders(orders))
    }

    pub(super) fn agents(&self, ctx: &Ctx) -> anyhow::Result<Agents> {
        let transport = ctx.transport()?;
        if let Some(w) = transport.warning("scap") {
            eprintln!("{w}");
        }
        Ok(Agents::new(transport, Duration::from_secs(self.timeout))?)
    }
}

/// Where the deploy lock, history, desired state and rollout record live
/// ([`Ctx::state`]).
pub(super) fn fleet_state(ctx: &Ctx) -> anyhow::Result<crate::fleet::state::DeployState> {
    ctx.state()
}
