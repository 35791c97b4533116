//! Deploying to a host: `scap serve` + `scap agent` against an rsync daemon
//! (what scap runs today: `rsync -a --delete --compress`), on loopback, on
//! the same generated MediaWiki-like tree, side by side in one run: a fresh
//! host, a backport, a train, and a no-op.
//!
//! Run: `cargo bench --bench sync` (needs rsync; SCAP_BENCH_FILES, default 30000).
//! Bytes on the wire are counted by TCP proxies (HTTP headers included),
//! for scap both agent <-> server and controller <-> agent; for rsync they
//! are rsync's own `--stats` totals (sent + received).

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn rsync(port: u16, dest: &Path) -> (f64, u64) {
    let (run, out) = timed(
        Command::new("rsync")
            .args(["-a", "--delete", "--compress", "--exclude=.git", "--stats"])
            .arg(format!("rsync://127.0.0.1:{port}/mw/"))
            .arg(dest),
    );
    let total = |what: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with(what))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.split_whitespace().next().unwrap_or("0").replace(',', ""))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        run.secs,
        total("Total bytes sent") + total("Total bytes received"),
    )
}

struct Scap {
    store: std::path::PathBuf,
    staging: std::path::PathBuf,
    agent_url: String,
    source: CountingProxy,
    front: CountingProxy,
    http: reqwest::blocking::Client,
}

impl Scap {
    fn build(&self) -> (f64, String) {
        let (run, out) = timed(
            scap(&self.store)
                .args(["build-manifest", "--exclude", "**/.git", "--component"])
                .arg(format!("mediawiki={}", self.staging.display())),
        );
        (
            run.secs,
            out.lines()
                .rev()
                .find(|l| l.len() == 64)
                .unwrap()
                .to_string(),
        )
    }

    /// Syncs the agent; (seconds, bytes on the wire, the agent's answer).
    fn sync(&self, v: &str) -> (f64, u64, serde_json::Value) {
        self.source.take();
        self.front.take();
        let started = Instant::now();
        let r = self
            .http
            .post(format!("{}/v1/sync", self.front.url))
            .bearer_auth("bench-token")
            .json(&serde_json::json!({"version": v, "sources": [self.source.url], "by": "bench"}))
            .send()
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
        let body: serde_json::Value = r.json().unwrap();
        // Let the proxies' threads finish counting.
        std::thread::sleep(Duration::from_millis(50));
        let bytes = self.source.take() + self.front.take();
        self.settle();
        (secs, bytes, body)
    }

    /// Waits until the agent's after-switch work (spare release, gc) is
    /// done, as it would be between two real deploys minutes apart.
    fn settle(&self) {
        loop {
            let st: serde_json::Value = self
                .http
                .get(format!("{}/v1/state", self.agent_url))
                .send()
                .unwrap()
                .json()
                .unwrap();
            if st["busy"] == false {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    assert!(
        have("rsync"),
        "rsync is not installed (apt-get install rsync)"
    );
    let files: usize = std::env::var("SCAP_BENCH_FILES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    let dir = fresh("sync");
    let tree = dir.join("tree");
    println!("machine: {}\ngenerating {files} files ...", machine());
    generate(&tree, files);
    let staging = tree.join("mediawiki-staging");
    std::thread::sleep(Duration::from_millis(1100));

    // rsync daemon over the staging tree.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\n[mw]\npath = {}\nread only = yes\n",
            staging.display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new("rsync")
        .args([
            "--daemon",
            "--no-detach",
            "--address=127.0.0.1",
            &format!("--port={port}"),
            "--config",
        ])
        .arg(&conf)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rsync daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rsync_dest = dir.join("rsync-host");

    // scap: a server and one agent, each behind a counting proxy.
    let store = dir.join("store");
    let token = dir.join("token");
    std::fs::write(&token, "bench-token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut s = Scap {
        store: store.clone(),
        staging: staging.clone(),
        agent_url: String::new(),
        source: CountingProxy {
            url: String::new(),
            bytes: Default::default(),
        },
        front: CountingProxy {
            url: String::new(),
            bytes: Default::default(),
        },
        http: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap(),
    };
    let (first_build, v1) = s.build();
    let (mut server, server_url) =
        start_listening(scap(&store).args(["serve", "--listen", "127.0.0.1:0"]));
    let (mut agent, agent_url) = start_listening(
        Command::new(SCAP)
            .args([
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--host",
                "bench",
                "--token-file",
            ])
            .arg(&token)
            .arg("--dir")
            .arg(dir.join("scap-host")),
    );
    s.agent_url = agent_url.clone();
    s.source = CountingProxy::start(&server_url);
    s.front = CountingProxy::start(&agent_url);

    let mut table = Table::new(&[
        "deploy",
        "scap time",
        "rsync time",
        "scap bytes",
        "rsync bytes",
        "time ratio",
        "bytes ratio",
    ]);
    let mut row = |name: &str, (st, sb): (f64, u64), (rt, rb): (f64, u64), extra: &str| {
        table.row(vec![
            format!("{name}{extra}"),
            ms(st),
            ms(rt),
            mb(sb),
            mb(rb),
            format!("{:.2}", st / rt),
            format!("{:.3}", sb as f64 / rb.max(1) as f64),
        ]);
    };

    // Fresh host.
    let (rt, rb) = rsync(port, &rsync_dest);
    let (st, sb, out) = s.sync(&v1);
    let hwm = vm_hwm(agent.id());
    row(
        "fresh host",
        (st, sb),
        (rt, rb),
        &format!(" ({files} files)"),
    );
    println!("scap fresh: {out}");

    // Backport.
    mutate(&tree, "backport", 3);
    let (backport_build, v2) = s.build();
    let (rt, rb) = rsync(port, &rsync_dest);
    let (st, sb, out) = s.sync(&v2);
    row("backport (1-3 files)", (st, sb), (rt, rb), "");
    println!("scap backport: {out}");

    // Train.
    mutate(&tree, "train", 4);
    std::thread::sleep(Duration::from_millis(1100));
    let (train_build, v3) = s.build();
    let (rt, rb) = rsync(port, &rsync_dest);
    let (st, sb, out) = s.sync(&v3);
    row("train (new php-* branch)", (st, sb), (rt, rb), "");
    println!("scap train: {out}");

    // No-op.
    let (rt, rb) = rsync(port, &rsync_dest);
    let (st, sb, out) = s.sync(&v3);
    row("no-op", (st, sb), (rt, rb), "");
    println!("scap no-op: {out}");

    // Config changes, one after another (the backport window).
    for seed in 5..8 {
        mutate(&tree, "config", seed);
        let (_, v) = s.build();
        let (rt, rb) = rsync(port, &rsync_dest);
        let (st, sb, out) = s.sync(&v);
        row(
            &format!("config change #{}", seed - 4),
            (st, sb),
            (rt, rb),
            "",
        );
        println!("scap config: {out}");
    }

    table.row(vec![
        format!("agent peak RSS during the fresh sync: {} MB", hwm / 1024),
        format!(
            "build-manifest (deploy host, not in the times above): cold {}, backport {}, train {}",
            ms(first_build),
            ms(backport_build),
            ms(train_build)
        ),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    table.save("sync", &format!("machine: {}\nfiles: {files}", machine()));
    let _ = agent.kill();
    let _ = server.kill();
    let _ = daemon.kill();
    let _ = daemon.wait();
}
