//! A whole canary rollout on a local fleet: 100 real agents on loopback
//! (small trees), a backport rolled out 10% -> 50% -> 100% by one
//! `scap sync --stages` command (after one deploy that brings every host to
//! its steady state of three release slots), then a rollback of everyone. Wall time and
//! bytes served; gate waits are zero (they are policy, not cost).
//!
//! Run: `cargo bench --bench canary` (SCAP_BENCH_HOSTS, default 100;
//! SCAP_BENCH_VERBOSE=1 prints the rollout's output; SCAP_BENCH_HOLD=FILE
//! keeps the fleet up for profiling until FILE is removed, and
//! SCAP_BENCH_HOLD_FIRST=FILE holds the fresh fleet before its first deploy).

mod common;

use std::process::{Child, Command};
use std::time::Instant;

use common::*;

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let n: usize = std::env::var("SCAP_BENCH_HOSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let dir = fresh("canary");
    println!("machine: {}", machine());
    let tree = dir.join("tree");
    generate(&tree, 300);
    let staging = tree.join("mediawiki-staging");
    let store = dir.join("store");
    // As deployed: TLS with client certificates, signed versions.
    let (pki, config) = lab(&dir);
    let scap = |store: &std::path::Path| {
        let mut c = scap(store);
        c.arg("--config").arg(&config);
        c
    };
    let build = || build_version(&mut scap(&store), "mediawiki", &staging).1;
    let v1 = build();
    let (mut server, server_url) = start_listening(
        scap(&store)
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK),
    );
    let proxy = CountingProxy::start(&server_url);
    // Every agent holds an inotify instance (production runs one agent a
    // machine; this bench runs them all on one): raise the per-user limit
    // (default 128) if it is lower than the fleet, as root can.
    let limit = "/proc/sys/fs/inotify/max_user_instances";
    let have: usize = std::fs::read_to_string(limit)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let want = 2 * n + 128;
    if have < want && std::fs::write(limit, format!("{want}")).is_err() {
        println!(
            "note: {limit} is {have}, below {n} agents: some run without inotify (as root this bench raises it)"
        );
    }
    println!("starting {n} agents ...");
    let mut agents: Vec<Child> = Vec::new();
    let mut group = String::new();
    for i in 0..n {
        let (child, url) = start_listening(
            Command::new(SCAP)
                .args([
                    "agent",
                    "--listen",
                    "127.0.0.1:0",
                    "--host",
                    &format!("mw{}", 1000 + i),
                    "--trusted-key",
                ])
                .arg(pki.join("deploy.pub"))
                .args(tls_flags(&pki, "agent"))
                .arg("--dir")
                .arg(dir.join(format!("hosts/mw{}", 1000 + i))),
        );
        group.push_str(url.split("://").nth(1).unwrap());
        group.push('\n');
        agents.push(child);
    }
    let group_file = dir.join("mediawiki-installation");
    std::fs::write(&group_file, group).unwrap();
    let sync = |v: &str, extra: &[&str]| {
        let started = Instant::now();
        let (_, out) = timed(
            scap(&store)
                .args(["sync", "--hosts"])
                .arg(&group_file)
                .args([
                    "--version",
                    v,
                    "--source",
                    &proxy.url,
                    "--wait",
                    "0",
                    "--yes",
                    // No gate in this bench: it measures the transfer.
                    "--force",
                ])
                .args(if extra.is_empty() {
                    &["--canary", "100%"][..]
                } else {
                    extra
                }),
        );
        (started.elapsed().as_secs_f64(), out)
    };
    // For profiling the first deploy by hand: it waits until the file
    // named by SCAP_BENCH_HOLD_FIRST is removed.
    if let Some(hold) = std::env::var_os("SCAP_BENCH_HOLD_FIRST") {
        std::fs::write(&hold, "remove me to start the first deploy\n").unwrap();
        println!(
            "{n} agents up; rm {} to start the first deploy",
            std::path::Path::new(&hold).display()
        );
        while std::path::Path::new(&hold).exists() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    // The agents' CPU over the first deploy: until it returns (what the
    // deploy's wall time bought), and until the fleet is at rest (the work
    // after each switch too: the spare slot, gc compressing what arrived).
    let pids: Vec<u32> = agents.iter().map(Child::id).collect();
    let cpu_before = fleet_cpu(&pids);
    let (first, _) = sync(&v1, &[]);
    let cpu_during = fleet_cpu(&pids) - cpu_before;
    settle_fleet(&pids);
    let cpu_total = fleet_cpu(&pids) - cpu_before;
    println!(
        "first deploy to {n} fresh hosts: {}; agent CPU a host: {} until it returned, {} with the work after the switch",
        ms(first),
        ms(cpu_during / n as f64),
        ms(cpu_total / n as f64)
    );
    // One more deploy before the measured one: a host's second deploy
    // also writes its third release slot whole (a fresh host has two);
    // from then on every deploy is a host's steady state, which is what
    // the rollout below measures.
    mutate(&tree, "backport", 10);
    let warm = build();
    sync(&warm, &[]);
    proxy.take();
    // Three backports, each rolled out from a fleet at rest (every host's
    // work after the previous deploy done: a step comes minutes after the
    // last, not seconds); the median is the figure.
    let mut rollouts = Vec::new();
    let mut bytes = 0;
    let mut v2 = String::new();
    for round in 0..3 {
        settle_fleet(&pids);
        mutate(&tree, "backport", 11 + round);
        v2 = build();
        println!("rolling out {} ...", &v2[..12]);
        let (rollout, out) = sync(&v2, &["--stages", "10,50,100"]);
        bytes = proxy.take();
        assert!(out.contains("100.0% of production traffic synced"), "{out}");
        if std::env::var_os("SCAP_BENCH_VERBOSE").is_some() {
            println!("{out}");
        }
        rollouts.push(rollout);
    }
    let rollout = median_of(&rollouts);
    std::thread::sleep(std::time::Duration::from_secs(2));
    // `scap status` over every host, A B B A B A A B: through `scap serve`
    // as a deploy host runs it (its dashboard polling the fleet every 5 s,
    // the default; scap.toml's `sources` names it), which polls every host
    // afresh over the connections it keeps; and `--direct`, one poll of
    // each host from the command itself (a TLS handshake each).
    let (mut status_server, status_url) = start_listening(
        common::scap(&store)
            .arg("--config")
            .arg(&config)
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK)
            .arg("--hosts")
            .arg(&group_file),
    );
    let status_config = dir.join("scap-status.toml");
    std::fs::write(
        &status_config,
        format!(
            "sources = [\"{status_url}\"]\n{}",
            std::fs::read_to_string(&config).unwrap()
        ),
    )
    .unwrap();
    // Its first poll of the fleet, at start.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (mut via, mut direct) = (Vec::new(), Vec::new());
    for tool in "ABBABAAB".chars() {
        let started = Instant::now();
        let (_, out) = timed(
            common::scap(&store)
                .arg("--config")
                .arg(&status_config)
                .args(["status", "--json", "--hosts"])
                .arg(&group_file)
                .args(if tool == 'A' {
                    &[][..]
                } else {
                    &["--direct"][..]
                }),
        );
        let secs = started.elapsed().as_secs_f64();
        let by = if tool == 'A' {
            "scap serve"
        } else {
            "this command"
        };
        assert!(out.contains(&format!("\"polled_by\": \"{by}")), "{out}");
        if tool == 'A' { &mut via } else { &mut direct }.push(secs);
    }
    let _ = status_server.kill();
    let _ = status_server.wait();
    let (via, direct) = (median_of(&via), median_of(&direct));
    let started = Instant::now();
    timed(
        scap(&store)
            .args(["rollback", "--hosts"])
            .arg(&group_file)
            .args(["--version", &v2, "--yes"]),
    );
    let rollback = started.elapsed().as_secs_f64();
    let rb_bytes = proxy.take();

    let mut table = Table::new(&["step", "wall time", "bytes from the deploy host"]);
    table.row(vec![
        format!("first deploy of v1 to {n} fresh hosts (setup)"),
        ms(first),
        "".into(),
    ]);
    table.row(vec![
        "the first deploy: agent CPU a host until the command returned".into(),
        ms(cpu_during / n as f64),
        "".into(),
    ]);
    table.row(vec![
        "the first deploy: agent CPU a host with the work after the switch (the fleet at rest)"
            .into(),
        ms(cpu_total / n as f64),
        "".into(),
    ]);
    table.row(vec![
        format!(
            "backport rolled out 10% -> 50% -> 100% of {n} hosts, one command (median of 3 backports, each from a fleet at rest: {})",
            rollouts.iter().map(|&r| ms(r)).collect::<Vec<_>>().join(", ")
        ),
        ms(rollout),
        mb(bytes),
    ]);
    table.row(vec![
        format!("scap status of {n} hosts through scap serve (a fresh poll over its connections; median of 4, A B B A B A A B)"),
        ms(via),
        "".into(),
    ]);
    table.row(vec![
        format!("scap status --direct of {n} hosts (each polled by the command; median of 4)"),
        ms(direct),
        "".into(),
    ]);
    table.row(vec![
        format!("rollback of all {n} hosts (a switch each)"),
        ms(rollback),
        mb(rb_bytes),
    ]);
    table.save("canary", &format!("machine: {}\nhosts: {n}", machine()));
    // For profiling by hand: the fleet stays up until the file named by
    // SCAP_BENCH_HOLD is removed (the store, group file and config are
    // printed).
    if let Some(hold) = std::env::var_os("SCAP_BENCH_HOLD") {
        std::fs::write(&hold, "remove me to stop the fleet\n").unwrap();
        println!(
            "holding the fleet: store {}, --hosts {}, --config {}; rm {} to stop",
            store.display(),
            group_file.display(),
            config.display(),
            std::path::Path::new(&hold).display()
        );
        while std::path::Path::new(&hold).exists() {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    let _ = server.kill();
    let _ = server.wait();
    done(&dir);
}
