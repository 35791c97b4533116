//! Fleet commands: sync (plain and canary), sync-file, rollback, promote,
//! status, history, lock.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::ctx::Ctx;
use super::fleet_args::{FleetArgs, fleet_state};
use super::output::{ProgressLine, clock, exit, print_json, report, resolve_version, runtime};
use crate::fleet::agents::{Agents, HostResult};
use crate::fleet::announce::{Announcer, Sent};
use crate::fleet::catchup::CatchUp;
use crate::fleet::deploy::Outcome;
use crate::fleet::deploy::{GateChoice, Operator, Rollout};
use crate::fleet::gates::Gates;
use crate::fleet::history;
use crate::fleet::inventory::{Host, Member};
use crate::fleet::lock::{self, LockError, Locks};
use crate::fleet::policy::{Policy, check_rollout, parse_stages, restart_policy};
use crate::fleet::promote::Promote;
use crate::fleet::record::{RolloutRecord, RolloutState, Settings};
use crate::fleet::restart::RestartPolicy;
use crate::fleet::rollback::Rollback;
use crate::fleet::rollout::{Budget, Goal, Percent, Stage};
use crate::fleet::trains::Trains;
use crate::manifest::change::{self, ChangeSpec, Kind};
use crate::proto::{Outcome as HostOutcome, RollbackTarget};
use crate::store::{Store, VersionId};
use crate::time::fmt_utc;

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// The deploy host's trains (empty without a store: versions are then
/// shown by their hash).
fn trains(ctx: &Ctx) -> Trains {
    Trains::load_or_empty(&ctx.store_path)
}

/// A version for people: its train and changes, with the hash.
fn label_of(ctx: &Ctx, v: &VersionId) -> String {
    trains(ctx).name(v).to_string()
}

/// Resolves what a deployer typed: a train's head now, or exactly the
/// version an ID names. Says so when an ID names a version that is not
/// its train's head (it is deployed as asked).
fn resolve_exact(ctx: &Ctx, name: &str) -> anyhow::Result<VersionId> {
    let v = resolve_version(ctx, name)?;
    let t = trains(ctx);
    if let Some((train, head)) = t.not_head(name, &v) {
        eprintln!(
            "{} note: {} is not the head of train {train} (its head is {}): deploying {} as asked",
            clock(),
            v.short(),
            t.name(&head),
            v.short()
        );
    }
    Ok(v)
}

