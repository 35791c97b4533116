//! A rollout: stages of top-up steps, each followed by the health gates and
//! (for people) a question. The controller's whole procedure for `scap
//! sync`, `scap sync-file` and `scap sync --resume`; how it talks to the
//! operator is the caller's ([`Operator`]).
//!
//! A rollout of one version keeps its record (`fleet::record`) as it goes,
//! so it can be resumed after the controller dies, and every step updates
//! the desired state (`fleet::desired`) of the hosts it moved.
//!
//! A host whose sync call timed out or answered nonsense may still have
//! switched: before a step is judged, such hosts are told to cancel and
//! read again, and one that reports its target counts as changed (so a
//! failing gate rolls it back with the rest of its step).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::agents::{Agents, Call, CallError, HostResult, fan_out};
use super::desired;
use super::gates::Gates;
use super::history::{self, Entry};
use super::inventory::{Host, Member};
use super::poll::{Reading, poll};
use super::pools::{Pools, fleet_from_pools};
use super::prom::Measurement;
use super::record::{RolloutRecord, RolloutState};
use super::restart::{RestartPolicy, Restarter};
use super::rollout::{Budget, Goal, Stage, TopUp, share, top_up};
use super::trains::Trains;
use crate::proto::{Outcome as HostOutcome, RollbackRequest, RollbackTarget, SyncRequest};
use crate::store::VersionId;
use crate::store::signature::SignedVersion;

pub use super::operator::{GateChoice, Operator};

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
    pub goal: Goal,
    /// For people: the version's label, or the change's message.
    pub label: String,
    /// The signatures of the versions the goal brings hosts to, sent with
    /// each sync (agents check them).
    pub signatures: BTreeMap<VersionId, SignedVersion>,
    pub sources: Vec<String>,
    pub stages: Vec<Stage>,
    pub gates: Gates,
    pub force: bool,
    pub wait: Duration,
    pub budget: Budget,
    pub dry_run: bool,
    pub concurrency: usize,
    pub by: String,
    pub command: String,
    /// `STORE/fleet`: history, desired state and the rollout record live here.
    pub state: crate::fleet::state::DeployState,
    /// Set by Ctrl-C: finish the hosts in flight, start no more.
    pub interrupted: &'a AtomicBool,
    /// The record of this rollout (one version, not a dry run): kept up to
    /// date as it goes, for `--resume`, status and the dashboard.
    pub record: Mutex<Option<RolloutRecord>>,
    /// `scap sync --resume`: the first stage run may have switched its
    /// hosts already and stopped before their gates; they run now.
    pub resume: bool,
    /// When the fleet comes from the load balancer's pools: read again
    /// before every stage (a host depooled meanwhile takes no traffic); an
    /// etcd that does not answer stops the rollout between steps.
    pub pools: Option<PoolFleet>,
    /// Restart the step's hosts in batches (depool, drain, restart, check,
    /// repool) before their gates.
    pub restarts: Option<RestartPolicy>,
    /// What the Prometheus gates of the current step measured (for its
    /// history entry).
    pub measured: Mutex<Vec<Measurement>>,
    /// Caches by datacenter: a host tries its own datacenter's first, then
    /// the others', then `sources` (the deploy host).
    pub caches: BTreeMap<String, Vec<String>>,
    /// Stage the version on every host that lacks it when the rollout
    /// starts (in the background): later steps are only switches.
    pub stage_ahead: bool,
    /// Bytes the current step's hosts (and the staging before it) received
    /// from each source.
    pub served: std::sync::Arc<Mutex<BTreeMap<String, u64>>>,
    /// The deploy host's trains: how versions are named to people.
    pub trains: Trains,
}

/// The sources for a host in datacenter `dc`: its own caches, the other
/// datacenters' caches, then the deploy host(s).
pub fn sources_for(
    caches: &BTreeMap<String, Vec<String>>,
    deploy: &[String],
    dc: &str,
) -> Vec<String> {
    let mut out: Vec<String> = caches.get(dc).cloned().unwrap_or_default();
    for (d, urls) in caches {
        if d != dc {
            out.extend(urls.iter().cloned());
        }
    }
    out.extend(deploy.iter().cloned());
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|u| seen.insert(u.clone()));
    out
}

/// The fleet from the pools, joined with the static sources (addresses,
/// canary flags), optionally one cluster only.
#[derive(Clone)]
pub struct PoolFleet {
    pub pools: Pools,
    pub statics: Vec<Member>,
    pub cluster: Option<String>,
}

