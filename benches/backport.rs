//! What a one-file backport costs an app server, background work included:
//! one real agent (TLS, signed versions) holding a tree of
//! SCAP_BENCH_FILES files (default 263,000, production's size), against
//! rsync bringing a copy of the same tree up to date.
//!
//! After one backport that brings the host to its steady state (three
//! release slots), for scap the figure is the agent process's CPU (user + system, from
//! /proc) from just before `scap sync` until the agent is idle again: the
//! sync, the switch, and the work after it (the spare slot, the slots'
//! watches, gc, the drift baseline). For rsync it is the CPU of both of its
//! processes (sender and receiver) for `rsync -a` of the staging tree onto
//! its last copy. Each round is a new backport, in the order A B B A B A A
//! B; the table gives medians. With SCAP_BENCH_VERBOSE=1 the agent's debug
//! log (what the work after each switch did, and how long each part took)
//! is kept in the bench directory.
//!
//! Run: `cargo bench --bench backport` (needs rsync and GNU time).

mod common;

use std::io::Read;
use std::process::Command;
use std::time::Instant;

use common::*;

/// CPU seconds of a command's children, from bash's `times`.
fn rsync_cpu(src: &std::path::Path, dst: &std::path::Path) -> (f64, f64) {
    let started = Instant::now();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "rsync -a --delete {}/ {}/ && times",
            src.display(),
            dst.display()
        ))
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "rsync failed: {out:?}");
    let wall = started.elapsed().as_secs_f64();
    // `times`: the shell's user and system time, then its children's.
    let text = String::from_utf8_lossy(&out.stdout);
    let children = text.lines().last().expect("times' second line");
    let secs: f64 = children
        .split_whitespace()
        .map(|t| {
            let (m, s) = t.trim_end_matches('s').split_once('m').expect("MmS.SSSs");
            m.parse::<f64>().unwrap() * 60.0 + s.parse::<f64>().unwrap()
        })
        .sum();
    (secs, wall)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let (dir, tree, files, host, v1) = OneHost::bench("backport", 263_000, 40_000);
    let staging = host.staging.clone();
    let build = || host.build();
    let start_agent = |name: &str| host.agent(name);
    let sync = |group: &std::path::Path, v: &str| host.sync(group, v);
    // A fresh host's sync, after the page cache's dirty pages are written
    // out (a tree just generated or a host just written would otherwise
    // be flushed during it, at its cost): wall seconds. The agent stops
    // once it is done; its directory stays until the bench ends (removing
    // 263k files makes ext4 slow to create the next host's for half a
    // minute).
    let fresh_host = |name: &str, v: &str| {
        assert!(Command::new("sync").status().unwrap().success());
        let (mut a, g, _) = start_agent(name);
        let secs = sync(&g, v);
        let _ = a.kill();
        let _ = a.wait();
        secs
    };
    // Twice: the first fresh host of a new version gets its pack as it is
    // built (nothing builds a fresh host's pack ahead), the next finds it
    // built.
    println!("two fresh hosts of v1, then of v1 with a backport ...");
    let mut pairs = Vec::new();
    for (round, v) in [v1.clone(), {
        mutate(&tree, "backport", 98);
        build()
    }]
    .iter()
    .enumerate()
    {
        let first = fresh_host(&format!("fresh{round}a"), v);
        let next = fresh_host(&format!("fresh{round}b"), v);
        pairs.push((first, next));
    }
    println!("first sync of {files} files ...");
    let (mut agent, group, log) = start_agent("mw1000");
    let pid = agent.id();
    sync(&group, &v1);
    // The agent's maintenance after start (a re-hash of the live
    // release, gc) must not fall inside a round.
    host.after_maintenance(pid, &log);
    let copy = dir.join("rsync-copy");
    rsync_cpu(&staging, &copy);
    // One backport first: a host's second deploy also writes its third
    // release slot whole (a fresh host has two); the rounds measure the
    // steady state.
    mutate(&tree, "backport", 99);
    let warm = build();
    sync(&group, &warm);
    settle_cpu(pid);

    // (agent CPU, sync wall time) a scap round; (CPU, wall) an rsync one.
    let (mut scap_runs, mut rsync_runs) = (Vec::new(), Vec::new());
    for (round, tool) in "ABBABAAB".chars().enumerate() {
        mutate(&tree, "backport", 100 + round as u64);
        if tool == 'A' {
            let v = build();
            let before = cpu_of(pid);
            let wall = sync(&group, &v);
            let after = settle_cpu(pid);
            scap_runs.push((after - before, wall));
        } else {
            rsync_runs.push(rsync_cpu(&staging, &copy));
        }
    }
    let med = |runs: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        median_of(&runs.iter().map(f).collect::<Vec<f64>>())
    };
    let mut table = Table::new(&["a one-file backport", "scap agent", "rsync", "ratio"]);
    let (sc, rc) = (med(&scap_runs, |r| r.0), med(&rsync_runs, |r| r.0));
    let (sw, rw) = (med(&scap_runs, |r| r.1), med(&rsync_runs, |r| r.1));
    table.row(vec![
        format!("CPU, background work included ({files} files; median of 4)"),
        ms(sc),
        ms(rc),
        format!("{:.3}", sc / rc),
    ]);
    table.row(vec![
        "wall time of the sync (scap sync, whole command; rsync -a)".into(),
        ms(sw),
        ms(rw),
        format!("{:.3}", sw / rw),
    ]);
    let (first, next) = pairs
        .iter()
        .fold((0.0, 0.0), |(f, n), p| (f + p.0, n + p.1));
    table.row(vec![
        format!(
            "a fresh host of {files} files, the first of its version (its pack streamed as it is built), against the next (2 pairs, summed; each: {})",
            pairs
                .iter()
                .map(|p| format!("{} / {}", ms(p.0), ms(p.1)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        ms(first),
        format!("next host {}", ms(next)),
        format!("{:.2}x", first / next),
    ]);
    table.save("backport", &format!("machine: {}", machine()));
    println!(
        "scap rounds (CPU s, wall s): {scap_runs:.3?}\nrsync rounds: {rsync_runs:.3?}\nfresh hosts (first, next): {pairs:.2?}"
    );
    let _ = agent.kill();
    let _ = agent.wait();
    host.stop();
    if std::env::var_os("SCAP_BENCH_VERBOSE").is_some() {
        let mut text = String::new();
        std::fs::File::open(&log)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        for l in text.lines().filter(|l| {
            l.contains("after-switch")
                || l.contains("watched in")
                || l.contains("spare slot")
                || l.contains("checked ")
                || l.contains("watched again")
                || l.contains("put off")
                || l.contains("maintenance")
        }) {
            println!("{l}");
        }
        println!("agent log kept: {}", log.display());
        return;
    }
    done(&dir);
}