/// Sets a flag on Ctrl-C or SIGTERM: the rollout stops starting hosts,
/// lets the ones in flight finish, records where it stopped, releases the
/// lock and reports. (Under `nohup`, SIGHUP is ignored: the rollout goes on.)
fn on_interrupt(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    rt.spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => if r.is_err() { return },
            () = term => {},
        }
        eprintln!(
            "\n{} stopping: finishing the hosts in flight, starting no more (`scap sync --resume` continues)",
            clock()
        );
        f.store(true, Ordering::SeqCst);
    });
    flag
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["version", "resume", "catch_up"])))]
pub struct SyncArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Why (the SAL message), e.g. 'group1 to 1.46.0-wmf.7'
    message: Option<String>,
    /// Version to deploy: a train (label: its head now), or exactly the version a
    /// full ID or unambiguous ID prefix names
    #[arg(long)]
    version: Option<String>,
    /// Continue the recorded rollout from its last completed step (after Ctrl-C, a
    /// stop between stages, or a controller that died)
    #[arg(long, conflicts_with_all = ["canary", "stages"])]
    resume: bool,
    /// Bring every host that is behind its desired state (down during a step,
    /// reimaged) to its target; no new rollout, no gates
    #[arg(long, conflicts_with_all = ["canary", "stages"])]
    catch_up: bool,
    #[command(flatten)]
    rollout: RolloutArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RolloutArgs {
    /// Share of traffic to bring to the version (top-up: hosts already on it count)
    /// [default: scap.toml's [policy] stages, else canary hosts then 100%]
    #[arg(long, value_name = "P%", conflicts_with = "stages")]
    canary: Option<String>,
    /// Several steps in one command, e.g. canary,10%,50%,100%
    #[arg(long, value_name = "STAGE,...")]
    stages: Option<String>,
    /// URL of a `scap serve` (or cache) hosts fetch from (repeatable; tried in order) [default: scap.toml's sources]
    #[arg(long = "source", value_name = "URL")]
    sources: Vec<String>,
    /// Health probe after each step, added to scap.toml's [[gate]]s: URL template with
    /// {host} (name) or {addr} (agent host:port), e.g. http://{host}/wiki/Main_Page (repeatable)
    #[arg(long = "check-url", value_name = "URL")]
    check_urls: Vec<String>,
    /// HTTP status the --check-url probes must answer
    #[arg(long, default_value_t = 200)]
    check_status: u16,
    /// Health check command after each step, added to scap.toml's [[gate]]s; gets
    /// SCAP_VERSION, SCAP_HOSTS, SCAP_PERCENT (repeatable)
    #[arg(long = "check-cmd", value_name = "CMD")]
    check_cmds: Vec<String>,
    /// How long to wait before each step's health gates: 20s, 2m, 0 [default: [policy] wait, else 20s]
    #[arg(long, value_parser = super::parse_duration)]
    wait: Option<Duration>,
    /// Hosts that may fail or be down before a step stops: N or P% [default: [policy] max_failures, else 0]
    #[arg(long)]
    max_failures: Option<String>,
    /// Batch mode: no questions; a failing gate rolls back this rollout's hosts
    #[arg(long, short = 'y')]
    yes: bool,
    /// Skip the health gates (loudly); needed to reach every host with no gate configured
    #[arg(long)]
    force: bool,
    /// Print which hosts would change (from and to which version) and the resulting share; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Hosts synced at once [default: [policy] concurrency, else 20]
    #[arg(long)]
    concurrency: Option<usize>,
    /// Restart a step's hosts in batches of this share of each cluster's pooled
    /// weight (without pools: of its hosts, rounded down, at least one) [default:
    /// [restarts] batch, else 10%]
    #[arg(long, value_name = "P%")]
    restart_batch: Option<String>,
    /// With pools: wait this long after a depool for connections to drain [default:
    /// [restarts] drain, else 5s]
    #[arg(long, value_parser = super::parse_duration)]
    drain: Option<Duration>,
    /// With pools: never leave less than this share of a cluster's pooled weight
    /// pooled [default: [restarts] min_pooled, else 75%]
    #[arg(long, value_name = "P%")]
    min_pooled: Option<String>,
    /// No restarts (the agents' post-switch hooks do it, or nothing)
    #[arg(long)]
    no_restart: bool,
    /// Do not stage the version on every host when a rollout of several stages starts
    #[arg(long)]
    no_stage: bool,
    /// The IRC/SAL relay, run with the start and end lines as $SCAP_ANNOUNCE
    /// [default: scap.toml's [announce] command]
    #[arg(long, value_name = "CMD")]
    announce: Option<String>,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

/// The announcer of fleet command `what` with the deployer's `message`
/// (none for a dry run, which changes nothing).
fn announcer(
    ctx: &Ctx,
    flag: Option<&str>,
    what: &str,
    message: &str,
    dry_run: bool,
) -> anyhow::Result<Announcer> {
    let flag = if dry_run { Some("") } else { flag };
    let cfg = if dry_run {
        None
    } else {
        ctx.config.announce.as_ref()
    };
    Announcer::new(cfg, flag, what, message).map_err(anyhow::Error::msg)
}

/// [`announcer`], having said the start.
fn announce_start(
    ctx: &Ctx,
    flag: Option<&str>,
    what: &str,
    message: &str,
    dry_run: bool,
) -> anyhow::Result<Announcer> {
    let mut a = announcer(ctx, flag, what, message, dry_run)?;
    said(a.start());
    Ok(a)
}

/// Prints the warning of an announcement that was not sent.
fn said(sent: Sent) {
    if let Some(w) = sent.warning() {
        eprintln!("{} {w}", clock());
    }
}

/// The end of a command that failed before it deployed anything: said,
/// then the error returned.
fn failed_before(a: &Announcer, e: anyhow::Error) -> anyhow::Error {
    said(a.finish(false, &format!("{e:#}")));
    e
}

/// A rollout's settings: the flags over scap.toml's policy over the
/// built-in default.
struct Plan {
    stages: Vec<Stage>,
    wait: Duration,
    budget: Budget,
    max_failures: String,
    concurrency: usize,
    gates: Gates,
    sources: Vec<String>,
    force: bool,
    /// With pools: batched restarts after each step.
    restarts: Option<RestartPolicy>,
}

impl RolloutArgs {
    fn plan(&self, ctx: &Ctx) -> anyhow::Result<Plan> {
        let policy = Policy::from_config(&ctx.config).map_err(anyhow::Error::msg)?;
        let stages = match (&self.stages, &self.canary) {
            (Some(s), _) => parse_stages(s).map_err(|e| anyhow::anyhow!("--stages: {e}"))?,
            (None, Some(c)) => vec![Stage::Share(
                Percent::parse(c).map_err(|e| anyhow::anyhow!("--canary: {e}"))?,
            )],
            (None, None) => policy.stages.clone(),
        };
        let max_failures = self
            .max_failures
            .clone()
            .unwrap_or_else(|| policy.max_failures.clone());
        let budget = Budget::parse(&max_failures).map_err(anyhow::Error::msg)?;
        let mut gates = policy.gates.clone();
        gates.probes.extend(
            self.check_urls
                .iter()
                .map(|u| (u.clone(), self.check_status)),
        );
        gates.commands.extend(self.check_cmds.iter().cloned());
        let sources = ctx.sources(&self.sources)?;
        let concurrency = self.concurrency.unwrap_or(policy.concurrency);
        if concurrency == 0 {
            bail!("--concurrency: give at least 1");
        }
        let restarts = self.restarts(ctx)?;
        Ok(Plan {
            stages,
            wait: self.wait.unwrap_or(policy.wait),
            budget,
            max_failures,
            concurrency,
            gates,
            sources,
            force: self.force,
            restarts,
        })
    }

    /// The restart policy: flags over scap.toml over the defaults. With
    /// pools, restarts run unless --no-restart; without, when scap.toml
    /// has `[restarts]` or --restart-batch is given (batches by host
    /// count: --drain and --min-pooled need pools).
    fn restarts(&self, ctx: &Ctx) -> anyhow::Result<Option<RestartPolicy>> {
        let pools = ctx.config.pools.is_some();
        if self.no_restart {
            if self.restart_batch.is_some() || self.min_pooled.is_some() || self.drain.is_some() {
                bail!("--no-restart: --restart-batch, --drain and --min-pooled go with restarts");
            }
            return Ok(None);
        }
        if !pools && (self.min_pooled.is_some() || self.drain.is_some()) {
            bail!(
                "--drain and --min-pooled need the pools: add [pools] to scap.toml (without pools, --restart-batch sets how many hosts restart at once)"
            );
        }
        if !pools && ctx.config.restarts.is_none() && self.restart_batch.is_none() {
            return Ok(None);
        }
        let mut p = restart_policy(&ctx.config).map_err(anyhow::Error::msg)?;
        if let Some(b) = &self.restart_batch {
            p.batch = Percent::parse(b).map_err(|e| anyhow::anyhow!("--restart-batch: {e}"))?;
            if p.batch.0 == 0 {
                bail!("--restart-batch: give more than 0%");
            }
        }
        if let Some(d) = self.drain {
            p.drain = d;
        }
        if let Some(m) = &self.min_pooled {
            p.min_pooled = Percent::parse(m).map_err(|e| anyhow::anyhow!("--min-pooled: {e}"))?;
        }
        Ok(Some(p))
    }
}

impl Plan {
    /// The plan a recorded rollout (or change) was started with.
    fn from_settings(stages: &[Stage], s: &Settings) -> anyhow::Result<Plan> {
        Ok(Plan {
            stages: stages.to_vec(),
            wait: Duration::from_secs(s.wait_seconds),
            budget: Budget::parse(&s.max_failures).map_err(anyhow::Error::msg)?,
            max_failures: s.max_failures.clone(),
            concurrency: s.concurrency.max(1),
            gates: Gates {
                probes: s.probes.clone(),
                commands: s.commands.clone(),
                prometheus: s.prometheus.clone(),
            },
            sources: s.sources.clone(),
            force: s.force,
            restarts: None,
        })
    }

    /// `--source` given to `--resume`: the hosts fetch from these instead
    /// of the recorded sources (the deploy host that started the rollout
    /// is lost, and a standby finishes it).
    fn resume_sources(&mut self, ctx: &Ctx, given: &[String]) -> anyhow::Result<()> {
        if given.is_empty() {
            return Ok(());
        }
        let sources = ctx.sources(given)?;
        if sources != self.sources {
            eprintln!(
                "{} hosts fetch from {} (--source), not the recorded {}",
                clock(),
                sources.join(", "),
                self.sources.join(", ")
            );
        }
        self.sources = sources;
        Ok(())
    }

    fn settings(&self) -> Settings {
        Settings {
            sources: self.sources.clone(),
            probes: self.gates.probes.clone(),
            commands: self.gates.commands.clone(),
            prometheus: self.gates.prometheus.clone(),
            wait_seconds: self.wait.as_secs(),
            max_failures: self.max_failures.clone(),
            concurrency: self.concurrency,
            force: self.force,
        }
    }

    /// Refuses what cannot or should not run (see `fleet::policy`).
    fn check(&self, members: &[Member], r: &RolloutArgs) -> anyhow::Result<()> {
        if self.sources.is_empty() && !r.dry_run {
            bail!(
                "no source to fetch from: pass --source https://DEPLOY-HOST:8469 (or set sources in scap.toml)"
            );
        }
        check_rollout(&self.stages, &self.gates, self.force, members)
            .map_err(anyhow::Error::msg)?;
        if self.force && self.gates.is_empty() && self.stages.iter().any(|s| s.is_all()) {
            eprintln!(
                "{} --force: deploying to every host with NO health gate",
                clock()
            );
        }
        let interactive = std::io::stdin().is_terminal();
        let asks = self.stages.len() > 1 || (!self.gates.is_empty() && !self.force);
        if asks && !r.yes && !interactive && !r.dry_run {
            bail!(
                "stdin is not a terminal and this rollout would ask questions (stages or health gates): pass --yes to run it in batch mode"
            );
        }
        Ok(())
    }
}

pub fn sync(ctx: &Ctx, a: SyncArgs) -> anyhow::Result<i32> {
    if a.resume {
        return resume(ctx, &a);
    }
    if a.catch_up {
        return catch_up(ctx, &a);
    }
    let name = a.version.as_deref().expect("clap requires one of them");
    let version = resolve_exact(ctx, name)?;
    let members = a.fleet.members(ctx)?;
    let plan = a.rollout.plan(ctx)?;
    plan.check(&members, &a.rollout)?;
    let label = label_of(ctx, &version);
    let message = a.message.clone().unwrap_or_else(|| format!("sync {label}"));
    let _lock = deploy_lock(ctx, a.rollout.dry_run, Some(&message))?;
    let ann = announce_start(
        ctx,
        a.rollout.announce.as_deref(),
        "sync",
        &message,
        a.rollout.dry_run,
    )?;
    sync_version(
        ctx,
        &a.fleet,
        &a.rollout,
        SyncVersion {
            version,
            label,
            members,
            plan,
            announcer: &ann,
        },
    )
}

/// What [`sync_version`] deploys.
struct SyncVersion<'a> {
    version: VersionId,
    label: String,
    members: Vec<Member>,
    plan: Plan,
    announcer: &'a Announcer,
}

/// Records a new rollout of a version and runs it (the caller holds the
/// deploy lock and has announced the start).
fn sync_version(
    ctx: &Ctx,
    fleet: &FleetArgs,
    args: &RolloutArgs,
    s: SyncVersion<'_>,
) -> anyhow::Result<i32> {
    let SyncVersion {
        version,
        label,
        members,
        plan,
        announcer,
    } = s;
    let dir = fleet_state(ctx)?;
    let record = if args.dry_run {
        None
    } else {
        let (record, replaced) = RolloutRecord::start(
            &dir,
            version,
            &label,
            &plan.stages,
            plan.settings(),
            &crate::sys::user(),
            &command_line(),
        )
        .map_err(|e| failed_before(announcer, e.into()))?;
        if let Some(old) = replaced {
            eprintln!(
                "{} note: replacing the unfinished rollout of {} (stopped after {} of {} stages: {})",
                clock(),
                old.label,
                old.completed,
                old.stages.len(),
                old.note
            );
        }
        Some(record)
    };
    let goal = Goal::one(version);
    run_rollout(
        ctx,
        Run {
            fleet,
            members,
            args,
            plan,
            goal,
            label,
            record,
            first_stage: 0,
            resume: false,
            order_key: None,
            announcer,
        },
    )
}

