//! A rollout: stages of top-up steps, each followed by the health gates and
//! (for people) a question. The controller's whole procedure, driven by
//! `scap sync`, `scap rollback` and `scap promote`; how it talks to the
//! operator is the caller's (`Operator`).

use std::time::Duration;

use serde::Serialize;

use super::gates::Gates;
use super::history::{self, Entry};
use super::inventory::Member;
use super::rollout::{Budget, Percent, Reading, TopUp, poll, share, top_up};
use super::sync::{Agents, HostResult, SyncJob, sync_hosts};
use crate::store::VersionId;

/// What the operator decides when a gate fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateChoice {
    Retry,
    Ignore,
    Rollback,
    Exit,
}

/// How a rollout talks to its operator.
pub trait Operator {
    /// A line of progress (the caller adds the clock).
    fn say(&mut self, line: &str);
    /// Continue to the next stage?
    fn confirm(&mut self, question: &str) -> bool;
    fn gate_failed(&mut self, failures: &[String]) -> GateChoice;
    /// A step starts syncing `hosts` hosts.
    fn step_started(&mut self, stage: &str, hosts: usize);
    /// Called after each host of the step finishes.
    fn host_done(&mut self, result: &HostResult);
    /// The step's hosts are all done.
    fn step_done(&mut self, stage: &str, ok: usize, failed: usize);
}

pub struct Rollout<'a> {
    pub agents: &'a Agents,
    pub members: Vec<Member>,
    pub version: VersionId,
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
    pub interrupted: &'a std::sync::atomic::AtomicBool,
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

