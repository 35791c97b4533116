//! `scap promote V`: once V is on every host, record it as their stable
//! version (what `rollback --to stable` goes back to), and pin it in the
//! deploy host's store so gc keeps it; the version the last promote
//! pinned (`STORE/fleet/promoted`) is unpinned.

use serde::Serialize;

use super::agents::{Agents, HostResult, fan_out};
use super::history::{self, Entry};
use super::inventory::{Host, Member};
use super::operator::Operator;
use super::poll::poll;
use super::rollout::pct;
use super::rollout::{Budget, share};
use crate::proto::PromoteRequest;
use crate::proto::state::HostState;
use crate::store::VersionId;

pub struct Promote<'a> {
    pub agents: &'a Agents,
    pub members: Vec<Member>,
    pub version: VersionId,
    pub label: String,
    /// Hosts that may be down (they keep their old stable version).
    pub budget: Budget,
    pub by: String,
    pub command: String,
    pub state: crate::fleet::state::DeployState,
    /// The deploy host's store, where the stable version is pinned.
    pub store: Option<&'a crate::store::Store>,
}

#[derive(Debug, Serialize)]
pub struct PromoteOutcome {
    pub ok: bool,
    pub results: Vec<HostResult<HostState>>,
    pub failed: Vec<String>,
    pub message: String,
}

impl Promote<'_> {
    /// Refuses (with what to do) unless every answering host runs the
    /// version and no more hosts than the budget allows are down.
    pub async fn run(&self, op: &mut dyn Operator) -> Result<PromoteOutcome, String> {
        let readings = poll(self.agents, &self.members, 64).await;
        let total: u64 = self.members.iter().map(|m| m.weight).sum();
        let on: u64 = readings
            .iter()
            .filter(|r| r.on(&self.version))
            .map(|r| r.member.weight)
            .sum();
        let behind: Vec<String> = readings
            .iter()
            .filter(|r| r.view.is_ok() && !r.on(&self.version))
            .map(|r| r.member.host.to_string())
            .collect();
        if !behind.is_empty() {
            return Err(format!(
                "{} is on {} of traffic; {} host(s) run something else ({}): sync it to 100% first",
                self.version.short(),
                pct(share(on, total)),
                behind.len(),
                behind
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let down: Vec<String> = readings
            .iter()
            .filter(|r| r.view.is_err())
            .map(|r| r.member.host.to_string())
            .collect();
        if !self.budget.allows(down.len(), readings.len()) {
            return Err(format!(
                "{} host(s) did not answer ({}): they would keep their old stable version; pass --max-failures {} to promote anyway",
                down.len(),
                down.join(", "),
                down.len()
            ));
        }
        let hosts: Vec<Host> = readings
            .iter()
            .filter(|r| r.view.is_ok())
            .map(|r| r.member.host.clone())
            .collect();
        let req = PromoteRequest {
            version: self.version,
            by: self.by.clone(),
        };
        let results = fan_out(
            &hosts,
            50,
            None,
            |h| Box::pin(self.agents.promote(h, &req)),
            &|_| {},
        )
        .await;
        let failed: Vec<String> = results
            .iter()
            .filter_map(|r| r.error().map(|e| e.to_string()))
            .collect();
        for f in &failed {
            op.say(&format!("FAIL {f}"));
        }
        let mut message = format!(
            "promoted {} to stable on {} host(s)",
            self.label,
            results.len() - failed.len()
        );
        if let Some(store) = self.store
            && !results.iter().all(|r| !r.ok())
        {
            match self.pin(store) {
                Ok(Some(old)) => message.push_str(&format!(
                    "; pinned it in the store, unpinned the old stable {}",
                    old.short()
                )),
                Ok(None) => message.push_str("; pinned it in the store"),
                Err(e) => op.say(&format!(
                    "WARNING: cannot pin {}: {e}",
                    self.version.short()
                )),
            }
        }
        let entry = Entry {
            version: Some(self.version),
            reached: Some(share(on, total)),
            ..Entry::outcome(
                "promote",
                &self.by,
                &self.command,
                &results,
                &failed,
                &message,
            )
        };
        history::record(&self.state, &entry);
        Ok(PromoteOutcome {
            ok: failed.is_empty(),
            results,
            failed,
            message,
        })
    }

    /// Pins the new stable version; unpins the one the last promote pinned.
    fn pin(&self, store: &crate::store::Store) -> Result<Option<VersionId>, String> {
        let path = self.state.dir().join("promoted");
        let old: Option<VersionId> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        store.pin(&self.version).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(self.state.dir()).map_err(|e| e.to_string())?;
        crate::store::fsutil::atomic_write(
            &path,
            format!("{}\n", self.version.to_hex()).as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        match old {
            Some(o) if o != self.version => {
                store.unpin(&o).map_err(|e| e.to_string())?;
                Ok(Some(o))
            }
            _ => Ok(None),
        }
    }
}