#[derive(Args, Debug)]
pub struct SyncWorldArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Why (the SAL message), e.g. 'group0 to 1.46.0-wmf.7'
    message: Option<String>,
    /// A component to build, NAME=PATH (repeatable) [default: scap.toml's [[component]]s]
    #[arg(long = "component", value_name = "NAME=PATH")]
    components: Vec<String>,
    /// Exclude glob, added to scap.toml's (repeatable)
    #[arg(long)]
    exclude: Vec<String>,
    /// The train the version is labelled with [default: the newest branch
    /// wikiversions.json sends a wiki to]
    #[arg(long)]
    label: Option<String>,
    /// The deploy key that signs the version [default: scap.toml's sign_key]
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    #[command(flatten)]
    rollout: RolloutArgs,
}

/// `scap sync-world MESSAGE`: the train's one command. Announce; check
/// (php -l, JSON, wikiversions); run the build steps (cached by content);
/// build the version (signed, labelled with its train); deploy it by the
/// site's policy, restarts included; announce the end.
pub fn sync_world(ctx: &Ctx, a: SyncWorldArgs) -> anyhow::Result<i32> {
    let components = crate::config::components(&ctx.config, &a.components, &a.exclude)?;
    let steps = crate::world::steps::from_config(&ctx.config, &components)?;
    let checks = crate::world::Checks::from_config(&ctx.config);
    let store = ctx.open_for_build()?;
    let members = a.fleet.members(ctx)?;
    let plan = a.rollout.plan(ctx)?;
    plan.check(&members, &a.rollout)?;
    let message = a.message.clone().unwrap_or_else(|| "sync-world".into());
    let signer = if a.rollout.dry_run {
        None
    } else {
        ctx.signer(a.sign_key.as_deref())?
    };
    let _lock = deploy_lock(ctx, a.rollout.dry_run, Some(&message))?;
    let ann = announce_start(
        ctx,
        a.rollout.announce.as_deref(),
        "sync-world",
        &message,
        a.rollout.dry_run,
    )?;
    if a.rollout.dry_run {
        let component = components
            .iter()
            .find(|c| c.name.to_string() == checks.component)
            .ok_or_else(|| crate::world::WorldError::NoComponent(checks.component.clone()))?;
        let cache = crate::world::checks::LintCache::open(Some(&store.cache_dir()), &checks.php);
        let n = checks.world(&component.path, &cache)?;
        println!(
            "dry run: checks passed (php -l of {n} changed PHP file(s), JSON, wikiversions); the build steps, the build and the deploy were not run"
        );
        return Ok(exit::OK);
    }
    let world = crate::world::World {
        store: &store,
        components,
        checks,
        steps,
        label: a.label.clone(),
        message: message.clone(),
        author: crate::sys::user(),
        signer,
    };
    let prepared = crate::world::prepare(&world, &mut |line| eprintln!("{} {line}", clock()))
        .map_err(|e| failed_before(&ann, e.into()))?;
    eprintln!("{} {prepared}", clock());
    let version = prepared.version;
    let label = label_of(ctx, &version);
    sync_version(
        ctx,
        &a.fleet,
        &a.rollout,
        SyncVersion {
            version,
            label,
            members,
            plan,
            announcer: &ann,
        },
    )
}

/// Takes the deploy lock to continue the work of controller `pid` on
/// `host` (unless this is a dry run).
fn take_over_lock(
    ctx: &Ctx,
    dry_run: bool,
    pid: u32,
    host: &str,
) -> anyhow::Result<Option<lock::DeployLock>> {
    if dry_run {
        return Ok(None);
    }
    let dir = fleet_state(ctx)?;
    match locks(ctx)?.take_over(&command_line(), pid, host) {
        Ok((l, taken)) => {
            if taken {
                eprintln!(
                    "{} the controller of this rollout (pid {pid}) is gone: taking over its lock",
                    clock()
                );
            }
            Ok(Some(l))
        }
        Err(e) => Err(with_rollout(e, &dir)),
    }
}

/// `scap sync --resume` of a change whose controller died or stopped:
/// every host of its trains to the new versions, then the heads move.
fn resume_change(
    ctx: &Ctx,
    a: &SyncArgs,
    pending: crate::fleet::change::PendingChange,
) -> anyhow::Result<i32> {
    let interactive = std::io::stdin().is_terminal();
    if !a.rollout.yes && !interactive && !a.rollout.dry_run {
        bail!("stdin is not a terminal: pass --yes to resume in batch mode");
    }
    let _lock = take_over_lock(ctx, a.rollout.dry_run, pending.pid, &pending.host)?;
    let pending = crate::fleet::change::PendingChange::take_for_resume(
        &fleet_state(ctx)?,
        &pending.id,
        a.rollout.dry_run,
    )?;
    let store = ctx.open_deploy()?;
    let members = a.fleet.members(ctx)?;
    let mut plan = Plan::from_settings(&pending.stages, &pending.settings)?;
    plan.resume_sources(ctx, &a.rollout.sources)?;
    plan.restarts = a.rollout.restarts(ctx)?;
    let prepared = pending.prepared();
    eprintln!(
        "{} resuming change {} ({}), started by {} at {}: {}",
        clock(),
        pending.id,
        pending.message,
        pending.by,
        fmt_utc(pending.started),
        if pending.note.is_empty() {
            "its controller stopped"
        } else {
            &pending.note
        }
    );
    let ann = announce_start(
        ctx,
        a.rollout.announce.as_deref(),
        "sync --resume",
        &pending.message,
        a.rollout.dry_run,
    )?;
    roll_out_change(
        ctx, &a.fleet, &a.rollout, store, members, plan, &prepared, true, None, &ann,
    )
}

/// Rolls a built change out (or on, `resume`), then moves the trains'
/// heads if it succeeded everywhere, and prints the outcome.
#[allow(clippy::too_many_arguments)]
fn roll_out_change(
    ctx: &Ctx,
    fleet: &FleetArgs,
    args: &RolloutArgs,
    store: Store,
    members: Vec<Member>,
    plan: Plan,
    prepared: &crate::fleet::change::Prepared,
    resume: bool,
    key: Option<&std::path::Path>,
    announcer: &Announcer,
) -> anyhow::Result<i32> {
    let dir = fleet_state(ctx)?;
    let to_all = plan.stages.last().is_some_and(|s| s.is_all());
    let goal = Goal::Change {
        id: prepared.id.clone(),
        map: prepared.map.clone(),
        unchanged: prepared.unchanged(),
    };
    let (mut outcome, op, agents) = rollout(
        ctx,
        Run {
            fleet,
            members,
            args,
            plan,
            goal,
            label: format!("change {}", crate::text::clip(&prepared.message, 60)),
            record: None,
            first_stage: 0,
            resume,
            order_key: key,
            announcer,
        },
    )
    .map_err(|e| failed_before(announcer, e))
    .inspect_err(|_| {
        // A new change that never started: no host moved.
        if !args.dry_run && !resume {
            crate::fleet::change::PendingChange::remove(&dir);
        }
    })?;
    if !args.dry_run {
        // The trains' heads move only once the change is on every host
        // of them, gates passed.
        let by = crate::sys::user();
        for m in crate::fleet::change::conclude(
            &store,
            &dir,
            prepared,
            to_all,
            &mut outcome,
            &by,
            agents.orders(),
        ) {
            eprintln!("{} {m}", clock());
        }
    }
    print_outcome(
        args,
        &outcome,
        op,
        Some(serde_json::to_value(prepared)?),
        announcer,
    )
}

