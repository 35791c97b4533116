//! The Debian package (`scripts/deb`): built from the tested binary,
//! installed with dpkg on this machine, its units verified by systemd, its
//! man pages rendered, its completions loaded, then purged, leaving
//! nothing behind and never touching a store.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::support::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn the_package_installs_verifies_and_purges_cleanly() {
    require_root("dpkg -i installs into /usr/bin and /lib/systemd");
    for (p, pkg) in [
        ("/usr/bin/dpkg-deb", "dpkg"),
        ("/usr/bin/systemd-analyze", "systemd"),
        ("/usr/bin/man", "man-db"),
        ("/usr/bin/groff", "groff-base"),
    ] {
        require_program(p, pkg);
    }
    let out_dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = run(Command::new(root.join("scripts/deb"))
        .env("SCAP_BIN", SCAP)
        .env("SCAP_DEB_OUT", out_dir.path()));
    let deb = out_dir.path().join(
        Path::new(deb.lines().last().unwrap().trim())
            .file_name()
            .unwrap(),
    );
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for f in [
        "./usr/bin/scap",
        "./lib/systemd/system/scap-agent.service",
        "./lib/systemd/system/scap-serve.service",
        "./etc/scap/scap.toml",
        "./etc/default/scap-agent",
        "./usr/share/man/man1/scap.1.gz",
        "./usr/share/man/man1/scap-sync-world.1.gz",
        "./usr/share/man/man1/scap-agent.1.gz",
        "./usr/share/bash-completion/completions/scap",
        "./usr/share/zsh/vendor-completions/_scap",
    ] {
        assert!(contents.contains(f), "{f} in:\n{contents}");
    }
    // A store that exists before the package must come out untouched.
    let store = Path::new("/srv/deployment/scap/store");
    let had_store = store.exists();
    let _ = Command::new("dpkg").args(["--purge", "scap"]).output();
    run(Command::new("dpkg").arg("-i").arg(&deb));
    let cleanup = Purge;
    assert!(run(Command::new("getent").args(["passwd", "scap"])).starts_with("scap:"));
    assert!(Path::new("/var/lib/scap").is_dir());
    assert!(store.is_dir());
    // The units as systemd reads them.
    run(Command::new("systemd-analyze").args([
        "verify",
        "/lib/systemd/system/scap-agent.service",
        "/lib/systemd/system/scap-serve.service",
    ]));
    // The installed binary, its pages and its completions.
    assert!(run(Command::new("/usr/bin/scap").arg("--version")).starts_with("scap "));
    let page = run(Command::new("man")
        .args(["-l", "/usr/share/man/man1/scap-sync-world.1.gz"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100"));
    assert!(
        page.contains("sync-world") && page.contains("--label"),
        "{page}"
    );
    // The installed binary runs the README's demo: a PKI, signed versions,
    // a local fleet over TLS, a rollout and a rollback.
    let work = tempfile::tempdir().unwrap();
    let demo = run(Command::new("/usr/bin/scap")
        .args(["demo", "--hosts", "4", "--files", "300"])
        .current_dir(work.path()));
    assert!(demo.contains("Done. Versions are Merkle roots"), "{demo}");
    // The installed scap.toml with a key this release does not know (one
    // from another release, a typo) is refused by name, with the file and
    // what to do. It is copied to the working directory, which is read
    // before /etc/scap (tests running beside this one read /etc/scap).
    let cfg = fs::read_to_string("/etc/scap/scap.toml").unwrap();
    fs::write(
        work.path().join("scap.toml"),
        cfg + "\nretired_key = true\n",
    )
    .unwrap();
    let out = Command::new("/usr/bin/scap")
        .args(["log"])
        .current_dir(work.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("scap.toml") && err.contains("retired_key") && err.contains("has no such key"),
        "{err}"
    );
    let loaded = run(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/scap && complete -p scap",
    ]));
    assert!(loaded.contains("scap"), "{loaded}");
    // An upgrade (the package installed over itself: postinst configure
    // with the old version) keeps an edited conffile and the store's
    // content. (A comment only: tests beside this one read /etc/scap.)
    fs::write(store.join("keep-me"), "a store's content").unwrap();
    let edited = fs::read_to_string("/etc/scap/scap.toml").unwrap() + "# edited by the site\n";
    fs::write("/etc/scap/scap.toml", &edited).unwrap();
    run(Command::new("dpkg")
        .args(["-i", "--force-confold"])
        .arg(&deb));
    assert_eq!(fs::read_to_string("/etc/scap/scap.toml").unwrap(), edited);
    assert_eq!(
        fs::read_to_string(store.join("keep-me")).unwrap(),
        "a store's content"
    );
    // Something the store holds must survive the purge.
    fs::write(store.join("keep-me"), "a store's content").unwrap();
    drop(cleanup);
    assert!(!Path::new("/usr/bin/scap").exists());
    assert!(!Path::new("/lib/systemd/system/scap-agent.service").exists());
    assert!(!Path::new("/etc/scap").exists());
    assert!(
        Command::new("getent")
            .args(["passwd", "scap"])
            .output()
            .unwrap()
            .stdout
            .is_empty()
    );
    assert_eq!(
        fs::read_to_string(store.join("keep-me")).unwrap(),
        "a store's content"
    );
    fs::remove_file(store.join("keep-me")).unwrap();
    if !had_store {
        let _ = fs::remove_dir(store);
        let _ = fs::remove_dir("/srv/deployment/scap");
        let _ = fs::remove_dir("/srv/deployment");
    }
}

