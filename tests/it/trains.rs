//! A fleet running two trains at once: a change (sync-file, sync-dir)
//! made during a canary reaches every live train and keeps the shares; the
//! fleet policy from scap.toml and its safe default; hosts that converge by
//! themselves to the deploy host's desired state; rollouts that outlive
//! their terminal (`--resume`); gc that knows what the fleet holds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::support::*;

/// An inventory naming every host as its agent calls itself (mw1001, ...),
/// at its current address; weights 1, 2, 3, 1, 2, 3...; two datacenters;
/// the `canaries` marked canary.
fn inventory(fleet: &Fleet, canaries: &[usize]) -> PathBuf {
    let mut text = String::new();
    for (i, h) in fleet.hosts.iter().enumerate() {
        text.push_str(&format!(
            "[[host]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\nweight = {}\ndc = \"{}\"\ncanary = {}\n\n",
            h.name,
            h.proc.port(),
            1 + i % 3,
            if i % 2 == 0 { "eqiad" } else { "codfw" },
            canaries.contains(&i)
        ));
    }
    let p = fleet.env.path("inventory.toml");
    fs::write(&p, text).unwrap();
    p
}

/// scap `args` over the fleet of inventory `inv`, as the deployer.
fn run_inv(fleet: &Fleet, inv: &Path, args: &[&str]) -> Output {
    fleet
        .env
        .cmd()
        .args(args)
        .arg("--inventory")
        .arg(inv)
        .args(fleet.transport("deployer"))
        .output()
        .unwrap()
}

/// A train's staging tree: its own code, and the shared config.
fn train_tree(dir: &Path, name: &str) {
    write(
        dir,
        "php/version.php",
        format!("<?php // {name}\n").as_bytes(),
    );
    write(
        dir,
        "php/includes/Setup.php",
        format!("<?php // setup of {name}\n").as_bytes(),
    );
    write(
        dir,
        "index.php",
        b"<?php require 'php/includes/Setup.php';\n",
    );
    write(
        dir,
        "wmf-config/InitialiseSettings.php",
        b"<?php // settings v1\n",
    );
    write(dir, "wmf-config/CommonSettings.php", b"<?php // common\n");
    write(dir, "docroot/robots.txt", b"User-agent: *\n");
}