/// `scap sync --resume`.
fn resume(ctx: &Ctx, a: &SyncArgs) -> anyhow::Result<i32> {
    let dir = fleet_state(ctx)?;
    if let Some(pending) = crate::fleet::change::PendingChange::load(&dir)? {
        if a.version.is_some() {
            bail!(
                "--resume continues the change {} ({}) first: drop --version",
                pending.id,
                pending.message
            );
        }
        return resume_change(ctx, a, pending);
    }
    let Some(record) = RolloutRecord::load(&dir)? else {
        bail!(
            "no rollout to resume: none is recorded in {}; start one with `scap sync --version V`",
            dir.location(crate::fleet::state::Doc::Rollout)
        );
    };
    match record.state {
        RolloutState::RolledBack => bail!(
            "the rollout of {} was rolled back ({}): there is nothing to resume; start a new one with `scap sync --version V`",
            record.label,
            record.note
        ),
        RolloutState::Done => bail!(
            "the rollout of {} is finished (all {} stages done): there is nothing to resume",
            record.label,
            record.stages.len()
        ),
        _ if record.completed >= record.stages.len() => bail!(
            "the rollout of {} has no stage left: there is nothing to resume",
            record.label
        ),
        _ => {}
    }
    if let Some(v) = &a.version {
        let asked = resolve_version(ctx, v)?;
        if asked != record.version {
            bail!(
                "--resume continues the recorded rollout of {}, not {}: drop --version, or start a new rollout",
                record.label,
                asked.short()
            );
        }
    }
    let members = a.fleet.members(ctx)?;
    let mut plan = Plan::from_settings(&record.stages, &record.settings)?;
    plan.resume_sources(ctx, &a.rollout.sources)?;
    plan.restarts = a.rollout.restarts(ctx)?;
    let interactive = std::io::stdin().is_terminal();
    if !a.rollout.yes && !interactive && !a.rollout.dry_run {
        bail!("stdin is not a terminal: pass --yes to resume in batch mode");
    }
    // The controller that ran it may have died holding the lock: take it
    // over only if it is that controller's and it is gone (files: on this
    // host, its process gone; etcd: its lease expired, on any host).
    let _lock = take_over_lock(ctx, a.rollout.dry_run, record.pid, &record.host)?;
    let record = RolloutRecord::reload_for_resume(&dir, &record.id)?;
    eprintln!(
        "{} resuming the rollout of {} at stage {} of {} ({})",
        clock(),
        record.label,
        record.completed + 1,
        record.stages.len(),
        record.stages[record.completed]
    );
    let goal = Goal::one(record.version);
    let first = record.completed;
    let label = record.label.clone();
    let ann = announce_start(
        ctx,
        a.rollout.announce.as_deref(),
        "sync --resume",
        a.message.as_deref().unwrap_or(&format!("sync {label}")),
        a.rollout.dry_run,
    )?;
    run_rollout(
        ctx,
        Run {
            fleet: &a.fleet,
            members,
            args: &a.rollout,
            plan,
            goal,
            label,
            record: Some(record),
            first_stage: first,
            resume: true,
            order_key: None,
            announcer: &ann,
        },
    )
}

/// `scap sync --catch-up`.
fn catch_up(ctx: &Ctx, a: &SyncArgs) -> anyhow::Result<i32> {
    let members = a.fleet.members(ctx)?;
    let plan = a.rollout.plan(ctx)?;
    if plan.sources.is_empty() && !a.rollout.dry_run {
        bail!(
            "no source to fetch from: pass --source https://DEPLOY-HOST:8469 (or set sources in scap.toml)"
        );
    }
    let message = a
        .message
        .clone()
        .unwrap_or_else(|| "catch-up: hosts behind their target".into());
    let _lock = deploy_lock(ctx, a.rollout.dry_run, Some(&message))?;
    let ann = announce_start(
        ctx,
        a.rollout.announce.as_deref(),
        "sync --catch-up",
        &message,
        a.rollout.dry_run,
    )?;
    let agents = a.fleet.ordering_agents(ctx, a.rollout.dry_run, None)?;
    let dir = fleet_state(ctx)?;
    let desired = crate::fleet::desired::Desired::load(&dir)?;
    let store = Store::open(&ctx.store_path).ok();
    let signatures = desired
        .versions()
        .into_iter()
        .filter_map(|v| Some((v, store.as_ref()?.signature(&v).ok()??)))
        .collect();
    let rt = runtime()?;
    let interrupted = on_interrupt(&rt);
    let procedure = CatchUp {
        agents: &agents,
        members,
        sources: plan.sources,
        caches: ctx.caches()?,
        signatures,
        concurrency: plan.concurrency,
        dry_run: a.rollout.dry_run,
        by: crate::sys::user(),
        command: command_line(),
        state: dir,
        interrupted: &interrupted,
    };
    let mut op = CliOperator::batch();
    let outcome = rt
        .block_on(procedure.run(&mut op))
        .map_err(|e| failed_before(&ann, anyhow::Error::msg(e)))?;
    if a.rollout.json {
        print_json(&outcome)?;
    } else {
        report(&outcome.results)?;
        println!("{}", outcome.message);
    }
    said(ann.finish(outcome.ok, &outcome.message));
    Ok(exit::from(outcome.ok))
}

/// This fleet's locks: its deploy lock and held lock, and the global one.
fn locks(ctx: &Ctx) -> anyhow::Result<Locks> {
    Ok(Locks::new(
        &fleet_state(ctx)?,
        ctx.config.global_lock.as_deref(),
    ))
}

/// Takes the deploy lock (unless this is a dry run, which changes
/// nothing), refused while someone else holds a lock (`scap lock`).
fn deploy_lock(
    ctx: &Ctx,
    dry_run: bool,
    message: Option<&str>,
) -> anyhow::Result<Option<lock::DeployLock>> {
    if dry_run {
        return Ok(None);
    }
    let dir = fleet_state(ctx)?;
    let (l, own) = locks(ctx)?
        .acquire(&command_line(), message)
        .map_err(|e| with_rollout(e, &dir))?;
    if let Some(h) = own {
        eprintln!(
            "{} note: going ahead through your own lock ({h}); `scap lock --release{}` when done",
            clock(),
            if h.global { " --all" } else { "" }
        );
    }
    Ok(Some(l))
}

/// A lock error, with the rollout the holder runs (if one is recorded).
fn with_rollout(e: LockError, dir: &crate::fleet::state::DeployState) -> anyhow::Error {
    match RolloutRecord::load(dir) {
        Ok(Some(r)) if r.state == RolloutState::Running => anyhow::anyhow!(
            "{e}\n  rollout in progress: {} (stage {} of {}: {}), started by {} at {}",
            r.label,
            (r.completed + 1).min(r.stages.len()),
            r.stages.len(),
            r.next_stage().map(|s| s.to_string()).unwrap_or_default(),
            r.by,
            fmt_utc(r.started)
        ),
        _ => e.into(),
    }
}

/// What `run_rollout` runs.
struct Run<'a> {
    fleet: &'a FleetArgs,
    members: Vec<Member>,
    args: &'a RolloutArgs,
    plan: Plan,
    goal: Goal,
    label: String,
    record: Option<RolloutRecord>,
    first_stage: usize,
    /// `--resume`: the first stage's gates may not have run yet.
    resume: bool,
    /// The deploy key that signs the orders, if not scap.toml's.
    order_key: Option<&'a std::path::Path>,
    /// Says the end on IRC.
    announcer: &'a Announcer,
}

/// Runs a rollout and prints its outcome; the caller holds the deploy lock.
fn run_rollout(ctx: &Ctx, run: Run<'_>) -> anyhow::Result<i32> {
    let r = run.args;
    let announcer = run.announcer;
    let (outcome, op, _) = rollout(ctx, run).map_err(|e| failed_before(announcer, e))?;
    print_outcome(r, &outcome, op, None, announcer)
}

/// Runs a rollout; returns how it ended and what each host said.
fn rollout(ctx: &Ctx, run: Run<'_>) -> anyhow::Result<(Outcome, CliOperator, Agents)> {
    let Run {
        fleet: fleet_args,
        members,
        args: r,
        plan,
        goal,
        label,
        record,
        first_stage,
        resume,
        order_key,
        announcer: _,
    } = run;
    let agents = fleet_args
        .ordering_agents(ctx, r.dry_run, order_key)?
        .with_rollout(goal.rollout_id().or(record.as_ref().map(|r| r.id.as_str())));
    let rt = runtime()?;
    let interrupted = on_interrupt(&rt);
    let store = Store::open(&ctx.store_path).ok();
    let plan_restarts = plan.restarts.clone();
    let signatures = goal
        .versions()
        .into_iter()
        .filter_map(|v| Some((v, store.as_ref()?.signature(&v).ok()??)))
        .collect();
    let rollout = Rollout {
        agents: &agents,
        members,
        goal,
        label,
        signatures,
        sources: plan.sources,
        stages: plan.stages,
        gates: plan.gates,
        force: plan.force,
        wait: plan.wait,
        budget: plan.budget,
        dry_run: r.dry_run,
        concurrency: plan.concurrency,
        by: crate::sys::user(),
        command: command_line(),
        state: fleet_state(ctx)?,
        interrupted: &interrupted,
        record: std::sync::Mutex::new(record),
        resume,
        pools: fleet_args.pool_fleet(ctx)?,
        restarts: plan_restarts,
        measured: std::sync::Mutex::new(Vec::new()),
        caches: ctx.caches()?,
        stage_ahead: !r.no_stage,
        served: Default::default(),
        trains: trains(ctx),
    };
    let mut op = CliOperator {
        yes: r.yes,
        line: None,
        results: Vec::new(),
    };
    let outcome = rt.block_on(rollout.run(&mut op, first_stage));
    if let Some(l) = op.line.take() {
        l.finish();
    }
    Ok((outcome, op, agents))
}