/// Purges the package when dropped, even if the test fails.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "scap"]).output();
    }
}

#[test]
fn scap_serve_and_the_agent_tell_systemd_they_are_ready_once_listening() {
    use std::os::unix::net::UnixDatagram;
    let mut fleet = Fleet::start(0);
    let mw = fleet.env.path("mw");
    write(&mw, "index.php", b"<?php\n");
    fleet.env.build(&[("mediawiki", &mw)], &[]);
    let sock_path = fleet.env.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // scap serve: READY once it listens, STOPPING on SIGTERM.
    let mut cmd = fleet.serve_command(Command::new(SCAP), &fleet.env.store.clone(), &[]);
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let mut serve = Proc::start(cmd);
    let ready = recv();
    assert!(ready.starts_with("READY=1\nSTATUS=serving "), "{ready}");
    let url = serve.url.clone();
    let code = fleet
        .http
        .get(format!("{url}/v1/versions"))
        .send()
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_ne!(code, 0, "listening when it said it was ready");
    let pid = serve.child.id() as i32;
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert_eq!(recv(), "STOPPING=1");
    serve.kill();
    // The agent: READY with its host name once both listeners take
    // connections (an abstract socket name, as systemd may give).
    let abstract_name = format!("scap-test-notify-{}", std::process::id());
    let abs = {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap();
        UnixDatagram::bind_addr(&addr).unwrap()
    };
    abs.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let dir = fleet.env.path("hosts/mw1001");
    let mut cmd = fleet.agent_command(Command::new(SCAP), "mw1001", &dir, "127.0.0.1:0", &[], &[]);
    cmd.env("NOTIFY_SOCKET", format!("@{abstract_name}"));
    let _agent = Proc::start(cmd);
    let mut buf = [0u8; 4096];
    let n = abs.recv(&mut buf).expect("the agent's READY within 30 s");
    let ready = String::from_utf8_lossy(&buf[..n]);
    assert!(
        ready.starts_with("READY=1\nSTATUS=host mw1001 listening on https://127.0.0.1:"),
        "{ready}"
    );
    assert!(
        dir.join("agent.sock").exists(),
        "the local socket is there once ready"
    );
    let _ = &mut fleet;
}

/// Sends SIGTERM to host 0's agent, as `systemctl stop` does; returns when.
fn sigterm(fleet: &Fleet) -> std::time::Instant {
    let pid = fleet.hosts[0].proc.child.id() as i32;
    let sent = std::time::Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    sent
}