impl Rollout<'_> {
    pub async fn run(&self, op: &mut dyn Operator) -> Outcome {
        let mut changed: Vec<Changed> = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        let mut reached = 0.0;
        // Whether the last step fell short of its share.
        let mut short = false;
        let finish = |ok: bool,
                      message: String,
                      changed: &[Changed],
                      failed: &[String],
                      reached: f64,
                      rolled_back: Vec<String>| Outcome {
            ok,
            reached,
            changed: changed.iter().map(|c| c.member.host.to_string()).collect(),
            failed: failed.to_vec(),
            rolled_back,
            message,
        };
        for (n, &stage) in self.stages.iter().enumerate() {
            // What this step's health gates said, for the history.
            let mut gates = if self.gates.is_empty() {
                "none"
            } else {
                "not run"
            };
            if self.interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                return self.record(
                    stage,
                    gates,
                    finish(
                        false,
                        "interrupted (Ctrl-C): no further hosts were started".into(),
                        &changed,
                        &failed,
                        reached,
                        vec![],
                    ),
                );
            }
            let readings = poll(self.agents, &self.members, 64).await;
            let down: Vec<&Reading> = readings.iter().filter(|r| r.view.is_err()).collect();
            for r in &down {
                op.say(r.view.as_ref().err().map(String::as_str).unwrap_or(""));
            }
            if !self.budget.allows(down.len(), readings.len()) {
                let msg = format!(
                    "{} of {} hosts did not answer, more than --max-failures allows: stopping before {stage}; fix them or raise --max-failures",
                    down.len(),
                    readings.len()
                );
                return self.record(
                    stage,
                    gates,
                    finish(false, msg, &changed, &failed, reached, vec![]),
                );
            }
            let plan = top_up(&readings, &self.version, stage);
            self.describe(op, &plan, &readings, stage);
            if self.dry_run {
                continue;
            }
            if plan.add.is_empty() {
                reached = plan.reached();
                short = plan.short();
                op.say(&format!(
                    "{} of production traffic already on {}: nothing to do",
                    pct(reached),
                    self.label
                ));
            } else {
                op.step_started(&stage.to_string(), plan.add.len());
                let hosts: Vec<_> = plan
                    .add
                    .iter()
                    .map(|&i| readings[i].member.host.clone())
                    .collect();
                let results = {
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                    let send = move |r: &HostResult| {
                        let _ = tx.send(r.clone());
                    };
                    let job = SyncJob {
                        version: &self.version,
                        sources: &self.sources,
                        by: &self.by,
                        concurrency: self.concurrency,
                        interrupted: Some(self.interrupted),
                    };
                    let fut = sync_hosts(self.agents, &hosts, &job, &send);
                    tokio::pin!(fut);
                    loop {
                        tokio::select! {
                            res = &mut fut => {
                                while let Ok(r) = rx.try_recv() { op.host_done(&r); }
                                break res;
                            }
                            Some(r) = rx.recv() => op.host_done(&r),
                        }
                    }
                };
                let mut step: Vec<Member> = Vec::new();
                for (r, &i) in results.iter().zip(&plan.add) {
                    let m = readings[i].member.clone();
                    if r.ok {
                        changed.push(Changed {
                            member: m.clone(),
                            from: readings[i].current(),
                        });
                        step.push(m);
                    } else {
                        op.say(&format!("FAIL {}", r.error.as_deref().unwrap_or("")));
                        // A host that fails again in a later stage is one failure.
                        if !failed.contains(&r.host) {
                            failed.push(r.host.clone());
                        }
                    }
                }
                let on_weight: u64 = plan
                    .already
                    .iter()
                    .map(|&i| readings[i].member.weight)
                    .sum::<u64>()
                    + step.iter().map(|m| m.weight).sum::<u64>();
                reached = share(on_weight, plan.total_weight);
                short = on_weight < plan.needed_weight;
                // Distinct hosts that failed in any step or do not answer now.
                let down_names: Vec<String> =
                    down.iter().map(|r| r.member.host.to_string()).collect();
                let fails =
                    failed.len() + down_names.iter().filter(|d| !failed.contains(d)).count();
                op.step_done(&stage.to_string(), step.len(), results.len() - step.len());
                if !self.budget.allows(fails, readings.len()) {
                    let msg = format!(
                        "{fails} host(s) failed or did not answer ({}), more than --max-failures allows: stopped at {} of traffic; hosts already switched stay switched",
                        failed
                            .iter()
                            .chain(
                                down.iter()
                                    .map(|r| &r.member.host)
                                    .map(|h| h.to_string())
                                    .collect::<Vec<_>>()
                                    .iter()
                            )
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        pct(reached)
                    );
                    return self.record(
                        stage,
                        gates,
                        finish(false, msg, &changed, &failed, reached, vec![]),
                    );
                }
                // Health gates on this step's hosts.
                if self.force {
                    if !self.gates.is_empty() {
                        op.say("--force: SKIPPING HEALTH GATES");
                        gates = "skipped (--force)";
                    }
                } else if !self.gates.is_empty() && !step.is_empty() {
                    if !self.wait.is_zero() {
                        op.say(&format!(
                            "waiting {}s before the health gates",
                            self.wait.as_secs()
                        ));
                        tokio::time::sleep(self.wait).await;
                    }
                    loop {
                        let hosts: Vec<_> = step.iter().map(|m| m.host.clone()).collect();
                        let failures = self
                            .gates
                            .run(&hosts, &self.version, &stage.to_string())
                            .await;
                        if failures.is_empty() {
                            op.say(&format!("health gates passed on {} host(s)", hosts.len()));
                            gates = "passed";
                            break;
                        }
                        for f in &failures {
                            op.say(&format!("GATE FAILED {f}"));
                        }
                        match op.gate_failed(&failures) {
                            GateChoice::Retry => continue,
                            GateChoice::Ignore => {
                                gates = "failed (ignored by the operator)";
                                break;
                            }
                            GateChoice::Exit => {
                                return self.record(
                                    stage,
                                    "failed",
                                    finish(
                                        false,
                                        "health gate failed; stopped (hosts left as they are)"
                                            .into(),
                                        &changed,
                                        &failed,
                                        reached,
                                        vec![],
                                    ),
                                );
                            }
                            GateChoice::Rollback => {
                                let back = self.roll_back(op, &changed).await;
                                let msg = format!(
                                    "health gate failed at {stage}: rolled back the {} host(s) this command changed",
                                    back.len()
                                );
                                return self.record(
                                    stage,
                                    "failed",
                                    finish(false, msg, &changed, &failed, reached, back),
                                );
                            }
                        }
                    }
                }
            }
            op.say(&format!("{} of production traffic synced", pct(reached)));
            let msg = format!("{} on {} of production traffic", self.label, pct(reached));
            self.record(
                stage,
                gates,
                finish(
                    failed.is_empty() && !short,
                    msg,
                    &changed,
                    &failed,
                    reached,
                    vec![],
                ),
            );
            if n + 1 < self.stages.len()
                && !op.confirm(&format!(
                    "{} of production traffic synced: continue [y/N]?",
                    pct(reached)
                ))
            {
                return finish(
                    failed.is_empty() && !short,
                    format!("stopped by the operator at {}", pct(reached)),
                    &changed,
                    &failed,
                    reached,
                    vec![],
                );
            }
        }
        if self.dry_run {
            return finish(
                true,
                "dry run: nothing changed".into(),
                &changed,
                &failed,
                reached,
                vec![],
            );
        }
        let msg = format!("{} on {} of production traffic", self.label, pct(reached));
        // Not reaching the last stage's share (a host down within the
        // failure budget) is reported as a failure too: never silently.
        // Every step is in the history already.
        let whole = failed.is_empty() && !short;
        finish(whole, msg, &changed, &failed, reached, vec![])
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

    async fn roll_back(&self, op: &mut dyn Operator, changed: &[Changed]) -> Vec<String> {
        let mut back = Vec::new();
        for c in changed {
            let Some(from) = c.from else {
                op.say(&format!(
                    "{}: had no version before this command: left on {}",
                    c.member.host, self.label
                ));
                continue;
            };
            let body = serde_json::json!({"to": from.to_hex(), "by": self.by});
            match self
                .agents
                .post(&c.member.host, "/v1/rollback", &body)
                .await
            {
                Ok(_) => {
                    op.say(&format!(
                        "{}: rolled back to {}",
                        c.member.host,
                        from.short()
                    ));
                    back.push(c.member.host.to_string());
                }
                Err(e) => op.say(&format!("ROLLBACK FAILED {e}")),
            }
        }
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