/// Prints a rollout's outcome (the last line says what the fleet now runs
/// compared with what was asked), announces it, and returns the exit code:
/// non-zero whenever the hosts asked for did not end on the version asked
/// for.
fn print_outcome(
    r: &RolloutArgs,
    outcome: &Outcome,
    op: CliOperator,
    extra: Option<serde_json::Value>,
    announcer: &Announcer,
) -> anyhow::Result<i32> {
    if r.json {
        let mut out = serde_json::json!({ "outcome": outcome, "hosts": op.results });
        if let Some(extra) = extra {
            out["change"] = extra;
        }
        print_json(&out)?;
    } else {
        report(&op.results)?;
        println!("{}", outcome.message);
    }
    said(announcer.finish(outcome.ok, &outcome.message));
    Ok(exit::from(outcome.ok))
}

struct CliOperator {
    yes: bool,
    line: Option<ProgressLine>,
    results: Vec<HostResult<HostOutcome>>,
}

impl CliOperator {
    fn batch() -> CliOperator {
        CliOperator {
            yes: true,
            line: None,
            results: Vec::new(),
        }
    }
}

impl CliOperator {
    fn ask(&mut self, question: &str) -> String {
        eprint!("{} {question} ", clock());
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        answer.trim().to_lowercase()
    }
}

impl Operator for CliOperator {
    fn say(&mut self, line: &str) {
        eprintln!("{} {line}", clock());
    }

    fn step_started(&mut self, stage: &str, hosts: usize) {
        let name = if stage == "rollback" {
            "rollback".to_string()
        } else {
            eprintln!("{} Started sync {stage}", clock());
            format!("sync-{stage}")
        };
        self.line = Some(ProgressLine::new(&name, hosts));
    }

    fn host_done(&mut self, result: &HostResult<HostOutcome>) {
        if let Some(l) = &self.line {
            l.done(result.ok());
        }
        self.results.push(result.clone());
    }

    fn step_done(&mut self, _stage: &str, _ok: usize, _failed: usize) {
        if let Some(l) = self.line.take() {
            l.finish();
        }
    }

    fn confirm(&mut self, question: &str) -> bool {
        if self.yes {
            return true;
        }
        matches!(self.ask(question).as_str(), "y" | "yes")
    }

    fn gate_failed(&mut self, _failures: &[String]) -> GateChoice {
        if self.yes {
            return GateChoice::Rollback;
        }
        loop {
            match self
                .ask("health gate failed: [r]etry, [i]gnore, roll [b]ack this command's hosts, or [e]xit?")
                .as_str()
            {
                "r" | "retry" => return GateChoice::Retry,
                "i" | "ignore" => return GateChoice::Ignore,
                "b" | "rollback" => return GateChoice::Rollback,
                "e" | "exit" | "" => return GateChoice::Exit,
                _ => continue,
            }
        }
    }
}

#[derive(Args, Debug)]
pub struct SyncFileArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Path to take from staging, relative to the component, e.g. wmf-config/InitialiseSettings.php
    path: String,
    /// Why (the SAL message), e.g. 'SWAT: [[gerrit:12345|Fix a notice]]'; or -m
    message: Option<String>,
    /// Why, as scap takes it
    #[arg(
        long = "message",
        short = 'm',
        value_name = "MESSAGE",
        conflicts_with = "message"
    )]
    message_flag: Option<String>,
    /// Component it belongs to (scap.toml or --staging names its staging dir)
    #[arg(long, default_value = "mediawiki")]
    component: String,
    /// The component's staging directory [default: from scap.toml]
    #[arg(long, value_name = "DIR")]
    staging: Option<PathBuf>,
    /// Allow a path that no live version has yet (a new file or directory)
    #[arg(long)]
    create: bool,
    /// The deploy key that signs the new versions [default: scap.toml's sign_key]
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    #[command(flatten)]
    rollout: RolloutArgs,
}

/// `scap sync-file` (`kind` File) and `scap sync-dir` (Dir): the path from
/// staging applied to every live train, then rolled out so that each host
/// moves to the new version of the train it runs.
pub fn sync_change(ctx: &Ctx, a: SyncFileArgs, kind: Kind) -> anyhow::Result<i32> {
    let store = ctx.open_for_build()?;
    let members = a.fleet.members(ctx)?;
    let plan = a.rollout.plan(ctx)?;
    plan.check(&members, &a.rollout)?;
    if let Some(p) = crate::fleet::change::PendingChange::load(&fleet_state(ctx)?)?
        && !a.rollout.dry_run
    {
        bail!(
            "change {} ({}) by {} is not finished ({}): `scap sync --resume` finishes it, or `scap rollback` undoes it, before another change",
            p.id,
            p.message,
            p.by,
            if p.note.is_empty() {
                "its controller stopped"
            } else {
                &p.note
            }
        );
    }
    let what = match kind {
        Kind::File => "sync-file",
        Kind::Dir => "sync-dir",
    };
    let message = a
        .message
        .clone()
        .or(a.message_flag.clone())
        .unwrap_or_else(|| format!("{what} {}/{}", a.component, a.path));
    // Before building: another deploy must not see (or gc) a half-made change.
    let _lock = deploy_lock(ctx, a.rollout.dry_run, Some(&message))?;
    let signer = if a.rollout.dry_run {
        None
    } else {
        ctx.signer(a.sign_key.as_deref())?
    };
    let cfg_component = ctx.config.components.iter().find(|c| c.name == a.component);
    let staging = match (&a.staging, cfg_component) {
        (Some(s), _) => s.clone(),
        (None, Some(c)) => c.path.clone(),
        (None, None) => bail!(
            "no staging directory for component {:?}: pass --staging DIR or add a [[component]] to scap.toml",
            a.component
        ),
    };
    let component = crate::config::components(
        &ctx.config,
        &[format!("{}={}", a.component, staging.display())],
        &[],
    )?
    .into_iter()
    .find(|c| c.name.to_string() == a.component)
    .expect("the flag names it");
    // Checked before anything is built: php -l, JSON, wikiversions.
    let checks = crate::world::Checks::from_config(&ctx.config);
    let trains_now = trains(ctx);
    let check_trains = checks.for_change(&store, &component, &a.path, &trains_now)?;
    let ann = announce_start(
        ctx,
        a.rollout.announce.as_deref(),
        what,
        &message,
        a.rollout.dry_run,
    )?;

    let agents = a.fleet.agents(ctx)?;
    let dir = fleet_state(ctx)?;
    let id = change::new_id(&message, &a.path);
    let by = crate::sys::user();
    let mut op = CliOperator::batch();
    let prepared = runtime()?
        .block_on(crate::fleet::change::build(
            &store,
            &agents,
            &members,
            &dir,
            ChangeSpec {
                id: id.clone(),
                bases: Vec::new(),
                component: &component,
                path: &a.path,
                kind,
                create: a.create,
                message: message.clone(),
                author: by.clone(),
                signer: signer.as_deref(),
                dry_run: a.rollout.dry_run,
                check: check_trains.as_deref(),
            },
            &mut op,
            &super::bar::Bar::default(),
        ))
        .map_err(|e| failed_before(&ann, e.into()))?;
    print_change(&prepared, a.rollout.dry_run, &a.path);
    if prepared.map.is_empty() {
        if a.rollout.json {
            print_json(&serde_json::json!({ "change": prepared, "outcome": null }))?;
        }
        println!(
            "{} is the same in staging and in every live version it applies to: nothing to deploy",
            a.path
        );
        said(ann.finish(
            true,
            "nothing to deploy: staging matches every live version",
        ));
        return Ok(exit::OK);
    }
    if !a.rollout.dry_run {
        eprintln!("{} change {id}: {message}", clock());
        // Recorded before the first host moves: a controller that dies
        // from here on leaves it for `scap sync --resume`.
        crate::fleet::change::PendingChange::begin(
            &dir,
            &prepared,
            &plan.stages,
            plan.settings(),
            &by,
            &command_line(),
        )
        .map_err(|e| failed_before(&ann, e.into()))?;
    }
    roll_out_change(
        ctx,
        &a.fleet,
        &a.rollout,
        store,
        members,
        plan,
        &prepared,
        false,
        a.sign_key.as_deref(),
        &ann,
    )
}

