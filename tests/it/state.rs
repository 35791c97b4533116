//! The deploy state in a real etcd cluster of three members (Debian's
//! etcd-server, v3 API) on loopback: the deploy lock as a lease under
//! kill -9 and SIGSTOP of its holder, a rollout resumed from the record
//! in etcd by another deploy host's command, one member stopped during a
//! step, every member stopped (a clear stop, no half record), and two
//! deploy hosts that see the same fleet.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// One etcd member: its process (while running), ports and data.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    data: PathBuf,
    child: Option<Child>,
}

/// A three-member etcd cluster on loopback, in a temp dir; every member is
/// killed when it is dropped.
pub struct Cluster {
    members: Vec<Member>,
    cluster: String,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        require_program("/usr/bin/etcd", "etcd-server");
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("etcd{i}"),
                client: free_port(),
                peer: free_port(),
                data: dir.path().join(format!("etcd{i}")),
                child: None,
            })
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            members,
            cluster,
            _dir: dir,
        };
        for i in 0..3 {
            c.start_member(i);
        }
        c.wait_healthy();
        c
    }

    fn start_member(&mut self, i: usize) {
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let child = Command::new("/usr/bin/etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data)
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
            .args([
                "--initial-cluster",
                &self.cluster,
                "--initial-cluster-state",
                "new",
            ])
            .args([
                "--initial-cluster-token",
                "scap-test",
                "--log-level",
                "error",
            ])
            // Elections in a second, not the default's seconds.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.members[i].child = Some(child);
    }

    /// Waits until a write goes through (a leader, a quorum).
    fn wait_healthy(&self) {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        wait_for(30, "the etcd cluster to elect a leader", || {
            self.members.iter().filter(|m| m.child.is_some()).any(|m| {
                http.post(format!("http://127.0.0.1:{}/v3/kv/put", m.client))
                    .body(r#"{"key":"aGVhbHRo","value":"b2s="}"#)
                    .send()
                    .is_ok_and(|r| r.status().is_success())
            })
        });
    }

    /// Every member's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// Stops member `i` (kill -9: a lost machine).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again, on its data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none());
        self.start_member(i);
    }

    pub fn restart_all(&mut self) {
        for i in 0..3 {
            if self.members[i].child.is_none() {
                self.start_member(i);
            }
        }
        self.wait_healthy();
    }

    /// The value at `key` (read from any member that answers).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        for url in self.urls() {
            let Ok(r) = http
                .post(format!("{url}/v3/kv/range"))
                .json(&serde_json::json!({ "key": b64.encode(key) }))
                .send()
            else {
                continue;
            };
            let v: serde_json::Value = r.json().unwrap();
            return v["kvs"][0]["value"]
                .as_str()
                .map(|s| b64.decode(s).unwrap());
        }
        panic!("no etcd member answered");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.stop(i);
        }
    }
}

