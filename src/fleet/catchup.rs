//! `scap sync --catch-up`: brings every host that is behind its desired
//! state (down during a step, reimaged, failed) to its target, with no new
//! rollout and no gates: the target was decided, and gated, when it was
//! set. A target built after what the host runs is a sync; one built
//! before (the host missed a rollback) is a rollback to that version,
//! fetched if the host lacks it.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use super::agents::{Agents, HostResult};
use super::deploy::{Operator, drive};
use super::desired::Desired;
use super::history::{self, Entry};
use super::inventory::{Host, Member};
use super::poll::poll;
use crate::proto::{Outcome as HostOutcome, RollbackRequest, RollbackTarget, SyncRequest};
use crate::store::VersionId;
use crate::store::signature::SignedVersion;

pub struct CatchUp<'a> {
    pub agents: &'a Agents,
    pub members: Vec<Member>,
    pub sources: Vec<String>,
    pub caches: std::collections::BTreeMap<String, Vec<String>>,
    /// Signatures of the versions in the desired state, from the store.
    pub signatures: BTreeMap<VersionId, SignedVersion>,
    pub concurrency: usize,
    pub dry_run: bool,
    pub by: String,
    pub command: String,
    pub state: crate::fleet::state::DeployState,
    pub interrupted: &'a AtomicBool,
}

#[derive(Debug, Serialize)]
pub struct CatchUpOutcome {
    pub ok: bool,
    /// (host, from, to) for every host behind.
    pub behind: Vec<(String, Option<VersionId>, VersionId)>,
    pub results: Vec<HostResult<HostOutcome>>,
    pub message: String,
}

impl CatchUp<'_> {
    /// When `v` was built, by its signatures (`None` when unsigned).
    fn built(&self, v: &Option<VersionId>) -> Option<u64> {
        let doc = self.signatures.get(v.as_ref()?)?;
        doc.statement().map(|s| s.time)
    }

    pub async fn run(&self, op: &mut dyn Operator) -> Result<CatchUpOutcome, String> {
        let desired = Desired::load(&self.state).map_err(|e| e.to_string())?;
        let readings = poll(self.agents, &self.members, 64).await;
        let mut plan: Vec<(Host, Option<VersionId>, VersionId)> = Vec::new();
        for r in &readings {
            let Some(t) = desired.get(&r.name()) else {
                continue;
            };
            match &r.view {
                Ok(v) if v.current != Some(t.version) => {
                    plan.push((r.member.host.clone(), v.current, t.version));
                }
                Ok(_) => {}
                Err(e) => op.say(&format!("{e}: it catches up when it comes back")),
            }
        }
        let behind: Vec<(String, Option<VersionId>, VersionId)> = plan
            .iter()
            .map(|(h, c, t)| (h.to_string(), *c, *t))
            .collect();
        for (h, c, t) in &behind {
            op.say(&format!(
                "{h}: runs {}, target {}",
                c.map_or_else(|| "nothing".into(), |c| c.short()),
                t.short()
            ));
        }
        if plan.is_empty() || self.dry_run {
            let message = if plan.is_empty() {
                "every host that answers is on its target".to_string()
            } else {
                format!(
                    "dry run: would bring {} host(s) to their target",
                    plan.len()
                )
            };
            return Ok(CatchUpOutcome {
                ok: true,
                behind,
                results: vec![],
                message,
            });
        }
        let hosts: Vec<Host> = plan.iter().map(|(h, _, _)| h.clone()).collect();
        op.step_started("catch-up", hosts.len());
        let results = drive(op, &hosts, self.concurrency, Some(self.interrupted), |h| {
            let (_, current, target) = plan.iter().find(|(x, _, _)| x == h).expect("planned");
            let dc = self
                .members
                .iter()
                .find(|m| m.host == *h)
                .map_or("", |m| m.dc.as_str());
            let sources = super::deploy::sources_for(&self.caches, &self.sources, dc);
            let forward = match (self.built(current), self.built(&Some(*target))) {
                (Some(c), Some(t)) => t >= c,
                _ => true,
            };
            if forward {
                let req = SyncRequest {
                    version: *target,
                    sources,
                    by: self.by.clone(),
                    fetch_timeout_seconds: None,
                    signature: self.signatures.get(target).cloned(),
                    order: None,
                };
                Box::pin(async move { self.agents.sync(h, &req).await })
            } else {
                let req = RollbackRequest {
                    to: RollbackTarget::Version(*target),
                    by: self.by.clone(),
                    sources,
                    order: None,
                };
                Box::pin(async move { self.agents.rollback(h, &req).await })
            }
        })
        .await;
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.ok())
            .map(|r| r.host.to_string())
            .collect();
        op.step_done("catch-up", results.len() - failed.len(), failed.len());
        let message = format!(
            "caught up {} host(s){}",
            results.len() - failed.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!("; {} failed: {}", failed.len(), failed.join(", "))
            }
        );
        let entry = Entry::outcome(
            "catch-up",
            &self.by,
            &self.command,
            &results,
            &failed,
            &message,
        );
        history::record(&self.state, &entry);
        Ok(CatchUpOutcome {
            ok: failed.is_empty(),
            behind,
            results,
            message,
        })
    }
}
