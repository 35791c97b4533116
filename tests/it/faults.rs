//! Fault injection: hostile trees (every name and entry-type trick),
//! hostile sources (oversized, truncated, wrong, slow and endless bodies),
//! hostile agents (malformed answers), crashes at every step of a build and
//! of a sync, gc racing writers, concurrent recoveries, rollback
//! pre-empting a fetch, and output no code may choke on.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// Rounds of the kill -9 tests: 50 in CI; `SCAP_FAULT_ROUNDS=1000` (the
/// `./scripts/bench faults` command) for the long run.
fn rounds() -> u64 {
    std::env::var("SCAP_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// Files outside every release that a tree tries to reach.
fn outside(env: &Env) -> PathBuf {
    let o = env.path("outside");
    write(&o, "file", b"sentinel\n");
    write(&o, "dir/keep", b"keep\n");
    o
}

/// Syncs host 0 to a version built from `staging` and checks the live tree
/// is exactly `staging`, drift is clean, and `outside` is untouched.
fn deploy_and_check(fleet: &Fleet, staging: &Path, outside: &Path, what: &str) -> String {
    let before = snapshot(outside);
    let v = fleet.env.build(&[("mediawiki", staging)], &[]);
    let (code, r) = fleet.sync_to(0, &v);
    assert_eq!(code, 200, "{what}: {r}");
    assert_eq!(
        snapshot(&fleet.live(0, "mediawiki")),
        snapshot(staging),
        "{what}: the live tree is exactly the version"
    );
    assert_eq!(snapshot(outside), before, "{what}: nothing outside changed");
    let (code, d) = fleet.get(0, "/v1/verify");
    assert_eq!(code, 200, "{d}");
    assert_eq!(d["changes"], json!([]), "{what}: drift");
    v
}

#[test]
fn hostile_trees_never_write_outside_the_release() {
    let mut fleet = Fleet::start(1);
    let out = outside(&fleet.env);
    let o = out.display().to_string();
    let st = fleet.env.path("staging");
    write(&st, "index.php", b"<?php\n");
    fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    let rm = |p: &str| {
        let p = st.join(p);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p).unwrap(),
            Ok(_) => fs::remove_file(&p).unwrap(),
            Err(_) => {}
        }
    };
    write(&st, "index.php", b"<?php\n");
    // The review's reproduction: a file and a symlink named like the old
    // agent's temporary name for it, pointing outside.
    write(&st, "foo", b"foo v1\n");
    symlink(&st, ".foo.scap-tmp", &format!("{o}/file"));
    deploy_and_check(&fleet, &st, &out, "symlinked temp name");
    write(&st, "foo", b"foo v2, a change\n");
    deploy_and_check(&fleet, &st, &out, "the file beside it changes");
    // Names like every temporary name scap has ever used.
    for n in [
        ".x.scap-tmp",
        ".current.tmp",
        ".mediawiki.scap-link.1",
        ".a.0.1-2.tmp",
    ] {
        write(&st, n, b"name trick\n");
    }
    deploy_and_check(&fleet, &st, &out, "temp-like names");
    // A directory that is a symlink outside, then a real directory.
    symlink(&st, "d", &format!("{o}/dir"));
    deploy_and_check(&fleet, &st, &out, "directory symlink");
    rm("d");
    write(&st, "d/keep", b"mine\n");
    write(&st, "d/new", b"new\n");
    deploy_and_check(
        &fleet,
        &st,
        &out,
        "symlinked directory replaced by a directory",
    );
    // A file replaced by a symlink to /etc, then by a directory holding a
    // file named like one in /etc, then a file again, then exec bit only.
    rm("foo");
    symlink(&st, "foo", "/etc");
    deploy_and_check(&fleet, &st, &out, "file replaced by a symlink to /etc");
    rm("foo");
    write(&st, "foo/passwd", b"not yours\n");
    deploy_and_check(&fleet, &st, &out, "symlink replaced by a directory");
    rm("foo");
    write_exec(&st, "foo", b"#!/bin/sh\n");
    deploy_and_check(&fleet, &st, &out, "directory replaced by an executable");
    fs::set_permissions(
        st.join("foo"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    deploy_and_check(&fleet, &st, &out, "exec bit only");

    // A spare slot edited by hand (a directory swapped for a symlink
    // outside): the next deploy into it must not write through it.
    let releases = fleet.hosts[0].dir.join("releases");
    let live = fs::read_link(fleet.hosts[0].dir.join("current")).unwrap();
    let live = live.file_name().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(500)); // the spare slot's background work
    for slot in ["a", "b", "c"] {
        let d = releases.join(slot).join("mediawiki/d");
        if slot != live && d.is_dir() {
            fs::remove_dir_all(&d).unwrap();
            std::os::unix::fs::symlink(out.join("dir"), &d).unwrap();
        }
    }
    write(&st, "d/new", b"new, changed\n");
    deploy_and_check(&fleet, &st, &out, "a tampered spare slot");
    write(&st, "d/newer", b"newer\n");
    deploy_and_check(&fleet, &st, &out, "and the next one");

    // Seeded random transitions between every kind of entry, at two
    // levels, with symlinks pointing out of the tree.
    let names = ["n1", "n2", "sub/n3", "sub/n4", "sub/deeper/n5"];
    let targets = [
        format!("{o}/file"),
        format!("{o}/dir"),
        "../..".into(),
        "/etc".into(),
    ];
    let mut x = 0x5eed_u64;
    for round in 0..20 {
        for (k, n) in names.iter().enumerate() {
            rm(n);
            let p = st.join(n);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            match xorshift(&mut x) % 5 {
                0 => {}
                1 => write(&st, n, format!("round {round} {k}\n").as_bytes()),
                2 => write_exec(&st, n, format!("#!/bin/sh\n# {round}\n").as_bytes()),
                3 => symlink(&st, n, &targets[(xorshift(&mut x) % 4) as usize]),
                _ => write(&st, &format!("{n}/inner"), b"inside\n"),
            }
        }
        deploy_and_check(&fleet, &st, &out, &format!("random round {round}"));
    }
}

/// Runs a build of `staging` with `SCAP_FAILPOINT` set; returns its output.
fn build_with(env: &Env, staging: &Path, failpoint: &str, extra: &[&str]) -> std::process::Output {
    env.cmd()
        .args(["build-manifest", "--component"])
        .arg(format!("mediawiki={}", staging.display()))
        .args(extra)
        .env("SCAP_FAILPOINT", failpoint)
        .env("SCAP_LOG", "warn")
        .output()
        .unwrap()
}

fn tree_of_files(root: &Path, n: usize, seed: u64) {
    for i in 0..n {
        write(
            root,
            &format!("d{}/f{i}.php", i % 15),
            &noise(2000 + i * 7, seed * 1000 + i as u64),
        );
    }
}

#[test]
fn a_crash_at_every_step_of_a_build_leaves_a_valid_store() {
    let points = [
        "writer:started",
        "build:objects-written",
        "writer:loose-written",
        "writer:synced",
        "build:committed",
        "build:recorded",
        "build:labelled",
    ];
    for (k, point) in points.iter().enumerate() {
        let env = Env::new();
        let mw = env.path("mw");
        tree_of_files(&mw, 120, 1);
        std::thread::sleep(Duration::from_millis(1100)); // past the stat cache's racy second
        let v1 = env.build(&[("mediawiki", &mw)], &[]);
        // Change a few files, then crash at the point.
        tree_of_files(&mw.join("changed"), 10, 2 + k as u64);
        std::thread::sleep(Duration::from_millis(1100));
        let out = build_with(&env, &mw, point, &["--label", "next"]);
        assert_eq!(out.status.signal(), Some(9), "{point}: killed at the point");
        // Before the commit the new objects are not durable: a power cut
        // could tear them. Before the commit they are in the session's own
        // pack, which recovery removes whole; once written loose (a small
        // session's), tear the newest, and see recovery remove it.
        let torn = match *point {
            "build:objects-written" | "writer:loose-written" => {
                let journal = fs::read_dir(env.store.join("journal")).unwrap().count();
                assert_eq!(journal, 1, "{point}: the dead session's journal is there");
                let obj = newest_object(&env.store);
                let name = obj.file_name().unwrap().to_string_lossy().into_owned();
                // The unfinished pack, or its side index.
                assert_eq!(
                    name.starts_with(".pack.") || name.starts_with(".idx."),
                    *point == "build:objects-written",
                    "{point}: {name}"
                );
                let b = fs::read(&obj).unwrap();
                fs::write(&obj, &b[..b.len() / 2]).unwrap();
                Some(obj)
            }
            _ => None,
        };
        // The next build recovers and completes; verify is clean.
        let out = env
            .cmd()
            .args(["build-manifest", "--component"])
            .arg(format!("mediawiki={}", mw.display()))
            .args(["--label", "next", "--move-label"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(torn) = &torn {
            // The torn object, and the trees written with it that named it.
            let err = String::from_utf8_lossy(&out.stderr);
            let said = if *point == "build:objects-written" {
                "removed the unfinished pack of a session that crashed"
            } else {
                "torn object(s) left by a crashed session"
            };
            assert!(err.contains(said), "{point}: {err}");
            let b = fs::read(torn).unwrap_or_default();
            assert!(
                b.is_empty() || env.raw(&["verify"]).status.success(),
                "{point}"
            );
        }
        let v2 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string();
        let out = env.raw(&["verify"]);
        assert!(
            out.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(env.ok(&["resolve", "next"]).trim(), v2);
        // A third build trusts only what the store has (the stat cache
        // never outlives the recovery that removed a chunk).
        let again = env.build(&[("mediawiki", &mw)], &[]);
        assert_eq!(again, v2, "{point}");
        env.ok(&["gc", "--keep", "1"]);
        assert!(env.raw(&["verify", &v2]).status.success(), "{point}");
        assert!(env.ok(&["log"]).contains(&v2));
        let _ = v1;
        assert_eq!(fs::read_dir(env.store.join("journal")).unwrap().count(), 0);
    }
}

fn newest_object(store: &Path) -> PathBuf {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for fan in fs::read_dir(store.join("objects")).unwrap() {
        for e in fs::read_dir(fan.unwrap().path()).unwrap() {
            let e = e.unwrap();
            let t = e.metadata().unwrap().modified().unwrap();
            if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                best = Some((t, e.path()));
            }
        }
    }
    best.unwrap().1
}

#[test]
fn gc_during_a_build_or_a_sync_file_never_eats_its_version() {
    let mut fleet = Fleet::start(1);
    let mw = fleet.env.path("mw");
    tree_of_files(&mw, 300, 3);
    let v0 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    fleet.serve();
    let (code, r) = fleet.sync_to(0, &v0);
    assert_eq!(code, 200, "{r}");
    // gc reads the fleet: the version the host runs is kept.
    let hosts = fleet.group("all", &[0]);
    let gc_args = ["gc", "--keep", "1", "--hosts", hosts.to_str().unwrap()];
    let mut gc_args: Vec<String> = gc_args.iter().map(|s| s.to_string()).collect();
    gc_args.extend(fleet.transport("deployer"));
    let gc_args: Vec<&str> = gc_args.iter().map(String::as_str).collect();
    // The window the review found: objects committed, record not written.
    for (n, point) in ["build:objects-written", "build:committed", "build:recorded"]
        .iter()
        .enumerate()
    {
        tree_of_files(&mw.join(format!("new{n}")), 50, 10 + n as u64);
        let build = fleet
            .env
            .cmd()
            .args(["build-manifest", "--component"])
            .arg(format!("mediawiki={}", mw.display()))
            .env("SCAP_FAILPOINT", format!("{point}:pause=1500"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(600));
        let gc = fleet.env.raw(&gc_args);
        let out = build.wait_with_output().unwrap();
        assert!(out.status.success());
        assert!(
            gc.status.success(),
            "{}",
            String::from_utf8_lossy(&gc.stderr)
        );
        let v = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string();
        let check = fleet.env.raw(&["verify", &v]);
        assert!(
            check.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
    // The same for sync-file: its new version survives a gc in its window.
    write(&mw, "d1/f1.php", b"<?php // a backport\n");
    let group = fleet.group("g", &[0]);
    let sf = fleet
        .env
        .cmd()
        .args(["sync-file", "d1/f1.php", "-m", "backport", "--staging"])
        .arg(&mw)
        .arg("--hosts")
        .arg(&group)
        .args(["--source", &fleet.source(), "--yes", "--wait", "0"])
        .args(ungated(&[]))
        .env("SCAP_FAILPOINT", "change:committed:pause=1500")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let gc = fleet.env.raw(&gc_args);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let out = sf.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cur = fleet.current(0).unwrap();
    assert!(fleet.env.raw(&["verify", &cur]).status.success());
    assert_eq!(
        fs::read(fleet.live(0, "mediawiki").join("d1/f1.php")).unwrap(),
        b"<?php // a backport\n"
    );
}

#[test]
fn two_recoveries_at_once_agree() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    write(&a, "only-in-a.php", b"<?php // a\n");
    write(&b, "shared.php", b"<?php // the torn one\n");
    env.build(&[("b", &b)], &[]);
    // A dead session's journal, and an object it "wrote" torn: b's file.
    let journal = env.store.join("journal/4242-1");
    fs::write(&journal, b"").unwrap();
    let chunk = blake3::Hasher::new_derive_key("scap 2026-11-26 object chunk v1")
        .update(b"<?php // the torn one\n")
        .finalize()
        .to_hex()
        .to_string();
    let obj = env
        .store
        .join("objects")
        .join(&chunk[..2])
        .join(&chunk[2..]);
    let bytes = fs::read(&obj).unwrap();
    fs::write(&obj, &bytes[..bytes.len() - 3]).unwrap();
    // Two writers start at once; whichever recovers, the other must not
    // rely on the torn object (it waits for the recovery to finish).
    let spawn = |name: &str, dir: &Path| {
        env.cmd()
            .args(["build-manifest", "--component"])
            .arg(format!("{name}={}", dir.display()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn("a", &a), spawn("b", &b));
    let (oa, ob) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    assert!(oa.status.success() && ob.status.success());
    let removed = [&oa, &ob]
        .iter()
        .filter(|o| {
            String::from_utf8_lossy(&o.stderr).contains("torn object(s) left by a crashed session")
        })
        .count();
    assert_eq!(removed, 1, "exactly one recovery ran");
    let out = env.raw(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(fs::read_dir(env.store.join("journal")).unwrap().count(), 0);
}

#[test]
fn deploy_host_commands_refuse_an_agent_store() {
    let mut fleet = Fleet::start(1);
    let st = fleet.env.path("staging");
    write(&st, "index.php", b"<?php\n");
    let v = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v).0, 200);
    let agent_store = fleet.hosts[0].dir.join("store");
    let objects_before = snapshot(&agent_store.join("objects"));
    for args in [
        vec!["gc", "--keep", "1"],
        vec!["label", "x", &v[..12]],
        vec!["build-manifest", "--component", "m=/tmp"],
    ] {
        let out = std::process::Command::new(SCAP)
            .arg("--store")
            .arg(&agent_store)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&agent_store.display().to_string()) && err.contains("agent"),
            "{args:?}: {err}"
        );
    }
    // A store without version records (an agent's from before roles).
    let marker = agent_store.join("scap-store");
    fs::write(&marker, "scap store\nformat 1\n").unwrap();
    let out = std::process::Command::new(SCAP)
        .arg("--store")
        .arg(&agent_store)
        .args(["gc", "--keep", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no version records"));
    assert_eq!(snapshot(&agent_store.join("objects")), objects_before);
}

/// What a hostile source does with every request.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// `/batch` is 404; each object is a 1 GiB body (with a length).
    HugeObject,
    /// `/batch` is 404; each object is an endless body (no length).
    EndlessObject,
    /// A batch frame that claims 1 GiB.
    OversizedFrame,
    /// Frames of objects nobody asked for, forever.
    EndlessBatch,
    /// Half a frame, then the connection closes.
    Truncated,
    /// The right IDs with the wrong bytes.
    Wrong,
    /// One byte a second.
    Trickle,
}

/// A source that answers every request the way `mode` says.
fn hostile_source(mode: Hostile) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = serve_hostile(conn, mode);
            });
        }
    });
    url
}