/// Adds `[state]` (this cluster, `prefix`, a lease of `lease`) to the
/// scap.toml of `env`.
fn use_etcd(env: &Env, cluster: &Cluster, prefix: &str, lease: &str) {
    let p = env.path("scap.toml");
    let mut text = fs::read_to_string(&p).unwrap();
    text.push_str(&format!(
        "\n[state]\netcd = [{}]\nprefix = \"{prefix}\"\nlease = \"{lease}\"\ntimeout = \"1s\"\n",
        cluster
            .urls()
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    fs::write(p, text).unwrap();
}

fn inventory(fleet: &Fleet) -> PathBuf {
    let mut text = String::new();
    for h in &fleet.hosts {
        text.push_str(&format!(
            "[[host]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\n\n",
            h.name,
            h.proc.port()
        ));
    }
    let p = fleet.env.path("inventory.toml");
    fs::write(&p, text).unwrap();
    p
}

/// scap on `store` with `fleet`'s scap.toml (the deploy state in etcd):
/// the primary's store, or another deploy host's.
fn scap_at(fleet: &Fleet, store: &Path) -> Command {
    let mut c = Command::new(SCAP);
    c.current_dir(fleet.env.dir.path())
        .env_remove("SCAP_STORE")
        .env_remove("SCAP_CONFIG")
        .arg("--store")
        .arg(store);
    c
}

/// `scap sync` of `v` from `source` to every host in one step, no gate.
fn sync_all<'a>(v: &'a str, source: &'a str) -> [&'a str; 11] {
    [
        "sync",
        "--version",
        v,
        "--source",
        source,
        "--yes",
        "--wait",
        "0",
        "--canary",
        "100%",
        "--force",
    ]
}

/// scap `args` over the fleet, as the deployer, from `env`'s directory
/// (its store and scap.toml: one deploy host).
fn run_on(env: &Env, fleet: &Fleet, inv: &Path, args: &[&str]) -> Output {
    env.cmd()
        .args(args)
        .arg("--inventory")
        .arg(inv)
        .args(fleet.transport("deployer"))
        .output()
        .unwrap()
}

/// A staged rollout of `v` (20%, 50%, 100%; `wait` before each step's
/// gates), in the background.
fn staged(fleet: &Fleet, inv: &Path, v: &str, source: &str, wait: &str) -> Child {
    fleet
        .env
        .cmd()
        .args(["sync", "--version", v, "--source", source, "--yes"])
        .args([
            "--stages",
            "20%,50%,100%",
            "--wait",
            wait,
            "--check-cmd",
            "true",
        ])
        .arg("--inventory")
        .arg(inv)
        .args(fleet.transport("deployer"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The rollout record in etcd under `prefix`.
fn record(cluster: &Cluster, prefix: &str) -> Option<serde_json::Value> {
    cluster
        .get(&format!("{prefix}/rollout"))
        .map(|b| serde_json::from_slice(&b).unwrap())
}

fn tree(dir: &Path, n: &str) {
    write(dir, "php/version.php", format!("<?php // {n}\n").as_bytes());
    write(dir, "index.php", b"<?php require 'php/version.php';\n");
    write(dir, "wmf-config/CommonSettings.php", b"<?php // common\n");
}

/// How many times each host was synced to `v`, from its own history.
fn syncs_to(fleet: &Fleet, v: &str) -> Vec<usize> {
    (0..fleet.hosts.len())
        .map(|i| {
            let (_, s) = fleet.get(i, "/v1/state");
            s["state"]["history"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["action"] == "sync" && e["version"] == v)
                .count()
        })
        .collect()
}

/// Five agents, versions v1 (everywhere) and v2, the state in `cluster`.
fn fleet_on_v1(
    cluster: &Cluster,
    prefix: &str,
    lease: &str,
) -> (Fleet, PathBuf, String, String, String) {
    let mut fleet = Fleet::start(5);
    use_etcd(&fleet.env, cluster, prefix, lease);
    let mw = fleet.env.path("mw");
    tree(&mw, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    tree(&mw, "v2");
    let v2 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let source = fleet.serve();
    let inv = inventory(&fleet);
    ok(&run_on(&fleet.env, &fleet, &inv, &sync_all(&v1, &source)));
    (fleet, inv, v1, v2, source)
}

#[test]
fn the_deploy_lock_is_a_lease_a_killed_holder_keeps_until_it_expires_never_less() {
    let cluster = Cluster::start();
    let prefix = "/scap/test-lock";
    let (fleet, inv, _v1, v2, source) = fleet_on_v1(&cluster, prefix, "4s");
    // Nothing stays in the files: the state is in etcd.
    assert!(!fleet.env.store.join("fleet/rollout.json").exists());
    assert!(record(&cluster, prefix).is_some());
    let mut child = staged(&fleet, &inv, &v2, &source, "30s");
    wait_for(60, "the first stage to complete", || {
        record(&cluster, prefix).is_some_and(|r| r["version"] == v2.as_str() && r["completed"] == 1)
    });
    let pid = child.id();
    // `scap lock` names the holder: user, host, pid, command, lease.
    let shown = fleet.env.ok(&["lock"]);
    assert!(
        shown.contains(&format!("pid {pid}"))
            && shown.contains(" sync --version")
            && shown.contains("lease renewed"),
        "{shown}"
    );
    child.kill().unwrap();
    let killed = Instant::now();
    child.wait().unwrap();
    // Held until the lease expires (4 s), never before.
    let out = run_on(
        &fleet.env,
        &fleet,
        &inv,
        &[
            "sync",
            "--version",
            &v2,
            "--source",
            &source,
            "--yes",
            "--canary",
            "50%",
        ],
    );
    let e = stderr(&out);
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "the check came too late to mean anything"
    );
    assert!(
        !out.status.success()
            && e.contains("another deploy is running")
            && e.contains(&format!("pid {pid}")),
        "{e}"
    );
    let shown = fleet.env.ok(&["lock"]);
    assert!(
        shown.contains("expires within") || shown.contains("lease renewed"),
        "{shown}"
    );
    // --resume waits out the dead holder's lease, then finishes the
    // rollout from the record in etcd: each host synced to v2 once.
    let out = run_on(
        &fleet.env,
        &fleet,
        &inv,
        &["sync", "--resume", "--yes", "--wait", "0"],
    );
    let log = ok(&out);
    assert!(
        killed.elapsed() >= Duration::from_secs(3),
        "took the lock {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        log.contains("waiting for the deploy lock") && log.contains("resuming the rollout"),
        "{log}"
    );
    assert_eq!(fleet.on(&v2).len(), 5);
    assert_eq!(syncs_to(&fleet, &v2), vec![1; 5]);
    assert_eq!(record(&cluster, prefix).unwrap()["state"], "done");
    // The lock went with its command: the next deploy goes at once.
    assert!(cluster.get(&format!("{prefix}/lock/deploy")).is_none());
    let shown = fleet.env.ok(&["lock"]);
    assert!(shown.contains("no deploy lock"), "{shown}");
    // The history is in etcd, and `scap history` reads it.
    let h = fleet.env.ok(&["history", "--json"]);
    let h: serde_json::Value = serde_json::from_str(&h).unwrap();
    assert!(h.as_array().unwrap().len() >= 4, "{h}");
}

#[test]
fn a_holder_whose_lease_expired_stops_before_its_next_step_naming_the_new_holder() {
    let cluster = Cluster::start();
    let prefix = "/scap/test-fence";
    let (fleet, inv, _v1, v2, source) = fleet_on_v1(&cluster, prefix, "2s");
    let child = staged(&fleet, &inv, &v2, &source, "3s");
    wait_for(60, "the first stage to complete", || {
        record(&cluster, prefix).is_some_and(|r| r["version"] == v2.as_str() && r["completed"] == 1)
    });
    // The controller hangs (SIGSTOP) longer than its lease...
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    // ...and another command resumes and finishes the rollout.
    let out = run_on(
        &fleet.env,
        &fleet,
        &inv,
        &["sync", "--resume", "--yes", "--wait", "0"],
    );
    ok(&out);
    assert_eq!(fleet.on(&v2).len(), 5);
    // A third command holds the lock now: the next rollout, waiting
    // before its gates.
    let mw = fleet.env.path("mw");
    tree(&mw, "v3");
    let v3 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let mut third = staged(&fleet, &inv, &v3, &source, "20s");
    let third_pid = format!("\"pid\":{}", third.id());
    wait_for(30, "the third command to take the lock", || {
        cluster
            .get(&format!("{prefix}/lock/deploy"))
            .is_some_and(|v| String::from_utf8_lossy(&v).contains(&third_pid))
    });
    // The hung controller wakes: it stops, naming the new holder, and
    // moves nothing.
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("lost the deploy lock")
            && e.contains("writes nothing more")
            && e.contains(&format!("now held by root (pid {}", third.id())),
        "{e}"
    );
    // No host was synced twice: the woken controller started nothing,
    // and the third command's record is untouched.
    assert_eq!(syncs_to(&fleet, &v2), vec![1; 5]);
    let r = record(&cluster, prefix).unwrap();
    assert_eq!(
        (r["version"].as_str(), r["state"].as_str()),
        (Some(v3.as_str()), Some("running"))
    );
    let _ = third.kill();
    let _ = third.wait();
}

#[test]
fn one_member_stopped_during_a_step_the_rollout_goes_on() {
    let mut cluster = Cluster::start();
    let prefix = "/scap/test-member";
    let (fleet, inv, _v1, v2, source) = fleet_on_v1(&cluster, prefix, "5s");
    let child = staged(&fleet, &inv, &v2, &source, "2s");
    wait_for(60, "the first stage to complete", || {
        record(&cluster, prefix).is_some_and(|r| r["version"] == v2.as_str() && r["completed"] == 1)
    });
    // The first member the controller talks to dies.
    cluster.stop(0);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fleet.on(&v2).len(), 5);
    assert_eq!(syncs_to(&fleet, &v2), vec![1; 5]);
    assert_eq!(record(&cluster, prefix).unwrap()["state"], "done");
    cluster.restart(0);
}

#[test]
fn every_member_stopped_the_rollout_stops_cleanly_naming_the_endpoints_and_resumes() {
    let mut cluster = Cluster::start();
    let prefix = "/scap/test-quorum";
    let (fleet, inv, _v1, v2, source) = fleet_on_v1(&cluster, prefix, "5s");
    let child = staged(&fleet, &inv, &v2, &source, "3s");
    wait_for(60, "the first stage to complete", || {
        record(&cluster, prefix).is_some_and(|r| r["version"] == v2.as_str() && r["completed"] == 1)
    });
    for i in 0..3 {
        cluster.stop(i);
    }
    let out = child.wait_with_output().unwrap();
    let moved = fleet.on(&v2).len();
    assert!(moved < 5, "the last stage ran without etcd");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    for url in cluster.urls() {
        assert!(e.contains(&url), "the error names {url}: {e}");
    }
    assert!(e.contains("etcd did not answer"), "{e}");
    // Back: the record is whole (a stage done, as it was last written),
    // and --resume finishes it.
    cluster.restart_all();
    let r = record(&cluster, prefix).unwrap();
    assert!(r["completed"] == 1 || r["completed"] == 2, "{r}");
    // The dead command's lease expires with the cluster's time.
    let out = run_on(
        &fleet.env,
        &fleet,
        &inv,
        &["sync", "--resume", "--yes", "--wait", "0"],
    );
    ok(&out);
    assert_eq!(fleet.on(&v2).len(), 5);
    assert_eq!(syncs_to(&fleet, &v2), vec![1; 5]);
}

#[test]
fn two_deploy_hosts_see_one_lock_one_rollout_and_one_fleet() {
    let cluster = Cluster::start();
    let prefix = "/scap/test-two";
    let (fleet, inv, v1, v2, source) = fleet_on_v1(&cluster, prefix, "5s");
    // A second deploy host: its own store and scap.toml, the same etcd.
    let other = Env::new();
    fs::write(
        other.path("scap.toml"),
        fs::read_to_string(fleet.env.path("scap.toml")).unwrap(),
    )
    .unwrap();
    let mut child = staged(&fleet, &inv, &v2, &source, "30s");
    wait_for(60, "the first stage to complete", || {
        record(&cluster, prefix).is_some_and(|r| r["version"] == v2.as_str() && r["completed"] == 1)
    });
    // The other deploy host cannot start a deploy, and says whose runs.
    let out = run_on(
        &other,
        &fleet,
        &inv,
        &[
            "sync",
            "--version",
            &v1,
            "--source",
            &source,
            "--yes",
            "--canary",
            "50%",
        ],
    );
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("another deploy is running"),
        "{e}"
    );
    assert!(e.contains("rollout in progress"), "{e}");
    // Both show the same fleet, rollout and lock.
    let a: serde_json::Value = serde_json::from_str(&ok_out(&run_on(
        &fleet.env,
        &fleet,
        &inv,
        &["status", "--json"],
    )))
    .unwrap();
    let b: serde_json::Value = serde_json::from_str(&ok_out(&run_on(
        &other,
        &fleet,
        &inv,
        &["status", "--json"],
    )))
    .unwrap();
    for k in ["rollout", "lock", "versions", "behind", "state"] {
        assert_eq!(a[k], b[k], "{k}: {a} / {b}");
    }
    assert!(a["state"].as_str().unwrap().contains(prefix), "{a}");
    child.kill().unwrap();
    child.wait().unwrap();
    // A `scap lock` from the other deploy host: refused while the killed
    // controller's lease runs, then it stops this one's deploys.
    let (_, e) = other.fails(&["lock", "investigating T1"]);
    assert!(e.contains("another deploy is running"), "{e}");
    wait_for(15, "the killed controller's lease to expire", || {
        other.raw(&["lock", "investigating T1"]).status.success()
    });
    assert!(cluster.get(&format!("{prefix}/lock/held")).is_some());
    assert!(fleet.env.ok(&["lock"]).contains("investigating T1"));
    fleet.env.ok(&["lock", "--release", "--force"]);
    assert!(cluster.get(&format!("{prefix}/lock/held")).is_none());
}

/// Whether the object service at `url` serves version `v` (its record).
fn serves(fleet: &Fleet, url: &str, v: &str) -> bool {
    fleet
        .http
        .get(format!("{url}/versions/{v}.json"))
        .send()
        .is_ok_and(|r| r.status().is_success())
}

#[test]
fn a_standby_copies_every_signed_version_and_train_catches_up_and_serves_hosts() {
    let cluster = Cluster::start();
    let prefix = "/scap/test-standby";
    let mut fleet = Fleet::start(3);
    use_etcd(&fleet.env, &cluster, prefix, "5s");
    let mw = fleet.env.path("mw");
    tree(&mw, "v1");
    let v1 = fleet
        .env
        .build(&[("mediawiki", &mw)], &["--label", "1.46.0-wmf.1"]);
    let primary = fleet.serve();
    // The standby: its own store, following the primary, trusting the
    // deploy key of scap.toml's sign_key.
    let standby_store = fleet.env.path("standby-store");
    let follow = ["--follow", primary.as_str(), "--follow-interval", "200ms"];
    let mut standby = fleet.serve_store(&standby_store, &follow);
    let standby_url = standby.url.clone();
    wait_for(30, "the standby to copy v1", || {
        serves(&fleet, &standby_url, &v1)
    });
    verify_store(&standby_store, &v1);
    // A new version on the primary reaches the standby in seconds, with
    // its train's head.
    tree(&mw, "v2");
    let v2 = fleet.env.build(
        &[("mediawiki", &mw)],
        &["--label", "1.46.0-wmf.1", "--move-label"],
    );
    let built = Instant::now();
    wait_for(30, "the standby to copy v2", || {
        serves(&fleet, &standby_url, &v2)
    });
    let took = built.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "v2 reached the standby after {took:?}"
    );
    // With the env's scap.toml (the deploy state in etcd).
    let resolve = |store: &Path, name: &str| {
        let out = scap_at(&fleet, store).args(["resolve", name]).output();
        ok_out(&out.unwrap()).trim().to_string()
    };
    wait_for(10, "the standby's train head to move", || {
        resolve(&standby_store, "1.46.0-wmf.1") == v2
    });
    // A standby that was down during a build catches up when it comes
    // back, and says so in `scap status` on either deploy host.
    standby.kill();
    tree(&mw, "v3");
    let v3 = fleet
        .env
        .build(&[("mediawiki", &mw)], &["--label", "1.46.0-wmf.2"]);
    // The trains' heads are shared through etcd: a head moved on the
    // primary is the head on the standby at once, for a version it holds;
    // one whose version it does not hold yet is not resolved at all.
    fleet.env.ok(&["label", "1.46.0-wmf.1", &v1, "--force"]);
    assert_eq!(resolve(&standby_store, "1.46.0-wmf.1"), v1);
    let on_standby = |args: &[&str]| scap_at(&fleet, &standby_store).args(args).output().unwrap();
    let out = on_standby(&["resolve", "1.46.0-wmf.2"]);
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("does not hold yet"),
        "{e}"
    );
    // And the other way: a head moved on the standby (a rollback there
    // after a failover) is the primary's head too, with its history.
    ok(&on_standby(&["label", "1.46.0-wmf.1", &v2, "--force"]));
    assert_eq!(resolve(&fleet.env.store, "1.46.0-wmf.1"), v2);
    let log = fleet.env.ok(&["log", "1.46.0-wmf.1"]);
    assert!(log.contains("scap label 1.46.0-wmf.1"), "{log}");
    let standby = fleet.serve_store(&standby_store, &follow);
    let standby_url = standby.url.clone();
    wait_for(30, "the standby to catch up with v3", || {
        serves(&fleet, &standby_url, &v3)
    });
    verify_store(&standby_store, &v3);
    wait_for(10, "the new train on the standby", || {
        resolve(&standby_store, "1.46.0-wmf.2") == v3
    });
    let inv = inventory(&fleet);
    wait_for(10, "the standby to report itself in step", || {
        let st = ok_out(&run_on(&fleet.env, &fleet, &inv, &["status"]));
        st.contains("is in step with")
    });
    // The primary is lost: the standby serves the hosts, and a rollout
    // from its store (the same deploy state) deploys v3.
    fleet.server.as_mut().unwrap().kill();
    let out = scap_at(&fleet, &standby_store)
        .args(sync_all(&v3, &standby_url))
        .arg("--inventory")
        .arg(&inv)
        .args(fleet.transport("deployer"))
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(fleet.on(&v3).len(), 3);
    drop(standby);
}