impl PoolFleet {
    pub async fn members(&self) -> Result<(Vec<Member>, Vec<String>), String> {
        let (mut m, notes) = fleet_from_pools(&self.pools, &self.statics)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(c) = &self.cluster {
            m.retain(|x| &x.cluster == c);
            if m.is_empty() {
                return Err(format!("no host of the pools is in cluster {c:?}"));
            }
        }
        Ok((m, notes))
    }
}

/// A background task that stops with its owner.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a rollout ended.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub ok: bool,
    /// Every stage ran to its end (not stopped, interrupted or rolled
    /// back): what a change needs before the trains' heads move.
    pub finished: bool,
    /// A rollback after a failed gate brought back every host the rollout
    /// moved (this run's, and for a resumed change every host on it), and
    /// none is left to come back later.
    pub all_back: bool,
    pub reached: f64,
    pub changed: Vec<String>,
    pub failed: Vec<String>,
    pub rolled_back: Vec<String>,
    pub message: String,
}

/// A host this command moved, and where it was before.
struct Changed {
    member: Member,
    /// Its name in the desired state (see `Reading::name`).
    name: String,
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
    /// Hosts restarted after their switch, over every step.
    restarted: usize,
}

impl Progress {
    fn outcome(&self, ok: bool, message: String, rolled_back: Vec<String>) -> Outcome {
        Outcome {
            ok,
            finished: false,
            all_back: false,
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

/// What a rollback after a failed gate did.
#[derive(Default)]
struct RolledBack {
    /// Hosts switched back.
    back: Vec<String>,
    /// Hosts whose rollback failed: they still run what the rollout gave.
    failed: Vec<String>,
    /// Hosts that did not answer: they go back when they return.
    unanswered: Vec<String>,
    /// Where the hosts are now (those already there included).
    went: BTreeMap<VersionId, usize>,
}

impl RolledBack {
    /// The outcome, for people: where the hosts are now compared with what
    /// was asked.
    fn message(&self, stage: Stage, goal: &Goal, trains: &Trains, label: &str) -> String {
        let now = self
            .went
            .iter()
            .map(|(v, n)| format!("{n} host(s) back on {}", trains.name(v)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut msg = format!("health gate failed at {stage}: ");
        if now.is_empty() {
            msg.push_str("no host had to go back");
        } else {
            msg.push_str(&now);
        }
        if !self.failed.is_empty() {
            msg.push_str(&format!(
                "; {} host(s) could NOT be rolled back and still run {label}: {}",
                self.failed.len(),
                crate::text::clip(&self.failed.join(" "), 200)
            ));
        }
        if !self.unanswered.is_empty() {
            msg.push_str(&format!(
                "; {} host(s) do not answer and go back when they return: {}",
                self.unanswered.len(),
                crate::text::clip(&self.unanswered.join(" "), 200)
            ));
        }
        match goal {
            Goal::Change { .. } if self.failed.is_empty() => {
                msg.push_str("; the change is not applied")
            }
            Goal::Change { .. } => msg.push_str("; the change is still on the hosts named"),
            Goal::One { .. } => {}
        }
        msg
    }
}

impl Rollout<'_> {
    /// Runs the stages from `first` (0, or where a resumed rollout left).
    pub async fn run(&self, op: &mut dyn Operator, first: usize) -> Outcome {
        let mut p = Progress::default();
        let _staging = self.stage_everywhere(op).await;
        self.update_record(|r| {
            r.state = RolloutState::Running;
            r.pid = std::process::id();
            r.host = crate::sys::hostname();
            r.note.clear();
        });
        for n in first..self.stages.len() {
            let stage = self.stages[n];
            let resuming = self.resume && n == first;
            if let Err(stop) = self.stage(op, stage, &mut p, resuming).await {
                return stop;
            }
            self.update_record(|r| {
                r.completed = n + 1;
                r.next_due = None;
                if n + 1 == self.stages.len() {
                    r.state = RolloutState::Done;
                }
            });
            if n + 1 < self.stages.len()
                && !self.dry_run
                && !op.confirm(&format!(
                    "{} of production traffic synced: continue [y/N]?",
                    pct(p.reached)
                ))
            {
                let msg = format!("stopped by the operator at {}", pct(p.reached));
                self.stopped(&msg);
                return p.outcome(p.failed.is_empty() && !p.short, msg, vec![]);
            }
        }
        if self.dry_run {
            return p.outcome(true, "dry run: nothing changed".into(), vec![]);
        }
        if let Err(e) = self.state.check_lock() {
            let msg = format!("{e}; the unreachable hosts' targets were not set");
            op.say(&msg);
            return p.outcome(false, msg, vec![]);
        }
        self.finished().await;
        // Not reaching the last stage's share (a host down within the
        // failure budget) is reported as a failure too: never silently.
        // Every step is in the history already.
        let msg = self.reached(&p);
        let mut o = p.outcome(p.failed.is_empty() && !p.short, msg, vec![]);
        o.finished = true;
        o
    }

    /// "V on 50% of production traffic", with the restarts when there are.
    fn reached(&self, p: &Progress) -> String {
        let mut msg = format!("{} on {} of production traffic", self.label, pct(p.reached));
        if self.restarts.is_some() && !self.dry_run {
            msg.push_str(&format!("; {} host(s) restarted", p.restarted));
        }
        msg
    }

    /// Every stage done: hosts that could not be reached are given their
    /// target too, and catch up when they come back.
    async fn finished(&self) {
        if !self.stages.last().is_some_and(|s| s.is_all()) {
            return;
        }
        let readings = poll(self.agents, &self.members, 64).await;
        let why = self.why();
        let result = desired::update(&self.state, self.agents.orders(), |d| match &self.goal {
            Goal::One { version, .. } => {
                for r in readings.iter().filter(|r| r.view.is_err()) {
                    d.set(&r.name(), *version, &self.by, &why);
                }
            }
            Goal::Change { map, .. } => d.rewrite(map, &self.by, &why),
        });
        if let Err(e) = result {
            tracing::error!("cannot record the desired state: {e}");
        }
    }

    /// Starts staging the version on every host that answers and lacks it,
    /// in the background (a step's sync to such a host waits for its
    /// staging, and is then only a switch). The task ends with the rollout.
    async fn stage_everywhere(&self, op: &mut dyn Operator) -> Option<AbortOnDrop> {
        let Goal::One { version, .. } = &self.goal else {
            return None;
        };
        if !self.stage_ahead || self.dry_run || self.stages.len() < 2 {
            return None;
        }
        let readings = poll(self.agents, &self.members, 64).await;
        let todo: Vec<(Host, String)> = readings
            .iter()
            .filter(|r| r.view.is_ok() && !self.goal.reached(r.current()))
            .map(|r| (r.member.host.clone(), r.member.dc.clone()))
            .collect();
        if todo.is_empty() {
            return None;
        }
        op.say(&format!(
            "staging {} on {} host(s) in the background",
            version.short(),
            todo.len()
        ));
        let agents = self.agents.clone();
        let req = SyncRequest {
            version: *version,
            sources: Vec::new(),
            by: self.by.clone(),
            fetch_timeout_seconds: None,
            signature: self.signatures.get(version).cloned(),
            order: None,
        };
        let (caches, deploy) = (self.caches.clone(), self.sources.clone());
        let served = self.served.clone();
        let task = tokio::spawn(async move {
            let hosts: Vec<Host> = todo.iter().map(|(h, _)| h.clone()).collect();
            let count = |r: &HostResult<HostOutcome>| {
                if let Ok(o) = &r.result {
                    let mut s = served.lock().expect("not poisoned");
                    for (src, n) in &o.fetched.by_source {
                        *s.entry(src.clone()).or_default() += n;
                    }
                }
            };
            let _ = fan_out(
                &hosts,
                16,
                None,
                |h| {
                    let dc = todo
                        .iter()
                        .find(|(x, _)| x == h)
                        .map_or("", |(_, d)| d.as_str());
                    let mut r = req.clone();
                    r.sources = sources_for(&caches, &deploy, dc);
                    let agents = &agents;
                    Box::pin(async move { agents.stage(h, &r).await })
                },
                &count,
            )
            .await;
        });
        Some(AbortOnDrop(task))
    }

    fn update_record(&self, f: impl FnOnce(&mut RolloutRecord)) {
        if self.dry_run {
            return;
        }
        let mut guard = self.record.lock().expect("not poisoned");
        if let Some(r) = guard.as_mut() {
            f(r);
            if let Err(e) = r.save(&self.state) {
                tracing::error!("cannot save the rollout record: {e}");
            }
        }
    }

    /// The rollout stopped between steps and may be resumed.
    fn stopped(&self, why: &str) {
        self.update_record(|r| {
            if r.state == RolloutState::Running {
                r.state = RolloutState::Stopped;
            }
            r.note = why.to_string();
        });
    }

    /// One stage: poll, top up, judge, gate. `Err` ends the rollout.
    async fn stage(
        &self,
        op: &mut dyn Operator,
        stage: Stage,
        p: &mut Progress,
        resuming: bool,
    ) -> Result<(), Stop> {
        if self.interrupted.load(Ordering::SeqCst) {
            let msg = "interrupted (Ctrl-C): no further hosts were started";
            self.stopped(msg);
            let o = p.outcome(false, msg.into(), vec![]);
            return Err(self.log_step(stage, self.no_gates(), o));
        }
        // The deploy state in etcd: this controller must still hold the
        // lock (a lease that expired while it hung means another deploy
        // host may be running this rollout now), and etcd must answer, or
        // nothing this step does could be recorded.
        self.holds_lock(op, stage, p, &format!("{stage}, no host was started"))?;
        let members = match &self.pools {
            Some(pf) => match pf.members().await {
                Ok((m, notes)) => {
                    for n in notes {
                        op.say(&n);
                    }
                    m
                }
                Err(e) => {
                    let msg = format!("cannot read the pools: {e}; stopping before {stage}");
                    op.say(&msg);
                    self.stopped(&msg);
                    return Err(self.log_step(
                        stage,
                        self.no_gates(),
                        p.outcome(false, msg, vec![]),
                    ));
                }
            },
            None => self.members.clone(),
        };
        let readings = self.settled_poll(op, &members).await;
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
            self.stopped(&msg);
            return Err(self.log_step(stage, self.no_gates(), p.outcome(false, msg, vec![])));
        }
        let plan = top_up(&readings, &self.goal, stage);
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
            // A resumed stage whose hosts switched before the controller
            // stopped: their gates have not run yet.
            let mut gates = self.no_gates();
            if resuming && !self.gates.is_empty() {
                let from = self
                    .record
                    .lock()
                    .expect("not poisoned")
                    .as_ref()
                    .map(|r| r.from.clone())
                    .unwrap_or_default();
                // A train's rollout: the hosts its record says it moved. A
                // change (no record): every host on one of its new versions.
                let moved_by_change = |c: Option<VersionId>| match &self.goal {
                    Goal::Change { map, .. } => c.is_some_and(|c| {
                        map.iter().any(|(old, new)| *new == c && *old != c) && !map.contains_key(&c)
                    }),
                    Goal::One { .. } => false,
                };
                let step: Vec<Member> = readings
                    .iter()
                    .filter(|r| {
                        (from.contains_key(&r.name()) && self.goal.reached(r.current()))
                            || moved_by_change(r.current())
                    })
                    .map(|r| r.member.clone())
                    .collect();
                if !step.is_empty() {
                    op.say(&format!(
                        "resuming: running the health gates on the {} host(s) this rollout moved",
                        step.len()
                    ));
                    gates = self.gate(op, stage, &step, &readings, p).await?;
                }
            }
            let msg = self.reached(p);
            let o = p.outcome(p.failed.is_empty() && !p.short, msg, vec![]);
            self.log_step(stage, gates, o);
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
        // Short overall, in some cluster, or because a planned host failed.
        p.short = plan.short() || on_weight < plan.reached_weight;
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
            self.stopped(&msg);
            return Err(self.log_step(stage, self.no_gates(), p.outcome(false, msg, vec![])));
        }
        let step = self.restart(op, stage, step, &plan, &readings, p).await?;
        let gates = self.gate(op, stage, &step, &readings, p).await?;
        op.say(&format!("{} of production traffic synced", pct(p.reached)));
        let msg = self.reached(p);
        let o = p.outcome(p.failed.is_empty() && !p.short, msg, vec![]);
        self.log_step(stage, gates, o);
        Ok(())
    }

    /// Polls every host; while some are in the middle of a sync, rollback
    /// or pull (a controller that died left one running, or a host pulls
    /// by itself), waits for them, up to two minutes: what they will run is
    /// not known yet, and a sync sent now would be refused as busy.
    async fn settled_poll(&self, op: &mut dyn Operator, members: &[Member]) -> Vec<Reading> {
        let until = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut said = false;
        loop {
            let readings = poll(self.agents, members, 64).await;
            let changing: Vec<String> = readings
                .iter()
                .filter(|r| r.view.as_ref().is_ok_and(|v| v.changing))
                .map(|r| r.member.host.to_string())
                .collect();
            if changing.is_empty()
                || tokio::time::Instant::now() >= until
                || self.interrupted.load(Ordering::SeqCst)
            {
                return readings;
            }
            if !said {
                op.say(&format!(
                    "waiting for {} host(s) busy with an operation: {}",
                    changing.len(),
                    crate::text::clip(&changing.join(" "), 200)
                ));
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Syncs the step's hosts; returns those now on their target.
    async fn sync_step(
        &self,
        op: &mut dyn Operator,
        stage: Stage,
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
        let targets: Vec<VersionId> = plan
            .add
            .iter()
            .map(|&i| {
                self.goal
                    .target(readings[i].current())
                    .expect("top_up picks only hosts with a target")
            })
            .collect();
        let dcs: Vec<String> = plan
            .add
            .iter()
            .map(|&i| readings[i].member.dc.clone())
            .collect();
        let results = drive(op, &hosts, self.concurrency, Some(self.interrupted), |h| {
            let i = hosts.iter().position(|x| x == h).expect("one of hosts");
            let req = SyncRequest {
                version: targets[i],
                sources: sources_for(&self.caches, &self.sources, &dcs[i]),
                by: self.by.clone(),
                fetch_timeout_seconds: None,
                signature: self.signatures.get(&targets[i]).cloned(),
                order: None,
            };
            Box::pin(async move { self.agents.sync(h, &req).await })
        })
        .await;
        {
            let mut served = self.served.lock().expect("not poisoned");
            for r in &results {
                if let Ok(o) = &r.result {
                    for (src, n) in &o.fetched.by_source {
                        *served.entry(src.clone()).or_default() += n;
                    }
                    for why in &o.fetched.skipped {
                        op.say(&format!("{}: skipped source {why}", r.host));
                    }
                }
            }
        }
        let mut step = Vec::new();
        for ((r, &i), target) in results.iter().zip(&plan.add).zip(&targets) {
            let m = readings[i].member.clone();
            let switched = match &r.result {
                Ok(_) => true,
                Err(e) if e.maybe_running() => self.settle(op, &m.host, *target, e).await,
                Err(_) => false,
            };
            if switched {
                p.changed.push(Changed {
                    member: m.clone(),
                    name: readings[i].name(),
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
        // Every host the step chose should run its target now, whether or
        // not it got there: one that failed or was down catches up when it
        // comes back (or with `scap sync --catch-up`), and a rollback
        // returns it to where it came from.
        let why = self.why();
        let chosen: Vec<(String, VersionId, Option<VersionId>)> = plan
            .add
            .iter()
            .zip(&targets)
            .map(|(&i, t)| (readings[i].name(), *t, readings[i].current()))
            .collect();
        if let Err(e) = desired::update(&self.state, self.agents.orders(), |d| {
            for (host, v, _) in &chosen {
                d.set(host, *v, &self.by, &why);
            }
        }) {
            tracing::error!("cannot record the desired state: {e}");
        }
        self.update_record(|r| {
            for (host, _, from) in &chosen {
                if let Some(from) = from {
                    r.from.entry(host.clone()).or_insert(*from);
                }
            }
        });
        step
    }

    /// Why hosts get their new target, for the desired state.
    fn why(&self) -> String {
        match &self.goal {
            Goal::One { version, .. } => format!("sync {}", version.short()),
            Goal::Change { id, .. } => format!("change {id}"),
        }
    }

    /// After a sync call that timed out: tells the host to stop, then
    /// reads what it runs. True if it is on its target after all.
    async fn settle(
        &self,
        op: &mut dyn Operator,
        host: &Host,
        target: VersionId,
        e: &CallError,
    ) -> bool {
        let _ = self.agents.cancel(host, &self.by).await;
        match self.agents.state(host).await {
            Ok(st) if st.state.current.as_ref().map(|d| d.version) == Some(target) => {
                op.say(&format!(
                    "{host}: switched to {} although its answer failed ({e}): counted as changed",
                    target.short()
                ));
                true
            }
            _ => false,
        }
    }

    /// Waits `self.wait`, or less if Ctrl-C comes: then `false`.
    async fn wait(&self) -> bool {
        let until = tokio::time::Instant::now() + self.wait;
        self.update_record(|r| r.next_due = Some(crate::time::unix_now() + self.wait.as_secs()));
        while tokio::time::Instant::now() < until {
            if self.interrupted.load(Ordering::SeqCst) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200).min(until - tokio::time::Instant::now()))
                .await;
        }
        true
    }

    /// With pools and a restart policy: restarts the step's hosts in
    /// batches that never drop a cluster under its floor. Returns the hosts
    /// whose new code now runs (the gates test those); a host whose restart
    /// failed is a failure (and stays depooled); restarts stopped by the
    /// floor or etcd stop the rollout.
    async fn restart(
        &self,
        op: &mut dyn Operator,
        stage: Stage,
        step: Vec<Member>,
        plan: &TopUp,
        readings: &[Reading],
        p: &mut Progress,
    ) -> Result<Vec<Member>, Stop> {
        let Some(policy) = &self.restarts else {
            return Ok(step);
        };
        let jobs: Vec<(Member, VersionId)> = step
            .iter()
            .filter_map(|m| {
                let i = plan
                    .add
                    .iter()
                    .copied()
                    .find(|&i| readings[i].member.host == m.host)?;
                Some((m.clone(), self.goal.target(readings[i].current())?))
            })
            .collect();
        let mut cluster_hosts = std::collections::BTreeMap::new();
        for r in readings {
            *cluster_hosts.entry(r.member.cluster.clone()).or_default() += 1;
        }
        let restarter = Restarter {
            agents: self.agents,
            pools: self.pools.as_ref().map(|pf| &pf.pools),
            cluster_hosts,
            policy: policy.clone(),
            by: self.by.clone(),
            interrupted: self.interrupted,
        };
        let report = restarter.run(op, &jobs).await;
        p.restarted += report.restarted.len();
        for (host, why) in &report.failed {
            op.say(&format!("FAIL {host}: {why}"));
            p.fail(host.clone());
        }
        if let Some(why) = &report.stopped {
            let msg = format!(
                "restarts stopped: {why}{}",
                if report.not_restarted.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (switched, not restarted: {})",
                        report.not_restarted.join(", ")
                    )
                }
            );
            op.say(&msg);
            self.stopped(&msg);
            return Err(self.log_step(stage, "not run", p.outcome(false, msg, vec![])));
        }
        let total = readings.len();
        if !self.budget.allows(p.failed.len(), total) {
            let msg = format!(
                "{} host(s) failed ({}), more than --max-failures allows: stopped at {} of traffic; hosts whose restart failed stay depooled",
                p.failed.len(),
                p.failed.join(", "),
                pct(p.reached)
            );
            self.stopped(&msg);
            return Err(self.log_step(stage, "not run", p.outcome(false, msg, vec![])));
        }
        Ok(step
            .into_iter()
            .filter(|m| report.restarted.contains(&m.host.to_string()))
            .collect())
    }

    /// Runs the health gates on the step's hosts. `Ok(what the gates
    /// said)`, or `Err` when the rollout stops.
    async fn gate(
        &self,
        op: &mut dyn Operator,
        stage: Stage,
        step: &[Member],
        readings: &[Reading],
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
            if !self.wait().await {
                let msg = "interrupted (Ctrl-C) while waiting for the health gates; `scap sync --resume` runs them and goes on";
                self.stopped(msg);
                return Err(self.log_step(stage, "not run", p.outcome(false, msg.into(), vec![])));
            }
        }
        let hosts: Vec<Host> = step.iter().map(|m| m.host.clone()).collect();
        let version = self.goal.versions()[0];
        // (SCAP_VERSION: for a change on two trains, the first new version;
        // the gate's hosts run one or the other.)
        loop {
            // The baseline for comparison gates: the hosts that answer and
            // are not on the version.
            let rest: Vec<Host> = readings
                .iter()
                .filter(|r| r.view.is_ok() && !self.goal.reached(r.current()))
                .filter(|r| !hosts.contains(&r.member.host))
                .map(|r| r.member.host.clone())
                .collect();
            let result = self
                .gates
                .run(
                    self.agents.http(),
                    &hosts,
                    &rest,
                    &version,
                    &stage.to_string(),
                )
                .await;
            for m in &result.measurements {
                op.say(&format!(
                    "measured {} = {}{} (limit {}): {}",
                    m.query,
                    m.value,
                    m.baseline
                        .map(|b| format!(", the rest {b}"))
                        .unwrap_or_default(),
                    m.limit,
                    if m.passed { "ok" } else { "FAILED" }
                ));
            }
            *self.measured.lock().expect("not poisoned") = result.measurements;
            let failures = result.failures;
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
                    let msg = "health gate failed; stopped (hosts left as they are)";
                    self.stopped(msg);
                    let o = p.outcome(false, msg.into(), vec![]);
                    return Err(self.log_step(stage, "failed", o));
                }
                GateChoice::Rollback => {
                    // Not if another command holds the lock now: its
                    // hosts are its own.
                    self.holds_lock(op, stage, p, "the rollback of the failed step")?;
                    let rb = self.roll_back(op, &p.changed).await;
                    let msg = rb.message(stage, &self.goal, &self.trains, &self.label);
                    let all_back = rb.failed.is_empty() && rb.unanswered.is_empty();
                    let back = rb.back;
                    self.update_record(|r| {
                        r.state = RolloutState::RolledBack;
                        r.note = msg.clone();
                    });
                    let mut o = p.outcome(false, msg, back);
                    o.all_back = all_back;
                    return Err(self.log_step(stage, "failed", o));
                }
            }
        }
    }

    /// `Err` (the rollout stops, nothing more sent or written) once this
    /// controller no longer holds the deploy lock, or etcd cannot say.
    fn holds_lock(
        &self,
        op: &mut dyn Operator,
        stage: Stage,
        p: &Progress,
        before: &str,
    ) -> Result<(), Stop> {
        if self.dry_run {
            return Ok(());
        }
        match self.state.check_lock() {
            Ok(()) => Ok(()),
            Err(e) => {
                let msg = format!("{e}; stopping before {before}");
                op.say(&msg);
                let o = p.outcome(false, msg, vec![]);
                Err(self.log_step(stage, self.no_gates(), o))
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

    fn describe(&self, op: &mut dyn Operator, plan: &TopUp, readings: &[Reading], stage: Stage) {
        let names = |ix: &[usize]| {
            ix.iter()
                .map(|&i| readings[i].member.host.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let what = match stage {
            Stage::Canary => "the canary group".to_string(),
            Stage::Share(p) => format!("{p} of traffic"),
        };
        op.say(&format!(
            "{what} is weight {} of {}: {} host(s) already on {} ({}), {} to add{}",
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
        if plan.clusters.len() > 1 {
            for c in &plan.clusters {
                op.say(&format!(
                    "  cluster {}: weight {} of {} needed, {} after this step",
                    if c.cluster.is_empty() {
                        "(none)"
                    } else {
                        &c.cluster
                    },
                    c.needed_weight,
                    c.total_weight,
                    c.reached_weight
                ));
            }
        }
        if plan.short() {
            op.say(&format!(
                "only {} can be reached: not enough hosts answer",
                pct(plan.reached())
            ));
        }
        if let Goal::Change { .. } = &self.goal {
            for r in readings {
                if r.view.is_ok()
                    && !self.goal.reached(r.current())
                    && self.goal.target(r.current()).is_none()
                {
                    op.say(&format!(
                        "{} runs {}, which is no live train: left alone (`scap sync --catch-up` brings it to its target)",
                        r.member.host,
                        r.current().map_or_else(|| "nothing".into(), |v| v.short())
                    ));
                }
            }
        }
        if self.dry_run {
            if let Goal::Change { .. } = &self.goal {
                for &i in &plan.add {
                    let cur = readings[i].current();
                    if let (Some(from), Some(to)) = (cur, self.goal.target(cur)) {
                        op.say(&format!(
                            "dry run: {} {} -> {}",
                            readings[i].member.host,
                            from.short(),
                            to.short()
                        ));
                    }
                }
            }
            op.say(&format!(
                "dry run: would reach {} of traffic",
                pct(plan.reached())
            ));
        }
    }

    /// Switches every host this rollout changed (this command's, and for a
    /// resumed rollout those its earlier runs moved) back to where it came
    /// from: its own train, with any change made since. Hosts that do not
    /// answer are given that as their desired state, and go there when they
    /// come back.
    async fn roll_back(&self, op: &mut dyn Operator, changed: &[Changed]) -> RolledBack {
        // A resumed rollout is one command: the hosts its earlier runs moved
        // go back too. Otherwise the hosts this command moved (earlier
        // steps passed their gates; `scap rollback --version V` takes them
        // back if wanted).
        let mut targets: BTreeMap<String, VersionId> = match &self.goal {
            Goal::One { .. } if self.resume => self
                .record
                .lock()
                .expect("not poisoned")
                .as_ref()
                .map(|r| r.from.clone())
                .unwrap_or_default(),
            _ => BTreeMap::new(),
        };
        for c in changed {
            match c.from {
                Some(from) => {
                    targets.entry(c.name.clone()).or_insert(from);
                }
                None => op.say(&format!(
                    "{}: had no version before this rollout: left on {}",
                    c.member.host, self.label
                )),
            }
        }
        let readings = poll(self.agents, &self.members, 64).await;
        // A resumed change: every host on one of its new versions (an
        // earlier run moved it) goes back to the version it was made from.
        if let Goal::Change { map, unchanged, .. } = &self.goal
            && self.resume
        {
            let inverse: BTreeMap<VersionId, VersionId> = map
                .iter()
                .filter(|(old, new)| {
                    !unchanged.contains(new) && !map.contains_key(new) && old != new
                })
                .map(|(old, new)| (*new, *old))
                .collect();
            for r in &readings {
                if let Some(old) = r.current().and_then(|c| inverse.get(&c)) {
                    targets.entry(r.name()).or_insert(*old);
                }
            }
        }
        let mut plan: Vec<(Host, VersionId)> = Vec::new();
        for r in &readings {
            let Some(to) = targets.get(&r.name()) else {
                continue;
            };
            match &r.view {
                Ok(_) if r.current() == Some(*to) => {}
                Ok(_) => plan.push((r.member.host.clone(), *to)),
                Err(_) => op.say(&format!(
                    "{}: does not answer: it goes back to {} when it comes back (its desired state)",
                    r.member.host,
                    to.short()
                )),
            }
        }
        let hosts: Vec<Host> = plan.iter().map(|(h, _)| h.clone()).collect();
        op.step_started("rollback", hosts.len());
        let results = drive(op, &hosts, self.concurrency.max(50), None, |h| {
            let i = hosts.iter().position(|x| x == h).expect("one of hosts");
            let dc = self
                .members
                .iter()
                .find(|m| m.host == plan[i].0)
                .map_or("", |m| m.dc.as_str());
            let req = RollbackRequest {
                to: RollbackTarget::Version(plan[i].1),
                by: self.by.clone(),
                sources: sources_for(&self.caches, &self.sources, dc),
                order: None,
            };
            Box::pin(async move { self.agents.rollback(h, &req).await })
        })
        .await;
        let mut rb = RolledBack::default();
        for (host, to) in &targets {
            let answered = readings.iter().find(|r| r.name() == *host);
            match answered.map(|r| (&r.view, r.current())) {
                Some((Ok(_), Some(cur))) if cur == *to => {
                    *rb.went.entry(*to).or_default() += 1;
                }
                Some((Err(_), _)) | None => rb.unanswered.push(host.clone()),
                _ => {}
            }
        }
        for r in &results {
            match &r.result {
                Ok(o) => {
                    op.say(&format!(
                        "{}: rolled back to {}",
                        r.host,
                        self.trains.name(&o.version)
                    ));
                    rb.back.push(r.host.to_string());
                    *rb.went.entry(o.version).or_default() += 1;
                }
                Err(e) => {
                    op.say(&format!("ROLLBACK FAILED {e}"));
                    rb.failed.push(r.host.to_string());
                }
            }
        }
        let back = &rb.back;
        op.step_done("rollback", back.len(), results.len() - back.len());
        if let Err(e) = desired::update(&self.state, self.agents.orders(), |d| {
            for (host, v) in &targets {
                d.set(host, *v, &self.by, "rollback (health gate)");
            }
        }) {
            tracing::error!("cannot record the desired state: {e}");
        }
        // (A change's versions never entered the train's rollout record
        // or its head: both move only once the change has succeeded.)
        rb
    }

    /// Appends one step (a stage, or where the command stopped) to the
    /// deploy history.
    fn log_step(&self, stage: Stage, gates: &str, o: Outcome) -> Outcome {
        let (action, version, change) = match &self.goal {
            Goal::One { version, .. } => ("sync", Some(*version), None),
            Goal::Change { id, .. } => ("change", None, Some(id.clone())),
        };
        let entry = Entry {
            time: crate::time::unix_now(),
            user: self.by.clone(),
            action: action.into(),
            version,
            target: Some(stage.to_string()),
            gates: Some(gates.to_string()),
            reached: Some(o.reached),
            hosts: o.changed.clone(),
            failed: o.failed.clone(),
            ok: o.ok,
            message: o.message.clone(),
            command: self.command.clone(),
            change,
            measurements: std::mem::take(&mut *self.measured.lock().expect("not poisoned")),
            sources: std::mem::take(&mut *self.served.lock().expect("not poisoned")),
        };
        history::record(&self.state, &entry);
        o
    }
}

pub use super::rollout::pct;
