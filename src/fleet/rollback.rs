//! `scap rollback`: switch hosts back to their previous or stable version,
//! or to a named one. With a version and a share, only enough of that
//! version's hosts to bring it down to the share, the last ones given it
//! first.
//!
//! Where each host goes is decided here, from a fresh poll, and sent to the
//! agent as a version:
//! - a host the recorded rollout of that version moved goes back to where
//!   it came from: its own train, with any change made since (the record
//!   is rewritten by changes), never to a version without them;
//! - `--to stable` is the head now of the host's stable version's train
//!   (the train with the changes that were deployed since; never a version
//!   whose rollout failed);
//! - `--to previous` is literally the host's previous version (undoing a
//!   backport takes the host back to before it).
//!
//! A version the host does not hold is fetched from the sources. Every
//! host rolled back gets that version as its desired state. A train whose
//! head every host left for the version the head was at before moves back
//! there (`trains::heads_after_rollback`). A rollback that matches no host
//! says so and fails.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use serde::Serialize;

use super::agents::{Agents, HostResult};
use super::deploy::{Operator, drive};
use super::desired;
use super::history::{self, Entry};
use super::inventory::{Host, Member};
use super::poll::poll;
use super::record::{RolloutRecord, RolloutState};
use super::rollout::{Percent, take_back};
use super::trains::{HeadMove, Trains};
use crate::proto::{Outcome as HostOutcome, RollbackRequest, RollbackTarget};
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
    /// Where hosts fetch a version they do not hold: the deploy host(s),
    /// after the caches of `caches`.
    pub sources: Vec<String>,
    pub caches: std::collections::BTreeMap<String, Vec<String>>,
    /// The deploy host's trains (names, heads).
    pub trains: Trains,
    /// The deploy host's store, whose train heads a rollback moves back.
    pub store: Option<crate::store::Store>,
    /// Show what would be done; change nothing.
    pub dry_run: bool,
    pub by: String,
    pub command: String,
    pub state: crate::fleet::state::DeployState,
    pub interrupted: &'a AtomicBool,
}

