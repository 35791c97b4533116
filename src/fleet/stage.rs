//! `scap stage --version V`: every host that answers and does not run V
//! fetches it and prepares its release beside what it runs, without
//! switching; a rollout of V is then only switches (and a rollback to what
//! hosts ran, too).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use super::agents::{Agents, HostResult};
use super::deploy::{drive, sources_for};
use super::inventory::{Host, Member};
use super::operator::Operator;
use super::poll::poll;
use crate::proto::{Outcome as HostOutcome, SyncRequest};
use crate::store::VersionId;
use crate::store::signature::SignedVersion;

pub struct Staging<'a> {
    pub agents: &'a Agents,
    pub members: Vec<Member>,
    pub version: VersionId,
    /// The version's signatures, sent with each request.
    pub signature: Option<SignedVersion>,
    /// The deploy host(s), after each host's datacenter's caches.
    pub sources: Vec<String>,
    pub caches: BTreeMap<String, Vec<String>>,
    pub concurrency: usize,
    pub by: String,
    pub interrupted: &'a AtomicBool,
}

#[derive(Debug, Serialize)]
pub struct StagingOutcome {
    pub ok: bool,
    pub results: Vec<HostResult<HostOutcome>>,
    /// Hosts that did not answer the poll (not staged).
    pub unreachable: Vec<String>,
}

impl Staging<'_> {
    pub async fn run(&self, op: &mut dyn Operator) -> StagingOutcome {
        let readings = poll(self.agents, &self.members, 64).await;
        let mut unreachable = Vec::new();
        for r in &readings {
            if let Err(e) = &r.view {
                op.say(&e.to_string());
                unreachable.push(r.member.host.to_string());
            }
        }
        let todo: Vec<(Host, String)> = readings
            .iter()
            .filter(|r| r.view.is_ok() && r.current() != Some(self.version))
            .map(|r| (r.member.host.clone(), r.member.dc.clone()))
            .collect();
        let hosts: Vec<Host> = todo.iter().map(|(h, _)| h.clone()).collect();
        op.step_started("stage", hosts.len());
        let results = drive(
            op,
            &hosts,
            self.concurrency.max(1),
            Some(self.interrupted),
            |h| {
                let dc = todo
                    .iter()
                    .find(|(x, _)| x == h)
                    .map_or("", |(_, d)| d.as_str());
                let req = SyncRequest {
                    version: self.version,
                    sources: sources_for(&self.caches, &self.sources, dc),
                    by: self.by.clone(),
                    fetch_timeout_seconds: None,
                    signature: self.signature.clone(),
                    order: None,
                };
                Box::pin(async move { self.agents.stage(h, &req).await })
            },
        )
        .await;
        let failed = results.iter().filter(|r| !r.ok()).count();
        op.step_done("stage", results.len() - failed, failed);
        StagingOutcome {
            ok: failed == 0,
            results,
            unreachable,
        }
    }
}