#[test]
fn a_standby_refuses_a_version_no_trusted_key_signed_and_status_says_it_is_behind() {
    let cluster = Cluster::start();
    let prefix = "/scap/test-standby-trust";
    let mut fleet = Fleet::start(1);
    use_etcd(&fleet.env, &cluster, prefix, "5s");
    let mw = fleet.env.path("mw");
    tree(&mw, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let primary = fleet.serve();
    let standby_store = fleet.env.path("standby-store");
    let follow = ["--follow", primary.as_str(), "--follow-interval", "200ms"];
    let standby = fleet.serve_store(&standby_store, &follow);
    wait_for(30, "the standby to copy v1", || {
        serves(&fleet, &standby.url, &v1)
    });
    // Two deploy hosts started as primary: the second is refused, naming
    // the first and what to do.
    let out = fleet
        .serve_command(Command::new(SCAP), &standby_store, &[])
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("another deploy host is the primary")
            && e.contains(&primary)
            && e.contains("--follow"),
        "{e}"
    );
    // A standby's store builds nothing while another host is the primary.
    let out = scap_at(&fleet, &standby_store)
        .args(["build-manifest", "--component"])
        .arg(format!("mediawiki={}", mw.display()))
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("is not the primary"),
        "{e}"
    );
    // A version signed by a key the standby does not trust (a compromised
    // build, or a primary that is not ours).
    let rogue = NewKey::make(&fleet.env);
    tree(&mw, "rogue");
    let bad = fleet.env.build(
        &[("mediawiki", &mw)],
        &["--sign-key", rogue.key.to_str().unwrap()],
    );
    let inv = inventory(&fleet);
    wait_for(15, "status to name the standby behind", || {
        let st = ok_out(&run_on(&fleet.env, &fleet, &inv, &["status"]));
        st.contains("is BEHIND") && st.contains("1 version(s)") && st.contains("refused")
    });
    assert!(!serves(&fleet, &standby.url, &bad));
}

