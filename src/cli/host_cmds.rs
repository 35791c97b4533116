//! Commands that run services or talk to hosts: serve, agent, sync, state.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::ctx::{AGENT_SOCKET, Ctx, DEFAULT_AGENT_DIR};
use super::output::{exit, print_json, runtime};
use crate::host::{Agent, AgentConfig};
use crate::net::server;
use crate::net::tls::Transport;
use crate::proto::state::HostState;
use crate::store::Store;

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr}: is another scap (or anything) using that port?")
    })
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (TLS: hosts and the deploy host need a client certificate)
    #[arg(long, default_value = "127.0.0.1:8469")]
    listen: SocketAddr,
    /// Address of the read-only dashboard, its JSON API and /metrics (plain HTTP, no
    /// client certificate: keep it on loopback and reach it by an SSH tunnel or the
    /// site's authenticating proxy)
    #[arg(long, default_value = "127.0.0.1:8468")]
    dashboard_listen: SocketAddr,
    /// A name the dashboard may be reached by besides loopback, its address and this
    /// host's name (repeatable): the name an authenticating proxy sends as Host
    #[arg(long = "dashboard-name", value_name = "NAME")]
    dashboard_names: Vec<String>,
    /// Requests handled at once
    #[arg(long, default_value_t = server::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Hosts the dashboard shows: dsh group files (repeatable)
    #[arg(long = "hosts", value_name = "GROUPFILE")]
    hosts: Vec<PathBuf>,
    /// Hosts the dashboard shows, with weights: a TOML inventory
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    /// Seconds between two polls of every agent for the dashboard
    #[arg(long, default_value_t = 5)]
    poll_interval: u64,
    /// A name (in its certificate) of a client that may ask this server for a fresh
    /// poll of the fleet (`scap status`): the deploy hosts' (repeatable) [default:
    /// scap-deployer, the lab PKI's]
    #[arg(long = "deployer", value_name = "NAME")]
    deployers: Vec<String>,
    /// Cap on everything served, bytes per second: 100M, 1G (a train must not
    /// saturate the deploy host's link)
    #[arg(long, value_name = "RATE", value_parser = crate::net::ratelimit::parse_rate)]
    max_rate: Option<u64>,
    /// Append one line per request here: time, peer, method, path, status, length
    #[arg(long, value_name = "FILE")]
    access_log: Option<PathBuf>,
    /// When a new version is built, build its delta packs at once from this many
    /// versions hosts are likely to run (the one it was built on, those hosts last
    /// moved to), so that the first host of the deploy finds its pack ready; 0: build
    /// packs only when a host asks
    #[arg(long, value_name = "N", default_value_t = 2)]
    packs_ahead: usize,
    /// Delta packs one client (IP address) may have built on its requests per hour
    /// (packs already built are free); over it, it gets 429 and fetches objects
    #[arg(long, value_name = "N", default_value_t = 64)]
    pack_builds_per_client: u32,
    /// Bytes of delta packs one client may have built per hour: 32G, 500M
    #[arg(long, value_name = "SIZE", default_value = "32G", value_parser = crate::net::ratelimit::parse_rate)]
    pack_bytes_per_client: u64,
    /// Run as a standby deploy host: keep this store a copy of the primary's, whose
    /// object service is at URL (repeatable: tried in order), copying each new version
    /// (signature checked, objects verified) and the trains' heads
    #[arg(long = "follow", value_name = "URL")]
    follow: Vec<String>,
    /// With --follow: time between two looks at the primary
    #[arg(long, default_value = "1s", value_parser = super::parse_duration, requires = "follow")]
    follow_interval: Duration,
    /// With --follow: a deploy key's public half whose signature a copied version must
    /// carry (repeatable) [default: the public half of scap.toml's sign_key]
    #[arg(long = "trusted-key", value_name = "FILE", requires = "follow")]
    trusted_keys: Vec<PathBuf>,
    #[command(flatten)]
    conns: ConnArgs,
}