fn serve_hostile(mut conn: TcpStream, mode: Hostile) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        let ids: Vec<&[u8]> = body.chunks(32).collect();
        let batch = path == "/batch";
        match mode {
            Hostile::HugeObject | Hostile::EndlessObject if batch => {
                conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            }
            Hostile::HugeObject => {
                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")?;
                let zeros = vec![0u8; 1 << 16];
                for _ in 0..(1 << 14) {
                    conn.write_all(&zeros)?;
                }
            }
            Hostile::EndlessObject => {
                conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nscap")?;
                let zeros = vec![0u8; 1 << 16];
                loop {
                    conn.write_all(&zeros)?;
                }
            }
            Hostile::OversizedFrame => {
                conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nscapbat1")?;
                conn.write_all(ids[0])?;
                conn.write_all(&[0])?;
                conn.write_all(&(1u32 << 30).to_le_bytes())?;
                let zeros = vec![0u8; 1 << 16];
                loop {
                    conn.write_all(&zeros)?;
                }
            }
            Hostile::EndlessBatch => {
                conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nscapbat1")?;
                let mut n = 0u64;
                loop {
                    n += 1;
                    let mut id = [0u8; 32];
                    id[..8].copy_from_slice(&n.to_le_bytes());
                    id[31] = 1;
                    conn.write_all(&id)?;
                    conn.write_all(&[1, 0, 0, 0, 0])?;
                }
            }
            Hostile::Truncated => {
                conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nscapbat1")?;
                conn.write_all(ids[0])?;
                conn.write_all(&[0, 100, 0, 0, 0, b's', b'c'])?;
                return Ok(());
            }
            Hostile::Wrong => {
                let mut out = b"scapbat1".to_vec();
                for id in &ids {
                    let mut file = b"scap\x01\x02\x00\x00".to_vec();
                    file.extend_from_slice(&3u64.to_le_bytes());
                    file.extend_from_slice(b"\x01\x00\x00");
                    out.extend_from_slice(id);
                    out.push(0);
                    out.extend_from_slice(&(file.len() as u32).to_le_bytes());
                    out.extend_from_slice(&file);
                }
                out.extend_from_slice(&[0u8; 32]);
                out.extend_from_slice(&[2, 0, 0, 0, 0]);
                write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    out.len()
                )?;
                conn.write_all(&out)?;
            }
            Hostile::Trickle => {
                conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
                for b in b"scapbat1".iter().cycle() {
                    conn.write_all(&[*b])?;
                    std::thread::sleep(Duration::from_millis(1000));
                }
            }
        }
    }
}

