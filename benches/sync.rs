//! Deploying to a host: `scap serve` + `scap agent` against an rsync daemon
//! (what scap runs today: `rsync -a --delete --compress`), on loopback, on
//! the same generated MediaWiki-like tree, side by side in one run: a fresh
//! host, a backport, a train, a no-op, config changes. Then how long a
//! rollback takes while the agent is busy (a fresh-host fetch, the work
//! after a big switch).
//!
//! Run: `cargo bench --bench sync` (needs rsync; SCAP_BENCH_FILES, default
//! 30000). With `SCAP_BENCH_BASELINE=/path/to/an/older/scap`, that binary
//! runs beside this one (its own store, server and agents) for a
//! before/after comparison in the same run.
//!
//! Every deploy is measured twice per tool, on two hosts that make the same
//! transition, in the order A B C C B A (this disk's speed drifts); the
//! better of each pair is reported. Bytes on the wire are counted by TCP
//! proxies (HTTP headers included), for scap both agent <-> server and
//! controller <-> agent; for rsync they are rsync's own `--stats` totals.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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

struct Host {
    child: Child,
    url: String,
    front: CountingProxy,
}

/// One scap binary with its own store, server and two agents.
struct Stack {
    exe: PathBuf,
    store: PathBuf,
    staging: PathBuf,
    server: Child,
    source: CountingProxy,
    hosts: Vec<Host>,
    token: PathBuf,
    dir: PathBuf,
    http: reqwest::blocking::Client,
}

impl Stack {
    /// Builds the first version (so the store exists), then starts a
    /// server and two agents.
    fn start(exe: &Path, dir: &Path, staging: &Path, token: &Path) -> (Stack, f64, String) {
        std::fs::create_dir_all(dir).unwrap();
        let store = dir.join("store");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(900))
            .build()
            .unwrap();
        let (secs, v) = build(exe, &store, staging);
        let (server, server_url) =
            start_listening(Command::new(exe).arg("--store").arg(&store).args([
                "serve",
                "--listen",
                "127.0.0.1:0",
            ]));
        let mut s = Stack {
            exe: exe.to_path_buf(),
            store,
            staging: staging.to_path_buf(),
            server,
            source: CountingProxy::start(&server_url),
            hosts: Vec::new(),
            token: token.to_path_buf(),
            dir: dir.to_path_buf(),
            http,
        };
        for i in 0..2 {
            let h = s.agent(&format!("host{i}"));
            s.hosts.push(h);
        }
        (s, secs, v)
    }

    fn agent(&self, name: &str) -> Host {
        let (child, url) = start_listening(
            Command::new(&self.exe)
                .args([
                    "agent",
                    "--listen",
                    "127.0.0.1:0",
                    "--host",
                    name,
                    "--token-file",
                ])
                .arg(&self.token)
                .arg("--dir")
                .arg(self.dir.join(name)),
        );
        let front = CountingProxy::start(&url);
        Host { child, url, front }
    }

    fn build(&self) -> (f64, String) {
        build(&self.exe, &self.store, &self.staging)
    }

    /// Syncs host `i` to `v`: (seconds, bytes on the wire, the answer).
    fn sync(&self, i: usize, v: &str) -> (f64, u64, serde_json::Value) {
        let h = &self.hosts[i];
        self.source.take();
        h.front.take();
        let started = Instant::now();
        let r = self
            .http
            .post(format!("{}/v1/sync", h.front.url))
            .bearer_auth("bench-token")
            .json(&serde_json::json!({"version": v, "sources": [self.source.url], "by": "bench"}))
            .send()
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
        let body: serde_json::Value = r.json().unwrap();
        // Let the proxies' threads finish counting.
        std::thread::sleep(Duration::from_millis(50));
        let bytes = self.source.take() + h.front.take();
        settle(&self.http, &h.url);
        (secs, bytes, body)
    }
}