/// `--follow`'s settings, checked: the primary's URLs and whose
/// signatures a copied version must carry.
fn follow_config(
    ctx: &Ctx,
    a: &ServeArgs,
) -> anyhow::Result<Option<crate::fleet::standby::FollowConfig>> {
    if a.follow.is_empty() {
        return Ok(None);
    }
    let primaries = ctx
        .sources(&a.follow)
        .map_err(|e| anyhow::anyhow!("--follow: {e}"))?;
    let keys = if a.trusted_keys.is_empty() {
        let Some(key) = &ctx.config.sign_key else {
            bail!(
                "--follow: give --trusted-key FILE (the deploy key's public half), or sign_key in scap.toml: a standby copies only signed versions"
            );
        };
        vec![
            crate::store::signature::SigningKey::load(key)?
                .public
                .clone(),
        ]
    } else {
        a.trusted_keys
            .iter()
            .map(|p| crate::store::signature::PublicKey::load(p))
            .collect::<Result<_, _>>()?
    };
    Ok(Some(crate::fleet::standby::FollowConfig {
        primaries,
        interval: a.follow_interval.max(Duration::from_millis(100)),
        trust: crate::store::signature::Trust {
            keys,
            revoked: Vec::new(),
        },
        host: crate::sys::hostname(),
    }))
}

/// How a server treats its connections (`scap serve`, `scap agent`).
#[derive(Args, Debug)]
pub struct ConnArgs {
    /// Close a connection with no request in flight after this long (also the time a
    /// client has to send a request): 60s, 2m
    #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
    idle_timeout: Duration,
    /// Connections at once, from everyone (lowered to fit the open-files limit); over
    /// it, a new connection takes the place of the oldest idle one
    #[arg(long, default_value_t = 8192)]
    max_connections: usize,
    /// Connections at once from one IP address
    #[arg(long, default_value_t = 512)]
    max_connections_per_peer: usize,
}

impl ConnArgs {
    fn limits(&self) -> crate::net::conns::Limits {
        crate::net::conns::Limits {
            idle: self.idle_timeout,
            max_total: self.max_connections.max(1),
            max_per_peer: self.max_connections_per_peer.max(1),
            ..Default::default()
        }
        .for_this_process()
    }
}

/// A listener for `transport`: TLS with its certificates, or plain.
fn listener(
    tcp: tokio::net::TcpListener,
    transport: &Transport,
    conns: &ConnArgs,
) -> anyhow::Result<crate::net::tls::Listener> {
    let config = match transport {
        Transport::Tls(files) => Some(crate::net::tls::server_config(files)?),
        Transport::Insecure { .. } => None,
    };
    Ok(crate::net::tls::Listener::new(tcp, config, conns.limits())?)
}