#[test]
fn a_hostile_source_cannot_exhaust_or_stall_the_agent() {
    // Plain HTTP (a lab): the hostile sources speak it.
    let mut fleet = Fleet::start_insecure(1);
    let st = fleet.env.path("staging");
    tree_of_files(&st, 200, 5);
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    write(&st, "d0/changed.php", &noise(50_000, 9));
    let v2 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    let pid = fleet.hosts[0].proc.child.id();
    for mode in [
        Hostile::HugeObject,
        Hostile::EndlessObject,
        Hostile::OversizedFrame,
        Hostile::EndlessBatch,
        Hostile::Truncated,
        Hostile::Wrong,
        Hostile::Trickle,
    ] {
        let src = hostile_source(mode);
        let started = Instant::now();
        let mut body = fleet.sync_body(&v2, &[&src]);
        body["fetch_timeout_seconds"] = json!(4);
        let (code, r) = fleet.post(0, "/v1/sync", body);
        assert_eq!(code, 502, "{mode:?}: {r}");
        let err = r["error"].as_str().unwrap();
        assert!(
            err.contains(&src) || err.contains("not done after 4 s"),
            "{mode:?}: the error names the source or the deadline: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(60), "{mode:?}");
        assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()), "{mode:?}");
    }
    let peak = peak_rss_kib(pid);
    assert!(peak < 200 * 1024, "agent peak RSS {peak} KiB");
    // A good source after all that: the host is fine.
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 200, "{r}");
    let (_, d) = fleet.get(0, "/v1/verify");
    assert_eq!(d["changes"], json!([]));
    fleet.restart(0);
}

