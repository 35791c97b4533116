//! Canary rollouts on a real local fleet: top-up arithmetic, weights,
//! gates and rollback, failure budgets, the lock, rollback, promote, status.

use std::fs;

use serde_json::{Value, json};

use crate::support::*;

fn small_tree(root: &std::path::Path, tag: &str) {
    let _ = fs::remove_dir_all(root);
    write(root, "index.php", format!("<?php // {tag}\n").as_bytes());
    write(
        root,
        "wmf-config/InitialiseSettings.php",
        format!("<?php // settings {tag}\n").as_bytes(),
    );
    write(root, "includes/a.php", b"<?php // shared\n");
}

fn fleet_with_two_versions(n: usize) -> (Fleet, String, String) {
    let mut fleet = Fleet::start(n);
    let staging = fleet.env.path("staging");
    small_tree(&staging, "old");
    let old = fleet
        .env
        .build(&[("mediawiki", &staging)], &["--label", "1.46.0-wmf.1"]);
    small_tree(&staging, "new");
    let new = fleet
        .env
        .build(&[("mediawiki", &staging)], &["--label", "1.46.0-wmf.2"]);
    fleet.serve();
    ok(&fleet.rollout(&old, &[]));
    (fleet, old, new)
}

#[test]
fn top_up_arithmetic_on_twenty_hosts() {
    let (fleet, old, new) = fleet_with_two_versions(20);
    assert_eq!(fleet.on(&old).len(), 20);
    let log = ok(&fleet.rollout("1.46.0-wmf.2", &["--canary=10%"]));
    assert!(log.contains("Started sync 10%"), "{log}");
    assert!(
        log.contains("sync-10%: 100% (ok: 2; fail: 0; left: 0)"),
        "{log}"
    );
    let first = fleet.on(&new);
    assert_eq!(first.len(), 2, "10% of 20 hosts");
    let since: Vec<Value> = first
        .iter()
        .map(|&i| fleet.get(i, "/v1/state").1["state"]["current"]["since"].clone())
        .collect();

    let log = ok(&fleet.rollout(&new, &["--canary=20%"]));
    let second = fleet.on(&new);
    assert_eq!(second.len(), 4, "20%: two more\n{log}");
    assert!(
        first.iter().all(|i| second.contains(i)),
        "the first two stay"
    );
    for (k, &i) in first.iter().enumerate() {
        assert_eq!(
            fleet.get(i, "/v1/state").1["state"]["current"]["since"],
            since[k],
            "host {i} untouched"
        );
    }
    // Same command again: nothing to do. A lower share: nothing either.
    let log = ok(&fleet.rollout(&new, &["--canary=20%"]));
    assert!(log.contains("nothing to do"), "{log}");
    let log = ok(&fleet.rollout(&new, &["--canary=5%"]));
    assert!(log.contains("nothing to do"), "{log}");
    assert_eq!(fleet.on(&new), second);

    let st = fleet.status();
    let shares: Vec<(String, f64)> = st["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_str().unwrap().to_string(),
                v["share"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shares, vec![(old.clone(), 80.0), (new.clone(), 20.0)]);

    // Stages in one command, to 100%.
    let log = ok(&fleet.rollout(&new, &["--stages", "50,100"]));
    assert!(log.contains("50.0% of production traffic synced"), "{log}");
    assert_eq!(fleet.on(&new).len(), 20);
    // The history has every step.
    let h = fleet.env.ok(&["history", "--json"]);
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h[0]["reached"], 100.0);
    assert_eq!(h[0]["action"], "sync");
}