pub fn serve(ctx: &Ctx, a: ServeArgs) -> anyhow::Result<i32> {
    crate::sys::raise_open_files_limit();
    let follow = follow_config(ctx, &a)?;
    // A standby starts from an empty store of its own.
    let store = if follow.is_some() {
        crate::store::Store::open_or_init(&ctx.store_path, crate::store::disk::Role::Deploy)?
    } else {
        ctx.open()?
    };
    let transport = ctx.transport()?;
    // Checked as an agent checks its own (no wildcard, a DNS name).
    let deployers = if a.deployers.is_empty() {
        vec![crate::pki::DEPLOYER.to_string()]
    } else {
        a.deployers.clone()
    };
    crate::host::api::Auth::deployers(deployers.clone()).map_err(anyhow::Error::msg)?;
    let store_path = ctx.store_path.clone();
    let rt = runtime()?;
    rt.block_on(async {
        let tcp = bind(a.listen).await?;
        let addr = tcp.local_addr()?;
        let dash_tcp = bind(a.dashboard_listen).await?;
        let dash_addr = dash_tcp.local_addr()?;
        let access = match &transport {
            Transport::Tls(_) => server::Access::ClientCert,
            Transport::Insecure { .. } => server::Access::Open,
        };
        let (app, state) = server::router_with(
            store,
            access,
            server::ServeOptions {
                concurrency: a.concurrency,
                max_rate: a.max_rate,
                access_log: a.access_log.clone(),
                packs_ahead: a.packs_ahead,
                pack_budget: crate::net::pack::Budget {
                    builds: a.pack_builds_per_client,
                    bytes: a.pack_bytes_per_client,
                    ..Default::default()
                },
                state: Some(ctx.state()?),
            },
        )
        .with_context(|| format!("--access-log {:?}", a.access_log))?;
        tokio::spawn(server::build_ahead(state.clone()));
        let members = if a.hosts.is_empty() && a.inventory.is_none() {
            Vec::new()
        } else {
            crate::fleet::inventory::fleet(&a.hosts, a.inventory.as_deref(), &[])?
        };
        let agents = crate::fleet::agents::Agents::new(transport.clone(), Duration::from_secs(10))?;
        let counters = state.clone();
        let web = crate::web::Web::new(
            state.store.clone(),
            std::sync::Arc::new(move |m: &mut crate::metrics::Exposition| counters.stats.expose(m)),
            ctx.state()?,
            members,
            agents,
            Duration::from_secs(a.poll_interval.max(1)),
        );
        let dashboard = crate::web::routes(
            web.clone(),
            crate::web::HostNames::new(dash_addr, &a.dashboard_names),
        );
        let app = app.merge(crate::web::poll_routes(web.clone(), deployers));
        tokio::spawn(web.poll_forever());
        // One primary at a time (with the deploy state in etcd): a
        // standby follows it instead. Kept until the server stops.
        let _primary = if follow.is_none() && ctx.state()?.is_etcd() {
            let (state, store, url) = (
                ctx.state()?,
                store_path.clone(),
                format!("{}://{addr}", transport.scheme()),
            );
            Some(
                tokio::task::spawn_blocking(move || {
                    crate::fleet::standby::PrimaryKeeper::claim(state, store, url)
                })
                .await??,
            )
        } else {
            None
        };
        if let Some(cfg) = follow {
            let client = crate::net::client::Client::new(
                crate::net::client::http_client(&transport)?,
                &cfg.primaries,
            );
            tokio::spawn(crate::fleet::standby::follow(
                state.store.clone(),
                client,
                cfg,
                ctx.state()?,
                Default::default(),
            ));
        }
        let main = listener(tcp, &transport, &a.conns)?;
        let dash = crate::net::tls::Listener::new(dash_tcp, None, a.conns.limits().dashboard())?;
        if let Some(w) = transport.warning("scap serve") {
            eprintln!("{w}");
        }
        println!(
            "scap serve: serving {} on {}://{addr} (dashboard on http://{dash_addr}/)",
            ctx.store_path.display(),
            transport.scheme()
        );
        std::io::stdout().flush()?;
        crate::sys::notify(&format!(
            "READY=1\nSTATUS=serving {} on {}://{addr}",
            ctx.store_path.display(),
            transport.scheme()
        ));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let dash_task = tokio::spawn(server::serve(dash, dashboard, async move {
            let mut rx = stop_rx;
            let _ = rx.changed().await;
        }));
        server::serve(main, app, async {
            server::shutdown_signal().await;
            crate::sys::notify("STOPPING=1");
        })
        .await?;
        let _ = stop_tx.send(true);
        let _ = dash_task.await;
        eprintln!("scap serve: stopped");
        anyhow::Ok(())
    })?;
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The agent's directory: store, releases, `current`, state.json
    #[arg(long, default_value = DEFAULT_AGENT_DIR)]
    dir: PathBuf,
    /// Address to listen on
    #[arg(long, default_value = "0.0.0.0:8470")]
    listen: SocketAddr,
    /// This host's name in state and errors [default: the system host name]
    #[arg(long)]
    host: Option<String>,
    /// Make PATH a symlink to the live release's COMPONENT (repeatable), e.g. mediawiki=/srv/mediawiki
    #[arg(long, value_name = "COMPONENT=PATH")]
    link: Vec<String>,
    /// Command run before the switch, with SCAP_VERSION etc. set; failure aborts the switch
    #[arg(long, value_name = "CMD")]
    pre_switch: Option<String>,
    /// Command run after the switch; failure is logged (to restart php-fpm, prefer --restart-command)
    #[arg(long, value_name = "CMD")]
    post_switch: Option<String>,
    /// What makes the new code run (php-fpm reload, opcache reset): run when the
    /// controller asks after a step (in batches; between a depool and a repool
    /// with pools), and by the agent after it catches up by itself; gets
    /// SCAP_CHANGED_FILES (a file listing the paths changed since the last
    /// restart) when known
    #[arg(long, value_name = "CMD")]
    restart_command: Option<String>,
    /// Release directories kept (3 to 8: live, previous, one to prepare, more for faster rollbacks)
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=8))]
    slots: u8,
    /// How long a hook may run before it is killed: 300s, 5m
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    hook_timeout: Duration,
    /// How often the agent re-hashes the whole live release for drift and
    /// collects garbage it put off (at start, then this often; 0: only at
    /// start and on `scap verify --live`). A switch checks only what changed.
    #[arg(long, default_value = "6h", value_parser = super::parse_duration)]
    verify_every: Duration,
    /// A name (in its certificate) of a client that may change this host: the deploy
    /// host's (repeatable) [default: scap-deployer, the lab PKI's]
    #[arg(long = "deployer", value_name = "NAME")]
    deployers: Vec<String>,
    /// A deploy key's public half (`scap keygen` makes it) whose signatures this host
    /// accepts (repeatable: several during a key rotation)
    #[arg(long = "trusted-key", value_name = "FILE")]
    trusted_keys: Vec<PathBuf>,
    /// A key ID (16 hex digits) no longer accepted, even if trusted (repeatable)
    #[arg(long = "revoked-key", value_name = "KEYID")]
    revoked_keys: Vec<String>,
    /// Lab only: run versions without a trusted signature (says so on every sync)
    #[arg(long)]
    insecure_allow_unsigned: bool,
    /// The deploy host's `scap serve` (repeatable): asked what this host should run at
    /// start and on `scap pull`, so a reimaged or long-down host catches up by itself
    #[arg(long = "source", value_name = "URL")]
    sources: Vec<String>,
    /// Cap on everything this host fetches, bytes per second: 100M, 20MiB
    #[arg(long, value_name = "RATE", value_parser = crate::net::ratelimit::parse_rate)]
    max_fetch_rate: Option<u64>,
    /// Requests in flight to one source at once
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    fetch_parallel: u16,
    /// Fetch objects only, never delta packs
    #[arg(long)]
    no_packs: bool,
    /// Skip a source for the rest of a sync when it has delivered no object this host
    /// lacks for this long (stalled, or streaming the same data forever): 30s, 2m
    #[arg(long, default_value = "30s", value_parser = super::parse_duration)]
    source_stall_timeout: Duration,
    /// On SIGTERM, how long the operation in flight may take to finish (so that a
    /// restart or an upgrade falls between two syncs) before it is cancelled at its
    /// next safe point: keep it under the unit's TimeoutStopSec (90s)
    #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
    stop_grace: Duration,
    /// The local socket `scap pull` on this host reaches the agent by (mode 0600:
    /// root only) [default: DIR/agent.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(flatten)]
    conns: ConnArgs,
}