#[test]
fn rollback_pre_empts_a_fetch_and_the_work_after_a_switch() {
    // Plain HTTP (a lab): the trickling source speaks it.
    let mut fleet = Fleet::start_insecure(1);
    let staging = fleet.env.path("staging");
    tree_of_files(&staging, 100, 6);
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    tree_of_files(&staging, 100, 7);
    let v2 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    tree_of_files(&staging.join("more"), 3000, 8);
    let v3 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    assert_eq!(fleet.sync_to(0, &v2).0, 200);
    // A sync that would take minutes (a trickling source)...
    let slow = hostile_source(Hostile::Trickle);
    let req = fleet
        .request("POST", 0, "/v1/sync")
        .json(&fleet.sync_body(&v3, &[&slow]));
    let sync = std::thread::spawn(move || {
        let r = req.send().unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().unwrap())
    });
    std::thread::sleep(Duration::from_millis(500));
    let (_, state) = fleet.get(0, "/v1/state");
    assert_eq!(state["busy"], true);
    // ...gives way to a rollback at once.
    let t = Instant::now();
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous", "by": "oncall"}));
    let took = t.elapsed();
    assert_eq!(code, 200, "{r}");
    assert!(took < Duration::from_secs(10), "rollback waited {took:?}");
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    let (code, r) = sync.join().unwrap();
    assert_eq!(code, 409, "{r}");
    assert!(
        // Who rolled back is the caller's credential, not the body's "by".
        r["error"]
            .as_str()
            .unwrap()
            .contains("rollback by the bearer token at 127.0.0.1"),
        "{r}"
    );
    let (_, state) = fleet.get(0, "/v1/state");
    let cancel = state["state"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "cancel");
    assert!(cancel, "the cancel is in the host's history: {state}");
    // A big switch leaves work for the background (the spare slot); a
    // rollback right after it does not wait for that work.
    let (code, r) = fleet.sync_to(0, &v3);
    assert_eq!(code, 200, "{r}");
    let t = Instant::now();
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous"}));
    assert_eq!(code, 200, "{r}");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    // The host is whole and the next deploy works.
    let (_, d) = fleet.get(0, "/v1/verify");
    assert_eq!(d["changes"], json!([]));
    assert_eq!(fleet.sync_to(0, &v3).0, 200);
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), snapshot(&staging));
}

