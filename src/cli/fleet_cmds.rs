//! Fleet commands: sync (plain and canary), sync-file, rollback, promote,
//! status, history, lock.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::host_cmds::{ProgressLine, clock, report, resolve_version, runtime};
use super::store_cmds::Ctx;
use super::{exit, print_json};
use crate::fleet::agents::{Agents, HostResult};
use crate::fleet::deploy::{GateChoice, Operator, Rollout};
use crate::fleet::gates::Gates;
use crate::fleet::history;
use crate::fleet::inventory::{Member, fleet};
use crate::fleet::lock;
use crate::fleet::poll::poll;
use crate::fleet::promote::Promote;
use crate::fleet::rollback::Rollback;
use crate::fleet::rollout::{Budget, Percent};
use crate::host::proto::{Outcome as HostOutcome, RollbackTarget};
use crate::store::{Store, VersionId};
use crate::time::fmt_utc;

/// Which hosts, and how to reach them.
#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// dsh-style group file of hosts, one host[:port] a line (repeatable)
    #[arg(long = "hosts", value_name = "GROUPFILE")]
    hosts: Vec<PathBuf>,
    /// TOML inventory with per-host weights, dc, cluster, canary flags
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// dsh group file of canary hosts: chosen before all others (repeatable)
    #[arg(long = "canary-group", value_name = "GROUPFILE")]
    canary_groups: Vec<PathBuf>,
    /// Seconds to wait for one host's answer
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

impl FleetArgs {
    fn members(&self) -> anyhow::Result<Vec<Member>> {
        Ok(fleet(
            &self.hosts,
            self.inventory.as_deref(),
            &self.canary_groups,
        )?)
    }

    fn agents(&self, ctx: &Ctx) -> anyhow::Result<Agents> {
        let transport = ctx.transport()?;
        if let Some(w) = transport.warning("scap") {
            eprintln!("{w}");
        }
        Ok(Agents::new(transport, Duration::from_secs(self.timeout))?)
    }
}

/// Where the deploy lock and history live: beside the store.
fn fleet_dir(ctx: &Ctx) -> PathBuf {
    ctx.store_path.join("fleet")
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// Labels of a version in the local store, for display.
fn label_of(ctx: &Ctx, v: &VersionId) -> String {
    crate::fleet::status::label_of(&labels(ctx), v)
}

/// Sets a flag on Ctrl-C: the rollout stops starting hosts, lets the ones
/// in flight finish, releases the lock and reports.
fn on_interrupt(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    rt.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!(
                "\n{} Ctrl-C: finishing the hosts in flight, starting no more",
                clock()
            );
            f.store(true, Ordering::SeqCst);
        }
    });
    flag
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Version to deploy: label, ID, or ID prefix
    #[arg(long)]
    version: String,
    #[command(flatten)]
    rollout: RolloutArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RolloutArgs {
    /// Share of traffic to bring to the version (top-up: hosts already on it count) [default: 100%]
    #[arg(long, value_name = "P%", conflicts_with = "stages")]
    canary: Option<String>,
    /// Several steps in one command, e.g. 10,20,50,100
    #[arg(long, value_name = "P,P,...")]
    stages: Option<String>,
    /// URL of a `scap serve` (or cache) hosts fetch from (repeatable; tried in order)
    #[arg(long = "source", value_name = "URL")]
    sources: Vec<String>,
    /// Health probe after each step: URL template with {host} (name) or {addr} (agent host:port), e.g. http://{host}/wiki/Main_Page (repeatable)
    #[arg(long = "check-url", value_name = "URL")]
    check_urls: Vec<String>,
    /// HTTP status the probes must answer
    #[arg(long, default_value_t = 200)]
    check_status: u16,
    /// Health check command after each step; gets SCAP_VERSION, SCAP_HOSTS, SCAP_PERCENT (repeatable)
    #[arg(long = "check-cmd", value_name = "CMD")]
    check_cmds: Vec<String>,
    /// How long to wait before each step's health gates (scap's canary_wait_time): 20s, 2m, 0
    #[arg(long, default_value = "20s", value_parser = super::parse_duration)]
    wait: Duration,
    /// Hosts that may fail or be down before a step stops: N or P%
    #[arg(long, default_value = "0")]
    max_failures: String,
    /// Batch mode: no questions; a failing gate rolls back this command's hosts
    #[arg(long, short = 'y')]
    yes: bool,
    /// Skip the health gates (loudly)
    #[arg(long)]
    force: bool,
    /// Print which hosts would change and the resulting share; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Hosts synced at once
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    /// Command run with a one-line summary when done (the IRC/SAL hook); gets it as $SCAP_ANNOUNCE
    #[arg(long, value_name = "CMD")]
    announce: Option<String>,
    /// Print the result as JSON
    #[arg(long)]
    json: bool,
}