/// Waits for host 0's agent to exit, failing `what` if that takes `limit`
/// from `stopped`.
fn exit_within(
    fleet: &mut Fleet,
    stopped: std::time::Instant,
    limit: std::time::Duration,
    what: &str,
) -> std::process::ExitStatus {
    loop {
        if let Some(s) = fleet.hosts[0].proc.child.try_wait().unwrap() {
            return s;
        }
        assert!(
            stopped.elapsed() < limit,
            "{what}: the agent did not stop within the unit's {limit:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// What systemd waits, after SIGTERM, before it kills the agent: the
/// shipped unit's `TimeoutStopSec`.
fn unit_stop_timeout() -> std::time::Duration {
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/scap-agent.service"),
    )
    .unwrap();
    let secs: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("the unit sets TimeoutStopSec")
        .trim()
        .parse()
        .expect("seconds");
    std::time::Duration::from_secs(secs)
}

#[test]
fn an_agent_stopped_mid_sync_leaves_its_host_on_one_version_within_the_unit_timeout() {
    use std::time::Duration;
    let limit = unit_stop_timeout();
    let mut fleet = Fleet::start(1);
    let st = fleet.env.path("staging");
    let mut ids = Vec::new();
    for (v, seed) in [("v1", 1u64), ("v2", 2)] {
        for i in 0..1500 {
            write(
                &st,
                &format!("d{}/f{i}.php", i % 30),
                &noise(2000, seed * 10_000 + i),
            );
        }
        write(&st, "VERSION", v.as_bytes());
        ids.push(fleet.env.build(&[("mediawiki", &st)], &[]));
    }
    let (v1, v2) = (ids[0].clone(), ids[1].clone());
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    let mut x = 0x5eed_u64;
    for round in 0..20 {
        let t = fleet.sync_in_flight(0, &v1, &v2);
        std::thread::sleep(Duration::from_millis(xorshift(&mut x) % 150));
        // What systemctl stop does: SIGTERM to the agent, then wait.
        let stopped = sigterm(&fleet);
        let status = exit_within(&mut fleet, stopped, limit, &format!("round {round}"));
        assert!(
            status.success(),
            "round {round}: a stop is a clean exit: {status}"
        );
        t.join().unwrap();
        fleet.restart(0);
        fleet.assert_on_one_of(0, &[(&v1, "v1"), (&v2, "v2")], round);
    }
}

#[test]
fn under_the_journal_each_operation_logs_one_line_with_its_host_and_no_timestamp() {
    let mut fleet = Fleet::start(1);
    let mw = fleet.env.path("mw");
    write(&mw, "index.php", b"<?php // v1\n");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    fleet.serve();
    let log = fleet.env.path("agent.log");
    // What the unit gives it: the journal on stderr, SCAP_LOG=info.
    fleet.restart_logged(
        0,
        &[("JOURNAL_STREAM", "8:12345"), ("SCAP_LOG", "info")],
        &log,
    );
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    wait_for(10, "the agent's log line for the sync", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("done")
    });
    let text = fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("op{host=mw1001") && l.contains("done"))
        .unwrap_or_else(|| panic!("no line for the sync in:\n{text}"));
    assert!(
        line.contains(&format!("what=a sync to {}", &v1[..12])),
        "{line}"
    );
    assert!(
        line.trim_start().starts_with("INFO"),
        "no timestamp, the level first: {line}"
    );
    assert!(!line.contains('\u{1b}'), "no colour: {line}");
    assert!(line.contains(&format!("version={v1}")), "{line}");
    // A rollout's calls carry its ID: one journal search finds what every
    // host did for it.
    write(&mw, "index.php", b"<?php // v2\n");
    let v2 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    ok(&fleet.rollout(&v2, &[]));
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(fleet.env.store.join("fleet/rollout.json")).unwrap())
            .unwrap();
    let id = record["id"].as_str().unwrap().to_string();
    assert!(id.ends_with(&v2[..12]), "{id}");
    wait_for(10, "the agent's log line for the rollout", || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&format!("rollout={id}"))
    });
    let text = fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(&format!("rollout={id}")) && l.contains("done"))
        .unwrap_or_else(|| panic!("no line for rollout {id} in:\n{text}"));
    assert!(
        line.contains(&format!("version={v2}")) && line.contains("op{host=mw1001"),
        "{line}"
    );
    // A header that is not an ID is refused, naming it.
    let (status, body) = {
        let r = fleet
            .request("POST", 0, "/v1/sync")
            .header("scap-rollout", "x y")
            .json(&fleet.sync_body(&v1, &[]))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("scap-rollout"), "{body}");
}

/// Host 0 of a fleet whose agents fetch at 1 MB/s, on a one-file v1, with
/// a 3 MB v2 built (about three seconds to fetch): `(fleet, v1, v2)`.
fn a_slow_sync(agent_args: &[&str]) -> (Fleet, String, String) {
    let mut args = vec!["--max-fetch-rate", "1M", "--no-packs"];
    args.extend(agent_args);
    let mut fleet = Fleet::start_with(1, &args);
    let st = fleet.env.path("staging");
    write(&st, "VERSION", b"v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    for i in 0..300 {
        write(&st, &format!("d/f{i}.php"), &noise(10_000, 7_000 + i));
    }
    write(&st, "VERSION", b"v2");
    let v2 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    (fleet, v1, v2)
}