/// `scap serve` of `store` on `port` (fixed, so that a standby following
/// it finds it again after a restart), with `extra`.
fn serve_on(fleet: &Fleet, store: &Path, port: u16, extra: &[&str]) -> Proc {
    let mut cmd = scap_at(fleet, store);
    cmd.args(fleet.transport("server"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--dashboard-listen", "127.0.0.1:0"])
        .args(extra);
    Proc::start(cmd)
}

/// Rounds of the failover test: 4 in CI; `SCAP_FAULT_ROUNDS` for more.
fn failover_rounds() -> u64 {
    std::env::var("SCAP_FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(4, |n: u64| n.clamp(1, 200))
}

#[test]
fn a_rollout_whose_deploy_host_dies_at_any_moment_is_finished_from_the_standby_once_per_host() {
    let cluster = Cluster::start();
    let prefix = "/scap/test-failover";
    let fleet = Fleet::start(4);
    use_etcd(&fleet.env, &cluster, prefix, "2s");
    let mw = fleet.env.path("mw");
    tree(&mw, "v0");
    let v0 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let primary_port = free_port();
    let primary_url = format!("https://127.0.0.1:{primary_port}");
    let mut primary = Some(serve_on(&fleet, &fleet.env.store, primary_port, &[]));
    let standby_store = fleet.env.path("standby-store");
    let standby = serve_on(
        &fleet,
        &standby_store,
        free_port(),
        &["--follow", &primary_url, "--follow-interval", "200ms"],
    );
    let inv = inventory(&fleet);
    ok(&run_on(
        &fleet.env,
        &fleet,
        &inv,
        &sync_all(&v0, &primary_url),
    ));
    let on_standby = |args: &[&str]| {
        let mut c = scap_at(&fleet, &standby_store);
        c.args(args)
            .arg("--inventory")
            .arg(&inv)
            .args(fleet.transport("deployer"));
        c.output().unwrap()
    };
    let mut seed = 0x5eed_u64 ^ std::process::id() as u64;
    for round in 0..failover_rounds() {
        if primary.is_none() {
            // The dead primary's claim goes with its lease (2 s).
            std::thread::sleep(Duration::from_secs(3));
            primary = Some(serve_on(&fleet, &fleet.env.store, primary_port, &[]));
        }
        tree(&mw, &format!("round {round}"));
        let v = fleet.env.build(&[("mediawiki", &mw)], &[]);
        wait_for(30, "the standby to copy the round's version", || {
            serves(&fleet, &standby.url, &v)
        });
        let mut child = staged(&fleet, &inv, &v, &primary_url, "1s");
        // The deploy host dies: its controller and its scap serve, at a
        // random moment of the staged rollout.
        let after = Duration::from_millis(300 + xorshift(&mut seed) % 3500);
        std::thread::sleep(after);
        let _ = child.kill();
        let _ = child.wait();
        primary.take().unwrap().kill();
        // Finished from the standby: resumed from the record in etcd if
        // the rollout had begun, started anew if not.
        let rec = record(&cluster, prefix).unwrap();
        let out = if rec["version"] == v.as_str() {
            on_standby(&[
                "sync",
                "--resume",
                "--yes",
                "--wait",
                "0",
                "--source",
                &standby.url,
            ])
        } else {
            on_standby(&sync_all(&v, &standby.url))
        };
        let log = stderr(&out);
        assert!(
            out.status.success() || log.contains("is finished"),
            "round {round} (killed after {after:?}): {log}"
        );
        assert_eq!(fleet.on(&v).len(), 4, "round {round}: {log}");
        // Every host moved to the round's version exactly once.
        let once: Vec<usize> = (0..fleet.hosts.len())
            .map(|i| {
                let (_, s) = fleet.get(i, "/v1/state");
                s["state"]["history"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| {
                        e["action"] == "sync" && e["version"] == v.as_str() && e["ok"] == true
                    })
                    .count()
            })
            .collect();
        assert_eq!(
            once,
            vec![1; 4],
            "round {round} (killed after {after:?}): {log}"
        );
        // Both deploy hosts show the same fleet.
        let a = ok_out(&run_on(&fleet.env, &fleet, &inv, &["status", "--json"]));
        let b = ok_out(&on_standby(&["status", "--json"]));
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&a).unwrap(),
            serde_json::from_str(&b).unwrap(),
        );
        assert_eq!(a["versions"], b["versions"], "round {round}");
        assert_eq!(a["rollout"], b["rollout"], "round {round}");
    }
}

#[test]
fn the_deploy_state_reaches_etcd_over_tls_with_a_client_certificate() {
    require_program("/usr/bin/etcd", "etcd-server");
    let env = Env::new();
    let data = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("https://127.0.0.1:{client}");
    let pki = |f: &str| env.path(&format!("pki/{f}")).display().to_string();
    let mut etcd = Command::new("/usr/bin/etcd")
        .args(["--name", "tls", "--data-dir"])
        .arg(data.path())
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
        ])
        .args(["--initial-cluster", &format!("tls=http://127.0.0.1:{peer}")])
        .args([
            "--cert-file",
            &pki("server.pem"),
            "--key-file",
            &pki("server.key"),
        ])
        .args(["--trusted-ca-file", &pki("ca.pem"), "--client-cert-auth"])
        .args(["--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let config = env.path("scap.toml");
    let base = fs::read_to_string(&config).unwrap();
    let with = |extra: &str| {
        fs::write(
            &config,
            format!("{base}\n[state]\netcd = [\"{url}\"]\nprefix = \"/scap/tls\"\ntimeout = \"2s\"\nlease = \"5s\"\n{extra}"),
        )
        .unwrap();
    };
    with(&format!(
        "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki("ca.pem"),
        pki("deployer.pem"),
        pki("deployer.key")
    ));
    wait_for(30, "etcd over TLS", || env.raw(&["lock"]).status.success());
    env.ok(&["lock", "investigating over TLS"]);
    assert!(env.ok(&["lock"]).contains("investigating over TLS"));
    env.ok(&["lock", "--release"]);
    assert!(!env.ok(&["lock"]).contains("investigating"));
    // Without a client certificate etcd refuses: the error names it.
    with(&format!("ca = \"{}\"\n", pki("ca.pem")));
    let (_, e) = env.fails(&["lock", "x"]);
    assert!(e.contains(&url) && e.contains("etcd did not answer"), "{e}");
    // An https endpoint and no CA: refused before any request, saying what
    // to give.
    with("");
    let (_, e) = env.fails(&["lock", "x"]);
    assert!(e.contains("[state] ca"), "{e}");
    let _ = etcd.kill();
    let _ = etcd.wait();
}