#[derive(Debug, Serialize)]
pub struct RollbackOutcome {
    pub ok: bool,
    pub results: Vec<HostResult<HostOutcome>>,
    pub failed: Vec<String>,
    /// Trains whose head moved back.
    pub heads: Vec<HeadMove>,
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
        // The rollout of this version, if one is recorded: its hosts go
        // back to where they came from.
        let record = RolloutRecord::load(&self.state)
            .ok()
            .flatten()
            .filter(|r| Some(r.version) == self.version);
        let mut plan: Vec<(Host, String, VersionId)> = Vec::new();
        let mut results: Vec<HostResult<HostOutcome>> = Vec::new();
        for &i in &chosen {
            let r = &readings[i];
            let view = r.view.as_ref().expect("chosen hosts answered");
            let name = r.name();
            let from_record = record.as_ref().and_then(|rec| rec.from.get(&name).copied());
            let target = match (from_record, self.to) {
                (Some(v), RollbackTarget::Previous) => Some(v),
                (_, RollbackTarget::Previous) => view.previous,
                (_, RollbackTarget::Stable) => view.stable.map(|s| self.trains.head_of_train(&s)),
                (_, RollbackTarget::Version(v)) => Some(v),
            };
            match target {
                Some(t) => plan.push((r.member.host.clone(), name, t)),
                None => {
                    let e = super::agents::CallError::Http {
                        host: r.member.host.to_string(),
                        status: 409,
                        message: format!(
                            "no {} version recorded: name a version with --to",
                            self.to
                        ),
                    };
                    op.say(&e.to_string());
                    results.push(HostResult {
                        host: r.member.host.clone(),
                        seconds: 0.0,
                        result: Err(e),
                    });
                }
            }
        }
        let name = |v: &VersionId| self.trains.name(v).to_string();
        if plan.is_empty() {
            let message = match self.version {
                Some(v) => format!(
                    "no host runs {}{}: nothing rolled back",
                    name(&v),
                    if self.keep.0 > 0 {
                        format!(" beyond {}", self.keep)
                    } else {
                        String::new()
                    }
                ),
                None => "no host to roll back (none answered, or none has a version to go back to): nothing rolled back".into(),
            };
            // Nothing to take back down to the share is success.
            let ok =
                self.keep.0 > 0 && results.is_empty() && readings.iter().any(|r| r.view.is_ok());
            let failed: Vec<String> = results.iter().map(|r| r.host.to_string()).collect();
            let mut message = message;
            if !self.dry_run {
                let running: Vec<VersionId> = readings.iter().filter_map(|r| r.current()).collect();
                if let Some(m) = self.undo_pending(&readings, &running) {
                    message.push_str(&m);
                }
                self.record(&results, &failed, &message);
            }
            return RollbackOutcome {
                ok,
                results,
                failed,
                heads: vec![],
                message,
            };
        }
        let mut by_target: BTreeMap<VersionId, usize> = BTreeMap::new();
        for (_, _, v) in &plan {
            *by_target.entry(*v).or_default() += 1;
        }
        let summary = by_target
            .iter()
            .map(|(v, n)| format!("{n} to {}", name(v)))
            .collect::<Vec<_>>()
            .join(", ");
        if self.dry_run {
            for (h, _, v) in &plan {
                let cur = readings
                    .iter()
                    .find(|r| r.member.host == *h)
                    .and_then(|r| r.current());
                op.say(&format!(
                    "dry run: {h} {} -> {}",
                    cur.map_or_else(|| "nothing".into(), |c| name(&c)),
                    name(v)
                ));
            }
            return RollbackOutcome {
                ok: results.is_empty(),
                results,
                failed: vec![],
                heads: vec![],
                message: format!("dry run: would roll back {} host(s): {summary}", plan.len()),
            };
        }
        if !op.confirm(&format!(
            "roll back {} host(s): {summary}: continue [y/N]?",
            plan.len()
        )) {
            return RollbackOutcome {
                ok: false,
                results,
                failed: vec![],
                heads: vec![],
                message: "rollback cancelled by the operator: nothing changed".into(),
            };
        }
        let hosts: Vec<Host> = plan.iter().map(|(h, _, _)| h.clone()).collect();
        op.say(&format!(
            "Started rollback of {} host(s) to {}{}",
            hosts.len(),
            self.to,
            if record.is_some() {
                " (hosts of the recorded rollout: where each came from)"
            } else {
                ""
            }
        ));
        op.step_started("rollback", hosts.len());
        let by_host: BTreeMap<&Host, VersionId> = plan.iter().map(|(h, _, v)| (h, *v)).collect();
        results.extend(
            drive(op, &hosts, self.concurrency, Some(self.interrupted), |h| {
                let dc = self
                    .members
                    .iter()
                    .find(|m| m.host == *h)
                    .map_or("", |m| m.dc.as_str());
                let req = RollbackRequest {
                    to: RollbackTarget::Version(by_host[h]),
                    by: self.by.clone(),
                    sources: super::deploy::sources_for(&self.caches, &self.sources, dc),
                    order: None,
                };
                Box::pin(async move { self.agents.rollback(h, &req).await })
            })
            .await,
        );
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.ok())
            .map(|r| r.host.to_string())
            .collect();
        op.step_done("rollback", results.len() - failed.len(), failed.len());
        // The hosts rolled back should stay there; hosts of the recorded
        // rollout that did not answer go there when they come back.
        let ok: Vec<&Host> = results.iter().filter(|r| r.ok()).map(|r| &r.host).collect();
        let why = format!("rollback to {}", self.to);
        let result = desired::update(&self.state, self.agents.orders(), |d| {
            for (h, name, v) in &plan {
                if ok.contains(&h) {
                    d.set(name, *v, &self.by, &why);
                }
            }
            if let Some(rec) = &record
                && self.keep == Percent(0)
            {
                for r in readings.iter().filter(|r| r.view.is_err()) {
                    if let Some(v) = rec.from.get(&r.name()) {
                        d.set(&r.name(), *v, &self.by, &why);
                    }
                }
            }
        });
        if let Err(e) = result {
            tracing::error!("cannot record the desired state: {e}");
        }
        if let Some(mut rec) = record
            && self.keep == Percent(0)
            && failed.is_empty()
        {
            rec.state = RolloutState::RolledBack;
            rec.note = format!("rolled back by {}", self.by);
            if let Err(e) = rec.save(&self.state) {
                tracing::error!("cannot save the rollout record: {e}");
            }
        }
        // What hosts run now: where each rolled-back host went, the rest
        // where they were.
        let mut moved: Vec<(VersionId, VersionId)> = Vec::new();
        let mut now: BTreeMap<VersionId, usize> = BTreeMap::new();
        for r in readings.iter().filter(|r| r.view.is_ok()) {
            let went = results
                .iter()
                .find(|x| x.host == r.member.host)
                .and_then(|x| x.result.as_ref().ok())
                .map(|o| o.version);
            match (r.current(), went) {
                (Some(from), Some(to)) => {
                    moved.push((from, to));
                    *now.entry(to).or_default() += 1;
                }
                (None, Some(to)) => *now.entry(to).or_default() += 1,
                (Some(cur), None) => *now.entry(cur).or_default() += 1,
                (None, None) => {}
            }
        }
        let still: Vec<VersionId> = now.keys().copied().collect();
        let heads = match &self.store {
            Some(store) => super::trains::heads_after_rollback(
                store,
                &moved,
                &still,
                &self.by,
                &format!("rollback to {}", self.to),
            ),
            None => vec![],
        };
        for h in &heads {
            op.say(&h.to_string());
        }
        let back = results.len() - failed.len();
        let mut message = format!("rolled back {back} of {} host(s)", plan.len());
        let went: BTreeMap<VersionId, usize> = results
            .iter()
            .filter_map(|r| r.result.as_ref().ok().map(|o| o.version))
            .fold(BTreeMap::new(), |mut m, v| {
                *m.entry(v).or_default() += 1;
                m
            });
        if !went.is_empty() {
            message.push_str(": ");
            message.push_str(
                &went
                    .iter()
                    .map(|(v, n)| format!("{n} now on {}", name(v)))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        if !failed.is_empty() {
            message.push_str(&format!(
                "; {} FAILED and still run what they ran: {}",
                failed.len(),
                crate::text::clip(&failed.join(" "), 200)
            ));
        }
        if let Some(v) = self.version {
            let left = now.get(&v).copied().unwrap_or(0);
            message.push_str(&format!("; {left} host(s) still on {}", name(&v)));
        }
        if let Some(m) = self.undo_pending(&readings, &still) {
            message.push_str(&m);
        }
        self.record(&results, &failed, &message);
        RollbackOutcome {
            ok: failed.is_empty(),
            results,
            failed,
            heads,
            message,
        }
    }

    /// A change left unfinished by its controller is undone once no host
    /// runs what it made (every host answered): its record goes, and so do
    /// the desired targets its steps set. Returns what to tell.
    fn undo_pending(
        &self,
        readings: &[super::poll::Reading],
        running: &[VersionId],
    ) -> Option<String> {
        let p = super::change::PendingChange::load(&self.state).ok()??;
        let on_it = p
            .steps
            .iter()
            .any(|s| s.from != s.to && running.contains(&s.to));
        if on_it || !readings.iter().all(|r| r.view.is_ok()) {
            return None;
        }
        super::change::undo_desired(&self.state, &p.prepared(), &self.by, self.agents.orders());
        super::change::PendingChange::remove(&self.state);
        Some(format!(
            "; change {} ({}) is undone: no host runs it",
            p.id,
            crate::text::clip(&p.message, 60)
        ))
    }

    fn record(&self, results: &[HostResult<HostOutcome>], failed: &[String], message: &str) {
        let entry = Entry {
            version: self.version,
            target: Some(self.to.to_string()),
            ..Entry::outcome(
                "rollback",
                &self.by,
                &self.command,
                results,
                failed,
                message,
            )
        };
        history::record(&self.state, &entry);
    }
}