/// Sends SIGTERM to host 0's agent once its sync is under way; returns
/// the sync's answer and how long the agent took to exit after it, with
/// its exit status.
fn sigterm_mid_sync(
    fleet: &mut Fleet,
    target: &str,
) -> (
    (u16, serde_json::Value),
    std::time::Duration,
    std::process::ExitStatus,
) {
    use std::time::Duration;
    let req = fleet
        .request("POST", 0, "/v1/sync")
        .json(&fleet.sync_body(target, &[&fleet.source()]));
    let sync = std::thread::spawn(move || {
        let r = req.send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<serde_json::Value>().unwrap())
    });
    wait_for(10, "the sync under way", || {
        fleet.get(0, "/v1/state").1["busy"] == true
    });
    std::thread::sleep(Duration::from_millis(300));
    let stopped = sigterm(fleet);
    // While it stops, a new operation is refused with why (here `scap
    // pull` on the host, through the local socket, still open). One that
    // arrives before the agent has handled the signal is refused as busy
    // with the sync: asked again until the signal is seen.
    let mut said = String::new();
    wait_for(5, "a pull refused because the agent is stopping", || {
        let pull = fleet
            .env
            .cmd()
            .args(["pull", "--socket"])
            .arg(fleet.hosts[0].dir.join("agent.sock"))
            .output()
            .unwrap();
        said = stderr(&pull);
        assert!(!pull.status.success(), "a pull while stopping: {said}");
        assert!(
            said.contains("the agent is stopping") || said.contains("busy with a sync"),
            "{said}"
        );
        said.contains("the agent is stopping")
    });
    let status = exit_within(fleet, stopped, unit_stop_timeout(), "the stop");
    (sync.join().unwrap(), stopped.elapsed(), status)
}

#[test]
fn a_restart_for_an_upgrade_falls_between_two_syncs_never_inside_one() {
    // What a package upgrade's `systemctl try-restart` does to an agent in
    // the middle of a sync: SIGTERM. The sync finishes, its answer reaches
    // the controller, and only then does the agent exit.
    let (mut fleet, _v1, v2) = a_slow_sync(&[]);
    let ((status, body), took, exit) = sigterm_mid_sync(&mut fleet, &v2);
    assert_eq!(status, 200, "the sync in flight finishes: {body}");
    assert_eq!(body["version"].as_str(), Some(v2.as_str()), "{body}");
    assert!(exit.success(), "a clean exit: {exit}");
    assert!(took.as_millis() > 500, "it waited for the sync ({took:?})");
    fleet.restart(0);
    fleet.assert_on_one_of(0, &[(&v2, "v2")], 0);
    let state = fleet.get(0, "/v1/state").1;
    let history = state["state"]["history"].to_string();
    assert!(
        !history.contains("cancel"),
        "nothing was cancelled: {history}"
    );
}

#[test]
fn a_sync_that_outlasts_the_stop_grace_is_cancelled_and_the_host_stays_put() {
    let (mut fleet, v1, v2) = a_slow_sync(&["--stop-grace", "1s"]);
    let log = fleet.env.path("agent.log");
    fleet.restart_logged(
        0,
        &[("JOURNAL_STREAM", "8:12345"), ("SCAP_LOG", "info")],
        &log,
    );
    let ((status, body), took, exit) = sigterm_mid_sync(&mut fleet, &v2);
    assert_eq!(status, 409, "cancelled: {body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("stopping"),
        "says why: {body}"
    );
    assert!(exit.success(), "a clean exit: {exit}");
    assert!(took.as_secs() < 10, "the grace bounds the stop ({took:?})");
    fleet.restart(0);
    fleet.assert_on_one_of(0, &[(&v1, "v1")], 0);
    let history = fleet.get(0, "/v1/state").1["state"]["history"].to_string();
    assert!(
        history.contains("cancelled: the agent is stopping (--stop-grace passed)"),
        "the host's history says why: {history}"
    );
    // Levels that mean something: the cut is a WARN (a sync did not
    // happen), the cancel it causes an INFO, and nothing here is an ERROR
    // (nobody must act: the host is on one version, and says which).
    let text = fs::read_to_string(&log).unwrap();
    let level = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{text}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        level("still runs after 1s (--stop-grace)"),
        "WARN",
        "{text}"
    );
    assert_eq!(
        level("}: scap::host::api: cancelled: the agent is stopping"),
        "INFO",
        "{text}"
    );
    assert!(
        !text.lines().any(|l| l.trim_start().starts_with("ERROR")),
        "{text}"
    );
}
