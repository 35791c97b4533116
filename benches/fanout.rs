//! Fan-out through HTTP caches, on loopback, in one run:
//!
//! 1. SCAP_BENCH_HOSTS (default 375) agents with a small tree, in three
//!    "datacenters" each behind its own nginx cache (contrib/nginx), against
//!    the same number of agents fetching straight from the deploy host: the
//!    bytes the deploy host serves and the wall time of a train and of a
//!    backport, each rolled out 10% -> 50% -> 100%. Order A B A (caches,
//!    direct, caches); the best of the A runs.
//! 2. On the ~30k-file tree: a fresh host from a warm cache, beside rsync
//!    from a daemon (A B B A), and, after `scap stage` on 10 agents, each
//!    10 -> 50 -> 100% step's wall time (each step a switch).
//!
//! Run: `cargo bench --bench fanout`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// nginx running contrib/nginx/scap-cache.conf in `dir`, in front of
/// `upstream` (host:port), with the lab's server certificate.
fn nginx(dir: &Path, upstream: &str, pki: &Path) -> (Child, String) {
    assert!(
        have("nginx") || Path::new("/usr/sbin/nginx").exists(),
        "nginx is not installed (apt-get install nginx)"
    );
    let _ = std::fs::remove_dir_all(dir);
    for sub in ["cache", "tmp", "logs"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let p = port();
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/nginx/scap-cache.conf"
    ))
    .unwrap();
    let site = template
        .replace("@CACHE_DIR@", &dir.join("cache").display().to_string())
        .replace("@UPSTREAM@", upstream)
        .replace("@UPSTREAM_NAME@", "localhost")
        .replace("@LISTEN@", &format!("127.0.0.1:{p}"))
        .replace("@CERT@", &pki.join("server.pem").display().to_string())
        .replace("@KEY@", &pki.join("server.key").display().to_string())
        .replace("@CA@", &pki.join("ca.pem").display().to_string())
        .replace("@ACCESS_LOG@", "off");
    let tmp = dir.join("tmp").display().to_string();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log warn;\nworker_rlimit_nofile 8192;\nevents {{ worker_connections 4096; }}\nhttp {{\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n{site}\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, format!("https://127.0.0.1:{p}"))
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A fleet of `n` agents in three datacenters, a deploy host, and (if
/// `caches`) one nginx per datacenter. Returns the deploy host's counting
/// proxy, the scap.toml, and the processes.
struct Site {
    store: PathBuf,
    config: PathBuf,
    staging: PathBuf,
    tree: PathBuf,
    counter: CountingProxy,
    _procs: Procs,
}

impl Site {
    fn scap(&self) -> Command {
        let mut c = scap(&self.store);
        c.arg("--config").arg(&self.config);
        c
    }

    fn build(&self) -> String {
        build_version(&mut self.scap(), "mediawiki", &self.staging).1
    }

    /// `scap sync` with `extra`: (seconds, deploy-host bytes).
    fn sync(&self, v: &str, extra: &[&str]) -> (f64, u64) {
        self.counter.take();
        let started = Instant::now();
        let (_, out) = timed(
            self.scap()
                .args([
                    "sync",
                    "--version",
                    v,
                    "--yes",
                    "--wait",
                    "0",
                    "--force",
                    "--no-stage",
                ])
                .args(extra),
        );
        let secs = started.elapsed().as_secs_f64();
        assert!(out.contains("production traffic"), "{out}");
        std::thread::sleep(Duration::from_millis(200));
        (secs, self.counter.take())
    }
}

fn site(dir: &Path, n: usize, files: usize, caches: bool) -> Site {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let tree = dir.join("tree");
    generate(&tree, files);
    let staging = tree.join("mediawiki-staging");
    let store = dir.join("store");
    let (pki, base) = lab(dir);
    let mut procs = Vec::new();
    let mut s = Site {
        store: store.clone(),
        config: base.clone(),
        staging,
        tree,
        counter: CountingProxy::start("http://127.0.0.1:9"),
        _procs: Procs(Vec::new()),
    };
    s.build();
    let (server, url) = start_listening(
        s.scap()
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK)
            .arg("--access-log")
            .arg(dir.join("access.log")),
    );
    procs.push(server);
    s.counter = CountingProxy::start(&url);
    let deploy = s.counter.url.clone();
    let dcs = ["eqiad", "codfw", "esams"];
    let mut cache_lines = String::new();
    if caches {
        for dc in dcs {
            let (c, curl) = nginx(
                &dir.join(format!("nginx-{dc}")),
                deploy.split("://").nth(1).unwrap(),
                &pki,
            );
            procs.push(c);
            cache_lines.push_str(&format!("{dc} = [\"{curl}\"]\n"));
        }
    }
    println!("starting {n} agents ...");
    let mut inv = String::new();
    for i in 0..n {
        let (child, aurl) = start_listening(
            Command::new(SCAP)
                .args(["agent", "--listen", "127.0.0.1:0", "--host"])
                .arg(format!("mw{}", 1000 + i))
                .arg("--trusted-key")
                .arg(pki.join("deploy.pub"))
                .args(tls_flags(&pki, "agent"))
                .arg("--dir")
                .arg(dir.join(format!("hosts/mw{}", 1000 + i))),
        );
        inv.push_str(&format!(
            "[[host]]\nname = \"mw{}\"\naddress = \"{}\"\ndc = \"{}\"\n\n",
            1000 + i,
            aurl.split("://").nth(1).unwrap(),
            dcs[i % 3]
        ));
        procs.push(child);
    }
    std::fs::write(dir.join("inventory.toml"), inv).unwrap();
    let config = dir.join("scap-site.toml");
    std::fs::write(
        &config,
        format!(
            "inventory = \"{}\"\nsources = [\"{deploy}\"]\n{}\n[caches]\n{cache_lines}",
            dir.join("inventory.toml").display(),
            std::fs::read_to_string(&base).unwrap()
        ),
    )
    .unwrap();
    s.config = config;
    s._procs = Procs(procs);
    s
}

/// Deploy-host bytes and wall time of a train and a backport, 10/50/100;
/// then (through caches) a train staged first, and each step's time.
fn rollouts(dir: &Path, n: usize, caches: bool) -> ([(f64, u64, u64); 2], Vec<f64>) {
    let s = site(dir, n, 300, caches);
    let v1 = s.build();
    s.sync(&v1, &["--canary", "100%"]);
    std::thread::sleep(Duration::from_secs(3));
    let _ = std::fs::write(dir.join("access.log"), "");
    let mut out = [(0.0, 0, 0); 2];
    for (k, kind) in ["train", "backport"].iter().enumerate() {
        let from = s.build();
        mutate(&s.tree, kind, 40 + k as u64);
        let v = s.build();
        let (secs, bytes) = s.sync(&v, &["--stages", "10,50,100"]);
        let pack = std::fs::metadata(s.store.join(format!("packs/{from}-{v}.4.pack")))
            .map(|m| m.len())
            .unwrap_or(0);
        println!(
            "{} {kind}: {secs:.2} s, deploy host served {bytes} bytes, pack {pack} bytes",
            if caches { "caches" } else { "direct" }
        );
        out[k] = (secs, bytes, pack);
        // What reached the deploy host, by request kind (the access log
        // since the last rollout).
        let log = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
        let _ = std::fs::write(dir.join("access.log"), "");
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        for l in log.lines() {
            let path = l
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .unwrap_or("?");
            let status = l
                .split_whitespace()
                .skip_while(|w| !w.starts_with('/'))
                .nth(1)
                .unwrap_or("");
            let kind: String = path.split('/').take(3).collect::<Vec<_>>().join("/") + " " + status;
            *kinds.entry(kind).or_default() += 1;
        }
        println!("  requests at the deploy host: {kinds:?}");
        if std::env::var_os("SCAP_BENCH_DEBUG").is_some() {
            for l in log.lines().filter(|l| l.contains("/v1/pack4/")).take(8) {
                println!("    {l}");
            }
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    let mut steps = Vec::new();
    if caches {
        mutate(&s.tree, "train", 60);
        let v = s.build();
        timed(s.scap().args(["stage", "--version", &v]));
        std::thread::sleep(Duration::from_secs(3));
        for share in ["10%", "50%", "100%"] {
            steps.push(s.sync(&v, &["--canary", share]).0);
        }
        println!("staged train, steps: {steps:?}");
    }
    (out, steps)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let n: usize = std::env::var("SCAP_BENCH_HOSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(375);
    let files: usize = std::env::var("SCAP_BENCH_FILES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    let dir = fresh("fanout");
    println!("machine: {}", machine());
    let mut table = Table::new(&[
        "rollout 10% -> 50% -> 100%",
        "wall time",
        "bytes the deploy host served",
        "pack size",
        "served / (3 caches x pack)",
    ]);
    // A B A.
    let (a1, steps1) = rollouts(&dir.join("a1"), n, true);
    let (b, _) = rollouts(&dir.join("b"), n, false);
    let (a2, steps2) = rollouts(&dir.join("a2"), n, true);
    for (k, kind) in ["train", "backport"].iter().enumerate() {
        let best = if a1[k].0 <= a2[k].0 { a1[k] } else { a2[k] };
        table.row(vec![
            format!("{kind}, {n} hosts behind 3 nginx caches (best of 2)"),
            ms(best.0),
            mb(best.1),
            mb(best.2),
            format!("{:.2}", best.1 as f64 / (3.0 * best.2.max(1) as f64)),
        ]);
        table.row(vec![
            format!("{kind}, {n} hosts straight from the deploy host"),
            ms(b[k].0),
            mb(b[k].1),
            mb(b[k].2),
            String::new(),
        ]);
    }
    let steps = if steps1.iter().sum::<f64>() <= steps2.iter().sum::<f64>() {
        steps1
    } else {
        steps2
    };
    table.row(vec![
        format!("train on {n} hosts after `scap stage`: 10% / 50% / 100% steps"),
        steps.iter().map(|s| ms(*s)).collect::<Vec<_>>().join(" / "),
        String::new(),
        String::new(),
        String::new(),
    ]);
    for d in ["a1", "b", "a2"] {
        let _ = std::fs::remove_dir_all(dir.join(d));
    }

    // The big tree: a fresh host from a warm cache, against rsync.
    assert!(
        have("rsync"),
        "rsync is not installed (apt-get install rsync)"
    );
    let s = site(&dir.join("big"), 10, files, true);
    let v = s.build();
    // Warm the caches: a first host of each datacenter.
    let (first, _) = s.sync(&v, &["--canary", "30%"]);
    println!("first hosts (cold caches): {first:.2} s");
    let (mut daemon, rsync_port) = rsync_daemon(&dir, &s.staging);
    let rsync = |to: &Path| {
        let _ = std::fs::remove_dir_all(to);
        timed(
            Command::new("rsync")
                .args([
                    "-a",
                    "--delete",
                    &format!("rsync://127.0.0.1:{rsync_port}/mw/"),
                ])
                .arg(to),
        )
        .0
        .secs
    };
    // A B B A: one more host each time from the warm cache, rsync into an
    // empty directory.
    let mut fresh_scap = Vec::new();
    let mut fresh_rsync = Vec::new();
    for (round, scap_turn) in [true, false, false, true].into_iter().enumerate() {
        std::thread::sleep(Duration::from_secs(2));
        if scap_turn {
            let share = if round == 0 { "50%" } else { "70%" };
            let (secs, _) = s.sync(&v, &["--canary", share]);
            fresh_scap.push(secs);
        } else {
            fresh_rsync.push(rsync(&dir.join("rsync-host")));
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    table.row(vec![
        format!("fresh host(s) from a warm cache ({files} files; 2 hosts a step, best of 2)"),
        ms(best(&fresh_scap)),
        String::new(),
        String::new(),
        String::new(),
    ]);
    table.row(vec![
        format!("rsync -a of the same tree into an empty directory (best of 2)"),
        ms(best(&fresh_rsync)),
        String::new(),
        String::new(),
        String::new(),
    ]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    // Staged: a train to all 10 hosts, staged first, then each step.
    ok_sync(&s, &v);
    mutate(&s.tree, "train", 77);
    let v2 = s.build();
    let started = Instant::now();
    let (_, out) = timed(s.scap().args(["stage", "--version", &v2]));
    println!("stage: {:.2} s: {out}", started.elapsed().as_secs_f64());
    let mut steps = Vec::new();
    for share in ["10%", "50%", "100%"] {
        let (secs, _) = s.sync(&v2, &["--canary", share]);
        steps.push(secs);
    }
    table.row(vec![
        format!("train on 10 hosts ({files} files) after `scap stage`: 10% / 50% / 100% steps"),
        steps.iter().map(|s| ms(*s)).collect::<Vec<_>>().join(" / "),
        String::new(),
        String::new(),
        String::new(),
    ]);
    table.save("fanout", &format!("machine: {}\nhosts: {n}", machine()));
}

fn ok_sync(s: &Site, v: &str) {
    s.sync(v, &["--canary", "100%"]);
}