#[test]
fn multibyte_and_binary_output_from_hooks_and_gates() {
    let hook = "printf '\\303\\251%.0s' $(seq 1500); printf '\\377\\033[2J'; exit 3";
    let mut fleet = Fleet::start_with(2, &["--pre-switch", hook]);
    let st = fleet.env.path("staging");
    write(&st, "index.php", b"<?php\n");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 500, "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("pre-switch hook failed (exit status: 3)"),
        "{err}"
    );
    assert!(err.contains('é') && !err.contains('\u{1b}'), "{err}");
    let (_, s) = fleet.get(0, "/v1/state");
    assert_eq!(s["state"]["history"][0]["action"], "sync");
    assert_eq!(s["state"]["history"][0]["ok"], false);
    // Gates: the same bytes from a failing check command.
    for i in 0..2 {
        fleet.hosts[i].extra.clear();
        fleet.restart(i);
    }
    let gate = "printf '\\342\\234\\223%.0s' $(seq 400); printf '\\377'; exit 1";
    let out = fleet.rollout(&v1, &["--check-cmd", gate]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GATE FAILED check"), "{err}");
    let hist = fleet.env.ok(&["history", "--json"]);
    assert!(hist.contains("\"gates\": \"failed\""), "{hist}");
}

/// An "agent" that answers every request with `body` (HTTP 200).
fn fake_agent(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                let mut len = 0usize;
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        let mut b = vec![0u8; len];
                        let _ = reader.read_exact(&mut b);
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        len = 0;
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

#[test]
fn malformed_agent_answers_are_named_never_a_crash() {
    // The fake agent speaks plain HTTP: so does this fleet (the parsing is
    // the same over TLS).
    let mut fleet = Fleet::start_insecure(2);
    let st = fleet.env.path("staging");
    write(&st, "index.php", b"<?php\n");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    let bad = [
        r#"{"state": {"format": 1, "host": "x", "current": {"version": "abc", "since": 1, "by": "x"}, "previous": null, "stable": null, "last_error": null, "history": []}, "slots": [], "busy": false, "drift": null}"#,
        r#"{"version": "short"}"#,
        r#"not json at all"#,
        r#"{"state": 5}"#,
    ];
    for body in bad {
        let port = fake_agent(body);
        let group = fleet.env.path("g");
        fs::write(
            &group,
            format!(
                "127.0.0.1:{}\n127.0.0.1:{}\n127.0.0.1:{port}\n",
                fleet.hosts[0].proc.port(),
                fleet.hosts[1].proc.port()
            ),
        )
        .unwrap();
        let run = |args: &[&str]| {
            fleet
                .env
                .cmd()
                .args(args)
                .arg("--hosts")
                .arg(&group)
                .args(fleet.transport("deployer"))
                .output()
                .unwrap()
        };
        let out = run(&["status"]);
        assert!(out.status.success(), "{body}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
        assert!(text.contains("bad answer"), "{body}: {text}");
        let out = run(&[
            "sync",
            "--version",
            &v1,
            "--source",
            &fleet.source(),
            "--yes",
            "--wait",
            "0",
            "--max-failures",
            "1",
            "--canary",
            "100%",
            "--force",
        ]);
        assert_ne!(out.status.code(), Some(101), "{body}: a panic");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bad answer"), "{body}: {err}");
        assert_eq!(fleet.on(&v1), vec![0, 1], "{body}");
    }
}

#[test]
fn agent_killed_at_every_step_of_a_sync_is_on_one_version() {
    let mut fleet = Fleet::start(1);
    let st = fleet.env.path("staging");
    // 300 files: more objects than a session keeps loose, so the fetch
    // writes a pack (and `writer:pack-sealed` is reached).
    tree_of_files(&st, 300, 11);
    write(&st, "VERSION", b"v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    for (n, point) in [
        "writer:started",
        "agent:fetched",
        "writer:pack-sealed",
        "writer:synced",
        "agent:slot-half-written",
        "agent:prepared",
        "agent:switched",
    ]
    .into_iter()
    .enumerate()
    {
        // A version no slot holds yet, so that every step runs.
        tree_of_files(&st, 300, 20 + n as u64);
        write(&st, "VERSION", point.as_bytes());
        let v2 = fleet.env.build(&[("mediawiki", &st)], &[]);
        // Back to v1 (older than what the host ran: only a rollback goes
        // back in time).
        let (code, r) = if n == 0 {
            fleet.sync_to(0, &v1)
        } else {
            fleet.post(0, "/v1/rollback", json!({"to": v1}))
        };
        assert_eq!(code, 200, "{point}: {r}");
        fleet.restart_with(0, &[("SCAP_FAILPOINT", point)]);
        let r = fleet
            .request("POST", 0, "/v1/sync")
            .json(&fleet.sync_body(&v2, &[&fleet.source()]))
            .send();
        assert!(r.is_err() || !r.unwrap().status().is_success(), "{point}");
        let _ = fleet.hosts[0].proc.child.wait();
        fleet.restart(0);
        let cur = fleet.current(0).unwrap();
        let want = if point == "agent:switched" { &v2 } else { &v1 };
        assert_eq!(&cur, want, "{point}");
        let (_, d) = fleet.get(0, "/v1/verify");
        assert_eq!(d["changes"], json!([]), "{point}");
        let store = fleet.hosts[0].dir.join("store");
        let out = std::process::Command::new(SCAP)
            .arg("--store")
            .arg(&store)
            .args(["verify", &cur])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(fleet.sync_to(0, &v2).0, 200, "{point}");
        assert_eq!(
            fs::read(fleet.live(0, "mediawiki").join("VERSION")).unwrap(),
            point.as_bytes()
        );
    }
}

#[test]
fn agent_and_builder_killed_at_random_moments_repeatedly() {
    let mut fleet = Fleet::start(1);
    let st = fleet.env.path("staging");
    tree_of_files(&st, 200, 13);
    write(&st, "VERSION", b"v1");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    tree_of_files(&st, 200, 14);
    write(&st, "VERSION", b"v2");
    let v2 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    let mut x = 0xfeed_u64;
    let mw = fleet.env.path("mw");
    tree_of_files(&mw, 100, 15);
    for round in 0..rounds() {
        // The agent, killed somewhere in a sync.
        let t = fleet.sync_in_flight(0, &v1, &v2);
        std::thread::sleep(Duration::from_millis(xorshift(&mut x) % 120));
        fleet.restart(0);
        t.join().unwrap();
        fleet.assert_on_one_of(0, &[(&v1, "v1"), (&v2, "v2")], round);
        // The builder, killed somewhere in a build.
        write(
            &mw,
            &format!("d{}/r{round}.php", round % 15),
            &noise(3000, round),
        );
        let mut child = fleet
            .env
            .cmd()
            .args(["build-manifest", "--component"])
            .arg(format!("mediawiki={}", mw.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(xorshift(&mut x) % 60));
        let _ = child.kill();
        let _ = child.wait();
    }
    let v = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let out = fleet.env.raw(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(fleet.env.ok(&["log"]).contains(&v));
}

#[test]
fn a_host_that_switches_after_the_controller_gave_up_is_rolled_back_with_its_step() {
    // Slow after switching to a version that holds SLOW (v2 only).
    let hook = r#"[ -e "$SCAP_RELEASE_DIR/mediawiki/SLOW" ] && sleep 4; true"#;
    let mut fleet = Fleet::start_with(2, &["--post-switch", hook]);
    let st = fleet.env.path("staging");
    write(&st, "index.php", b"<?php // v1\n");
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    write(&st, "SLOW", b"\n");
    let v2 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    for i in 0..2 {
        assert_eq!(fleet.sync_to(i, &v1).0, 200);
    }
    // The controller waits 1 s for each sync; the hosts switch, then spend
    // 4 s in their post-switch hook (until the controller's cancel stops
    // it). A gate then fails.
    let out = fleet.rollout(&v2, &["--timeout", "1", "--check-cmd", "false"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("counted as changed"), "{err}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "health gate failed at 100%: 2 host(s) back on {}",
            &v1[..12]
        )),
        "{said}"
    );
    assert_eq!(fleet.on(&v1), vec![0, 1]);
    for i in 0..2 {
        fleet.restart(i);
    }
}

#[test]
fn tens_of_directories_per_descriptor_the_agent_may_hold() {
    // 1,500 directories; the agent may hold 600 file descriptors at once
    // (its budget: up to 256 files being made durable together, the
    // directories on each thread's current path, sockets): writing and
    // re-hashing a release must not keep one open per directory.
    let mut fleet = Fleet::start(1);
    let st = fleet.env.path("staging");
    for d in 0..1500 {
        write(
            &st,
            &format!("d{}/e{d}/f.php", d % 30),
            format!("<?php // {d}\n").as_bytes(),
        );
    }
    let v1 = fleet.env.build(&[("mediawiki", &st)], &[]);
    fleet.serve();
    let mut wrapper = std::process::Command::new("sh");
    wrapper.args(["-c", "ulimit -n 600 && exec \"$0\" \"$@\"", SCAP]);
    fleet.restart_wrapped(0, wrapper);
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), snapshot(&st));
    let (code, d) = fleet.get(0, "/v1/verify");
    assert_eq!(code, 200, "{d}");
    assert_eq!(d["changes"], json!([]));
    assert_eq!(d["checked_files"], 1500);
}