impl RolloutArgs {
    fn stages(&self) -> anyhow::Result<Vec<Percent>> {
        let list: Vec<Percent> = match (&self.stages, &self.canary) {
            (Some(s), _) => s
                .split(',')
                .map(|p| Percent::parse(p).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()?,
            (None, Some(c)) => {
                vec![Percent::parse(c).map_err(|e| anyhow::anyhow!("--canary: {e}"))?]
            }
            (None, None) => vec![Percent::ALL],
        };
        if list.windows(2).any(|w| w[0] >= w[1]) {
            bail!("--stages must rise, e.g. 10,20,50,100 (rollback is how a share goes down)");
        }
        Ok(list)
    }

    fn gates(&self) -> Gates {
        Gates {
            probes: self
                .check_urls
                .iter()
                .map(|u| (u.clone(), self.check_status))
                .collect(),
            commands: self.check_cmds.clone(),
        }
    }
}

pub fn sync(ctx: &Ctx, a: SyncArgs) -> anyhow::Result<i32> {
    let version = resolve_version(ctx, &a.version)?;
    let _lock = deploy_lock(ctx, a.rollout.dry_run)?;
    run_rollout(ctx, &a.fleet, &a.rollout, version)
}

/// Takes the deploy lock (unless this is a dry run, which changes nothing).
fn deploy_lock(ctx: &Ctx, dry_run: bool) -> anyhow::Result<Option<lock::DeployLock>> {
    if dry_run {
        return Ok(None);
    }
    Ok(Some(lock::acquire(&fleet_dir(ctx), &command_line())?))
}

/// Runs a rollout of `version`; the caller holds the deploy lock.
fn run_rollout(
    ctx: &Ctx,
    fleet_args: &FleetArgs,
    r: &RolloutArgs,
    version: VersionId,
) -> anyhow::Result<i32> {
    let members = fleet_args.members()?;
    let stages = r.stages()?;
    let budget = Budget::parse(&r.max_failures).map_err(anyhow::Error::msg)?;
    let sources = if r.sources.is_empty() {
        ctx.config.sources.clone()
    } else {
        r.sources.clone()
    };
    if sources.is_empty() && !r.dry_run {
        bail!(
            "no source to fetch from: pass --source http://DEPLOY-HOST:8469 (or set sources in scap.toml)"
        );
    }
    let gates = r.gates();
    let interactive = std::io::stdin().is_terminal();
    let asks = stages.len() > 1 || (!gates.is_empty() && !r.force);
    if asks && !r.yes && !interactive && !r.dry_run {
        bail!(
            "stdin is not a terminal and this rollout would ask questions (stages or health gates): pass --yes to run it in batch mode"
        );
    }
    let agents = fleet_args.agents(ctx)?;
    let rt = runtime()?;
    let interrupted = on_interrupt(&rt);
    let label = label_of(ctx, &version);
    let signature = Store::open(&ctx.store_path)
        .ok()
        .and_then(|s| s.signature(&version).ok().flatten());
    let rollout = Rollout {
        agents: &agents,
        members,
        version,
        signature,
        label: label.clone(),
        sources,
        stages,
        gates,
        force: r.force,
        wait: r.wait,
        budget,
        dry_run: r.dry_run,
        concurrency: r.concurrency,
        by: crate::sys::user(),
        command: command_line(),
        fleet_dir: fleet_dir(ctx),
        interrupted: &interrupted,
    };
    let mut op = CliOperator {
        yes: r.yes,
        line: None,
        results: Vec::new(),
    };
    let outcome = rt.block_on(rollout.run(&mut op));
    if let Some(l) = op.line.take() {
        l.finish();
    }
    if r.json {
        print_json(&serde_json::json!({ "outcome": outcome, "hosts": op.results }))?;
    } else {
        report(&op.results)?;
        println!("{}", outcome.message);
    }
    if let Some(cmd) = &r.announce {
        announce(cmd, &format!("{}: {}", crate::sys::user(), outcome.message));
    }
    Ok(exit::from(outcome.ok))
}

fn announce(cmd: &str, line: &str) {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("SCAP_ANNOUNCE", line)
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("scap: warning: announce command {cmd:?} failed");
    }
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
    /// File (or symlink) to take from staging, relative to the component
    path: String,
    /// Component it belongs to (scap.toml or --component names its staging dir)
    #[arg(long, default_value = "mediawiki")]
    component: String,
    /// The component's staging directory [default: from scap.toml]
    #[arg(long, value_name = "DIR")]
    staging: Option<PathBuf>,
    /// Version to start from [default: the newest recorded version]
    #[arg(long)]
    from: Option<String>,
    /// Why (the SAL message), e.g. 'Backport: [[gerrit:12345|Fix a notice]]'
    #[arg(long, short = 'm')]
    message: Option<String>,
    /// The deploy key that signs the new version [default: scap.toml's sign_key]
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    #[command(flatten)]
    rollout: RolloutArgs,
}