pub fn agent(ctx: &Ctx, a: AgentArgs) -> anyhow::Result<i32> {
    // First, while this process has one thread: the agent runs for months.
    if !crate::sys::tune_malloc() {
        tracing::debug!("malloc is not tuned here (not glibc)");
    }
    crate::sys::raise_open_files_limit();
    let transport = ctx.transport()?;
    let host = match a.host {
        Some(h) => h,
        None => crate::sys::hostname(),
    };
    let links = a
        .link
        .iter()
        .map(|l| {
            l.split_once('=')
                .filter(|(c, p)| !c.is_empty() && !p.is_empty())
                .map(|(c, p)| (c.to_string(), PathBuf::from(p)))
                .with_context(|| {
                    format!("--link {l:?}: expected COMPONENT=PATH, e.g. mediawiki=/srv/mediawiki")
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let trust = crate::store::signature::Trust {
        keys: a
            .trusted_keys
            .iter()
            .map(|p| crate::store::signature::PublicKey::load(p))
            .collect::<Result<_, _>>()?,
        revoked: a
            .revoked_keys
            .iter()
            .map(|k| {
                k.parse()
                    .map_err(|e: String| anyhow::anyhow!("--revoked-key: {e}"))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let auth = match &transport {
        Transport::Tls(_) => crate::host::api::Auth::deployers(if a.deployers.is_empty() {
            vec![crate::pki::DEPLOYER.to_string()]
        } else {
            a.deployers.clone()
        })
        .map_err(anyhow::Error::msg)?,
        Transport::Insecure { token } => crate::host::api::Auth::Token(token.to_string()),
    };
    let agent = Agent::open(AgentConfig {
        dir: a.dir.clone(),
        host: host.clone(),
        links,
        pre_switch: a.pre_switch,
        post_switch: a.post_switch,
        restart: a.restart_command,
        slots: usize::from(a.slots),
        hook_timeout: a.hook_timeout,
        verify_every: (!a.verify_every.is_zero()).then_some(a.verify_every),
        transport: transport.clone(),
        trust,
        allow_unsigned: a.insecure_allow_unsigned,
        sources: a.sources.clone(),
        max_fetch_rate: a.max_fetch_rate,
        fetch_parallel: usize::from(a.fetch_parallel),
        packs: !a.no_packs,
        source_stall: a.source_stall_timeout,
    })
    .with_context(|| format!("starting the agent in {}", a.dir.display()))?;
    if let Some(w) = transport.warning(&format!("scap agent {host}")) {
        eprintln!("{w}");
    }
    if a.insecure_allow_unsigned {
        eprintln!(
            "scap agent {host}: WARNING: --insecure-allow-unsigned: this host runs versions nobody signed; for a lab only"
        );
    }
    let rt = runtime()?;
    rt.block_on(async {
        let tcp = bind(a.listen).await?;
        let addr = tcp.local_addr()?;
        let listener = listener(tcp, &transport, &a.conns)?;
        let (app, state) = crate::host::api::router(agent, auth);
        println!(
            "scap agent: host {host} listening on {}://{addr}",
            transport.scheme()
        );
        std::io::stdout().flush()?;
        tokio::spawn(crate::host::api::at_start(state.clone()));
        let socket = a.socket.clone().unwrap_or_else(|| a.dir.join(AGENT_SOCKET));
        let local = crate::net::tls::Listener::unix(&socket)
            .with_context(|| format!("--socket {}: cannot listen there", socket.display()))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let local_task = tokio::spawn(server::serve(local, app.clone(), async move {
            let mut rx = stop_rx;
            let _ = rx.changed().await;
        }));
        // Both listeners take connections from here on.
        crate::sys::notify(&format!(
            "READY=1\nSTATUS=host {host} listening on {}://{addr}",
            transport.scheme()
        ));
        // SIGTERM: no new connection, no new operation; the one in flight
        // finishes within --stop-grace (or is cancelled), and its answer
        // still reaches the controller.
        let grace = a.stop_grace;
        let (stop_task_tx, stop_task) = tokio::sync::oneshot::channel();
        server::serve_with_grace(
            listener,
            app,
            async move {
                server::shutdown_signal().await;
                crate::sys::notify("STOPPING=1");
                tracing::info!("stopping (SIGTERM)");
                let _ = stop_task_tx.send(tokio::spawn(async move { state.stop(grace).await }));
            },
            grace + Duration::from_secs(5),
        )
        .await?;
        // Also what runs with no client waiting (a pull at start).
        if let Ok(stop) = stop_task.await {
            let _ = stop.await;
        }
        let _ = stop_tx.send(true);
        let _ = local_task.await;
        let _ = std::fs::remove_file(&socket);
        anyhow::Ok(())
    })?;
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct StateArgs {
    /// The agent's directory
    #[arg(long, default_value = DEFAULT_AGENT_DIR)]
    dir: PathBuf,
    /// Print the state file as JSON
    #[arg(long)]
    json: bool,
}

pub fn state(a: StateArgs) -> anyhow::Result<i32> {
    let path = a.dir.join("state.json");
    let Some(st) = HostState::load(&path)? else {
        bail!(
            "{}: no state file: this host has never been deployed to (is --dir right?)",
            path.display()
        );
    };
    if a.json {
        print_json(&st)?;
        return Ok(exit::OK);
    }
    let show = |d: &Option<crate::proto::state::Deployed>| match d {
        Some(d) => format!(
            "{} (since {}, by {})",
            d.version,
            crate::time::fmt_utc(d.since),
            d.by
        ),
        None => "-".into(),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "host:     {}", st.host)?;
    writeln!(out, "current:  {}", show(&st.current))?;
    writeln!(out, "previous: {}", show(&st.previous))?;
    writeln!(out, "stable:   {}", show(&st.stable))?;
    if let Some(e) = &st.last_error {
        writeln!(
            out,
            "last error: {} ({}): {}",
            crate::time::fmt_utc(e.time),
            e.action,
            e.message
        )?;
    }
    writeln!(out, "history:")?;
    for e in st.history.iter().take(10) {
        writeln!(
            out,
            "  {} {:<8} {} {} by {} in {:.2}s{}",
            crate::time::fmt_utc(e.time),
            e.action,
            if e.ok { "ok  " } else { "FAIL" },
            e.version.map(|v| v.short()).unwrap_or_else(|| "-".into()),
            e.by,
            e.seconds,
            e.error
                .as_ref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )?;
    }
    Ok(exit::OK)
}

/// `scap verify --live`: re-hash the live release on this host.
pub fn verify_live(dir: &Path, json: bool) -> anyhow::Result<i32> {
    let path = dir.join("state.json");
    let Some(st) = HostState::load(&path)? else {
        bail!(
            "{}: no state file: nothing is deployed here",
            path.display()
        );
    };
    let Some(cur) = st.current else {
        bail!("{}: no version is live", path.display());
    };
    let store = Store::open(&dir.join("store"))?;
    let live = std::fs::canonicalize(dir.join("current"))
        .with_context(|| format!("{}/current", dir.display()))?;
    let root = crate::host::materialize::Dir::open(&live)?;
    let drift = crate::host::drift::check(
        &store,
        root,
        &cur.version.root(),
        &crate::cancel::Cancel::new(),
    )?;
    if json {
        print_json(&drift)?;
    } else {
        let mut out = std::io::stdout().lock();
        for (s, p, why) in &drift.changes {
            writeln!(out, "{s}\t{p}\t({why})")?;
        }
        writeln!(
            out,
            "{}: {} files checked against {}; {} changed by hand",
            live.display(),
            drift.checked_files,
            cur.version.short(),
            drift.changes.len()
        )?;
    }
    Ok(if drift.changes.is_empty() {
        exit::OK
    } else {
        exit::PROBLEMS_FOUND
    })
}
