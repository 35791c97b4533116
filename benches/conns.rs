//! Connection handling of `scap serve` under load, on loopback, in one run:
//! the latency of an agent's state poll (`GET /v1/desired/<host>`) from
//! SCAP_BENCH_HOSTS (default 375) polling clients, with SCAP_BENCH_IDLE
//! (default 2000) idle TLS connections held open against the server
//! (handshake done, no request sent) and without them (the baseline).
//!
//! - The real `scap serve` (release build) with TLS and the lab PKI
//!   (`scap pki init`), on a store with one small version and a
//!   `fleet/desired.json` naming every polling host, each target signed as
//!   `scap sync` signs it (so each answer carries a version and its deploy
//!   order, as production's would).
//! - `--idle-timeout 10m` (longer than the run: no idle connection is
//!   reaped, none needs re-opening) and `--max-connections-per-peer 4096`
//!   (every client is 127.0.0.1: the default 512 would make the idle
//!   connections evict each other and the pollers).
//! - Each poller has its own client certificate from the lab CA (issued
//!   here with rcgen and the lab CA's key) and one keep-alive connection
//!   (hyper over tokio-rustls), and polls every SCAP_BENCH_POLL_MS (default
//!   1000 ms; starts spread over one interval): 375 polls a second, far
//!   more than agents poll in production. A poll is timed from sending the
//!   request to the answer's last byte.
//! - The pollers run through the whole bench; the phases are windows of
//!   SCAP_BENCH_SECS (default 20) seconds, in order A B B A (baseline,
//!   loaded, loaded, baseline); a poll counts in a phase if it started and
//!   ended in it. The idle connections are opened (64 handshakes at a time,
//!   with the lab agent certificate) before the first B and closed after
//!   the second; 3 s settle before each window.
//! - Also: the server's VmRSS and open fds (/proc/PID) in each phase, its
//!   CPU time, the time to open the idle connections, and whether any of
//!   them was closed by the server by the end.
//!
//! Run: `cargo bench --bench conns`.

mod common;

use std::path::Path;
use std::pin::Pin;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use common::*;