fn build(exe: &Path, store: &Path, staging: &Path) -> (f64, String) {
    let (run, out) = timed(
        Command::new(exe)
            .arg("--store")
            .arg(store)
            .args(["build-manifest", "--exclude", "**/.git", "--component"])
            .arg(format!("mediawiki={}", staging.display())),
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

/// Waits until an agent's after-switch work (spare release, gc) is done,
/// as it would be between two real deploys minutes apart.
fn settle(http: &reqwest::blocking::Client, agent: &str) {
    loop {
        let st: serde_json::Value = http
            .get(format!("{agent}/v1/state"))
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

fn post(http: &reqwest::blocking::Client, url: &str, body: serde_json::Value) -> (u16, f64) {
    let t = Instant::now();
    let r = http
        .post(url)
        .bearer_auth("bench-token")
        .json(&body)
        .send()
        .unwrap();
    (r.status().as_u16(), t.elapsed().as_secs_f64())
}

/// Seconds a rollback to `previous` takes on a fresh agent that is busy
/// with `busy`: "fetch" (a fresh-host fetch of `big` in progress) or
/// "after-switch" (the background work right after switching to `big`).
fn rollback_while_busy(s: &Stack, tiny: &[String; 2], big: &str, busy: &str, n: usize) -> f64 {
    let h = s.agent(&format!("rollback-{busy}-{n}"));
    for v in tiny {
        let (code, _) = post(
            &s.http,
            &format!("{}/v1/sync", h.url),
            serde_json::json!({"version": v, "sources": [s.source.url]}),
        );
        assert_eq!(code, 200);
        settle(&s.http, &h.url);
    }
    let sync_url = format!("{}/v1/sync", h.url);
    let body = serde_json::json!({"version": big, "sources": [s.source.url]});
    let http = s.http.clone();
    let during_fetch = busy == "fetch";
    let mut t = Some(std::thread::spawn(move || post(&http, &sync_url, body)));
    if during_fetch {
        // Well into the fetch (a fresh host takes seconds).
        std::thread::sleep(Duration::from_millis(1500));
    } else {
        assert_eq!(t.take().unwrap().join().unwrap().0, 200);
    }
    let (code, secs) = post(
        &s.http,
        &format!("{}/v1/rollback", h.url),
        serde_json::json!({"to": "previous", "by": "bench"}),
    );
    assert_eq!(code, 200);
    if let Some(t) = t {
        assert_eq!(t.join().unwrap().0, 409, "the fetch was cancelled");
    }
    let mut child = h.child;
    let _ = child.kill();
    let _ = child.wait();
    secs
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
    let baseline = std::env::var("SCAP_BENCH_BASELINE").ok().map(PathBuf::from);
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
    let rsync_dest = [dir.join("rsync-host0"), dir.join("rsync-host1")];

    let token = dir.join("token");
    std::fs::write(&token, "bench-token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (scap, first_build, v1) =
        Stack::start(Path::new(SCAP), &dir.join("scap"), &staging, &token);
    let before = baseline.as_ref().map(|exe| {
        let (s, _, v) = Stack::start(exe, &dir.join("before"), &staging, &token);
        assert_eq!(v, v1, "both binaries make the same version");
        s
    });

    let mut headers = vec!["deploy", "scap time"];
    if before.is_some() {
        headers.push("scap before time");
    }
    headers.extend([
        "rsync time",
        "scap bytes",
        "rsync bytes",
        "scap / rsync time",
        "scap / rsync bytes",
    ]);
    if before.is_some() {
        headers.push("scap / before time");
    }
    let mut table = Table::new(&headers);
    let mut hwm = 0;
    let mut current = v1.clone();
    // A deploy kind: `rounds` successive changes (each mutates the tree,
    // builds, then runs every tool twice, A B C C B A on two hosts that
    // make the same transition); the median of each tool's samples.
    let mut deploy = |name: &str, rounds: &[Option<(&str, u64)>], table: &mut Table| {
        let (mut r, mut s, mut b) = (Vec::new(), Vec::new(), Vec::new());
        for change in rounds {
            let v = match change {
                Some((kind, seed)) => {
                    mutate(&tree, kind, *seed);
                    std::thread::sleep(Duration::from_millis(1100));
                    let (_, v) = scap.build();
                    if let Some(bs) = &before {
                        assert_eq!(bs.build().1, v, "both binaries make the same version");
                    }
                    v
                }
                None => current.clone(),
            };
            for (pass, dest) in rsync_dest.iter().enumerate() {
                let mut steps: Vec<u8> = vec![0, 1, 2];
                if pass == 1 {
                    steps.reverse();
                }
                for step in steps {
                    match step {
                        0 => r.push(rsync(port, dest)),
                        1 => {
                            let (t, n, out) = scap.sync(pass, &v);
                            if pass == 0 {
                                println!("scap {name}: {out}");
                            }
                            s.push((t, n));
                        }
                        _ => {
                            if let Some(bs) = &before {
                                let (t, n, _) = bs.sync(pass, &v);
                                b.push((t, n));
                            }
                        }
                    }
                }
            }
            current = v;
        }
        let med = |v: &mut Vec<(f64, u64)>| -> (f64, u64) {
            if v.is_empty() {
                return (0.0, 0);
            }
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v[v.len() / 2]
        };
        let (rt, rb) = med(&mut r);
        let (st, sb) = med(&mut s);
        let (bt, _) = med(&mut b);
        println!("samples {name}: scap {s:?} before {b:?} rsync {r:?}");
        let mut row = vec![name.to_string(), ms(st)];
        if before.is_some() {
            row.push(ms(bt));
        }
        row.extend([
            ms(rt),
            mb(sb),
            mb(rb),
            format!("{:.2}", st / rt),
            format!("{:.3}", sb as f64 / rb.max(1) as f64),
        ]);
        if before.is_some() {
            row.push(format!("{:.2}", st / bt));
        }
        table.row(row);
    };

    deploy(&format!("fresh host ({files} files)"), &[None], &mut table);
    hwm = hwm.max(vm_hwm(scap.hosts[0].child.id()));
    deploy(
        "backport (1-3 files; 3 in a row, median of 6)",
        &[
            Some(("backport", 3)),
            Some(("backport", 31)),
            Some(("backport", 32)),
        ],
        &mut table,
    );
    deploy(
        "train (new php-* branch)",
        &[Some(("train", 4))],
        &mut table,
    );
    deploy("no-op (median of 6)", &[None, None, None], &mut table);
    deploy(
        "config change (3 in a row, median of 6)",
        &[
            Some(("config", 5)),
            Some(("config", 6)),
            Some(("config", 7)),
        ],
        &mut table,
    );
    let cols = headers.len();
    let mut note = |text: String| {
        let mut cells = vec![text];
        cells.resize(cols, String::new());
        table.row(cells);
    };
    note(format!(
        "agent peak RSS during the fresh sync: {} MB",
        hwm / 1024
    ));
    note(format!(
        "build-manifest (deploy host, not in the times above): cold {}",
        ms(first_build),
    ));

    // A rollback while the agent is busy: a fresh-host fetch of the whole
    // tree in progress, or the work after switching to it.
    let tiny_dir = dir.join("tiny");
    let tiny: [String; 2] = std::array::from_fn(|i| {
        std::fs::create_dir_all(&tiny_dir).unwrap();
        std::fs::write(tiny_dir.join("index.php"), format!("<?php // tiny {i}\n")).unwrap();
        build(&scap.exe, &scap.store, &tiny_dir).1
    });
    let mut during_fetch: Vec<f64> = (0..3)
        .map(|n| rollback_while_busy(&scap, &tiny, &v1, "fetch", n))
        .collect();
    let mut during_bg: Vec<f64> = (0..3)
        .map(|n| rollback_while_busy(&scap, &tiny, &v1, "after-switch", n))
        .collect();
    during_fetch.sort_by(f64::total_cmp);
    during_bg.sort_by(f64::total_cmp);
    println!("rollback during a fetch: {during_fetch:?}; after a switch: {during_bg:?}");
    note(format!(
        "rollback while a fresh-host fetch of {files} files runs: median {}, worst {} (3 runs)",
        ms(during_fetch[1]),
        ms(during_fetch[2])
    ));
    note(format!(
        "rollback right after switching to it (spare slot being written): median {}, worst {} (3 runs)",
        ms(during_bg[1]),
        ms(during_bg[2])
    ));
    table.save(
        "sync",
        &format!(
            "machine: {}\nfiles: {files}\nbaseline: {}",
            machine(),
            baseline
                .as_ref()
                .map_or("none".into(), |b| b.display().to_string())
        ),
    );
    for s in std::iter::once(scap).chain(before) {
        let mut s = s;
        let _ = s.server.kill();
        for h in &mut s.hosts {
            let _ = h.child.kill();
        }
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}