pub fn sync_file(ctx: &Ctx, a: SyncFileArgs) -> anyhow::Result<i32> {
    let store = ctx.open_deploy()?;
    // Before building: another deploy must not see (or gc) a half-made change.
    let _lock = deploy_lock(ctx, a.rollout.dry_run)?;
    let signer = ctx.signer(a.sign_key.as_deref())?;
    let base = match &a.from {
        Some(f) => store.resolve(f)?,
        None => store
            .records()?
            .first()
            .map(|r| r.version)
            .context("the store has no version yet: run build-manifest first")?,
    };
    let staging = match &a.staging {
        Some(s) => s.clone(),
        None => ctx
            .config
            .components
            .iter()
            .find(|c| c.name == a.component)
            .map(|c| c.path.clone())
            .with_context(|| format!("no staging directory for component {:?}: pass --staging or name it in scap.toml", a.component))?,
    };
    let (version, changed) = crate::manifest::patch::patch(
        &store,
        &crate::manifest::patch::Patch {
            base,
            component: &a.component,
            staging: &staging,
            path: &a.path,
            message: a.message.clone(),
            author: crate::sys::user(),
            signer: signer.as_deref(),
        },
    )?;
    if !changed {
        eprintln!(
            "{} {} is the same in staging and in {}: deploying {} as it is",
            clock(),
            a.path,
            base.short(),
            base.short()
        );
    } else {
        eprintln!(
            "{} built {} from {} with {} from staging",
            clock(),
            version,
            base.short(),
            a.path
        );
    }
    run_rollout(ctx, &a.fleet, &a.rollout, version)
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Where to: each host's previous or stable version, or a version (label, ID, prefix)
    #[arg(long, default_value = "previous")]
    to: String,
    /// Only hosts now on this version [default: every host]
    #[arg(long)]
    version: Option<String>,
    /// Leave at most this share of traffic on --version (rolls back just enough hosts) [default: 0%]
    #[arg(long, value_name = "P%", requires = "version")]
    canary: Option<String>,
    /// Hosts rolled back at once
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub fn rollback(ctx: &Ctx, a: RollbackArgs) -> anyhow::Result<i32> {
    let members = a.fleet.members()?;
    let agents = a.fleet.agents(ctx)?;
    let version = a
        .version
        .as_deref()
        .map(|v| resolve_version(ctx, v))
        .transpose()?;
    let to = match a.to.as_str() {
        "previous" => RollbackTarget::Previous,
        "stable" => RollbackTarget::Stable,
        v => RollbackTarget::Version(resolve_version(ctx, v)?),
    };
    let keep = a
        .canary
        .as_deref()
        .map(Percent::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?
        .unwrap_or(Percent(0));
    let _lock = lock::acquire(&fleet_dir(ctx), &command_line())?;
    let rt = runtime()?;
    let interrupted = on_interrupt(&rt);
    let procedure = Rollback {
        agents: &agents,
        members,
        to,
        version,
        keep,
        concurrency: a.concurrency,
        by: crate::sys::user(),
        command: command_line(),
        fleet_dir: fleet_dir(ctx),
        interrupted: &interrupted,
    };
    let mut op = CliOperator::batch();
    let outcome = rt.block_on(procedure.run(&mut op));
    if a.json {
        print_json(&outcome.results)?;
    } else {
        report(&outcome.results)?;
        println!("{}", outcome.message);
    }
    Ok(exit::from(outcome.ok))
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// The version that is on every host and becomes their stable version
    version: String,
    /// Hosts that may be down (they keep their old stable version): N or P%
    #[arg(long, default_value = "0")]
    max_failures: String,
}

pub fn promote(ctx: &Ctx, a: PromoteArgs) -> anyhow::Result<i32> {
    let members = a.fleet.members()?;
    let agents = a.fleet.agents(ctx)?;
    let version = resolve_version(ctx, &a.version)?;
    let budget = Budget::parse(&a.max_failures).map_err(anyhow::Error::msg)?;
    let _lock = lock::acquire(&fleet_dir(ctx), &command_line())?;
    let rt = runtime()?;
    let procedure = Promote {
        agents: &agents,
        members,
        version,
        label: label_of(ctx, &version),
        budget,
        by: crate::sys::user(),
        command: command_line(),
        fleet_dir: fleet_dir(ctx),
    };
    let outcome = rt
        .block_on(procedure.run(&mut CliOperator::batch()))
        .map_err(anyhow::Error::msg)?;
    println!("{}", outcome.message);
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
}

/// Labels by version, from the local store (empty without one).
fn labels(ctx: &Ctx) -> Vec<(String, VersionId)> {
    Store::open(&ctx.store_path)
        .and_then(|s| s.labels())
        .unwrap_or_default()
}

pub fn status(ctx: &Ctx, a: StatusArgs) -> anyhow::Result<i32> {
    let members = a.fleet.members()?;
    let agents = a.fleet.agents(ctx)?;
    let highlight = a
        .version
        .as_deref()
        .map(|v| resolve_version(ctx, v))
        .transpose()?;
    let rt = runtime()?;
    let readings = rt.block_on(poll(&agents, &members, 64));
    let st =
        crate::fleet::status::fleet_status(&members, &readings, &labels(ctx), &fleet_dir(ctx), &[]);
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
        writeln!(
            out,
            "  {} {:>6.1}%  {:>4} hosts  {} {}",
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
            let (cur, stable) = (short(&h["current"]), short(&h["stable"]));
            let since = h["since"].as_u64().map(fmt_utc).unwrap_or_default();
            let mut note = String::new();
            if h["busy"] == true {
                note.push_str(" busy");
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
    if let Some(l) = st["lock"].as_object() {
        writeln!(
            out,
            "\ndeploy in progress: {} ({})",
            l.get("command").and_then(|c| c.as_str()).unwrap_or(""),
            l.get("user").and_then(|c| c.as_str()).unwrap_or("")
        )?;
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
    let mut entries = history::read(&fleet_dir(ctx))
        .with_context(|| format!("reading {}", history::path(&fleet_dir(ctx)).display()))?;
    entries.reverse();
    entries.truncate(a.max_count);
    if a.json {
        print_json(&entries)?;
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
            e.version.map(|v| v.short()).unwrap_or_else(|| "-".into()),
            e.target.as_deref().unwrap_or(""),
            e.message
        )?;
    }
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct LockArgs {
    /// Remove the lock, whoever holds it (after making sure that deploy is over)
    #[arg(long = "break")]
    break_it: bool,
}

pub fn lock_cmd(ctx: &Ctx, a: LockArgs) -> anyhow::Result<i32> {
    let dir = fleet_dir(ctx);
    if a.break_it {
        match lock::break_lock(&dir)? {
            Some(h) => println!("broke the lock of {h}"),
            None => println!("no deploy lock"),
        }
        return Ok(exit::OK);
    }
    match lock::holder(&dir)? {
        Some(h) => {
            let alive = match h.alive() {
                Some(true) => "running",
                Some(false) => "STALE: that process is gone; `scap lock --break` removes it",
                None => "on another host",
            };
            println!("{h} [{alive}]");
        }
        None => println!("no deploy lock"),
    }
    Ok(exit::OK)
}