/// The share of traffic (percent) on each version, from `scap status`.
fn shares(fleet: &Fleet, inv: &Path) -> std::collections::BTreeMap<String, f64> {
    let out = run_inv(fleet, inv, &["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&ok_out(&out)).unwrap();
    st["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_str().unwrap().to_string(),
                v["share"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn read(fleet: &Fleet, i: usize, rel: &str) -> String {
    fs::read_to_string(fleet.live(i, "mediawiki").join(rel)).unwrap()
}

#[test]
fn a_change_during_a_canary_reaches_both_trains_and_keeps_the_shares() {
    let mut fleet = Fleet::start(20);
    let (old_dir, new_dir) = (fleet.env.path("train-wmf5"), fleet.env.path("train-wmf6"));
    train_tree(&old_dir, "1.46.0-wmf.5");
    train_tree(&new_dir, "1.46.0-wmf.6");
    let t1 = fleet
        .env
        .build(&[("mediawiki", &old_dir)], &["--label", "1.46.0-wmf.5"]);
    let t2 = fleet
        .env
        .build(&[("mediawiki", &new_dir)], &["--label", "1.46.0-wmf.6"]);
    let source = fleet.serve();
    let inv = inventory(&fleet, &[0, 1]);
    let gate = "https://{addr}/v1/health";
    let common = ["--source", &source, "--yes", "--wait", "0"];
    let with = |extra: &[&str]| -> Vec<String> {
        common.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_inv(&fleet, &inv, &a)
    };
    let mut a = vec!["sync".to_string(), "--version".into(), t1.clone()];
    a.extend(with(&["--canary", "100%", "--check-url", gate]));
    ok(&run(a));
    let mut a = vec![
        "sync".to_string(),
        "--version".into(),
        "1.46.0-wmf.6".into(),
    ];
    a.extend(with(&["--canary", "50%"]));
    ok(&run(a));
    let before = shares(&fleet, &inv);
    assert_eq!(before.len(), 2, "two trains: {before:?}");
    assert!(before[&t2] >= 50.0 && before[&t2] < 70.0, "{before:?}");
    let on_t1 = fleet.on(&t1);
    let on_t2 = fleet.on(&t2);
    assert_eq!(on_t1.len() + on_t2.len(), 20);
    let records_before = fleet.env.ok(&["log", "--json"]);

    // The config change, staged.
    let staging = fleet.env.path("staging");
    write(
        &staging,
        "wmf-config/InitialiseSettings.php",
        b"<?php // settings v2\n",
    );
    let file = "wmf-config/InitialiseSettings.php";
    let message = "SWAT: [[gerrit:12345|raise a limit]]";
    let change_args = |dry: bool| {
        let mut a = vec![
            "sync-file".to_string(),
            file.into(),
            message.into(),
            "--staging".into(),
            staging.display().to_string(),
        ];
        a.extend(with(&[
            "--stages",
            "canary,100%",
            "--check-url",
            gate,
            "--json",
        ]));
        if dry {
            a.push("--dry-run".into());
        }
        a
    };
    // The dry run says, per host group, from and to which version, and
    // which files; it changes nothing and records nothing.
    let out = run(change_args(true));
    let log = stderr(&out);
    ok(&out);
    for (train, v) in [("1.46.0-wmf.5", &t1), ("1.46.0-wmf.6", &t2)] {
        assert!(
            log.contains(&format!("dry run: would build {train} ({})", &v[..12])),
            "{log}"
        );
    }
    assert!(
        log.contains("M mediawiki/wmf-config/InitialiseSettings.php"),
        "{log}"
    );
    assert!(
        log.contains("10 host(s)") || log.contains("host(s):"),
        "{log}"
    );
    assert_eq!(fleet.on(&t1), on_t1);
    assert_eq!(fleet.on(&t2), on_t2);
    assert_eq!(fleet.env.ok(&["log", "--json"]), records_before);

    // The change itself.
    let out = run(change_args(false));
    let text = ok_out(&out);
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let id = j["change"]["id"].as_str().unwrap().to_string();
    let versions = j["change"]["steps"].as_array().unwrap();
    let new_of = |base: &str| -> String {
        versions
            .iter()
            .find(|v| v["from"] == base)
            .unwrap_or_else(|| panic!("{base} in {versions:?}"))["to"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (t1c, t2c) = (new_of(&t1), new_of(&t2));
    assert_ne!(t1c, t1);
    assert_ne!(t2c, t2);
    // Each host on its own train, with the change; the shares as before.
    assert_eq!(fleet.on(&t1c), on_t1);
    assert_eq!(fleet.on(&t2c), on_t2);
    let after = shares(&fleet, &inv);
    assert_eq!(after[&t1c], before[&t1]);
    assert_eq!(after[&t2c], before[&t2]);
    for &i in &on_t1 {
        assert_eq!(
            read(&fleet, i, "php/version.php"),
            "<?php // 1.46.0-wmf.5\n"
        );
        assert_eq!(read(&fleet, i, file), "<?php // settings v2\n");
    }
    for &i in &on_t2 {
        assert_eq!(
            read(&fleet, i, "php/version.php"),
            "<?php // 1.46.0-wmf.6\n"
        );
        assert_eq!(read(&fleet, i, file), "<?php // settings v2\n");
    }
    // One change, two versions, one message: in the history and the log.
    let history: serde_json::Value =
        serde_json::from_str(&fleet.env.ok(&["history", "--json", "-n", "100"])).unwrap();
    let steps: Vec<&serde_json::Value> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["change"] == id.as_str())
        .collect();
    assert_eq!(steps.len(), 2, "a canary step and a 100% step: {history}");
    assert!(
        steps
            .iter()
            .all(|e| e["action"] == "change" && e["ok"] == true)
    );
    let log: serde_json::Value =
        serde_json::from_str(&fleet.env.ok(&["log", "--change", &id, "--json"])).unwrap();
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert!(
        log.iter()
            .all(|r| r["message"] == message && r["change"] == id.as_str())
    );
    let mut parents: Vec<&str> = log.iter().map(|r| r["parent"].as_str().unwrap()).collect();
    parents.sort();
    let mut want = vec![t1.as_str(), t2.as_str()];
    want.sort();
    assert_eq!(parents, want);
    let d: serde_json::Value =
        serde_json::from_str(&fleet.env.ok(&["diff", &t1, &t1c, "--json"])).unwrap();
    assert!(
        d["descent"]
            .as_str()
            .unwrap()
            .contains(&format!("change {id}")),
        "{d}"
    );
    let d: serde_json::Value =
        serde_json::from_str(&fleet.env.ok(&["diff", &t1c, &t2c, "--json"])).unwrap();
    assert!(d["descent"].as_str().unwrap().contains("one change"), "{d}");

    // The change succeeded on every host: each train's head moved to its
    // new version, and the move is in the train's history.
    assert_eq!(fleet.env.ok(&["resolve", "1.46.0-wmf.6"]).trim(), t2c);
    assert_eq!(fleet.env.ok(&["resolve", "1.46.0-wmf.5"]).trim(), t1c);
    let moves: serde_json::Value =
        serde_json::from_str(&fleet.env.ok(&["log", "1.46.0-wmf.6", "--json"])).unwrap();
    let last = moves.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["from"], t2.as_str(), "{moves}");
    assert_eq!(last["to"], t2c.as_str(), "{moves}");
    assert_eq!(last["action"], "change");
    assert_eq!(last["message"], message);
    // Continuing the canary by the train's name deploys its head: the
    // train with the change.
    let mut a = vec![
        "sync".to_string(),
        "--version".into(),
        "1.46.0-wmf.6".into(),
    ];
    a.extend(with(&["--canary", "100%", "--check-url", gate]));
    let out = run(a);
    ok(&out);
    assert_eq!(fleet.on(&t2c).len(), 20);
    for i in [0, 7, 19] {
        assert_eq!(
            read(&fleet, i, "php/version.php"),
            "<?php // 1.46.0-wmf.6\n"
        );
        assert_eq!(read(&fleet, i, file), "<?php // settings v2\n");
    }
    // Rolling the canary back: every host to the old train with the change.
    let out = run_inv(
        &fleet,
        &inv,
        &[
            "rollback",
            "--version",
            "1.46.0-wmf.6",
            "--source",
            &source,
            "--yes",
        ],
    );
    ok(&out);
    assert_eq!(fleet.on(&t1c).len(), 20, "{}", stderr(&out));
    for i in [0, 7, 19] {
        assert_eq!(
            read(&fleet, i, "php/version.php"),
            "<?php // 1.46.0-wmf.5\n"
        );
        assert_eq!(read(&fleet, i, file), "<?php // settings v2\n");
    }
    // And the desired state agrees: every host's target is where it is.
    let st: serde_json::Value =
        serde_json::from_str(&ok_out(&run_inv(&fleet, &inv, &["status", "--json"]))).unwrap();
    assert_eq!(st["behind"].as_array().unwrap().len(), 0, "{st}");
    assert!(
        st["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["target"] == t1c.as_str())
    );
    // The rollout is over: nothing to resume.
    let out = run_inv(&fleet, &inv, &["sync", "--resume", "--yes"]);
    assert!(stderr(&out).contains("was rolled back"), "{}", stderr(&out));
}

#[test]
fn sync_dir_and_what_a_change_refuses() {
    let mut fleet = Fleet::start(4);
    let (a_dir, b_dir) = (fleet.env.path("a"), fleet.env.path("b"));
    train_tree(&a_dir, "a");
    train_tree(&b_dir, "b");
    // In train b, "cache" is a directory; in train a, a file.
    write(&a_dir, "cache", b"a file\n");
    write(&b_dir, "cache/x", b"a dir\n");
    let ta = fleet.env.build(&[("mediawiki", &a_dir)], &[]);
    let tb = fleet.env.build(&[("mediawiki", &b_dir)], &[]);
    let source = fleet.serve();
    let inv = inventory(&fleet, &[0]);
    let base = [
        "--source",
        source.as_str(),
        "--yes",
        "--wait",
        "0",
        "--force",
    ];
    let args = |head: &[&str], tail: &[&str]| -> Vec<String> {
        head.iter()
            .chain(&base)
            .chain(tail)
            .map(|s| s.to_string())
            .collect()
    };
    let run = |v: Vec<String>| {
        let a: Vec<&str> = v.iter().map(String::as_str).collect();
        run_inv(&fleet, &inv, &a)
    };
    ok(&run(args(
        &["sync", "--version", &ta],
        &["--canary", "100%"],
    )));
    ok(&run(args(
        &["sync", "--version", &tb],
        &["--canary", "50%"],
    )));
    let on_a = fleet.on(&ta);
    let staging = fleet.env.path("staging");
    write(
        &staging,
        "wmf-config/InitialiseSettings.php",
        b"<?php // v2\n",
    );
    write(&staging, "wmf-config/extra/new.php", b"<?php // new\n");
    write(&staging, "cache", b"x\n");
    write(
        &staging,
        "wmf-config/Nope.php",
        b"<?php // not in any version\n",
    );
    let st = staging.display().to_string();
    // A path no live version has.
    let out = run(args(
        &[
            "sync-file",
            "wmf-config/Nope.php",
            "-m",
            "x",
            "--staging",
            &st,
        ],
        &["--canary", "100%"],
    ));
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("wmf-config/Nope.php") && e.contains("in none of the live versions"),
        "{e}"
    );
    assert!(e.contains("--create"), "{e}");
    // A file in one live train, a directory in the other.
    let out = run(args(
        &["sync-file", "cache", "--staging", &st],
        &["--canary", "100%"],
    ));
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("is a file in") && e.contains("a directory in"),
        "{e}"
    );
    assert!(e.contains(&ta[..12]) && e.contains(&tb[..12]), "{e}");
    // A directory given to sync-file.
    let out = run(args(
        &["sync-file", "wmf-config", "--staging", &st],
        &["--canary", "100%"],
    ));
    assert!(
        stderr(&out).contains("use `scap sync-dir`"),
        "{}",
        stderr(&out)
    );
    // Nothing was recorded by any of them.
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&fleet.env.ok(&["log", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // sync-dir takes the whole directory, with its new file, into both.
    let out = run(args(
        &[
            "sync-dir",
            "wmf-config",
            "Backport: config dir",
            "--staging",
            &st,
        ],
        &["--canary", "100%"],
    ));
    ok(&out);
    for i in 0..4 {
        assert_eq!(
            read(&fleet, i, "wmf-config/InitialiseSettings.php"),
            "<?php // v2\n"
        );
        assert_eq!(
            read(&fleet, i, "wmf-config/extra/new.php"),
            "<?php // new\n"
        );
        // The staging dir has no CommonSettings.php: it is gone, as with rsync --delete.
        assert!(
            !fleet
                .live(i, "mediawiki")
                .join("wmf-config/CommonSettings.php")
                .exists()
        );
    }
    let a_hosts: Vec<usize> = (0..4)
        .filter(|&i| read(&fleet, i, "php/version.php") == "<?php // a\n")
        .collect();
    assert_eq!(a_hosts, on_a, "each host stayed on its train");
}

#[test]
fn hosts_converge_by_themselves() {
    let mut fleet = Fleet::start(0);
    let mw = fleet.env.path("mw");
    train_tree(&mw, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let source = fleet.serve();
    for i in 0..4 {
        let dir = fleet.env.path(&format!("hosts/mw{}", 1001 + i));
        fleet.add_host_with(
            &format!("mw{}", 1001 + i),
            &dir,
            &["--source".into(), source.clone()],
        );
    }
    let inv = inventory(&fleet, &[]);
    let sync = |fleet: &Fleet, v: &str, extra: &[&str]| {
        let mut a = vec![
            "sync",
            "--version",
            v,
            "--source",
            &source,
            "--yes",
            "--wait",
            "0",
        ];
        a.extend(extra);
        run_inv(fleet, &inventory(fleet, &[]), &a)
    };
    // A new host with no target keeps what it has (nothing) and says so.
    let out = run_inv(&fleet, &inv, &["status", "--json"]);
    let st: serde_json::Value = serde_json::from_str(&ok_out(&out)).unwrap();
    assert_eq!(st["behind"].as_array().unwrap().len(), 0);
    ok(&sync(&fleet, &v1, &["--canary", "100%", "--force"]));
    assert_eq!(fleet.on(&v1).len(), 4);
    let want = snapshot(&fleet.live(0, "mediawiki"));

    // A reimage: the agent's directory wiped, the agent started again. It
    // asks the deploy host and converges, with no controller command.
    fleet.hosts[1].proc.kill();
    fs::remove_dir_all(&fleet.hosts[1].dir).unwrap();
    fleet.restart(1);
    wait_for(60, "the reimaged host to converge", || {
        fleet.current(1).as_deref() == Some(&v1)
    });
    assert_eq!(snapshot(&fleet.live(1, "mediawiki")), want);
    let (_, state) = fleet.get(1, "/v1/state");
    assert_eq!(state["state"]["history"][0]["action"], "pull", "{state}");

    // A host down during a step gets its target, and catches up when it
    // comes back.
    write(&mw, "php/version.php", b"<?php // v2\n");
    let v2 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    fleet.hosts[2].proc.kill();
    let out = sync(
        &fleet,
        &v2,
        &["--canary", "100%", "--force", "--max-failures", "1"],
    );
    assert!(stderr(&out).contains("mw1003"), "{}", stderr(&out));
    assert_eq!(fleet.on(&v2), vec![0, 1, 3]);
    fleet.restart(2);
    wait_for(60, "the host that was down to catch up", || {
        fleet.current(2).as_deref() == Some(&v2)
    });

    // A host without --source that was down stays behind: status says so,
    // and `scap sync --catch-up` brings it.
    fleet.hosts[3].extra.clear();
    fleet.hosts[3].proc.kill();
    write(&mw, "php/version.php", b"<?php // v3\n");
    let v3 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let out = sync(
        &fleet,
        &v3,
        &["--canary", "100%", "--force", "--max-failures", "1"],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "not every host got it: {}",
        stderr(&out)
    );
    fleet.restart(3);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fleet.current(3).as_deref(), Some(v2.as_str()));
    let inv = inventory(&fleet, &[]);
    let st: serde_json::Value =
        serde_json::from_str(&ok_out(&run_inv(&fleet, &inv, &["status", "--json"]))).unwrap();
    let behind = st["behind"].as_array().unwrap();
    assert_eq!(behind.len(), 1, "{st}");
    assert_eq!(behind[0]["host"], "mw1004");
    assert_eq!(behind[0]["target"], v3.as_str());
    let text = ok_out(&run_inv(&fleet, &inv, &["status"]));
    assert!(
        text.contains("BEHIND") && text.contains("--catch-up"),
        "{text}"
    );
    let out = run_inv(
        &fleet,
        &inv,
        &["sync", "--catch-up", "--source", &source, "--yes"],
    );
    assert!(ok_out(&out).contains("caught up 1 host(s)"));
    assert_eq!(fleet.on(&v3).len(), 4);
    // A host can also be told to pull now (`scap pull` on the host).
    let (code, body) = fleet.post(0, "/v1/pull", serde_json::json!({"by": "test"}));
    assert_eq!(code, 200, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("already on its target"),
        "{body}"
    );
}

#[test]
fn a_killed_controller_resumes_and_moves_each_host_once() {
    let fleet = Fleet::start(6);
    let mw = fleet.env.path("mw");
    train_tree(&mw, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    write(&mw, "php/version.php", b"<?php // v2\n");
    let v2 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let mut fleet = fleet;
    let source = fleet.serve();
    let inv = inventory(&fleet, &[]);
    // Nothing to resume yet.
    let out = run_inv(&fleet, &inv, &["sync", "--resume", "--yes"]);
    assert!(
        stderr(&out).contains("no rollout to resume"),
        "{}",
        stderr(&out)
    );
    ok(&run_inv(
        &fleet,
        &inv,
        &[
            "sync",
            "--version",
            &v1,
            "--source",
            &source,
            "--yes",
            "--wait",
            "0",
            "--canary",
            "100%",
            "--force",
        ],
    ));
    // Three stages with a 3 s wait before each step's gates; killed (-9)
    // once the first is done.
    let mut child = fleet
        .env
        .cmd()
        .args(["sync", "--version", &v2, "--source", &source, "--yes"])
        .args([
            "--stages",
            "20%,50%,100%",
            "--wait",
            "3s",
            "--check-cmd",
            "true",
        ])
        .arg("--inventory")
        .arg(&inv)
        .args(fleet.transport("deployer"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let record = fleet.env.store.join("fleet/rollout.json");
    wait_for(60, "the first stage to complete", || {
        fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|r| r["version"] == v2.as_str() && r["completed"] == 1)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let st: serde_json::Value =
        serde_json::from_str(&ok_out(&run_inv(&fleet, &inv, &["status", "--json"]))).unwrap();
    assert_eq!(st["rollout"]["completed"], 1, "{st}");
    assert_eq!(st["rollout"]["next"], "50%", "{st}");
    let text = ok_out(&run_inv(&fleet, &inv, &["status"]));
    assert!(
        text.contains("1 of 3 stages done") && text.contains("next: 50%"),
        "{text}"
    );
    // The lock it left is taken over by --resume (its holder is gone).
    let out = run_inv(&fleet, &inv, &["sync", "--resume", "--yes"]);
    let log = stderr(&out);
    ok(&out);
    assert!(log.contains("resuming the rollout"), "{log}");
    assert!(log.contains("taking over its lock"), "{log}");
    assert_eq!(fleet.on(&v2).len(), 6);
    // Each host was synced to v2 exactly once.
    for i in 0..6 {
        let (_, s) = fleet.get(i, "/v1/state");
        let syncs = s["state"]["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "sync" && e["version"] == v2.as_str())
            .count();
        assert_eq!(syncs, 1, "host {i}: {s}");
    }
    let out = run_inv(&fleet, &inv, &["sync", "--resume", "--yes"]);
    assert!(stderr(&out).contains("is finished"), "{}", stderr(&out));
}

#[test]
fn promote_pins_and_gc_keeps_what_the_fleet_holds() {
    let mut fleet = Fleet::start(3);
    let mw = fleet.env.path("mw");
    let mut vs = Vec::new();
    for n in 1..=4 {
        train_tree(&mw, &format!("v{n}"));
        write(
            &mw,
            &format!("only-in-v{n}.php"),
            format!("<?php // {n}\n").as_bytes(),
        );
        vs.push(fleet.env.build(&[("mediawiki", &mw)], &[]));
        fs::remove_file(mw.join(format!("only-in-v{n}.php"))).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
    }
    let source = fleet.serve();
    let inv = inventory(&fleet, &[]);
    let sync = |v: &str, share: &str| {
        run_inv(
            &fleet,
            &inv,
            &[
                "sync",
                "--version",
                v,
                "--source",
                &source,
                "--yes",
                "--wait",
                "0",
                "--canary",
                share,
                "--force",
            ],
        )
    };
    ok(&sync(&vs[0], "100%"));
    let out = run_inv(&fleet, &inv, &["promote", &vs[0]]);
    assert!(ok_out(&out).contains("pinned it in the store"));
    assert!(fleet.env.store.join("refs/pins").join(&vs[0]).exists());
    // v3 on one host; v2 and v4 nowhere.
    ok(&sync(&vs[2], "20%"));
    let gc = |extra: &[&str]| {
        let mut a = vec!["gc", "--keep", "1", "--json"];
        a.extend(extra);
        run_inv(&fleet, &inv, &a)
    };
    let report: serde_json::Value = serde_json::from_str(&ok_out(&gc(&[]))).unwrap();
    let removed: Vec<&str> = report["removed_versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(removed, vec![vs[1].as_str()], "{report}");
    for v in [&vs[0], &vs[2], &vs[3]] {
        assert!(
            fleet.env.raw(&["verify", v]).status.success(),
            "{v} kept whole"
        );
    }
    // Promoting v3 pins it and unpins v1 (still kept: hosts hold it).
    ok(&sync(&vs[2], "100%"));
    let out = run_inv(&fleet, &inv, &["promote", &vs[2]]);
    assert!(ok_out(&out).contains("unpinned the old stable"));
    assert!(!fleet.env.store.join("refs/pins").join(&vs[0]).exists());
    assert!(fleet.env.store.join("refs/pins").join(&vs[2]).exists());
    // A host that does not answer: gc refuses, naming it.
    let mut fleet = fleet;
    fleet.hosts[1].proc.kill();
    let out = run_inv(&fleet, &inv, &["gc", "--keep", "1"]);
    let e = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{e}");
    assert!(e.contains("mw1002") && e.contains("did not answer"), "{e}");
}

#[test]
fn the_default_policy_and_the_site_policy() {
    let fleet = Fleet::start(4);
    let mw = fleet.env.path("mw");
    train_tree(&mw, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    write(&mw, "php/version.php", b"<?php // v2\n");
    let v2 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let mut fleet = fleet;
    let source = fleet.serve();
    let inv = inventory(&fleet, &[0]);
    let base = fs::read_to_string(fleet.env.path("scap.toml")).unwrap();
    // Top-level keys go before the [tls] table of the lab's scap.toml.
    let config_with = |top: &str, tables: &str| {
        fs::write(
            fleet.env.path("scap.toml"),
            format!(
                "{top}inventory = \"{}\"\nsources = [\"{source}\"]\n{base}\n{tables}",
                inv.display()
            ),
        )
        .unwrap();
    };
    let config = |tables: &str| config_with("", tables);
    let scap = |args: &[&str]| {
        fleet
            .env
            .cmd()
            .args(args)
            .args(fleet.transport("deployer"))
            .output()
            .unwrap()
    };
    // No share given, no gate configured: reaching every host needs --force.
    config("");
    let out = scap(&["sync", "--version", &v1, "--yes", "--wait", "0"]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("no health gate is configured") && e.contains("--force"),
        "{e}"
    );
    assert!(fleet.on(&v1).is_empty());
    ok(&scap(&[
        "sync",
        "--version",
        &v1,
        "--yes",
        "--wait",
        "0",
        "--force",
    ]));
    assert_eq!(fleet.on(&v1).len(), 4, "canary, then every host");
    // With a gate that fails: the canary host gets v2, fails its gate, is
    // rolled back; no other host is touched.
    config("[[gate]]\ncommand = \"test \\\"$SCAP_PERCENT\\\" != canary\"\n");
    let out = scap(&["sync", "--version", &v2, "--yes", "--wait", "0"]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("GATE FAILED"), "{e}");
    assert!(e.contains("Started sync canary"), "{e}");
    assert!(
        !e.contains("Started sync 100%"),
        "stopped after the canary hosts: {e}"
    );
    assert_eq!(fleet.on(&v1).len(), 4);
    // A passing gate: canary, the wait, the gate, then the rest.
    config("[[gate]]\ncommand = \"true\"\n");
    let out = scap(&["sync", "--version", &v2, "--yes", "--wait", "0"]);
    let e = stderr(&out);
    ok(&out);
    assert!(
        e.contains("Started sync canary") && e.contains("Started sync 100%"),
        "{e}"
    );
    assert_eq!(fleet.on(&v2).len(), 4);
    // A site policy of its own.
    config(
        "[policy]\nstages = [\"canary\", \"50%\", \"100%\"]\nwait = \"0\"\n\n[[gate]]\ncommand = \"true\"\n",
    );
    let out = scap(&["sync", "--version", &v1, "--yes", "--dry-run"]);
    let e = stderr(&out);
    ok(&out);
    assert!(
        e.contains("the canary group") && e.contains("50% of traffic"),
        "{e}"
    );
    // Unknown keys are named, with the known ones.
    config_with("hostz = []\n", "");
    let out = scap(&["status"]);
    let e = stderr(&out);
    assert!(
        e.contains("hostz") && e.contains("hosts") && e.contains("inventory"),
        "{e}"
    );
    config("[policy]\nstages = [\"50%\", \"10%\"]\n");
    let out = scap(&["sync", "--version", &v1, "--yes"]);
    assert!(stderr(&out).contains("[policy] stages"), "{}", stderr(&out));
    // A deploy while another holds the lock: refused, naming it and its rollout.
    write(&mw, "php/version.php", b"<?php // v3\n");
    let v3 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    config("[[gate]]\ncommand = \"sleep 4\"\n");
    let mut slow = fleet
        .env
        .cmd()
        .args(["sync", "--version", &v3, "--yes", "--wait", "0"])
        .args(fleet.transport("deployer"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = fleet.env.store.join("fleet/deploy.lock");
    wait_for(30, "the lock", || lock.exists());
    std::thread::sleep(Duration::from_millis(500));
    let staging = fleet.env.path("staging");
    write(
        &staging,
        "wmf-config/InitialiseSettings.php",
        b"<?php // v2\n",
    );
    let out = scap(&[
        "sync-file",
        "wmf-config/InitialiseSettings.php",
        "backport",
        "--staging",
        staging.to_str().unwrap(),
        "--yes",
    ]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("another deploy is running") && e.contains("rollout in progress"),
        "{e}"
    );
    slow.wait().unwrap();
}

#[test]
fn a_rollout_survives_its_terminal_and_stops_cleanly_on_sigterm() {
    let fleet = Fleet::start(4);
    let mw = fleet.env.path("mw");
    train_tree(&mw, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let mut fleet = fleet;
    let source = fleet.serve();
    let inv = inventory(&fleet, &[]);
    let spawn = |stages: &str| {
        // Under nohup, as a long rollout is run: no terminal, SIGHUP ignored.
        std::process::Command::new("nohup")
            .arg(SCAP)
            .arg("--store")
            .arg(&fleet.env.store)
            .current_dir(fleet.env.dir.path())
            .env_remove("SCAP_STORE")
            .env_remove("SCAP_CONFIG")
            .args(["sync", "--version", &v1, "--source", &source, "--yes"])
            .args(["--stages", stages, "--wait", "2s", "--check-cmd", "true"])
            .arg("--inventory")
            .arg(&inv)
            .args(fleet.transport("deployer"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let record = fleet.env.store.join("fleet/rollout.json");
    let field = |k: &str| -> serde_json::Value {
        fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .map_or(serde_json::Value::Null, |r| r[k].clone())
    };
    // The terminal goes away (SIGHUP): the rollout goes on to the end.
    let child = spawn("25%,100%");
    wait_for(30, "the first step's wait", || field("next_due").is_u64());
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    ok(&out);
    assert_eq!(fleet.on(&v1).len(), 4);
    assert_eq!(field("state"), "done");
    // SIGTERM during a wait: stops between steps, releases the lock, and
    // the record says where it stopped; --resume finishes it.
    write(&mw, "php/version.php", b"<?php // v2\n");
    let v2 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let spawn2 = || {
        std::process::Command::new(SCAP)
            .arg("--store")
            .arg(&fleet.env.store)
            .current_dir(fleet.env.dir.path())
            .env_remove("SCAP_STORE")
            .env_remove("SCAP_CONFIG")
            .args(["sync", "--version", &v2, "--source", &source, "--yes"])
            .args([
                "--stages",
                "25%,100%",
                "--wait",
                "5s",
                "--check-cmd",
                "true",
            ])
            .arg("--inventory")
            .arg(&inv)
            .args(fleet.transport("deployer"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let child = spawn2();
    wait_for(30, "the first step's wait", || {
        field("version") == v2.as_str() && field("next_due").is_u64()
    });
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!fleet.env.store.join("fleet/deploy.lock").exists());
    assert_eq!(field("state"), "stopped");
    assert_eq!(field("completed"), 0, "its gates did not run");
    let moved = fleet.on(&v2);
    assert!(!moved.is_empty() && moved.len() < 4);
    let out = run_inv(&fleet, &inv, &["sync", "--resume", "--yes"]);
    let log = stderr(&out);
    ok(&out);
    assert!(log.contains("running the health gates on the"), "{log}");
    assert_eq!(fleet.on(&v2).len(), 4);
    assert_eq!(field("state"), "done");
}

#[test]
fn a_host_back_on_a_version_nobody_targets_is_named_and_left_alone() {
    let mut fleet = Fleet::start(3);
    let mw = fleet.env.path("mw");
    train_tree(&mw, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    write(&mw, "php/version.php", b"<?php // odd\n");
    let odd = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let source = fleet.serve();
    let inv = inventory(&fleet, &[]);
    let base = [
        "--source",
        source.as_str(),
        "--yes",
        "--wait",
        "0",
        "--force",
        "--canary",
        "100%",
    ];
    let mut a = vec!["sync", "--version", v1.as_str()];
    a.extend(base);
    ok(&run_inv(&fleet, &inv, &a));
    // Host 2 is put on another version behind the controller's back, and
    // is down when the change starts.
    let (code, body) = fleet.sync_to(2, &odd);
    assert_eq!(code, 200, "{body}");
    fleet.hosts[2].proc.kill();
    let staging = fleet.env.path("staging");
    write(
        &staging,
        "wmf-config/InitialiseSettings.php",
        b"<?php // v2\n",
    );
    let change = fleet
        .env
        .cmd()
        .args(["sync-file", "wmf-config/InitialiseSettings.php", "config"])
        .arg("--staging")
        .arg(&staging)
        .args(base)
        .arg("--inventory")
        .arg(&inv)
        .args(fleet.transport("deployer"))
        .env("SCAP_FAILPOINT", "change:committed:pause=3000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    // It comes back mid-change, on its own version.
    fleet.restart_same_port(2);
    let out = change.wait_with_output().unwrap();
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "it did not reach 100%: {e}");
    assert!(
        e.contains(&format!(
            "mw1003 runs {}, which is no live train: left alone",
            &odd[..12]
        )),
        "{e}"
    );
    assert_eq!(fleet.current(2).as_deref(), Some(odd.as_str()));
    let v1c = fleet.current(0).unwrap();
    assert_ne!(v1c, v1);
    assert_eq!(fleet.current(1).as_deref(), Some(v1c.as_str()));
    // Its target is its train with the change: --catch-up brings it there.
    let out = run_inv(
        &fleet,
        &inv,
        &["sync", "--catch-up", "--source", &source, "--yes"],
    );
    ok(&out);
    assert_eq!(fleet.on(&v1c).len(), 3);
}
