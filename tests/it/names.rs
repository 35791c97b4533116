//! What a name deploys: a version ID is exactly that tree, a train is its
//! head now, a failed change never becomes the train, reverts by
//! `sync-file` work, a change reaches only trains that have its directory,
//! and every command ends with what the fleet now runs. Real agents over
//! TLS with signed versions; every assertion on the hosts' live trees and
//! exit codes, not on scap's own report.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::*;

const T5: &str = "1.46.0-wmf.5";
const T6: &str = "1.46.0-wmf.6";

/// A MediaWiki-like staging tree holding the branches `branches`, with the
/// shared config.
fn tree(dir: &Path, branches: &[&str], settings: &str) {
    for b in branches {
        write(
            dir,
            &format!("php-{b}/includes/Setup.php"),
            format!("<?php // setup of {b}\n").as_bytes(),
        );
        write(
            dir,
            &format!("php-{b}/includes/X.php"),
            format!("<?php // X of {b}\n").as_bytes(),
        );
    }
    write(dir, "wmf-config/CS.php", settings.as_bytes());
    write(dir, "wmf-config/IS.php", b"<?php // IS\n");
}

fn read(fleet: &Fleet, i: usize, rel: &str) -> Option<String> {
    fs::read_to_string(fleet.live(i, "mediawiki").join(rel)).ok()
}

/// Every host's live `rel`.
fn everywhere(fleet: &Fleet, rel: &str) -> Vec<Option<String>> {
    (0..fleet.hosts.len())
        .map(|i| read(fleet, i, rel))
        .collect()
}

/// The last line of stdout.
fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string()
}

struct Lab {
    fleet: Fleet,
    source: String,
    staging: PathBuf,
}

impl Lab {
    /// `n` agents, and train 1.46.0-wmf.5 built from `staging` (one
    /// branch) and synced to every host.
    fn new(n: usize) -> (Lab, String) {
        let mut fleet = Fleet::start(n);
        let staging = fleet.env.path("staging");
        tree(&staging, &[T5], "<?php // CS v1\n");
        let t1 = fleet
            .env
            .build(&[("mediawiki", &staging)], &["--label", T5]);
        let source = fleet.serve();
        let lab = Lab {
            fleet,
            source,
            staging,
        };
        ok(&lab.sync(T5, &["--canary", "100%", "--force"]));
        assert_eq!(lab.fleet.on(&t1).len(), n);
        (lab, t1)
    }

    fn sync(&self, version: &str, extra: &[&str]) -> Output {
        let mut a = vec![
            "sync",
            "--version",
            version,
            "--source",
            &self.source,
            "--yes",
            "--wait",
            "0",
        ];
        a.extend(extra);
        self.fleet.run(&a)
    }

