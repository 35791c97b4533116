//! The command line: parse flags (clap), turn them into validated settings,
//! call one library function, print. No deploy logic lives here.

mod bar;
mod ctx;
mod demo;
mod fleet_args;
pub(crate) mod fleet_cmds;
mod generate;
mod host_cmds;
mod keys;
mod output;
mod store_cmds;

pub use ctx::{DEFAULT_AGENT_DIR, DEFAULT_STORE, TransportArgs};
pub use output::{NotFound, exit, parse_duration, print_json};

use std::io::{self};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "scap",
    version,
    about = "Content-addressed MediaWiki deploys: versions are Merkle roots, hosts know what they run",
    after_help = "Start with: scap build-manifest, scap diff A B, scap ls VERSION. See the README for the demo on a generated tree."
)]
pub struct Cli {
    /// Store directory [default: scap.toml's `store`, else /srv/deployment/scap/store]
    #[arg(long, global = true, env = "SCAP_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Config file [default: ./scap.toml if present, else /etc/scap/scap.toml if present]
    #[arg(long, global = true, env = "SCAP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Hash staging trees into the store; print the version ID (last line)
    BuildManifest(store_cmds::BuildArgs),
    /// Show what changed between two versions (git --name-status style)
    Diff(store_cmds::DiffArgs),
    /// List a directory of a version
    Ls(store_cmds::LsArgs),
    /// Print a file of a version
    Cat(store_cmds::CatArgs),
    /// List version records, newest first
    Log(store_cmds::LogArgs),
    /// Print the full version ID of a label or ID prefix
    Resolve(store_cmds::ResolveArgs),
    /// Attach a label to a version (labels are kept by gc)
    Label(store_cmds::LabelArgs),
    /// Keep a version through gc without labelling it
    Pin(store_cmds::PinArgs),
    /// Undo `scap pin`
    Unpin(store_cmds::PinArgs),
    /// Re-hash every object reachable from versions; report each bad one
    Verify(store_cmds::VerifyArgs),
    /// Delete objects no kept version reaches
    Gc(store_cmds::GcArgs),
    /// Serve this store to hosts over HTTP
    Serve(host_cmds::ServeArgs),
    /// Run the host agent: fetch, release, switch, state file, HTTP API
    Agent(host_cmds::AgentArgs),
    /// Deploy a version to hosts: all, or --canary=P% of traffic, or --stages
    Sync(fleet_cmds::SyncArgs),
    /// The train's one command: announce, check (php -l, JSON, wikiversions), run the build steps, build, deploy by the site's policy, restart, announce the end
    SyncWorld(fleet_cmds::SyncWorldArgs),
    /// Take a file from staging into every live train (new versions), and deploy them
    SyncFile(fleet_cmds::SyncFileArgs),
    /// Take a directory from staging into every live train (new versions), and deploy them
    SyncDir(fleet_cmds::SyncFileArgs),
    /// Switch hosts back to their previous or stable version, or where a rollout took them from
    Rollback(fleet_cmds::RollbackArgs),
    /// Record a version that is on every host as their stable version
    Promote(fleet_cmds::PromoteArgs),
    /// The fleet at a glance: versions, traffic shares, hosts
    Status(fleet_cmds::StatusArgs),
    /// The deploy host's audit log of syncs, rollbacks and promotes
    History(fleet_cmds::HistoryArgs),
    /// Hold a lock with a message (`--all`: every deploy on this host) until --release; or show the locks
    Lock(fleet_cmds::LockArgs),
    /// On a host: ask the deploy host what this host should run, and go there
    Pull(fleet_cmds::PullArgs),
    /// Fetch and prepare a version on every host, without switching
    Stage(fleet_cmds::StageArgs),
    /// Make a deploy key (ed25519) that signs versions
    Keygen(keys::KeygenArgs),
    /// Sign existing versions with the deploy key
    Sign(keys::SignArgs),
    /// Certificates for a lab: `scap pki init DIR`
    Pki(keys::PkiArgs),
    /// Show this host's state file
    State(host_cmds::StateArgs),
    /// Man pages and shell completions, for packaging
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
    /// Run the built-in sample: build versions of a generated tree, diff them, roll one out to a local fleet
    Demo(demo::DemoArgs),
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return code;
        }
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SCAP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()));
    // Under systemd, stderr goes to the journal (`$JOURNAL_STREAM`), which
    // stamps each line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        subscriber.without_time().init();
    } else {
        subscriber.init();
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return exit::OK;
            }
            eprintln!("scap: error: {err}");
            // Our errors often quote their cause already; print the rest.
            let mut shown = err.to_string();
            for cause in err.chain().skip(1) {
                let text = cause.to_string();
                if !shown.contains(&text) {
                    eprintln!("  caused by: {text}");
                    shown.push_str(&text);
                }
            }
            error_code(&err)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let ctx = ctx::Ctx::new(cli.store, cli.config, cli.transport)?;
    match cli.command {
        Command::BuildManifest(a) => store_cmds::build_manifest(&ctx, a),
        Command::Diff(a) => store_cmds::diff(&ctx, a),
        Command::Ls(a) => store_cmds::ls(&ctx, a),
        Command::Cat(a) => store_cmds::cat(&ctx, a),
        Command::Log(a) => store_cmds::log(&ctx, a),
        Command::Resolve(a) => store_cmds::resolve(&ctx, a),
        Command::Label(a) => store_cmds::label(&ctx, a),
        Command::Pin(a) => store_cmds::pin(&ctx, a, true),
        Command::Unpin(a) => store_cmds::pin(&ctx, a, false),
        Command::Verify(a) if a.live => host_cmds::verify_live(&a.dir, a.json),
        Command::Verify(a) => store_cmds::verify(&ctx, a),
        Command::Gc(a) => store_cmds::gc(&ctx, a),
        Command::Serve(a) => host_cmds::serve(&ctx, a),
        Command::Agent(a) => host_cmds::agent(&ctx, a),
        Command::Sync(a) => fleet_cmds::sync(&ctx, a),
        Command::SyncWorld(a) => fleet_cmds::sync_world(&ctx, a),
        Command::SyncFile(a) => {
            fleet_cmds::sync_change(&ctx, a, crate::manifest::change::Kind::File)
        }
        Command::SyncDir(a) => fleet_cmds::sync_change(&ctx, a, crate::manifest::change::Kind::Dir),
        Command::Rollback(a) => fleet_cmds::rollback(&ctx, a),
        Command::Promote(a) => fleet_cmds::promote(&ctx, a),
        Command::Status(a) => fleet_cmds::status(&ctx, a),
        Command::History(a) => fleet_cmds::history_cmd(&ctx, a),
        Command::Lock(a) => fleet_cmds::lock_cmd(&ctx, a),
        Command::Pull(a) => fleet_cmds::pull(&ctx, a),
        Command::Stage(a) => fleet_cmds::stage(&ctx, a),
        Command::Keygen(a) => keys::keygen(a),
        Command::Sign(a) => keys::sign(&ctx, a),
        Command::Pki(a) => keys::pki(a),
        Command::State(a) => host_cmds::state(a),
        Command::Generate(a) => generate::generate(a),
        Command::Demo(a) => demo::demo(a),
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            || matches!(c.downcast_ref::<crate::store::StoreError>(),
                Some(crate::store::StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn error_code(err: &anyhow::Error) -> i32 {
    use crate::store::StoreError;
    for c in err.chain() {
        if let Some(
            StoreError::UnknownVersion(_) | StoreError::Ambiguous { .. } | StoreError::BadId(_),
        ) = c.downcast_ref::<StoreError>()
        {
            return exit::NOT_FOUND;
        }
        if c.downcast_ref::<NotFound>().is_some() {
            return exit::NOT_FOUND;
        }
    }
    exit::FAILURE
}
