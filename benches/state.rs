//! Two deploy hosts: what keeping the deploy state in etcd costs a rollout,
//! and how soon a standby serves what the primary built.
//!
//! 1. **Rollout step overhead**: real agents (SCAP_BENCH_HOSTS, default
//!    375) and a real three-member etcd cluster (Debian's etcd-server) on
//!    loopback; a backport rolled out 10% -> 50% -> 100% by one `scap
//!    sync --stages`, after one unmeasured, with the deploy state in files
//!    or in etcd in the order A B B A B A A B (a new backport each time);
//!    the medians are compared.
//! 2. **A standby in step**: a ~30k-file tree (SCAP_BENCH_FILES) built on
//!    the primary, a standby `scap serve --follow` copying it; then
//!    backports, each timed from the end of its build on the primary to
//!    its record on the standby (a version is servable once its record is
//!    written, the last thing a copy does), alternated with today's way
//!    of keeping deploy hosts in step, an rsync of the staging tree to the
//!    other host (`sync-masters`), of the same backport.
//!
//! Run: `cargo bench --bench state`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A three-member etcd cluster on loopback; killed when dropped.
struct Cluster {
    members: Vec<Child>,
    urls: Vec<String>,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        assert!(
            Path::new("/usr/bin/etcd").exists(),
            "this bench needs etcd: apt-get install etcd-server"
        );
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (port(), port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("etcd{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        let mut urls = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let client = format!("http://127.0.0.1:{c}");
            let peer = format!("http://127.0.0.1:{p}");
            members.push(
                Command::new("/usr/bin/etcd")
                    .args(["--name", &format!("etcd{i}"), "--data-dir"])
                    .arg(dir.join(format!("etcd{i}")))
                    .args([
                        "--listen-client-urls",
                        &client,
                        "--advertise-client-urls",
                        &client,
                    ])
                    .args([
                        "--listen-peer-urls",
                        &peer,
                        "--initial-advertise-peer-urls",
                        &peer,
                    ])
                    .args(["--initial-cluster", &cluster, "--log-level", "error"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            urls.push(client);
        }
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("curl")
                .args([
                    "-sf",
                    "-X",
                    "POST",
                    "-d",
                    r#"{"key":"aGVhbHRo","value":"b2s="}"#,
                ])
                .arg(format!("{}/v3/kv/put", urls[0]))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(
                Instant::now() < until,
                "etcd did not elect a leader in 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Cluster { members, urls }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

/// `config` with `[state]` in `cluster` appended, as a new file.
fn with_etcd(config: &Path, cluster: &Cluster, out: &Path) -> PathBuf {
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&format!(
        "\n[state]\netcd = [{}]\nprefix = \"/scap/bench\"\n",
        cluster
            .urls
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    std::fs::write(out, text).unwrap();
    out.to_path_buf()
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
    let dir = fresh("state");
    println!("machine: {}", machine());
    let (pki, files_config) = lab(&dir);
    let cluster = Cluster::start(&dir);
    let etcd_config = with_etcd(&files_config, &cluster, &dir.join("scap-etcd.toml"));
    let limit = "/proc/sys/fs/inotify/max_user_instances";
    let want = 2 * n + 128;
    let have: usize = std::fs::read_to_string(limit)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if have < want {
        let _ = std::fs::write(limit, format!("{want}"));
    }

    // 1. Rollout step overhead.
    let tree = dir.join("tree");
    generate(&tree, 300);
    let staging = tree.join("mediawiki-staging");
    let store = dir.join("store");
    let run = |config: &Path| {
        let mut c = scap(&store);
        c.arg("--config").arg(config);
        c
    };
    let build = || build_version(&mut run(&files_config), "mediawiki", &staging).1;
    let v1 = build();
    let (mut server, server_url) = start_listening(
        run(&files_config)
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK),
    );
    let group = dir.join("mediawiki-installation");
    let agents = start_agents(n, &pki, &dir, &group);
    let sync = |config: &Path, v: &str, extra: &[&str]| {
        let started = Instant::now();
        let (_, out) = timed(
            run(config)
                .args(["sync", "--hosts"])
                .arg(&group)
                .args([
                    "--version",
                    v,
                    "--source",
                    &server_url,
                    "--wait",
                    "0",
                    "--yes",
                ])
                .args(["--force"])
                .args(extra),
        );
        assert!(out.contains("100.0% of production traffic synced"), "{out}");
        started.elapsed().as_secs_f64()
    };
    let first = sync(&files_config, &v1, &["--canary", "100%"]);
    println!("first deploy to {n} hosts: {}", ms(first));
    std::thread::sleep(Duration::from_secs(3));
    // One rollout unmeasured: the first ones after a fleet's first deploy
    // run slower (spare releases being written), whatever the state.
    mutate(&tree, "backport", 99);
    let warm = build();
    println!(
        "warm-up rollout: {}",
        ms(sync(&files_config, &warm, &["--stages", "10,50,100"]))
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut by_mode: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for (round, mode) in [0usize, 1, 1, 0, 1, 0, 0, 1].into_iter().enumerate() {
        mutate(&tree, "backport", 100 + round as u64);
        let v = build();
        let config = if mode == 0 {
            &files_config
        } else {
            &etcd_config
        };
        let t = sync(config, &v, &["--stages", "10,50,100"]);
        println!(
            "rollout {} with the state in {}: {}",
            round + 1,
            ["files", "etcd"][mode],
            ms(t)
        );
        by_mode[mode].push(t);
        std::thread::sleep(Duration::from_secs(2));
    }
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    let _ = server.kill();
    let _ = server.wait();
    let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (files_t, etcd_t) = (median_of(&by_mode[0]), median_of(&by_mode[1]));

    // 2. A standby in step with the primary.
    let big = dir.join("big");
    generate(&big, files);
    let big_staging = big.join("mediawiki-staging");
    let primary_store = dir.join("primary");
    let standby_store = dir.join("standby");
    let prun = |store: &Path| {
        let mut c = scap(store);
        c.arg("--config").arg(&etcd_config);
        c
    };
    let (cold_build, w1) = build_version(&mut prun(&primary_store), "mediawiki", &big_staging);
    let (mut primary, primary_url) = start_listening(
        prun(&primary_store)
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK),
    );
    let cold = Instant::now();
    let (mut standby, _standby_url) = start_listening(
        prun(&standby_store)
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK)
            // The default interval (1 s): the figure a site gets.
            .args(["--follow", &primary_url]),
    );
    let servable = |v: &str| standby_store.join(format!("versions/{v}.json")).exists();
    let wait_servable = |v: &str| {
        let until = Instant::now() + Duration::from_secs(600);
        while !servable(v) {
            assert!(
                Instant::now() < until,
                "the standby did not copy {v} in 600 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_servable(&w1);
    let cold_copy = cold.elapsed().as_secs_f64();
    // sync-masters today: the staging tree rsynced to the other deploy
    // host (a copy made now, then each backport sent).
    let mirror = dir.join("mirror");
    let rsync = || {
        let (r, _) = timed(
            Command::new("rsync")
                .args(["-a", "--delete"])
                .arg(format!("{}/", big_staging.display()))
                .arg(&mirror),
        );
        r.secs
    };
    let cold_rsync = rsync();
    let mut copies = Vec::new();
    let mut rsyncs = Vec::new();
    for (round, tool) in [
        "scap", "rsync", "rsync", "scap", "rsync", "scap", "scap", "rsync",
    ]
    .into_iter()
    .enumerate()
    {
        mutate(&big, "backport", 200 + round as u64);
        if tool == "scap" {
            let (b, v) = build_version(&mut prun(&primary_store), "mediawiki", &big_staging);
            let built = Instant::now();
            wait_servable(&v);
            let t = built.elapsed().as_secs_f64();
            println!(
                "backport {}: built in {}, on the standby {} later",
                round + 1,
                ms(b.secs),
                ms(t)
            );
            copies.push(t);
        } else {
            let t = rsync();
            println!(
                "backport {}: rsync of the staging tree {}",
                round + 1,
                ms(t)
            );
            rsyncs.push(t);
        }
    }
    let _ = standby.kill();
    let _ = standby.wait();
    let _ = primary.kill();
    let _ = primary.wait();

    let mut table = Table::new(&["what", "scap", "alternative", "ratio"]);
    table.row(vec![
        format!("backport rolled out 10% -> 50% -> 100% of {n} hosts: state in etcd vs in files (median of 4 each, A B B A B A A B)"),
        ms(etcd_t),
        ms(files_t),
        format!("{:.2}x ({:+.1}%)", etcd_t / files_t, (etcd_t / files_t - 1.0) * 100.0),
    ]);
    table.row(vec![
        format!("a backport built on the primary, servable by the standby ({files} files, --follow-interval 1 s; vs rsync of the staging tree; median of 4 each)"),
        ms(median_of(&copies)),
        ms(median_of(&rsyncs)),
        format!("{:.2}x", median_of(&copies) / median_of(&rsyncs)),
    ]);
    table.row(vec![
        "the same, the slowest of the 4 (target: under 2 s)".into(),
        ms(worst(&copies)),
        ms(worst(&rsyncs)),
        format!("{:.2}x", worst(&copies) / worst(&rsyncs)),
    ]);
    table.row(vec![
        format!("a standby started empty, servable with the first version ({files} files; vs a first rsync)"),
        ms(cold_copy),
        ms(cold_rsync),
        format!("{:.2}x", cold_copy / cold_rsync),
    ]);
    table.save(
        "state",
        &format!(
            "machine: {}\nhosts: {n}; files: {files}; the primary's cold build: {}",
            machine(),
            ms(cold_build.secs)
        ),
    );
    drop(cluster);
    done(&dir);
}