    /// `scap sync-file PATH MSG` from the staging tree, to every host at
    /// once, with `extra` (a gate).
    fn sync_file(&self, path: &str, message: &str, extra: &[&str]) -> Output {
        let mut a = self.sync_file_args(path, message);
        a.extend(extra.iter().map(|s| s.to_string()));
        self.fleet
            .run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `sync-file PATH MESSAGE` from this lab's staging and source, to
    /// every host at once, without asking or waiting.
    fn sync_file_args(&self, path: &str, message: &str) -> Vec<String> {
        [
            "sync-file",
            path,
            message,
            "--staging",
            &self.staging.display().to_string(),
            "--source",
            &self.source,
            "--yes",
            "--wait",
            "0",
            "--canary",
            "100%",
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// Starts `sync-file wmf-config/CS.php 'SWAT: v2'` to every host with
    /// `gate`, waits until every host left `t1`, and kills the controller
    /// (-9) while it waits in the gate; returns the version hosts run.
    fn kill_mid_change(&self, t1: &str, gate: &str) -> String {
        let group = self
            .fleet
            .group("all", &(0..self.fleet.hosts.len()).collect::<Vec<_>>());
        let mut child = self
            .fleet
            .env
            .cmd()
            .args(self.sync_file_args("wmf-config/CS.php", "SWAT: v2"))
            .args(["--check-cmd", gate, "--hosts"])
            .arg(&group)
            .args(self.fleet.transport("deployer"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for(60, "every host on the change", || {
            (0..self.fleet.hosts.len()).all(|i| self.fleet.current(i).is_some_and(|c| c != t1))
        });
        let now = self.fleet.current(0).unwrap();
        kill_9(&mut child);
        now
    }

    fn resolve(&self, name: &str) -> String {
        self.fleet.env.ok(&["resolve", name]).trim().to_string()
    }

    fn moves(&self, train: &str) -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&self.fleet.env.ok(&["log", train, "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

#[test]
fn a_version_id_means_that_tree_even_after_a_failed_change() {
    let (lab, t1) = Lab::new(4);
    let v1 = Some("<?php // CS v1\n".to_string());
    // A SWAT whose gate fails: rolled back, and said so on the last line.
    write(&lab.staging, "wmf-config/CS.php", b"<?php // CS bad\n");
    let out = lab.sync_file(
        "wmf-config/CS.php",
        "SWAT: bad change",
        &["--check-cmd", "false"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let last = last_line(&out);
    assert!(
        last.starts_with("health gate failed at 100%: 4 host(s) back on 1.46.0-wmf.5 (")
            && last.ends_with("; the change is not applied"),
        "{last}"
    );
    assert_eq!(
        everywhere(&lab.fleet, "wmf-config/CS.php"),
        vec![v1.clone(); 4]
    );
    // Undone: nothing pending, every host's target is where it is.
    assert!(!lab.fleet.env.store.join("fleet/change.json").exists());
    let st = lab.fleet.status();
    assert_eq!(st["behind"].as_array().unwrap().len(), 0, "{st}");
    assert!(
        st["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["target"] == t1.as_str())
    );
    // The train's head never moved: its history has the build only.
    assert_eq!(lab.resolve(T5), t1);
    let moves = lab.moves(T5);
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert_eq!(moves[0]["action"], "build");

    // The version ID, its prefix and the train's name all deploy T1
    // itself, never the child with the failed change.
    for name in [t1.as_str(), &t1[..12], T5] {
        let out = lab.sync(name, &["--canary", "100%", "--force"]);
        ok(&out);
        let text = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
        assert!(!text.contains("has had changes"), "{text}");
        assert_eq!(lab.fleet.on(&t1).len(), 4, "{name}");
        assert_eq!(
            everywhere(&lab.fleet, "wmf-config/CS.php"),
            vec![v1.clone(); 4]
        );
    }
    // The child exists, and is deployed only when named by its ID.
    let log: serde_json::Value =
        serde_json::from_str(&lab.fleet.env.ok(&["log", "--json"])).unwrap();
    let child = log
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["parent"] == t1.as_str() && r["message"] == "SWAT: bad change")
        .expect("the failed change's version is recorded")["version"]
        .as_str()
        .unwrap()
        .to_string();
    let out = lab.sync(&child, &["--canary", "25%", "--force"]);
    let err = stderr(&out);
    ok(&out);
    assert!(
        err.contains(&format!("is not the head of train {T5}")),
        "{err}"
    );
    assert_eq!(lab.fleet.on(&child).len(), 1);
}

#[test]
fn a_revert_by_sync_file_is_a_new_step_that_agents_take() {
    let (lab, t1) = Lab::new(3);
    write(&lab.staging, "wmf-config/CS.php", b"<?php // CS v2\n");
    let out = lab.sync_file("wmf-config/CS.php", "SWAT: v2", &["--force"]);
    ok(&out);
    let t1b = lab.resolve(T5);
    assert_ne!(t1b, t1, "the head moved to the change");
    assert_eq!(lab.fleet.on(&t1b).len(), 3);
    assert!(last_line(&out).contains(&format!("train head(s) moved: {T5} -> {}", &t1b[..12])));
    // The revert: the old file back in staging, synced again.
    write(&lab.staging, "wmf-config/CS.php", b"<?php // CS v1\n");
    let out = lab.sync_file("wmf-config/CS.php", "Revert SWAT: v2", &["--force"]);
    let err = stderr(&out);
    ok(&out);
    // No host refused it as busy or stale (an agent's "HTTP 409"; a bare
    // "409" also matches a loopback port such as 127.0.0.1:40911).
    assert!(!err.contains("HTTP 409"), "{err}");
    assert!(err.contains("(a revert)"), "{err}");
    assert_eq!(lab.fleet.on(&t1).len(), 3, "every host took the revert");
    assert_eq!(
        everywhere(&lab.fleet, "wmf-config/CS.php"),
        vec![Some("<?php // CS v1\n".to_string()); 3]
    );
    // A new step in the train's history: build, change, revert.
    assert_eq!(lab.resolve(T5), t1);
    let moves = lab.moves(T5);
    let steps: Vec<(&str, &str)> = moves
        .iter()
        .map(|m| (m["action"].as_str().unwrap(), m["to"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        vec![("build", t1.as_str()), ("change", &t1b), ("revert", &t1)]
    );
    assert_eq!(moves[2]["message"], "Revert SWAT: v2");
    // The deploy history names each step's version by its train.
    let h: serde_json::Value =
        serde_json::from_str(&lab.fleet.env.ok(&["history", "--json", "-n", "1"])).unwrap();
    assert_eq!(h[0]["action"], "change");
    let h: serde_json::Value =
        serde_json::from_str(&lab.fleet.env.ok(&["history", "--json", "-n", "100"])).unwrap();
    let first_sync = h.as_array().unwrap().last().unwrap();
    assert_eq!(
        first_sync["name"],
        format!("{T5} ({})", &t1[..12]),
        "{first_sync}"
    );
    // And the text view names them.
    let text = lab.fleet.env.ok(&["log", T5]);
    assert!(text.contains("revert"), "{text}");
    assert!(text.contains("1.46.0-wmf.5 +1: SWAT: v2"), "{text}");
}

#[test]
fn a_change_reaches_only_the_trains_that_have_its_directory() {
    let (lab, t5) = Lab::new(4);
    // The new train has both branches; it goes to half the hosts.
    let new_staging = lab.fleet.env.path("staging-wmf6");
    tree(&new_staging, &[T5, T6], "<?php // CS v1\n");
    let t6 = lab
        .fleet
        .env
        .build(&[("mediawiki", &new_staging)], &["--label", T6]);
    ok(&lab.sync(T6, &["--canary", "50%", "--force"]));
    let on6 = lab.fleet.on(&t6);
    let on5 = lab.fleet.on(&t5);
    assert_eq!(on6.len() + on5.len(), 4);
    assert!(!on6.is_empty() && !on5.is_empty());

    // A backport to the new branch: the dry run says, per train.
    write(
        &new_staging,
        &format!("php-{T6}/includes/X.php"),
        b"<?php // X of wmf.6, fixed\n",
    );
    let path = format!("php-{T6}/includes/X.php");
    let staging = new_staging.display().to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "sync-file",
            &path,
            "Backport: fix X",
            "--staging",
            &staging,
            "--source",
            &lab.source,
            "--yes",
            "--wait",
            "0",
            "--canary",
            "100%",
            "--force",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        lab.fleet.run(&a)
    };
    let out = run(args(&["--dry-run"]));
    let err = stderr(&out);
    ok(&out);
    assert!(
        err.contains(&format!(
            "left alone: {T5} ({}) (it has no mediawiki/php-{T6}/",
            &t5[..12]
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("dry run: would build {T6} ({})", &t6[..12])),
        "{err}"
    );
    let out = run(args(&[]));
    ok(&out);
    for &i in &on5 {
        assert!(
            !fleet_has(&lab.fleet, i, &format!("php-{T6}")),
            "host {i} of the old train got php-{T6}/"
        );
        assert_eq!(lab.fleet.current(i).as_deref(), Some(t5.as_str()));
    }
    for &i in &on6 {
        assert_eq!(
            read(&lab.fleet, i, &path).as_deref(),
            Some("<?php // X of wmf.6, fixed\n")
        );
    }
    // --create adds a file only where its directory is.
    write(
        &new_staging,
        &format!("php-{T6}/includes/New.php"),
        b"<?php // new\n",
    );
    let new_path = format!("php-{T6}/includes/New.php");
    let mut a = args(&["--create"]);
    a[1] = new_path.clone();
    let out = run(a);
    ok(&out);
    for &i in &on5 {
        assert!(!fleet_has(&lab.fleet, i, &format!("php-{T6}")));
    }
    for &i in &on6 {
        assert_eq!(
            read(&lab.fleet, i, &new_path).as_deref(),
            Some("<?php // new\n")
        );
    }
    // A path whose directory is in no train: refused, naming it.
    write(&new_staging, "php-1.47.0-wmf.1/includes/Y.php", b"<?php\n");
    let mut a = args(&["--create"]);
    a[1] = "php-1.47.0-wmf.1/includes/Y.php".into();
    let out = run(a);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "its directory mediawiki/php-1.47.0-wmf.1/includes/ is in none of the live versions"
        ),
        "{}",
        stderr(&out)
    );
}

fn fleet_has(fleet: &Fleet, i: usize, rel: &str) -> bool {
    fleet.live(i, "mediawiki").join(rel).exists()
}

#[test]
fn rollbacks_by_train_name_and_what_they_say() {
    let (lab, t5) = Lab::new(4);
    let new_staging = lab.fleet.env.path("staging-wmf6");
    tree(&new_staging, &[T6], "<?php // CS v1\n");
    let t6 = lab
        .fleet
        .env
        .build(&[("mediawiki", &new_staging)], &["--label", T6]);
    ok(&lab.sync(T6, &["--canary", "50%", "--force"]));
    // A SWAT on both trains (the config is shared), then a backport.
    write(&lab.staging, "wmf-config/CS.php", b"<?php // CS v2\n");
    ok(&lab.sync_file("wmf-config/CS.php", "SWAT: v2", &["--force"]));
    let (t5b, t6b) = (lab.resolve(T5), lab.resolve(T6));
    assert_ne!(t5b, t5);
    assert_ne!(t6b, t6);
    assert_eq!(lab.fleet.on(&t5b).len() + lab.fleet.on(&t6b).len(), 4);

    // A dry run changes nothing.
    let out = lab.fleet.run(&[
        "rollback",
        "--version",
        T6,
        "--source",
        &lab.source,
        "--dry-run",
    ]);
    ok(&out);
    assert!(last_line(&out).starts_with("dry run: would roll back 2 host(s)"));
    assert_eq!(lab.fleet.on(&t6b).len(), 2);
    // Without --yes and without a terminal: refused, nothing changed.
    let out = lab.fleet.run(&["rollback", "--version", T6]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("pass --yes"), "{}", stderr(&out));
    assert_eq!(lab.fleet.on(&t6b).len(), 2);

    // Rolling the new train back by name: its hosts go where they came
    // from, the old train with the SWAT.
    let out = lab.fleet.run(&[
        "rollback",
        "--version",
        T6,
        "--source",
        &lab.source,
        "--yes",
    ]);
    ok(&out);
    assert_eq!(lab.fleet.on(&t5b).len(), 4, "{}", stderr(&out));
    assert_eq!(
        everywhere(&lab.fleet, "wmf-config/CS.php"),
        vec![Some("<?php // CS v2\n".to_string()); 4]
    );
    let last = last_line(&out);
    assert!(
        last.starts_with("rolled back 2 of 2 host(s): 2 now on 1.46.0-wmf.5 +1: SWAT: v2 (")
            && last.ends_with(&format!(
                "; 0 host(s) still on {T6} +1: SWAT: v2 ({})",
                &t6b[..12]
            )),
        "{last}"
    );
    // Again: no host runs it any more. Said, and a failure.
    let out = lab.fleet.run(&[
        "rollback",
        "--version",
        T6,
        "--source",
        &lab.source,
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        last_line(&out).starts_with(&format!("no host runs {T6} +1: SWAT: v2")),
        "{}",
        last_line(&out)
    );
    assert_eq!(lab.fleet.on(&t5b).len(), 4);

    // Names in the views: status and its JSON.
    let text = ok_out(&lab.fleet.run(&["status"]));
    assert!(text.contains("1.46.0-wmf.5 +1: SWAT: v2"), "{text}");
    let st = lab.fleet.status();
    let names: Vec<&str> = st["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["current_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![format!("1.46.0-wmf.5 +1: SWAT: v2 ({})", &t5b[..12]); 4]
    );
    let trains: Vec<(&str, &str)> = st["trains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["train"].as_str().unwrap(), t["head"].as_str().unwrap()))
        .collect();
    assert_eq!(trains, vec![(T5, t5b.as_str()), (T6, t6b.as_str())]);
}

#[test]
fn names_that_mean_nothing_or_two_things_are_refused() {
    let (lab, t1) = Lab::new(1);
    // A train that does not exist.
    let (code, err) = lab.fleet.env.fails(&[
        "sync",
        "--version",
        "1.99.0-wmf.1",
        "--canary",
        "100%",
        "--yes",
    ]);
    assert_eq!(code, 4);
    assert!(
        err.contains("no version or label \"1.99.0-wmf.1\""),
        "{err}"
    );
    let (code, err) = lab.fleet.env.fails(&["log", "1.99.0-wmf.1"]);
    assert_eq!(code, 4);
    assert!(err.contains(&format!("the trains are {T5}")), "{err}");
    // A label left from before labels that look like IDs were refused,
    // which is also a prefix of a version: both named.
    let hexlabel = &t1[..10];
    fs::write(
        lab.fleet.env.store.join("refs/labels").join(hexlabel),
        format!("{t1}\n"),
    )
    .unwrap();
    let (code, err) = lab.fleet.env.fails(&["resolve", hexlabel]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!(
            "{hexlabel:?} is both a label (version {}) and a prefix of version {}",
            &t1[..12],
            &t1[..12]
        )),
        "{err}"
    );
}

/// An order made by the test with the lab's deploy key, its sequence
/// starting just above `from`.
fn order(lab: &Lab, from: u64, host: &str, version: &str, action: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("orders.seq"), format!("{from}\n")).unwrap();
    let key = scap::store::signature::SigningKey::load(&lab.fleet.env.pki.deploy_key()).unwrap();
    let orders = scap::fleet::orders::Orders::reserve(
        key,
        &scap::fleet::state::DeployState::files(dir.path()),
    )
    .unwrap();
    let o = orders.sign(host, version.parse().unwrap(), action).unwrap();
    serde_json::to_value(o).unwrap()
}

#[test]
fn deploy_orders_take_a_host_back_only_when_newer_than_any_it_took() {
    let (lab, t1) = Lab::new(1);
    write(&lab.staging, "wmf-config/CS.php", b"<?php // CS v2\n");
    ok(&lab.sync_file("wmf-config/CS.php", "SWAT: v2", &["--force"]));
    let t1b = lab.resolve(T5);
    assert_eq!(lab.fleet.current(0).as_deref(), Some(t1b.as_str()));
    let floor = lab.fleet.get(0, "/v1/state").1["state"]["order_seq"]
        .as_u64()
        .expect("the host keeps the newest order it took");
    assert!(floor > 1 && floor < u64::MAX / 4, "{floor}");
    let sync = |order: serde_json::Value| {
        let mut body = lab.fleet.sync_body(&t1, &[&lab.source]);
        body["order"] = order;
        lab.fleet.post(0, "/v1/sync", body)
    };
    // A replayed (older) order back to T1: refused, the host unmoved.
    let (code, r) = sync(order(&lab, 1, "mw1001", &t1, "sync"));
    assert_eq!(code, 409, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("is not newer than the newest this host took") && e.contains(&t1[..12]),
        "{e}"
    );
    assert_eq!(lab.fleet.current(0).as_deref(), Some(t1b.as_str()));
    // An order for another host, or to another version, or stage for sync:
    // refused by name.
    let (code, r) = sync(order(&lab, u64::MAX / 4, "mw2002", &t1, "sync"));
    assert_eq!(code, 403, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("for host \"mw2002\", not this host (mw1001)")
    );
    let (code, _) = sync(order(&lab, u64::MAX / 4, "mw1001", &t1b, "sync"));
    assert_eq!(code, 403);
    let (code, _) = sync(order(&lab, u64::MAX / 4, "mw1001", &t1, "stage"));
    assert_eq!(code, 403);
    // (Without an order, a version signed before the one that runs is
    // refused as before: transport::every_signature_refusal_names_the_version_and_the_key.)
    // A newer order takes it back: a version it ran before is not refused.
    let (code, r) = sync(order(&lab, u64::MAX / 4, "mw1001", &t1, "sync"));
    assert_eq!(code, 200, "{r}");
    assert_eq!(lab.fleet.current(0).as_deref(), Some(t1.as_str()));
    assert_eq!(
        read(&lab.fleet, 0, "wmf-config/CS.php").as_deref(),
        Some("<?php // CS v1\n")
    );
    // And from then on, the deploy host's own orders (from the clock) are
    // older than that one: the host says so, and stays.
    let out = lab.sync(&t1b, &["--canary", "100%", "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("is not newer than the newest this host took")
    );
    assert_eq!(lab.fleet.current(0).as_deref(), Some(t1.as_str()));
}

#[test]
fn a_controller_killed_during_a_change_leaves_the_head_and_resume_finishes_it() {
    let (lab, t1) = Lab::new(3);
    let flag = lab.fleet.env.path("gate-open");
    let gate = format!("test -e {} || sleep 20", flag.display());
    write(&lab.staging, "wmf-config/CS.php", b"<?php // CS v2\n");
    let t1b = lab.kill_mid_change(&t1, &gate);
    // The head never points at a version whose rollout did not finish.
    assert_eq!(lab.resolve(T5), t1);
    assert_eq!(lab.moves(T5).len(), 1);
    let pending = lab.fleet.env.store.join("fleet/change.json");
    assert!(pending.exists());
    // Another change is refused until this one is finished or undone.
    write(&lab.staging, "wmf-config/IS.php", b"<?php // IS v2\n");
    let out = lab.sync_file("wmf-config/IS.php", "SWAT: IS", &["--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not finished"), "{}", stderr(&out));
    // --resume finishes it: the gate passes now, and the head moves.
    fs::write(&flag, b"").unwrap();
    let out = lab.fleet.run(&["sync", "--resume", "--yes"]);
    ok(&out);
    assert!(stderr(&out).contains("resuming change"), "{}", stderr(&out));
    assert_eq!(lab.resolve(T5), t1b);
    assert!(!pending.exists());
    assert_eq!(lab.fleet.on(&t1b).len(), 3);
    assert_eq!(
        everywhere(&lab.fleet, "wmf-config/CS.php"),
        vec![Some("<?php // CS v2\n".to_string()); 3]
    );
}

/// SIGKILL, as a crash would.
fn kill_9(child: &mut std::process::Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A small xorshift generator: the property test's sequences are the
/// same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random sequences of builds, deploys by name and by ID, changes whose
/// gate passes or fails, reverts (a change back to content seen before)
/// and rollbacks, on a simulated fleet of six hosts over a real store and
/// the real train code. After every step: each train resolves to the head
/// its history says, every ID to exactly itself, each head is a build or
/// a version a successful step deployed, the history's moves chain, and
/// no host runs a version no successful step asked for.
#[test]
fn the_train_history_holds_under_random_steps() {
    use scap::fleet::change::{prepare, settle};
    use scap::fleet::trains::{Trains, heads_after_rollback};
    use scap::manifest::change::{ChangeSpec, Kind};
    use scap::store::VersionId;
    use scap::store::disk::{Role, Store};
    use std::collections::{BTreeMap, BTreeSet};

    let trains = ["1.46.0-wmf.5", "1.46.0-wmf.6"];
    for seed in 1..=24u64 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_init(&dir.path().join("store"), Role::Deploy).unwrap();
        let staging = |t: &str| dir.path().join(format!("staging-{t}"));
        let component = |t: &str| {
            scap::config::components(
                &Default::default(),
                &[format!("mediawiki={}", staging(t).display())],
                &[],
            )
            .unwrap()
            .remove(0)
        };
        let mut hosts: Vec<Option<VersionId>> = vec![None; 6];
        let mut head: BTreeMap<&str, VersionId> = BTreeMap::new();
        let mut builds: BTreeSet<VersionId> = BTreeSet::new();
        let mut asked: BTreeSet<VersionId> = BTreeSet::new();
        let mut log = Vec::new();
        for step in 0..30 {
            let t = trains[rng.below(2) as usize];
            let what = if head.is_empty() { 0 } else { rng.below(5) };
            match what {
                // A build of the train (new code, the shared config as it is).
                0 => {
                    tree(
                        &staging(t),
                        &[t],
                        &format!("<?php // CS {}\n", rng.below(3)),
                    );
                    write(
                        &staging(t),
                        &format!("php-{t}/includes/Setup.php"),
                        format!("<?php // {t} build {step}\n").as_bytes(),
                    );
                    let r = scap::manifest::build(
                        &store,
                        &scap::manifest::BuildOptions {
                            components: vec![component(t)],
                            label: Some(t.to_string()),
                            move_label: true,
                            message: None,
                            author: "prop".into(),
                            parent: None,
                            signer: None,
                        },
                        &scap::progress::Silent,
                    )
                    .unwrap();
                    head.insert(t, r.version);
                    builds.insert(r.version);
                    log.push(format!("build {t} -> {}", r.version.short()));
                }
                // A deploy by the train's name or by an ID, to some hosts.
                1 if head.contains_key(t) => {
                    let by_id = rng.below(2) == 0;
                    let name = if by_id {
                        let all: Vec<VersionId> = asked.iter().chain(&builds).copied().collect();
                        all[rng.below(all.len() as u64) as usize].to_hex()[..12].to_string()
                    } else {
                        t.to_string()
                    };
                    let v = store.resolve(&name).unwrap();
                    if by_id {
                        assert!(v.to_hex().starts_with(&name), "an ID is exact");
                    } else {
                        assert_eq!(v, head[t], "a train is its head");
                    }
                    let n = 1 + rng.below(6) as usize;
                    for h in hosts.iter_mut().take(n) {
                        *h = Some(v);
                    }
                    asked.insert(v);
                    log.push(format!("deploy {name} -> {}", v.short()));
                }
                // A change to the shared config, its gate passing or not
                // (content from a small set: reverts happen).
                2 | 3 => {
                    let live: Vec<VersionId> = hosts
                        .iter()
                        .flatten()
                        .copied()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    if live.is_empty() {
                        continue;
                    }
                    let content = format!("<?php // CS {}\n", rng.below(3));
                    write(&staging(t), "wmf-config/CS.php", content.as_bytes());
                    let c = component(t);
                    let prepared = prepare(
                        &store,
                        &ChangeSpec {
                            id: format!("c{step}"),
                            bases: live,
                            component: &c,
                            path: "wmf-config/CS.php",
                            kind: Kind::File,
                            create: false,
                            message: format!("SWAT {step}"),
                            author: "prop".into(),
                            signer: None,
                            dry_run: false,
                            check: None,
                        },
                        &[],
                        &scap::progress::Silent,
                    )
                    .unwrap();
                    // Who ran each version when the change was built (what
                    // a poll tells `prepare`).
                    let mut prepared = prepared;
                    for st in &mut prepared.steps {
                        st.hosts = hosts
                            .iter()
                            .enumerate()
                            .filter(|(_, h)| **h == Some(st.from))
                            .map(|(i, _)| format!("h{i}"))
                            .collect();
                    }
                    let ran: BTreeSet<VersionId> = hosts.iter().flatten().copied().collect();
                    let gate_ok = what == 2;
                    if gate_ok {
                        for h in hosts.iter_mut().flatten() {
                            if let Some(n) = prepared.map.get(h) {
                                *h = *n;
                            }
                        }
                        asked.extend(prepared.map.values().copied());
                        // Only heads some host ran move.
                        for (_, hv) in head.iter_mut() {
                            if let Some(n) = prepared.map.get(hv).filter(|_| ran.contains(hv)) {
                                *hv = *n;
                            }
                        }
                    }
                    let moves = settle(
                        &store,
                        &scap::fleet::state::DeployState::files(dir.path()),
                        &prepared,
                        gate_ok,
                        "prop",
                    );
                    assert!(gate_ok || moves.is_empty(), "a failed gate moves no head");
                    assert!(moves.iter().all(|m| m.refused.is_none()));
                    log.push(format!(
                        "change {step} gate_ok={gate_ok}: {:?}",
                        prepared.map
                    ));
                }
                // A rollback of the train's head: its hosts go back to the
                // version the head was at before.
                _ => {
                    let Some(&h) = head.get(t) else { continue };
                    let before = store.label_log(t).unwrap().last().and_then(|m| m.from);
                    let Some(before) = before.filter(|b| asked.contains(b)) else {
                        continue;
                    };
                    let mut moved = Vec::new();
                    for x in hosts.iter_mut() {
                        if *x == Some(h) {
                            *x = Some(before);
                            moved.push((h, before));
                        }
                    }
                    if moved.is_empty() {
                        continue;
                    }
                    let still: Vec<VersionId> = hosts.iter().flatten().copied().collect();
                    heads_after_rollback(&store, &moved, &still, "prop", "rollback");
                    // Every host of the head left it: the head moves back,
                    // unless another train shares that version.
                    if !still.contains(&h) {
                        head.insert(t, before);
                        for (other, hv) in head.iter_mut() {
                            if *other != t
                                && *hv == h
                                && store.label(other).unwrap() == Some(before)
                            {
                                *hv = before;
                            }
                        }
                    }
                    log.push(format!("rollback {t}: {} -> {}", h.short(), before.short()));
                }
            }
            // The properties.
            let view = Trains::load(&store).unwrap();
            for (t, h) in &head {
                assert_eq!(
                    store.resolve(t).unwrap(),
                    *h,
                    "seed {seed} step {step} {t}: {log:#?}"
                );
                assert_eq!(view.head(t), Some(*h));
                assert!(
                    builds.contains(h) || asked.contains(h),
                    "seed {seed}: the head of {t} was never built or deployed: {log:#?}"
                );
                let moves = store.label_log(t).unwrap();
                assert_eq!(moves.last().map(|m| m.to), Some(*h));
                for w in moves.windows(2) {
                    assert_eq!(
                        w[1].from,
                        Some(w[0].to),
                        "seed {seed}: {t}'s history chains"
                    );
                }
            }
            for r in store.records().unwrap() {
                assert_eq!(store.resolve(&r.version.to_hex()).unwrap(), r.version);
            }
            for v in hosts.iter().flatten() {
                assert!(
                    asked.contains(v),
                    "seed {seed}: a host runs {v}, which no step asked for"
                );
            }
        }
    }
}

#[test]
fn a_resumed_change_whose_gate_fails_takes_back_every_host_on_it() {
    let (lab, t1) = Lab::new(3);
    let (hold, open) = (lab.fleet.env.path("hold"), lab.fleet.env.path("open"));
    fs::write(&hold, b"").unwrap();
    // The gate waits while `hold` exists (the controller is killed then),
    // and passes only once `open` exists.
    let gate = format!(
        "if test -e {}; then sleep 20; fi; test -e {}",
        hold.display(),
        open.display()
    );
    write(&lab.staging, "wmf-config/CS.php", b"<?php // CS v2\n");
    lab.kill_mid_change(&t1, &gate);
    // Resumed, its gate fails: every host the dead controller moved goes
    // back, though this run moved none; the change is undone.
    fs::remove_file(&hold).unwrap();
    let out = lab.fleet.run(&["sync", "--resume", "--yes"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let last = last_line(&out);
    assert!(
        last.starts_with("health gate failed at 100%: 3 host(s) back on 1.46.0-wmf.5 (")
            && last.ends_with("; the change is not applied"),
        "{last}"
    );
    assert_eq!(lab.fleet.on(&t1).len(), 3);
    assert_eq!(
        everywhere(&lab.fleet, "wmf-config/CS.php"),
        vec![Some("<?php // CS v1\n".to_string()); 3]
    );
    assert_eq!(lab.resolve(T5), t1);
    assert!(!lab.fleet.env.store.join("fleet/change.json").exists());
    let st = lab.fleet.status();
    assert_eq!(st["behind"].as_array().unwrap().len(), 0, "{st}");
}