/// Says, per live version, what the change makes of it and who moves.
fn print_change(p: &crate::fleet::change::Prepared, dry_run: bool, path: &str) {
    for st in &p.steps {
        let role = if st.hosts.is_empty() {
            "held as previous/stable, or a rollout's target".to_string()
        } else {
            format!(
                "{} host(s): {}",
                st.hosts.len(),
                crate::text::clip(&st.hosts.join(" "), 200)
            )
        };
        if let Some(why) = &st.skipped {
            eprintln!("{} left alone: {} ({why}; {role})", clock(), st.from_name);
        } else if st.from != st.to {
            eprintln!(
                "{} {} {} -> {}{}{} ({role})",
                clock(),
                if dry_run {
                    "dry run: would build"
                } else {
                    "built"
                },
                st.from_name,
                st.to.short(),
                if st.created {
                    ", creating the path"
                } else {
                    ""
                },
                if st.revert {
                    ", an earlier version's tree (a revert)"
                } else {
                    ""
                },
            );
            for f in &st.files {
                eprintln!("           {f}");
            }
        } else {
            eprintln!(
                "{} {path} is already the same in staging and in {} ({role})",
                clock(),
                st.from_name
            );
        }
    }
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Why (the SAL message), e.g. 'T12345: errors on group1'
    message: Option<String>,
    /// Where to: each host's previous version, its stable version's train (that
    /// train's head now), or a version (a train: its head; or an ID, exactly)
    #[arg(long, default_value = "previous")]
    to: String,
    /// Only hosts now on this version (a train: its head now; or an ID, exactly) [default: every host]
    #[arg(long)]
    version: Option<String>,
    /// Leave at most this share of traffic on --version (rolls back just enough hosts) [default: 0%]
    #[arg(long, value_name = "P%", requires = "version")]
    canary: Option<String>,
    /// Print which hosts would go back, from and to which version; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Batch mode: no question before rolling back
    #[arg(long, short = 'y')]
    yes: bool,
    /// The IRC/SAL relay, run with the start and end lines as $SCAP_ANNOUNCE
    /// [default: scap.toml's [announce] command]
    #[arg(long, value_name = "CMD")]
    announce: Option<String>,
    /// Hosts rolled back at once
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Where hosts fetch a version they no longer hold (the old train with a change
    /// made since) [default: scap.toml's sources]
    #[arg(long = "source", value_name = "URL")]
    sources: Vec<String>,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub fn rollback(ctx: &Ctx, a: RollbackArgs) -> anyhow::Result<i32> {
    let members = a.fleet.members(ctx)?;
    let agents = a.fleet.ordering_agents(ctx, a.dry_run, None)?;
    let version = a
        .version
        .as_deref()
        .map(|v| resolve_exact(ctx, v))
        .transpose()?;
    let to = match a.to.as_str() {
        "previous" => RollbackTarget::Previous,
        "stable" => RollbackTarget::Stable,
        v => RollbackTarget::Version(resolve_exact(ctx, v)?),
    };
    if !a.yes && !a.dry_run && !std::io::stdin().is_terminal() {
        bail!(
            "stdin is not a terminal and a rollback asks before it changes hosts: pass --yes to run it in batch mode (or --dry-run to see what it would do)"
        );
    }
    let keep = a
        .canary
        .as_deref()
        .map(Percent::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?
        .unwrap_or(Percent(0));
    let message = a
        .message
        .clone()
        .unwrap_or_else(|| format!("rollback to {}", a.to));
    let _lock = deploy_lock(ctx, a.dry_run, Some(&message))?;
    let ann = announce_start(ctx, a.announce.as_deref(), "rollback", &message, a.dry_run)?;
    let rt = runtime()?;
    let interrupted = on_interrupt(&rt);
    let procedure = Rollback {
        agents: &agents,
        members,
        to,
        version,
        keep,
        concurrency: a.concurrency,
        sources: ctx.sources(&a.sources)?,
        caches: ctx.caches()?,
        trains: trains(ctx),
        store: Store::open_deploy(&ctx.store_path).ok(),
        dry_run: a.dry_run,
        by: crate::sys::user(),
        command: command_line(),
        state: fleet_state(ctx)?,
        interrupted: &interrupted,
    };
    let mut op = CliOperator::batch();
    op.yes = a.yes;
    let outcome = rt.block_on(procedure.run(&mut op));
    if a.json {
        print_json(&outcome)?;
    } else {
        report(&outcome.results)?;
        println!("{}", outcome.message);
    }
    said(ann.finish(outcome.ok, &outcome.message));
    Ok(exit::from(outcome.ok))
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// The version that is on every host and becomes their stable version
    version: String,
    /// Why (the SAL message)
    message: Option<String>,
    /// The IRC/SAL relay [default: scap.toml's [announce] command]
    #[arg(long, value_name = "CMD")]
    announce: Option<String>,
    /// Hosts that may be down (they keep their old stable version): N or P%
    #[arg(long, default_value = "0")]
    max_failures: String,
}

pub fn promote(ctx: &Ctx, a: PromoteArgs) -> anyhow::Result<i32> {
    let members = a.fleet.members(ctx)?;
    let agents = a.fleet.agents(ctx)?;
    let version = resolve_version(ctx, &a.version)?;
    let budget = Budget::parse(&a.max_failures).map_err(anyhow::Error::msg)?;
    let message = a
        .message
        .clone()
        .unwrap_or_else(|| format!("promote {}", label_of(ctx, &version)));
    let _lock = deploy_lock(ctx, false, Some(&message))?;
    let ann = announce_start(ctx, a.announce.as_deref(), "promote", &message, false)?;
    let store = Store::open_deploy(&ctx.store_path).ok();
    let rt = runtime()?;
    let procedure = Promote {
        store: store.as_ref(),
        agents: &agents,
        members,
        version,
        label: label_of(ctx, &version),
        budget,
        by: crate::sys::user(),
        command: command_line(),
        state: fleet_state(ctx)?,
    };
    let outcome = rt
        .block_on(procedure.run(&mut CliOperator::batch()))
        .map_err(|e| failed_before(&ann, anyhow::Error::msg(e)))?;
    println!("{}", outcome.message);
    said(ann.finish(outcome.ok, &outcome.message));
    Ok(exit::from(outcome.ok))
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Highlight this version (label, ID, prefix)
    #[arg(long)]
    version: Option<String>,
    /// Print JSON
    #[arg(long)]
    json: bool,
    /// Poll every host from this command, not through `scap serve` (scap.toml's first
    /// `sources` entry), which keeps its connections to the agents
    #[arg(long)]
    direct: bool,
}

pub fn status(ctx: &Ctx, a: StatusArgs) -> anyhow::Result<i32> {
    let members = a.fleet.members(ctx)?;
    let agents = a.fleet.agents(ctx)?;
    let highlight = a
        .version
        .as_deref()
        .map(|v| resolve_version(ctx, v))
        .transpose()?;
    let serve = if a.direct {
        None
    } else {
        ctx.sources(&[])?
            .first()
            .map(|url| crate::fleet::inventory::host_of_url(url))
            .transpose()
            .map_err(anyhow::Error::msg)?
    };
    let rt = runtime()?;
    let (readings, polled_by) = rt.block_on(crate::fleet::poll::poll_fleet(
        &agents,
        serve.as_ref(),
        &members,
        64,
    ));
    if let crate::fleet::poll::PolledBy::Direct(Some(why)) = &polled_by {
        eprintln!("scap status: {why}; polled every host from here (--direct does so at once)");
    }
    let mut st = crate::fleet::status::fleet_status(
        &members,
        &readings,
        &trains(ctx),
        &fleet_state(ctx)?,
        &[],
    );
    // The global lock where scap.toml says it is.
    st["held"] = serde_json::to_value(locks(ctx)?.held().unwrap_or_default())?;
    st["polled_by"] = match &polled_by {
        crate::fleet::poll::PolledBy::Serve(at) => format!("scap serve at {at}"),
        crate::fleet::poll::PolledBy::Direct(_) => "this command".to_string(),
    }
    .into();
    if a.json {
        print_json(&st)?;
        return Ok(exit::OK);
    }
    let mut out = std::io::stdout().lock();
    let bar = |share: f64| {
        let n = (share / 5.0).round() as usize;
        format!("{}{}", "#".repeat(n.min(20)), ".".repeat(20 - n.min(20)))
    };
    writeln!(
        out,
        "fleet: {} hosts, traffic weight {}",
        members.len(),
        st["total_weight"]
    )?;
    for v in st["versions"].as_array().into_iter().flatten() {
        let id = v["version"].as_str().unwrap_or("");
        let mut tags = Vec::new();
        if v["stable"] == true {
            tags.push("stable");
        }
        if highlight.map(|h| h.to_hex()) == Some(id.to_string()) {
            tags.push("<-- this one");
        }
        let per_cluster = v["clusters"]
            .as_object()
            .filter(|c| c.len() > 1)
            .map(|c| {
                let parts: Vec<String> = c
                    .iter()
                    .map(|(name, share)| format!("{name} {:.1}%", share.as_f64().unwrap_or(0.0)))
                    .collect();
                format!("  [{}]", parts.join(", "))
            })
            .unwrap_or_default();
        writeln!(
            out,
            "  {} {:>6.1}%  {:>4} hosts  {} {}{per_cluster}",
            bar(v["share"].as_f64().unwrap_or(0.0)),
            v["share"].as_f64().unwrap_or(0.0),
            v["hosts"].as_array().map_or(0, Vec::len),
            v["label"].as_str().unwrap_or(""),
            tags.join(" ")
        )?;
    }
    let down = &st["unreachable"];
    if down["weight"].as_u64().unwrap_or(0) > 0 {
        writeln!(
            out,
            "  {} {:>6.1}%  {:>4} hosts  UNREACHABLE",
            bar(down["share"].as_f64().unwrap_or(0.0)),
            down["share"].as_f64().unwrap_or(0.0),
            down["hosts"].as_array().map_or(0, Vec::len)
        )?;
    }
    if let Some(v) = highlight
        && !st["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["version"] == v.to_hex())
    {
        writeln!(out, "  {} is on no host", v.short())?;
    }
    writeln!(out)?;
    for h in st["hosts"].as_array().into_iter().flatten() {
        let name = h["host"].as_str().unwrap_or("");
        if h["reachable"] == true {
            let short = |v: &serde_json::Value| {
                v.as_str()
                    .and_then(|s| s.parse::<VersionId>().ok())
                    .map_or_else(|| "-".to_string(), |v| v.short())
            };
            let named = |k: &str| {
                h[format!("{k}_name")]
                    .as_str()
                    .map_or_else(|| short(&h[k]), str::to_string)
            };
            let (cur, stable) = (named("current"), named("stable"));
            let since = h["since"].as_u64().map(fmt_utc).unwrap_or_default();
            let mut note = String::new();
            if h["busy"] == true {
                note.push_str(" busy");
            }
            if h["behind"] == true {
                note.push_str(&format!(" BEHIND: target {}", short(&h["target"])));
            }
            match h["pooled"].as_str() {
                Some("yes") => note.push_str(" pooled"),
                Some(p) => note.push_str(&format!(" DEPOOLED ({p})")),
                None => {}
            }
            if let Some(n) = h["drift"].as_u64().filter(|&n| n > 0) {
                note.push_str(&format!(
                    " DRIFT: {n} file(s) edited by hand (scap verify --live)"
                ));
            }
            if let Some(e) = h["last_error"].as_str() {
                note.push_str(&format!(
                    " last error: {}",
                    e.chars().take(80).collect::<String>()
                ));
            }
            writeln!(
                out,
                "  {name:<24} {cur}  stable {stable}  since {since}  w{}{note}",
                h["weight"]
            )?;
        } else {
            writeln!(
                out,
                "  {name:<24} UNREACHABLE: {}",
                h["error"].as_str().unwrap_or("")
            )?;
        }
    }
    if let Some(staged) = st["staged"].as_object().filter(|m| !m.is_empty()) {
        for (v, n) in staged {
            let short = v.get(..12).unwrap_or(v);
            writeln!(out, "  staged (prepared, not live): {short} on {n} host(s)")?;
        }
    }
    if let Some(src) = st["sources_last_rollout"]
        .as_object()
        .filter(|m| !m.is_empty())
    {
        let parts: Vec<String> = src
            .iter()
            .map(|(s, n)| format!("{s} {}", crate::time::fmt_bytes(n.as_u64().unwrap_or(0))))
            .collect();
        writeln!(out, "  served in the last rollout: {}", parts.join(", "))?;
    }
    for line in st["standbys"].as_array().into_iter().flatten() {
        if let Some(text) = line["summary"].as_str() {
            writeln!(out, "{text}")?;
        }
    }
    let behind = st["behind"].as_array().cloned().unwrap_or_default();
    if !behind.is_empty() {
        writeln!(
            out,
            "\n{} host(s) behind their target (`scap sync --catch-up`, or they catch up when their agent restarts):",
            behind.len()
        )?;
        let short = |v: &serde_json::Value| {
            v.as_str()
                .and_then(|s| s.parse::<VersionId>().ok())
                .map_or_else(|| "-".to_string(), |v| v.short())
        };
        for b in &behind {
            let named = |k: &str| {
                b[format!("{k}_name")]
                    .as_str()
                    .map_or_else(|| short(&b[k]), str::to_string)
            };
            writeln!(
                out,
                "  {:<24} runs {}, target {}",
                b["host"].as_str().unwrap_or(""),
                named("current"),
                named("target")
            )?;
        }
    }
    if let Some(r) = st["rollout"].as_object() {
        let stages: Vec<&str> = r["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str())
            .collect();
        let done = r["completed"].as_u64().unwrap_or(0) as usize;
        let state = r["state"].as_str().unwrap_or("");
        let mut line = format!(
            "\nrollout {}: {} [{}] {} of {} stages done ({})",
            r["id"].as_str().unwrap_or(""),
            r["label"].as_str().unwrap_or(""),
            state,
            done,
            stages.len(),
            stages
                .iter()
                .enumerate()
                .map(|(i, s)| if i < done {
                    format!("{s} done")
                } else {
                    s.to_string()
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(next) = r["next"].as_str()
            && matches!(state, "running" | "stopped")
        {
            line.push_str(&format!("; next: {next}"));
            match r["next_due"].as_u64() {
                Some(t) => line.push_str(&format!(" due {}", fmt_utc(t))),
                None if state == "stopped" => line.push_str(" (`scap sync --resume`)"),
                None => {}
            }
        }
        writeln!(out, "{line}")?;
        if let Some(n) = r["note"].as_str().filter(|n| !n.is_empty()) {
            writeln!(out, "  {n}")?;
        }
    }
    for h in st["held"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "\nLOCKED by {} since {}: {}{}",
            h["user"].as_str().unwrap_or(""),
            fmt_utc(h["time"].as_u64().unwrap_or(0)),
            h["message"].as_str().unwrap_or(""),
            if h["global"] == true {
                " (every deploy on this host: scap lock --all)"
            } else {
                " (scap lock)"
            }
        )?;
    }
    if let Some(l) = st["lock"].as_object() {
        writeln!(
            out,
            "\ndeploy in progress: {} ({} on {}, pid {})",
            l.get("command").and_then(|c| c.as_str()).unwrap_or(""),
            l.get("user").and_then(|c| c.as_str()).unwrap_or(""),
            l.get("host").and_then(|c| c.as_str()).unwrap_or(""),
            l.get("pid").and_then(|c| c.as_u64()).unwrap_or(0)
        )?;
    }
    if let Some(where_) = st["state"].as_str().filter(|s| s.starts_with("etcd")) {
        writeln!(out, "\ndeploy state: {where_}")?;
    }
    if let Some(d) = st["last_deploy"].as_object() {
        writeln!(
            out,
            "\nlast: {} {} by {}: {}",
            fmt_utc(d.get("time").and_then(|t| t.as_u64()).unwrap_or(0)),
            d.get("action").and_then(|t| t.as_str()).unwrap_or(""),
            d.get("user").and_then(|t| t.as_str()).unwrap_or(""),
            d.get("message").and_then(|t| t.as_str()).unwrap_or("")
        )?;
    }
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Show at most this many entries (newest first)
    #[arg(long, short = 'n', default_value_t = 20)]
    max_count: usize,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub fn history_cmd(ctx: &Ctx, a: HistoryArgs) -> anyhow::Result<i32> {
    let state = fleet_state(ctx)?;
    let mut entries = history::recent(&state, a.max_count)
        .with_context(|| format!("reading the deploy history ({})", state.describe()))?;
    entries.reverse();
    let trains = trains(ctx);
    if a.json {
        print_json(&history::named(&entries, &trains))?;
        return Ok(exit::OK);
    }
    let mut out = std::io::stdout().lock();
    for e in &entries {
        writeln!(
            out,
            "{} {:<8} {:<10} {} {} {}: {}",
            fmt_utc(e.time),
            e.action,
            e.user,
            if e.ok { "ok  " } else { "FAIL" },
            match (&e.version, &e.change) {
                (Some(v), _) => trains.name(v).to_string(),
                (None, Some(c)) => c.clone(),
                (None, None) => "-".into(),
            },
            e.target.as_deref().unwrap_or(""),
            e.message
        )?;
    }
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct StageArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// The version to stage: a train (its head now), or exactly the version an ID or
    /// ID prefix names
    #[arg(long)]
    version: String,
    /// The deploy host(s) [default: scap.toml's sources]; caches come from scap.toml's [caches]
    #[arg(long = "source", value_name = "URL")]
    sources: Vec<String>,
    /// Hosts staging at once
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// `scap stage --version V`: every host that lacks V fetches it and
/// prepares its release, without switching; a rollout of V is then only
/// switches (and a rollback to what hosts ran, too).
pub fn stage(ctx: &Ctx, a: StageArgs) -> anyhow::Result<i32> {
    let version = resolve_exact(ctx, &a.version)?;
    let members = a.fleet.members(ctx)?;
    let sources = ctx.sources(&a.sources)?;
    if sources.is_empty() && ctx.config.caches.is_empty() {
        bail!(
            "no source to fetch from: pass --source https://DEPLOY-HOST:8469 (or set sources in scap.toml)"
        );
    }
    let agents = a.fleet.ordering_agents(ctx, false, None)?;
    let rt = runtime()?;
    let interrupted = on_interrupt(&rt);
    let procedure = crate::fleet::stage::Staging {
        agents: &agents,
        members,
        version,
        signature: Store::open(&ctx.store_path)
            .ok()
            .and_then(|s| s.signature(&version).ok().flatten()),
        sources,
        caches: ctx.caches()?,
        concurrency: a.concurrency,
        by: crate::sys::user(),
        interrupted: &interrupted,
    };
    let mut op = CliOperator::batch();
    let outcome = rt.block_on(procedure.run(&mut op));
    if a.json {
        print_json(&outcome.results)?;
    } else {
        report(&outcome.results)?;
        let failed = outcome.results.iter().filter(|r| !r.ok()).count();
        println!(
            "{} staged on {} host(s){}{}",
            label_of(ctx, &version),
            outcome.results.len() - failed,
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            },
            if outcome.unreachable.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} did not answer: {}",
                    outcome.unreachable.len(),
                    crate::text::clip(&outcome.unreachable.join(" "), 200)
                )
            }
        );
    }
    Ok(exit::from(outcome.ok))
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// The agent's local socket (root only) [default: /var/lib/scap/agent.sock]
    #[arg(long, value_name = "PATH", conflicts_with = "agent")]
    socket: Option<PathBuf>,
    /// Ask the agent at HOST:PORT over the network instead (needs a deployer's
    /// certificate, like a sync)
    #[arg(long, value_name = "HOST:PORT", value_parser = crate::fleet::inventory::parse_host)]
    agent: Option<Host>,
    /// Seconds to wait for the sync
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// `scap pull`, run on a host as root: its agent asks the deploy host what
/// it should run, and goes there (through the agent's local socket; the
/// agent records the local user as who asked).
pub fn pull(ctx: &Ctx, a: PullArgs) -> anyhow::Result<i32> {
    let timeout = Duration::from_secs(a.timeout);
    let rt = runtime()?;
    let o = match &a.agent {
        None => {
            let socket = a.socket.clone().unwrap_or_else(|| {
                PathBuf::from(super::ctx::DEFAULT_AGENT_DIR).join(super::ctx::AGENT_SOCKET)
            });
            rt.block_on(crate::net::local::pull(&socket, timeout))
                .map_err(anyhow::Error::msg)?
        }
        Some(host) => {
            let agents = Agents::new(ctx.transport()?, timeout)?;
            rt.block_on(agents.pull(host, &crate::sys::user()))
                .map_err(anyhow::Error::new)?
        }
    };
    if a.json {
        print_json(&o)?;
    } else {
        println!("{}: {}", o.host, o.message);
    }
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct LockArgs {
    /// Why: hold a lock that refuses everyone else's deploys (naming you and
    /// this) until `scap lock --release`
    message: Option<String>,
    /// Every deploy on this deploy host, whatever its store (the global lock)
    #[arg(long)]
    all: bool,
    /// Release your held lock (with --all: the global one)
    #[arg(long, conflicts_with_all = ["message", "break_it"])]
    release: bool,
    /// With --release: release someone else's lock
    #[arg(long, requires = "release")]
    force: bool,
    /// Remove the deploy lock of a running command, whoever holds it (after making
    /// sure that deploy is over)
    #[arg(long = "break", conflicts_with = "message")]
    break_it: bool,
    /// The IRC/SAL relay [default: scap.toml's [announce] command]
    #[arg(long, value_name = "CMD")]
    announce: Option<String>,
}

pub fn lock_cmd(ctx: &Ctx, a: LockArgs) -> anyhow::Result<i32> {
    let dir = fleet_state(ctx)?;
    let locks = locks(ctx)?;
    if a.break_it {
        match lock::break_lock(&dir)? {
            Some(h) => println!("broke the lock of {h}"),
            None => println!("no deploy lock"),
        }
        return Ok(exit::OK);
    }
    let scope = if a.all {
        "every deploy on this host"
    } else {
        "this fleet's deploys"
    };
    if a.release {
        return match locks.release(a.all, a.force)? {
            Some(h) => {
                let held = crate::fleet::announce::duration(Duration::from_secs(
                    crate::time::unix_now().saturating_sub(h.time),
                ));
                let ann = announcer(ctx, a.announce.as_deref(), "lock", &h.message, false)?;
                said(ann.say(&format!(
                    "Released the scap lock on {scope}: {} (held {held} by {})",
                    h.message, h.user
                )));
                println!("released: {h} (held {held})");
                Ok(exit::OK)
            }
            None => {
                println!(
                    "no held lock on {scope}{}",
                    if a.all {
                        ""
                    } else {
                        " (--all for the global one)"
                    }
                );
                Ok(exit::OK)
            }
        };
    }
    if let Some(message) = &a.message {
        if message.trim().is_empty() {
            bail!(
                "give the lock a message: why others must not deploy, e.g. 'investigating T12345'"
            );
        }
        let h = locks.hold(message, a.all)?;
        let ann = announcer(ctx, a.announce.as_deref(), "lock", message, false)?;
        said(ann.say(&format!("Locked scap ({scope}): {message}")));
        println!(
            "locked {scope}: {h}; `scap lock --release{}` ends it",
            if a.all { " --all" } else { "" }
        );
        return Ok(exit::OK);
    }
    let mut any = false;
    for h in locks.held()? {
        any = true;
        println!(
            "held lock ({}): {h}",
            if h.global {
                "every deploy on this host, scap lock --all"
            } else {
                "scap lock"
            }
        );
    }
    match lock::holder_and_lease(&dir)? {
        Some((h, lease)) => {
            let alive = match (lease, h.alive()) {
                (Some(ttl), Some(false)) => format!(
                    "that process is gone: its lease in etcd expires within {ttl} s, then the lock is free"
                ),
                (Some(ttl), _) => format!("lease renewed, {ttl} s left"),
                (None, Some(true)) => "running".into(),
                (None, Some(false)) => {
                    "STALE: that process is gone; `scap lock --break` removes it".into()
                }
                (None, None) => "on another host".into(),
            };
            println!(
                "deploy lock: {h}{} [{alive}]",
                h.message
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            );
        }
        None if !any => println!("no deploy lock"),
        None => {}
    }
    Ok(exit::OK)
}
