//! A rollout: stages of top-up steps, each followed by the health gates and
//! (for people) a question. The controller's whole procedure for `scap
//! sync`; how it talks to the operator is the caller's ([`Operator`]).
//!
//! A host whose sync call timed out or answered nonsense may still have
//! switched: before a step is judged, such hosts are told to cancel and
//! read again, and one that reports the new version counts as changed (so
//! a failing gate rolls it back with the rest of its step).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::agents::{Agents, Call, CallError, HostResult, fan_out};
use super::gates::Gates;
use super::history::{self, Entry};
use super::inventory::{Host, Member};
use super::poll::{Reading, poll};
use super::rollout::{Budget, Percent, TopUp, share, top_up};
use crate::host::proto::{Outcome as HostOutcome, RollbackRequest, RollbackTarget, SyncRequest};
use crate::store::VersionId;
use crate::store::signature::SignedVersion;

/// What the operator decides when a gate fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateChoice {
    Retry,
    Ignore,
    Rollback,
    Exit,
}

/// How fleet procedures talk to their operator.
pub trait Operator {
    /// A line of progress (the caller adds the clock).
    fn say(&mut self, line: &str);
    /// Continue to the next stage?
    fn confirm(&mut self, question: &str) -> bool;
    fn gate_failed(&mut self, failures: &[String]) -> GateChoice;
    /// A step starts changing `hosts` hosts.
    fn step_started(&mut self, stage: &str, hosts: usize);
    /// Called after each host of the step finishes.
    fn host_done(&mut self, result: &HostResult<HostOutcome>);
    /// The step's hosts are all done.
    fn step_done(&mut self, stage: &str, ok: usize, failed: usize);
}

/// Runs `call` on every host of a step, reporting each to `op` as it
/// finishes (the operator is not `Sync`: results come back over a channel).
pub async fn drive<'a, F>(
    op: &mut dyn Operator,
    hosts: &'a [Host],
    concurrency: usize,
    interrupted: Option<&AtomicBool>,
    call: F,
) -> Vec<HostResult<HostOutcome>>
where
    F: Fn(&'a Host) -> Call<'a, HostOutcome> + Sync,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let send = move |r: &HostResult<HostOutcome>| {
        let _ = tx.send(r.clone());
    };
    let fut = fan_out(hosts, concurrency, interrupted, call, &send);
    tokio::pin!(fut);
    loop {
        tokio::select! {
            res = &mut fut => {
                while let Ok(r) = rx.try_recv() { op.host_done(&r); }
                return res;
            }
            Some(r) = rx.recv() => op.host_done(&r),
        }
    }
}

pub struct Rollout<'a> {
    pub agents: &'a Agents,
    pub members: Vec<Member>,
    pub version: VersionId,
    /// Its signatures, sent with each sync (agents check them).
    pub signature: Option<SignedVersion>,
    pub label: String,
    pub sources: Vec<String>,
    pub stages: Vec<Percent>,
    pub gates: Gates,
    pub force: bool,
    pub wait: Duration,
    pub budget: Budget,
    pub dry_run: bool,
    pub concurrency: usize,
    pub by: String,
    pub command: String,
    /// `STORE/fleet`: history lives here.
    pub fleet_dir: std::path::PathBuf,
    /// Set by Ctrl-C: finish the hosts in flight, start no more.
    pub interrupted: &'a AtomicBool,
}

/// How a rollout ended.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub ok: bool,
    pub reached: f64,
    pub changed: Vec<String>,
    pub failed: Vec<String>,
    pub rolled_back: Vec<String>,
    pub message: String,
}

/// A host this command moved, and where it was before.
struct Changed {
    member: Member,
    from: Option<VersionId>,
}

/// What the rollout has done so far.
#[derive(Default)]
struct Progress {
    changed: Vec<Changed>,
    failed: Vec<String>,
    reached: f64,
    /// Whether the last step fell short of its share.
    short: bool,
}

