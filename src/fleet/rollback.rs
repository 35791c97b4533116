//! `scap rollback`: switch hosts back to their previous or stable version,
//! or to a named one: a switch on each host, no fetch. With a version and a
//! share, only enough of that version's hosts to bring it down to the
//! share, the last ones given it first.

use std::sync::atomic::AtomicBool;

use serde::Serialize;

use super::agents::{Agents, HostResult};
use super::deploy::{Operator, drive};
use super::history::{self, Entry};
use super::inventory::{Host, Member};
use super::poll::poll;
use super::rollout::{Percent, take_back};
use crate::host::proto::{Outcome as HostOutcome, RollbackRequest, RollbackTarget};
use crate::store::VersionId;

pub struct Rollback<'a> {
    pub agents: &'a Agents,
    pub members: Vec<Member>,
    pub to: RollbackTarget,
    /// Only hosts now on this version (all hosts if `None`).
    pub version: Option<VersionId>,
    /// With `version`: leave at most this share of traffic on it.
    pub keep: Percent,
    pub concurrency: usize,
    pub by: String,
    pub command: String,
    pub fleet_dir: std::path::PathBuf,
    pub interrupted: &'a AtomicBool,
}

#[derive(Debug, Serialize)]
pub struct RollbackOutcome {
    pub ok: bool,
    pub results: Vec<HostResult<HostOutcome>>,
    pub failed: Vec<String>,
    pub message: String,
}

impl Rollback<'_> {
    pub async fn run(&self, op: &mut dyn Operator) -> RollbackOutcome {
        let readings = poll(self.agents, &self.members, 64).await;
        for r in &readings {
            if let Err(e) = &r.view {
                op.say(&e.to_string());
            }
        }
        let chosen: Vec<usize> = match self.version {
            Some(v) => take_back(&readings, &v, self.keep),
            None => (0..readings.len())
                .filter(|&i| readings[i].view.is_ok())
                .collect(),
        };
        let hosts: Vec<Host> = chosen
            .iter()
            .map(|&i| readings[i].member.host.clone())
            .collect();
        op.say(&format!(
            "Started rollback of {} host(s) to {}",
            hosts.len(),
            self.to
        ));
        op.step_started("rollback", hosts.len());
        let req = RollbackRequest {
            to: self.to,
            by: self.by.clone(),
        };
        let results = drive(op, &hosts, self.concurrency, Some(self.interrupted), |h| {
            Box::pin(self.agents.rollback(h, &req))
        })
        .await;
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.ok())
            .map(|r| r.host.to_string())
            .collect();
        op.step_done("rollback", results.len() - failed.len(), failed.len());
        let message = format!(
            "rolled back {} host(s) to {}{}",
            results.len() - failed.len(),
            self.to,
            if failed.is_empty() {
                String::new()
            } else {
                format!("; {} failed", failed.len())
            }
        );
        self.record(&results, &failed, &message);
        RollbackOutcome {
            ok: failed.is_empty(),
            results,
            failed,
            message,
        }
    }

    fn record(&self, results: &[HostResult<HostOutcome>], failed: &[String], message: &str) {
        let entry = Entry {
            time: crate::time::unix_now(),
            user: self.by.clone(),
            action: "rollback".into(),
            version: self.version,
            target: Some(self.to.to_string()),
            reached: None,
            gates: None,
            hosts: results
                .iter()
                .filter(|r| r.ok())
                .map(|r| r.host.to_string())
                .collect(),
            failed: failed.to_vec(),
            ok: failed.is_empty(),
            message: message.to_string(),
            command: self.command.clone(),
        };
        if let Err(e) = history::append(&self.fleet_dir, &entry) {
            tracing::warn!("cannot append to the deploy history: {e}");
        }
    }
}
