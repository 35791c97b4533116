//! A rolling upgrade of scap itself: the previous release's binary (the
//! commit in `scripts/previous-release`, built by `scripts/previous-scap`)
//! beside this one. Agents of both releases under either controller,
//! through a rollout, a sync-file and a rollback; a store the previous
//! release wrote, opened and written by this one; a store from a future
//! release refused, naming both formats.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use crate::support::*;

/// The previous release's scap, built once (about a minute) if missing.
fn previous_scap() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/previous-scap"))
        .current_dir(&root)
        .output()
        .expect("run scripts/previous-scap");
    assert!(
        out.status.success(),
        "scripts/previous-scap could not build the previous release's scap (it needs git, and the commit in scripts/previous-release): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(path.exists(), "{}", path.display());
    path
}

#[test]
fn old_and_new_agents_and_controllers_work_together() {
    let old = previous_scap();
    let help = Command::new(&old).arg("--help").output().unwrap();
    assert!(
        !String::from_utf8_lossy(&help.stdout).contains("sync-world"),
        "{} is not the previous release",
        old.display()
    );
    let mut fleet = Fleet::start(4);
    // Hosts 0 and 1 run the previous release's agent (same directories,
    // same flags).
    for i in [0, 1] {
        fleet.restart_wrapped(i, Command::new(&old));
        let exe = fs::read_link(format!("/proc/{}/exe", fleet.hosts[i].proc.child.id())).unwrap();
        assert_eq!(exe, old, "host {i} runs the previous release");
    }
    let mw = fleet.env.path("mw");
    write(&mw, "index.php", b"<?php // v1\n");
    write(&mw, "wmf-config/a.php", b"<?php // a1\n");
    // The store is written by the previous release's build-manifest.
    let built = ok_out(
        &fleet
            .env
            .cmd_of(&old)
            .args(["build-manifest", "--label", "1.46.0-wmf.1", "--component"])
            .arg(format!("mediawiki={}", mw.display()))
            .output()
            .unwrap(),
    );
    let v1 = built.lines().last().unwrap().trim().to_string();
    // This release reads it: its records, its objects, its signature.
    let verified = fleet.env.ok(&["verify", &v1]);
    assert!(!verified.is_empty());
    assert_eq!(fleet.env.ok(&["resolve", "1.46.0-wmf.1"]).trim(), v1);
    fleet.serve();

    // The new controller: a rollout to old and new agents.
    ok(&fleet.rollout(&v1, &[]));
    assert_eq!(fleet.on(&v1), vec![0, 1, 2, 3]);

    // The new controller's sync-file, on every host.
    write(&mw, "wmf-config/a.php", b"<?php // a2\n");
    let source = fleet.source();
    let out = fleet.run(
        &ungated(&[
            "sync-file",
            "wmf-config/a.php",
            "SWAT: a2",
            "--staging",
            &mw.display().to_string(),
            "--source",
            &source,
            "--wait",
            "0",
            "--yes",
        ])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    ok(&out);
    let v2 = fleet.current(0).unwrap();
    assert_ne!(v2, v1);
    assert_eq!(
        fleet.on(&v2),
        vec![0, 1, 2, 3],
        "old and new agents took the change"
    );

    // The previous release's controller: a rollback of every host, old
    // agents and new.
    let group = fleet.group("all-hosts", &[0, 1, 2, 3]);
    let out = fleet
        .env
        .cmd_of(&old)
        .args(["rollback", "--yes", "--hosts"])
        .arg(&group)
        .args(fleet.transport("deployer"))
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(fleet.on(&v1), vec![0, 1, 2, 3], "{}", stderr(&out));

    // And its rollout, which the new agents follow too.
    let out = fleet
        .env
        .cmd_of(&old)
        .args(["sync", "--version", &v2, "--source", &source])
        .args([
            "--wait", "0", "--yes", "--canary", "100%", "--force", "--hosts",
        ])
        .arg(&group)
        .args(fleet.transport("deployer"))
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(fleet.on(&v2), vec![0, 1, 2, 3]);

    // The old agents upgraded in place: the same directories, this release.
    for i in [0, 1] {
        fleet.restart(i);
    }
    wait_for(30, "the upgraded agents to answer", || {
        (0..4).all(|i| fleet.current(i).as_deref() == Some(v2.as_str()))
    });
    let st = fleet.status();
    assert_eq!(st["versions"].as_array().unwrap().len(), 1, "{st}");
    // The history the old agents wrote reads on.
    let (_, state) = fleet.get(0, "/v1/state");
    let history = state["state"]["history"].as_array().unwrap();
    assert!(history.len() >= 4, "{state}");
}

#[test]
fn an_agent_two_releases_from_its_controller_refuses_naming_what_to_upgrade() {
    let fleet = Fleet::start(1);
    for (release, says) in [
        ("0", "upgrade scap on the deploy host first"),
        ("4", "upgrade scap on this app server"),
    ] {
        let resp = fleet
            .request("POST", 0, "/v1/cancel")
            .header("scap-release", release)
            .json(&serde_json::json!({"by": "x"}))
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 426, "release {release}");
        assert_eq!(resp.headers()["scap-release"], "2");
        let body = resp.text().unwrap();
        assert!(
            body.contains("host mw1001") && body.contains(says),
            "{body}"
        );
    }
    // One apart, or no header (the release before it existed): served.
    for release in [Some("1"), Some("3"), None] {
        let mut req = fleet.request("GET", 0, "/v1/state");
        if let Some(r) = release {
            req = req.header("scap-release", r);
        }
        assert_eq!(req.send().unwrap().status().as_u16(), 200, "{release:?}");
    }
}

#[test]
fn a_store_from_a_future_release_is_refused_naming_both_formats() {
    let env = Env::new();
    let mw = env.path("mw");
    write(&mw, "index.php", b"<?php\n");
    env.build(&[("mediawiki", &mw)], &[]);
    let marker = env.store.join("scap-store");
    let text = fs::read_to_string(&marker).unwrap();
    let future: String = text
        .lines()
        .map(|l| {
            if l.starts_with("format ") {
                "format 99".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&marker, future + "\n").unwrap();
    let (code, err) = env.fails(&["log"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("store format v99")
            && err.contains("reads up to v2")
            && err.contains("upgrade scap"),
        "{err}"
    );
}