/// Fds the bench needs besides its connections (files, pipes, the runtime).
const FDS_SPARE: u64 = 256;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Raises this process's soft open-files limit to the hard limit; fails,
/// naming the numbers, if the hard limit is below `need`.
fn raise_nofile(need: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    assert!(
        hard >= need,
        "this bench holds {need} file descriptors open and the hard open-files limit (ulimit -Hn) is {hard}: raise it (e.g. `ulimit -Hn 65536` as root, or LimitNOFILE= in the unit) and run again"
    );
    if lim.current.unwrap_or(u64::MAX) < hard {
        lim.current = lim.maximum;
        setrlimit(Resource::Nofile, lim).unwrap_or_else(|e| {
            panic!("cannot raise the soft open-files limit to the hard limit {hard}: {e}")
        });
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// From /proc/PID: (VmRSS KiB, open fds, CPU seconds user+system).
fn proc_stats(pid: u32) -> (u64, usize, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command's closing parenthesis: utime and
            // stime are the 12th and 13th (fields 14 and 15 of the line).
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0);
    (rss, fds, cpu)
}

/// The lab CA as an issuer: rebuilt from its key with the name `scap pki
/// init` gives it (rcgen here cannot parse ca.pem), so certificates it
/// signs chain to ca.pem.
fn lab_ca(pki: &Path) -> (rcgen::Certificate, rcgen::KeyPair) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).unwrap())
        .expect("the lab CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "scap lab CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// A TLS client config presenting `cert`/`key`, trusting the lab CA.
fn client_config(
    roots: &rustls::RootCertStore,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Arc<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots.clone())
    .with_client_auth_cert(vec![cert], key)
    .expect("a client certificate");
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// Client certificates for `host-0` .. `host-{n-1}`, signed by the lab CA.
fn issue_clients(
    pki: &Path,
    roots: &rustls::RootCertStore,
    n: usize,
) -> Vec<Arc<rustls::ClientConfig>> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
    let (ca, ca_key) = lab_ca(pki);
    (0..n)
        .map(|i| {
            let name = format!("host-{i}");
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![name.clone()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            client_config(
                roots,
                cert.der().clone(),
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
        })
        .collect()
}

async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    port: u16,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(config)
        .connect(
            ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            tcp,
        )
        .await
}

type Sender = hyper::client::conn::http1::SendRequest<String>;

async fn http_connect(config: Arc<rustls::ClientConfig>, port: u16) -> anyhow::Result<Sender> {
    let tls = tls_connect(config, port).await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One poll on `sender`: the answer's status and body.
async fn poll_once(sender: &mut Sender, port: u16, host: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use http_body::Body;
    sender.ready().await?;
    let req = hyper::Request::get(format!("/v1/desired/{host}"))
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .body(String::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok((status, out))
}

/// The phase whose window is open (0: none).
struct Shared {
    phase: AtomicU32,
    stop: AtomicBool,
    errors: [AtomicU64; 5],
    reconnects: AtomicU64,
    /// Failed polls printed so far (the first few only).
    printed: AtomicU64,
}

impl Shared {
    fn say(&self, what: String) {
        if self.printed.fetch_add(1, Ordering::Relaxed) < 20 {
            eprintln!("{what}");
        }
    }
}

/// One agent polling every `every` from `start`; returns (phase, latency)
/// of each poll that started and ended in one phase's window.
async fn poller(
    i: usize,
    config: Arc<rustls::ClientConfig>,
    port: u16,
    version: String,
    start: tokio::time::Instant,
    every: Duration,
    sh: Arc<Shared>,
) -> Vec<(u32, Duration)> {
    let host = format!("host-{i}");
    let mut samples = Vec::new();
    let mut sender: Option<Sender> = None;
    let mut tick = tokio::time::interval_at(start, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tick.tick().await;
        if sh.stop.load(Ordering::SeqCst) {
            return samples;
        }
        let phase = sh.phase.load(Ordering::SeqCst);
        let started = Instant::now();
        let result = async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                if !first {
                    sh.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                sender = Some(http_connect(config.clone(), port).await?);
            }
            poll_once(sender.as_mut().unwrap(), port, &host).await
        }
        .await;
        first = false;
        let took = started.elapsed();
        let ok = match result {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                v["version"].as_str() == Some(version.as_str())
            }
            Ok((status, body)) => {
                sh.say(format!(
                    "{host}: {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ));
                false
            }
            Err(e) => {
                sh.say(format!("{host}: {e:#}"));
                sender = None;
                false
            }
        };
        if phase != 0 && sh.phase.load(Ordering::SeqCst) == phase {
            if ok {
                samples.push((phase, took));
            } else {
                sh.errors[phase as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Opens `n` idle TLS connections (handshake done, nothing sent), `at_once`
/// handshakes at a time: the connections, and how many failed.
async fn open_idle(
    config: Arc<rustls::ClientConfig>,
    port: u16,
    n: usize,
    at_once: usize,
) -> (Vec<TlsStream<TcpStream>>, usize) {
    let results: Vec<_> = futures_util::stream::iter(0..n)
        .map(|_| tls_connect(config.clone(), port))
        .buffer_unordered(at_once)
        .collect()
        .await;
    let mut failed = 0;
    let mut open = Vec::new();
    for r in results {
        match r {
            Ok(s) => open.push(s),
            Err(e) => {
                if failed < 5 {
                    eprintln!("an idle connection failed: {e}");
                }
                failed += 1;
            }
        }
    }
    (open, failed)
}

/// How many of `conns` the server has closed (EOF or an error on a read
/// that does not wait).
fn closed(conns: &mut [TlsStream<TcpStream>]) -> usize {
    use futures_util::FutureExt;
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let mut n = 0;
    for c in conns {
        if !matches!(c.read(&mut buf).now_or_never(), None | Some(Ok(1..))) {
            n += 1;
        }
    }
    n
}

/// Waits until `pid` has at most (`below`) or at least (`!below`) `fds`
/// open fds, up to 30 s.
async fn wait_fds(pid: u32, fds: usize, below: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = proc_stats(pid).1;
        if (below && now <= fds) || (!below && now >= fds) || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pct(v: &[Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn lat(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

struct Phase {
    name: &'static str,
    idle: usize,
    lat: Vec<Duration>,
    errors: u64,
    rss_kib: u64,
    fds: usize,
    cpu: f64,
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let hosts = env_num("SCAP_BENCH_HOSTS", 375) as usize;
    let idle = env_num("SCAP_BENCH_IDLE", 2000) as usize;
    let every = Duration::from_millis(env_num("SCAP_BENCH_POLL_MS", 1000));
    let window = Duration::from_secs(env_num("SCAP_BENCH_SECS", 20));
    let settle = Duration::from_secs(3);
    raise_nofile((hosts + idle) as u64 + FDS_SPARE);
    println!("machine: {}", machine());

    let dir = fresh("conns");
    let tree = dir.join("tree");
    generate(&tree, 100);
    let (pki, config) = lab(&dir);
    let store = dir.join("store");
    let (_, version) = build_version(
        scap(&store).arg("--config").arg(&config),
        "mediawiki",
        &tree.join("mediawiki-staging"),
    );
    // Every poller's host has a target, as after a deploy: signed by the
    // lab's deploy key, one deploy order per host, as `scap sync` writes
    // it.
    let fleet_dir = scap::fleet::state::DeployState::files(&store.join("fleet"));
    let key = scap::store::signature::SigningKey::load(&pki.join("deploy.key")).unwrap();
    let orders = scap::fleet::orders::Orders::reserve(key, &fleet_dir).unwrap();
    let v: scap::store::VersionId = version.parse().unwrap();
    scap::fleet::desired::update(&fleet_dir, Some(&orders), |d| {
        for i in 0..hosts {
            d.set(&format!("host-{i}"), v, "bench", "sync");
        }
    })
    .unwrap();

    let (child, url) = start_listening(
        scap(&store)
            .arg("--config")
            .arg(&config)
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK)
            .args([
                "--idle-timeout",
                "10m",
                "--max-connections-per-peer",
                "4096",
            ]),
    );
    let server = Server(child);
    let pid = server.0.id();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let server_nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .take(2)
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default();
    println!("scap serve at {url}, pid {pid}, open files soft/hard {server_nofile}");

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let issued = Instant::now();
    let clients = issue_clients(&pki, &roots, hosts);
    println!(
        "issued {hosts} client certificates in {:.2} s",
        issued.elapsed().as_secs_f64()
    );
    let agent = client_config(
        &roots,
        CertificateDer::from_pem_file(pki.join("agent.pem")).unwrap(),
        PrivateKeyDer::from_pem_file(pki.join("agent.key")).unwrap(),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (phases, rss_before, notes) = rt.block_on(async {
        let sh = Arc::new(Shared {
            phase: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            errors: Default::default(),
            reconnects: AtomicU64::new(0),
            printed: AtomicU64::new(0),
        });
        let (rss0, fds0, _) = proc_stats(pid);
        let start = tokio::time::Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                tokio::spawn(poller(
                    i,
                    c,
                    port,
                    version.clone(),
                    start + every * i as u32 / hosts as u32,
                    every,
                    sh.clone(),
                ))
            })
            .collect();
        // Every poller connected and polled a few times.
        tokio::time::sleep(every * 3 + settle).await;
        let mut notes = vec![format!(
            "server before the pollers: VmRSS {:.1} MiB, {fds0} fds",
            rss0 as f64 / 1024.0
        )];
        let mut phases = Vec::new();
        let mut held: Vec<TlsStream<TcpStream>> = Vec::new();
        let mut base_fds = 0;
        let mut rss_before = 0;
        for (k, loaded) in [false, true, true, false].into_iter().enumerate() {
            if loaded && held.is_empty() {
                let (rss, fds, _) = proc_stats(pid);
                base_fds = fds;
                rss_before = rss;
                let opened = Instant::now();
                let (conns, failed) = open_idle(agent.clone(), port, idle, 64).await;
                let secs = opened.elapsed().as_secs_f64();
                held = conns;
                wait_fds(pid, base_fds + held.len(), false).await;
                notes.push(format!(
                    "opened {} idle TLS connections in {secs:.2} s ({:.0}/s, 64 handshakes at a time); {failed} failed",
                    held.len(),
                    held.len() as f64 / secs
                ));
            }
            if !loaded && !held.is_empty() {
                let gone = closed(&mut held);
                notes.push(format!(
                    "idle connections the server had closed by the end of the loaded phases: {gone} of {}",
                    held.len()
                ));
                held.clear();
                wait_fds(pid, base_fds, true).await;
                tokio::time::sleep(settle).await;
                let (rss, fds, _) = proc_stats(pid);
                notes.push(format!(
                    "server after they were closed: VmRSS {:.1} MiB, {fds} fds",
                    rss as f64 / 1024.0
                ));
            }
            tokio::time::sleep(settle).await;
            let (_, _, cpu0) = proc_stats(pid);
            sh.phase.store(k as u32 + 1, Ordering::SeqCst);
            tokio::time::sleep(window).await;
            sh.phase.store(0, Ordering::SeqCst);
            let (rss, fds, cpu1) = proc_stats(pid);
            phases.push(Phase {
                name: if loaded { "B" } else { "A" },
                idle: if loaded { held.len() } else { 0 },
                lat: Vec::new(),
                errors: 0,
                rss_kib: rss,
                fds,
                cpu: (cpu1 - cpu0) / window.as_secs_f64(),
            });
            println!(
                "phase {} ({}): server VmRSS {:.1} MiB, {fds} fds",
                k + 1,
                phases[k].name,
                rss as f64 / 1024.0
            );
        }
        sh.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        for (phase, took) in all {
            phases[phase as usize - 1].lat.push(took);
        }
        for (k, p) in phases.iter_mut().enumerate() {
            p.lat.sort();
            p.errors = sh.errors[k + 1].load(Ordering::Relaxed);
        }
        notes.push(format!(
            "poller reconnections (a poll connection found closed): {}",
            sh.reconnects.load(Ordering::Relaxed)
        ));
        (phases, rss_before, notes)
    });
    drop(server);

    let mut table = Table::new(&[
        "phase",
        "idle TLS connections",
        "polls",
        "errors",
        "p50",
        "p99",
        "max",
        "server CPU",
        "server VmRSS",
        "server open fds",
    ]);
    for (k, p) in phases.iter().enumerate() {
        table.row(vec![
            format!(
                "{} {}",
                k + 1,
                if p.idle > 0 {
                    "loaded (B)"
                } else {
                    "baseline (A)"
                }
            ),
            p.idle.to_string(),
            p.lat.len().to_string(),
            p.errors.to_string(),
            lat(pct(&p.lat, 50)),
            lat(pct(&p.lat, 99)),
            lat(p.lat.last().copied().unwrap_or_default()),
            format!("{:.0}%", p.cpu * 100.0),
            format!("{:.1} MiB", p.rss_kib as f64 / 1024.0),
            p.fds.to_string(),
        ]);
    }
    // Each pair: the better of its two phases, figure by figure; then its
    // polls pooled. The baseline's memory is phase 1's (phase 4's keeps
    // what the idle connections made the server's heap grow to).
    let best = |a: &Phase, b: &Phase, f: &dyn Fn(&[Duration]) -> Duration| f(&a.lat).min(f(&b.lat));
    let max = |v: &[Duration]| v.last().copied().unwrap_or_default();
    for (name, a, b) in [
        ("baseline (A)", &phases[0], &phases[3]),
        ("loaded (B)", &phases[1], &phases[2]),
    ] {
        let mut pooled: Vec<Duration> = a.lat.iter().chain(&b.lat).copied().collect();
        pooled.sort();
        let mem = if a.idle == 0 { a } else { b };
        for (how, p50, p99, top) in [
            (
                "best of its 2 phases",
                best(a, b, &|v| pct(v, 50)),
                best(a, b, &|v| pct(v, 99)),
                best(a, b, &max),
            ),
            (
                "its 2 phases pooled",
                pct(&pooled, 50),
                pct(&pooled, 99),
                max(&pooled),
            ),
        ] {
            table.row(vec![
                format!("{name}, {how}"),
                a.idle.max(b.idle).to_string(),
                pooled.len().to_string(),
                (a.errors + b.errors).to_string(),
                lat(p50),
                lat(p99),
                lat(top),
                format!("{:.0}%", (a.cpu + b.cpu) / 2.0 * 100.0),
                format!("{:.1} MiB", mem.rss_kib as f64 / 1024.0),
                mem.fds.to_string(),
            ]);
        }
    }
    let rss_b = (phases[1].rss_kib + phases[2].rss_kib) as f64 / 2.0;
    let per_conn = (rss_b - rss_before as f64) * 1024.0 / idle.max(1) as f64;
    let pollers = hosts;
    let mut preamble = format!(
        "machine: {}\npollers: {pollers}, one poll every {} ms each; idle TLS connections: {idle}; windows of {} s, A B B A; scap serve --idle-timeout 10m --max-connections-per-peer 4096 (open files soft/hard {server_nofile})",
        machine(),
        every.as_millis(),
        window.as_secs()
    );
    for n in &notes {
        preamble.push('\n');
        preamble.push_str(n);
    }
    preamble.push_str(&format!(
        "\nserver VmRSS just before the idle connections were opened: {:.1} MiB; per idle connection (mean of the B phases minus that, / {idle}): {:.1} KiB",
        rss_before as f64 / 1024.0,
        per_conn / 1024.0
    ));
    println!("{preamble}");
    table.save("conns", &preamble);
    done(&dir);
}