impl Progress {
    fn outcome(&self, ok: bool, message: String, rolled_back: Vec<String>) -> Outcome {
        Outcome {
            ok,
            reached: self.reached,
            changed: self
                .changed
                .iter()
                .map(|c| c.member.host.to_string())
                .collect(),
            failed: self.failed.clone(),
            rolled_back,
            message,
        }
    }

    fn fail(&mut self, host: String) {
        // A host that fails again in a later stage is one failure.
        if !self.failed.contains(&host) {
            self.failed.push(host);
        }
    }
}

/// Why a stage ended the rollout.
type Stop = Outcome;

impl Rollout<'_> {
    pub async fn run(&self, op: &mut dyn Operator) -> Outcome {
        let mut p = Progress::default();
        for (n, &stage) in self.stages.iter().enumerate() {
            if let Err(stop) = self.stage(op, stage, &mut p).await {
                return stop;
            }
            if n + 1 < self.stages.len()
                && !self.dry_run
                && !op.confirm(&format!(
                    "{} of production traffic synced: continue [y/N]?",
                    pct(p.reached)
                ))
            {
                return p.outcome(
                    p.failed.is_empty() && !p.short,
                    format!("stopped by the operator at {}", pct(p.reached)),
                    vec![],
                );
            }
        }
        if self.dry_run {
            return p.outcome(true, "dry run: nothing changed".into(), vec![]);
        }
        // Not reaching the last stage's share (a host down within the
        // failure budget) is reported as a failure too: never silently.
        // Every step is in the history already.
        let msg = format!("{} on {} of production traffic", self.label, pct(p.reached));
        p.outcome(p.failed.is_empty() && !p.short, msg, vec![])
    }

    /// One stage: poll, top up, judge, gate. `Err` ends the rollout.
    async fn stage(
        &self,
        op: &mut dyn Operator,
        stage: Percent,
        p: &mut Progress,
    ) -> Result<(), Stop> {
        if self.interrupted.load(Ordering::SeqCst) {
            let o = p.outcome(
                false,
                "interrupted (Ctrl-C): no further hosts were started".into(),
                vec![],
            );
            return Err(self.record(stage, self.no_gates(), o));
        }
        let readings = poll(self.agents, &self.members, 64).await;
        let down: Vec<&Reading> = readings.iter().filter(|r| r.view.is_err()).collect();
        for r in &down {
            if let Err(e) = &r.view {
                op.say(&e.to_string());
            }
        }
        if !self.budget.allows(down.len(), readings.len()) {
            let msg = format!(
                "{} of {} hosts did not answer, more than --max-failures allows: stopping before {stage}; fix them or raise --max-failures",
                down.len(),
                readings.len()
            );
            return Err(self.record(stage, self.no_gates(), p.outcome(false, msg, vec![])));
        }
        let plan = top_up(&readings, &self.version, stage);
        self.describe(op, &plan, &readings, stage);
        if self.dry_run {
            return Ok(());
        }
        if plan.add.is_empty() {
            p.reached = plan.reached();
            p.short = plan.short();
            op.say(&format!(
                "{} of production traffic already on {}: nothing to do",
                pct(p.reached),
                self.label
            ));
            let msg = format!("{} on {} of production traffic", self.label, pct(p.reached));
            let o = p.outcome(p.failed.is_empty() && !p.short, msg, vec![]);
            self.record(stage, self.no_gates(), o);
            return Ok(());
        }
        let step = self.sync_step(op, stage, &plan, &readings, p).await;
        let on_weight: u64 = plan
            .already
            .iter()
            .map(|&i| readings[i].member.weight)
            .sum::<u64>()
            + step.iter().map(|m| m.weight).sum::<u64>();
        p.reached = share(on_weight, plan.total_weight);
        p.short = on_weight < plan.needed_weight;
        // Distinct hosts that failed in any step or do not answer now.
        let mut bad: Vec<String> = p.failed.clone();
        for r in &down {
            let name = r.member.host.to_string();
            if !bad.contains(&name) {
                bad.push(name);
            }
        }
        if !self.budget.allows(bad.len(), readings.len()) {
            let msg = format!(
                "{} host(s) failed or did not answer ({}), more than --max-failures allows: stopped at {} of traffic; hosts already switched stay switched",
                bad.len(),
                bad.join(", "),
                pct(p.reached)
            );
            return Err(self.record(stage, self.no_gates(), p.outcome(false, msg, vec![])));
        }
        let gates = self.gate(op, stage, &step, p).await?;
        op.say(&format!("{} of production traffic synced", pct(p.reached)));
        let msg = format!("{} on {} of production traffic", self.label, pct(p.reached));
        let o = p.outcome(p.failed.is_empty() && !p.short, msg, vec![]);
        self.record(stage, gates, o);
        Ok(())
    }

    /// Syncs the step's hosts; returns those now on the version.
    async fn sync_step(
        &self,
        op: &mut dyn Operator,
        stage: Percent,
        plan: &TopUp,
        readings: &[Reading],
        p: &mut Progress,
    ) -> Vec<Member> {
        op.step_started(&stage.to_string(), plan.add.len());
        let hosts: Vec<Host> = plan
            .add
            .iter()
            .map(|&i| readings[i].member.host.clone())
            .collect();
        let req = SyncRequest {
            version: self.version,
            sources: self.sources.clone(),
            by: self.by.clone(),
            fetch_timeout_seconds: None,
            signature: self.signature.clone(),
        };
        let results = drive(op, &hosts, self.concurrency, Some(self.interrupted), |h| {
            Box::pin(self.agents.sync(h, &req))
        })
        .await;
        let mut step = Vec::new();
        for (r, &i) in results.iter().zip(&plan.add) {
            let m = readings[i].member.clone();
            let switched = match &r.result {
                Ok(_) => true,
                Err(e) if e.maybe_running() => self.settle(op, &m.host, e).await,
                Err(_) => false,
            };
            if switched {
                p.changed.push(Changed {
                    member: m.clone(),
                    from: readings[i].current(),
                });
                step.push(m);
            }
            // A host that switched although its answer was lost did its
            // job: it is in the step (and its rollback), not a failure.
            if let Err(e) = &r.result
                && !switched
            {
                op.say(&format!("FAIL {e}"));
                p.fail(r.host.to_string());
            }
        }
        op.step_done(&stage.to_string(), step.len(), plan.add.len() - step.len());
        step
    }

    /// After a sync call that timed out: tells the host to stop, then
    /// reads what it runs. True if it is on the version after all.
    async fn settle(&self, op: &mut dyn Operator, host: &Host, e: &CallError) -> bool {
        let _ = self.agents.cancel(host, &self.by).await;
        match self.agents.state(host).await {
            Ok(st) if st.state.current.as_ref().map(|d| d.version) == Some(self.version) => {
                op.say(&format!(
                    "{host}: switched to {} although its answer failed ({e}): counted as changed",
                    self.label
                ));
                true
            }
            _ => false,
        }
    }

    /// Runs the health gates on the step's hosts. `Ok(what the gates
    /// said)`, or `Err` when the rollout stops.
    async fn gate(
        &self,
        op: &mut dyn Operator,
        stage: Percent,
        step: &[Member],
        p: &mut Progress,
    ) -> Result<&'static str, Stop> {
        if self.gates.is_empty() {
            return Ok("none");
        }
        if self.force {
            op.say("--force: SKIPPING HEALTH GATES");
            return Ok("skipped (--force)");
        }
        if step.is_empty() {
            return Ok("not run");
        }
        if !self.wait.is_zero() {
            op.say(&format!(
                "waiting {}s before the health gates",
                self.wait.as_secs()
            ));
            tokio::time::sleep(self.wait).await;
        }
        let hosts: Vec<Host> = step.iter().map(|m| m.host.clone()).collect();
        loop {
            let failures = self
                .gates
                .run(
                    self.agents.http(),
                    &hosts,
                    &self.version,
                    &stage.to_string(),
                )
                .await;
            if failures.is_empty() {
                op.say(&format!("health gates passed on {} host(s)", hosts.len()));
                return Ok("passed");
            }
            for f in &failures {
                op.say(&format!("GATE FAILED {f}"));
            }
            match op.gate_failed(&failures) {
                GateChoice::Retry => continue,
                GateChoice::Ignore => return Ok("failed (ignored by the operator)"),
                GateChoice::Exit => {
                    let o = p.outcome(
                        false,
                        "health gate failed; stopped (hosts left as they are)".into(),
                        vec![],
                    );
                    return Err(self.record(stage, "failed", o));
                }
                GateChoice::Rollback => {
                    let back = self.roll_back(op, &p.changed).await;
                    let msg = format!(
                        "health gate failed at {stage}: rolled back the {} host(s) this command changed",
                        back.len()
                    );
                    let o = p.outcome(false, msg, back);
                    return Err(self.record(stage, "failed", o));
                }
            }
        }
    }

    fn no_gates(&self) -> &'static str {
        if self.gates.is_empty() {
            "none"
        } else {
            "not run"
        }
    }

    fn describe(&self, op: &mut dyn Operator, plan: &TopUp, readings: &[Reading], stage: Percent) {
        let names = |ix: &[usize]| {
            ix.iter()
                .map(|&i| readings[i].member.host.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        op.say(&format!(
            "{stage} of traffic is weight {} of {}: {} host(s) already on {} ({}), {} to add{}",
            plan.needed_weight,
            plan.total_weight,
            plan.already.len(),
            self.label,
            pct(share(
                plan.already
                    .iter()
                    .map(|&i| readings[i].member.weight)
                    .sum(),
                plan.total_weight
            )),
            plan.add.len(),
            if plan.add.is_empty() {
                String::new()
            } else {
                format!(": {}", names(&plan.add))
            }
        ));
        if plan.short() {
            op.say(&format!(
                "only {} can be reached: not enough hosts answer",
                pct(plan.reached())
            ));
        }
        if self.dry_run {
            op.say(&format!(
                "dry run: would reach {} of traffic",
                pct(plan.reached())
            ));
        }
    }

    /// Switches every host this command changed back to where it was.
    async fn roll_back(&self, op: &mut dyn Operator, changed: &[Changed]) -> Vec<String> {
        let mut hosts = Vec::new();
        let mut targets = Vec::new();
        for c in changed {
            match c.from {
                Some(from) => {
                    hosts.push(c.member.host.clone());
                    targets.push(from);
                }
                None => op.say(&format!(
                    "{}: had no version before this command: left on {}",
                    c.member.host, self.label
                )),
            }
        }
        op.step_started("rollback", hosts.len());
        let by = self.by.clone();
        let results = drive(op, &hosts, self.concurrency.max(50), None, |h| {
            let i = hosts.iter().position(|x| x == h).expect("one of hosts");
            let req = RollbackRequest {
                to: RollbackTarget::Version(targets[i]),
                by: by.clone(),
            };
            Box::pin(async move { self.agents.rollback(h, &req).await })
        })
        .await;
        let mut back = Vec::new();
        for r in &results {
            match &r.result {
                Ok(o) => {
                    op.say(&format!("{}: rolled back to {}", r.host, o.version.short()));
                    back.push(r.host.to_string());
                }
                Err(e) => op.say(&format!("ROLLBACK FAILED {e}")),
            }
        }
        op.step_done("rollback", back.len(), results.len() - back.len());
        back
    }

    /// Appends one step (a stage, or where the command stopped) to the
    /// deploy history.
    fn record(&self, stage: Percent, gates: &str, o: Outcome) -> Outcome {
        let entry = Entry {
            time: crate::time::unix_now(),
            user: self.by.clone(),
            action: "sync".into(),
            version: Some(self.version),
            target: Some(stage.to_string()),
            gates: Some(gates.to_string()),
            reached: Some(o.reached),
            hosts: o.changed.clone(),
            failed: o.failed.clone(),
            ok: o.ok,
            message: o.message.clone(),
            command: self.command.clone(),
        };
        if let Err(e) = history::append(&self.fleet_dir, &entry) {
            tracing::warn!("cannot append to the deploy history: {e}");
        }
        o
    }
}

pub fn pct(v: f64) -> String {
    format!("{v:.1}%")
}