#[test]
fn dry_run_changes_nothing_and_is_deterministic() {
    let (fleet, old, new) = fleet_with_two_versions(10);
    let a = ok(&fleet.rollout(&new, &["--canary=30%", "--dry-run"]));
    let b = ok(&fleet.rollout(&new, &["--canary=30%", "--dry-run"]));
    let picked = |log: &str| {
        log.lines()
            .find(|l| l.contains("to add"))
            .unwrap()
            .split("to add")
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(picked(&a), picked(&b));
    assert!(a.contains("would reach 30.0%"), "{a}");
    assert_eq!(fleet.on(&old).len(), 10);
    // And the real run picks exactly those hosts.
    ok(&fleet.rollout(&new, &["--canary=30%"]));
    let names: Vec<String> = fleet
        .on(&new)
        .iter()
        .map(|&i| format!("127.0.0.1:{}", fleet.hosts[i].proc.port()))
        .collect();
    for n in &names {
        assert!(picked(&a).contains(n), "{n} in {}", picked(&a));
    }
}

#[test]
fn weights_from_an_inventory() {
    let (fleet, _old, new) = fleet_with_two_versions(4);
    // Host 0 carries 70% of the traffic, and is in the canary group.
    let inv = fleet.env.path("inventory.toml");
    let mut text = String::new();
    for (i, h) in fleet.hosts.iter().enumerate() {
        let weight = if i == 0 { 7 } else { 1 };
        text.push_str(&format!(
            "[[host]]\nname = \"127.0.0.1:{}\"\nweight = {weight}\ndc = \"dc{}\"\ncanary = {}\n",
            h.proc.port(),
            i % 2,
            i == 0
        ));
    }
    fs::write(&inv, text).unwrap();
    let source = fleet.source();
    let out = fleet
        .env
        .cmd()
        .args([
            "sync",
            "--version",
            &new,
            "--source",
            &source,
            "--wait",
            "0",
            "--yes",
            "--canary=50%",
            "--inventory",
        ])
        .arg(&inv)
        .output()
        .unwrap();
    let log = ok(&out);
    assert!(
        log.contains("70.0% of production traffic synced"),
        "the canary host alone is 70%: {log}"
    );
    assert_eq!(fleet.on(&new), vec![0]);
    let bad = fleet.env.path("bad.toml");
    fs::write(&bad, "[[host]]\nname = \"mw1\"\nweight = 0\n").unwrap();
    let out = fleet
        .env
        .cmd()
        .args(["status", "--inventory"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("weight 0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_failing_gate_rolls_back_exactly_this_steps_hosts() {
    let (fleet, old, new) = fleet_with_two_versions(10);
    ok(&fleet.rollout(&new, &["--canary=10%"]));
    let first = fleet.on(&new);
    assert_eq!(first.len(), 1);
    // The next step's health check fails.
    let out = fleet.rollout(
        &new,
        &[
            "--canary=30%",
            "--check-cmd",
            "test \"$SCAP_PERCENT\" != 30%",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("GATE FAILED"), "{log}");
    assert!(log.contains("rolled back to"), "{log}");
    assert_eq!(fleet.on(&new), first, "only this command's hosts went back");
    assert_eq!(fleet.on(&old).len(), 9);
    // An HTTP probe that passes ({host} is each step host's agent).
    ok(&fleet.rollout(
        &new,
        &["--canary=30%", "--check-url", "https://{host}/v1/health"],
    ));
    assert_eq!(fleet.on(&new).len(), 3);
    // A failing probe without --yes and without a terminal: refused up front.
    let source = fleet.source();
    let out = fleet.run(&[
        "sync",
        "--version",
        &new,
        "--source",
        &source,
        "--canary=50%",
        "--check-url",
        "https://{host}/nope",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pass --yes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fleet.on(&new).len(), 3);
}

#[test]
fn a_down_host_is_counted_against_the_budget() {
    let (mut fleet, _old, new) = fleet_with_two_versions(5);
    fleet.hosts[2].proc.kill();
    let out = fleet.rollout(&new, &[]);
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!("127.0.0.1:{}", fleet.hosts[2].proc.port()))
            && log.contains("unreachable"),
        "{log}"
    );
    let result = String::from_utf8_lossy(&out.stdout);
    assert!(result.contains("--max-failures"), "{result}");
    assert!(
        fleet.on(&new).is_empty(),
        "stopped before changing anything"
    );
    let out = fleet.rollout(&new, &["--max-failures", "1"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "100% was asked and 80% reached: not a success"
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(fleet.on(&new).len(), 4, "{log}");
    assert!(log.contains("only 80.0% can be reached"), "{log}");
    assert!(
        stdout.contains("on 80.0% of production traffic"),
        "{stdout}"
    );
    let st = fleet.status();
    assert_eq!(st["unreachable"]["share"], 20.0);
}

#[test]
fn one_deploy_at_a_time() {
    let (fleet, _old, new) = fleet_with_two_versions(2);
    let dir = fleet.env.store.join("fleet");
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    // A deploy by a live process (this test) holds the lock.
    let me = json!({"user": "jdoe", "host": hostname, "pid": std::process::id(), "time": 1795000000, "command": "scap sync --canary=10%"});
    fs::write(dir.join("deploy.lock"), me.to_string()).unwrap();
    let out = fleet.rollout(&new, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another deploy is running: jdoe") && err.contains("scap sync --canary=10%"),
        "{err}"
    );
    assert!(fleet.env.ok(&["lock"]).contains("[running]"));
    // Its process gone: stale, reported, broken only on request.
    let dead = json!({"user": "jdoe", "host": hostname, "pid": 4_000_000_000u32, "time": 1795000000, "command": "scap sync"});
    fs::write(dir.join("deploy.lock"), dead.to_string()).unwrap();
    let out = fleet.rollout(&new, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("scap lock --break"));
    assert!(
        fleet
            .env
            .ok(&["lock", "--break"])
            .contains("broke the lock of jdoe")
    );
    ok(&fleet.rollout(&new, &[]));
    assert!(
        !dir.join("deploy.lock").exists(),
        "released after the deploy"
    );
}

#[test]
fn rollback_is_a_switch_and_promote_needs_everyone() {
    let (mut fleet, old, new) = fleet_with_two_versions(4);
    ok(&fleet.rollout(&new, &["--canary=50%"]));
    let out = fleet.run(&["promote", &new]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("on 50.0% of traffic"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&fleet.rollout(&new, &[]));
    ok(&fleet.run(&["promote", &new]));
    for i in 0..4 {
        assert_eq!(
            fleet.get(i, "/v1/state").1["state"]["stable"]["version"],
            new.as_str()
        );
    }
    // Roll back half the traffic, with the deploy host's server gone.
    fleet.server.take();
    let out = fleet.run(&[
        "rollback",
        "--version",
        &new,
        "--canary=50%",
        "--json",
        "--yes",
    ]);
    ok(&out);
    let outcome: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(outcome["ok"], true);
    let results = &outcome["results"];
    assert_eq!(results.as_array().unwrap().len(), 2);
    for r in results.as_array().unwrap() {
        assert_eq!(r["outcome"]["fetched"]["bytes"], 0, "a pure switch");
        assert_eq!(r["outcome"]["version"], old.as_str());
    }
    assert_eq!(fleet.on(&new).len(), 2);
    // Everyone back to previous.
    ok(&fleet.run(&["rollback", "--version", &new, "--yes"]));
    assert_eq!(fleet.on(&old).len(), 4);
    let h: Value = serde_json::from_str(&fleet.env.ok(&["history", "--json"])).unwrap();
    assert_eq!(h[0]["action"], "rollback");
}

#[test]
fn bad_input_is_refused_clearly() {
    let (fleet, _old, new) = fleet_with_two_versions(2);
    for (args, want) in [
        (vec!["--canary=120%"], "cannot exceed 100%"),
        (vec!["--canary=ten"], "not a percentage"),
        (vec!["--stages", "50,20"], "must rise"),
        (vec!["--max-failures", "some"], "--max-failures"),
    ] {
        let out = fleet.rollout(&new, &args);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = fleet.rollout("1.46.0-wmf.9", &[]);
    assert_eq!(out.status.code(), Some(4));
    let empty = fleet.env.path("empty-group");
    fs::write(&empty, "# nobody\n").unwrap();
    let out = fleet
        .env
        .cmd()
        .args(["status", "--hosts"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no hosts in it"));
    let dup = fleet.env.path("dup-group");
    fs::write(&dup, "127.0.0.1:1\n127.0.0.1:1\n").unwrap();
    let out = fleet
        .env
        .cmd()
        .args(["status", "--hosts"])
        .arg(&dup)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("listed twice"));
}

#[test]
fn sync_file_deploys_one_file_from_staging() {
    let (fleet, _old, new) = fleet_with_two_versions(3);
    ok(&fleet.rollout(&new, &[]));
    let staging = fleet.env.path("staging");
    write(
        &staging,
        "wmf-config/InitialiseSettings.php",
        b"<?php // SWAT: one setting\n",
    );
    write(
        &staging,
        "index.php",
        b"<?php // not part of this sync-file\n",
    );
    let source = fleet.source();
    let out = fleet.run(&[
        "sync-file",
        "wmf-config/InitialiseSettings.php",
        "--staging",
        staging.to_str().unwrap(),
        "-m",
        "SWAT: [[gerrit:12345|Not a real patch]]",
        "--source",
        &source,
        "--wait",
        "0",
        "--yes",
        "--canary",
        "100%",
        "--force",
    ]);
    ok(&out);
    let v = fleet.current(0).unwrap();
    assert_ne!(v, new);
    assert_eq!(fleet.on(&v).len(), 3);
    assert_eq!(
        fleet.env.ok(&["diff", &new, &v]).trim(),
        "M\tmediawiki/wmf-config/InitialiseSettings.php"
    );
    let live = fleet.live(1, "mediawiki");
    assert_eq!(
        fs::read_to_string(live.join("wmf-config/InitialiseSettings.php")).unwrap(),
        "<?php // SWAT: one setting\n"
    );
    assert_eq!(
        fs::read_to_string(live.join("index.php")).unwrap(),
        "<?php // new\n"
    );
    assert!(
        fleet
            .env
            .ok(&["log", "-n", "1"])
            .contains("SWAT: [[gerrit:12345|Not a real patch]]")
    );
}

#[test]
fn ctrl_c_stops_between_steps_and_releases_the_lock() {
    let (fleet, _old, new) = fleet_with_two_versions(4);
    // The first step's check sends SIGINT to scap, as an operator's Ctrl-C.
    let out = fleet.rollout(
        &new,
        &["--stages", "25,100", "--check-cmd", "kill -INT $PPID"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("interrupted"), "{stdout}");
    assert_eq!(
        fleet.on(&new).len(),
        1,
        "the first step's host stays switched, no more"
    );
    assert!(
        !fleet.env.store.join("fleet/deploy.lock").exists(),
        "the lock is released"
    );
    let h: Value = serde_json::from_str(&fleet.env.ok(&["history", "--json"])).unwrap();
    assert_eq!(h[0]["ok"], false);
}

#[test]
fn status_shows_hosts_edited_by_hand() {
    let (fleet, _old, _new) = fleet_with_two_versions(2);
    // The baseline check runs after the switch, in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fleet.get(1, "/v1/state").1["drift"]["changed"] != json!(0) {
        assert!(std::time::Instant::now() < deadline, "no drift baseline");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    fs::write(
        fleet.live(1, "mediawiki").join("index.php"),
        b"<?php // hotfix by hand\n",
    )
    .unwrap();
    let (_, d) = fleet.get(1, "/v1/verify");
    assert_eq!(d["changes"].as_array().unwrap().len(), 1);
    let st = fleet.status();
    let drift: Vec<Value> = st["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["drift"].clone())
        .collect();
    assert_eq!(drift, vec![json!(0), json!(1)]);
    let text = String::from_utf8_lossy(&fleet.run(&["status"]).stdout).into_owned();
    assert!(text.contains("DRIFT: 1 file(s) edited by hand"), "{text}");
}
