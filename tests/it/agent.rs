//! Real `scap serve` and `scap agent` processes on 127.0.0.1: fetch by
//! difference, the atomic switch, the state file, faults.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::json;

use crate::support::*;

/// A tree whose every file says which version it belongs to.
fn versioned_tree(root: &Path, tag: &str) {
    let _ = fs::remove_dir_all(root);
    sample_tree(root);
    for i in 0..40 {
        write(
            root,
            &format!("includes/v/f{i:02}.php"),
            format!("<?php // {tag} file {i}\n").as_bytes(),
        );
    }
    write(root, "VERSION", tag.as_bytes());
}

#[test]
fn hosts_get_the_exact_tree_and_a_state_file() {
    let mut fleet = Fleet::start(3);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    let out = fleet.sync(&[0, 1, 2], &v1[..12]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results["hosts"].as_array().unwrap().len(), 3);
    assert_eq!(results["outcome"]["reached"], 100.0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sync-100%: 100% (ok: 3; fail: 0; left: 0)"),
        "{stderr}"
    );
    for i in 0..3 {
        // Byte for byte, symlinks (dangling too), exec bits, empty dirs.
        assert_eq!(
            snapshot(&fleet.live(i, "mediawiki")),
            snapshot(&staging),
            "host {i}"
        );
        let state: serde_json::Value =
            serde_json::from_slice(&fs::read(fleet.hosts[i].dir.join("state.json")).unwrap())
                .unwrap();
        assert_eq!(state["current"]["version"], v1.as_str());
        assert_eq!(state["host"], fleet.hosts[i].name.as_str());
        assert_eq!(state["history"][0]["action"], "sync");
        assert_eq!(state["history"][0]["ok"], true);
    }
    let exec = fs::metadata(fleet.live(0, "mediawiki").join("maintenance/run.php")).unwrap();
    assert_eq!(exec.permissions().mode() & 0o777, 0o755);
    // `scap state` on the host shows it.
    let st = fleet
        .env
        .ok(&["state", "--dir", fleet.hosts[0].dir.to_str().unwrap()]);
    assert!(st.contains(&format!("current:  {v1}")), "{st}");
}

/// A release's modes are the version's whatever the agent's umask: 0644
/// and 0755 for files, 0755 for directories (the agent skips its `fchmod`
/// only where the umask cannot have taken bits away).
#[test]
fn modes_are_the_versions_whatever_the_agents_umask() {
    let mut fleet = Fleet::start(2);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    for (i, umask) in [(0, "077"), (1, "000")] {
        let mut wrapper = std::process::Command::new("sh");
        wrapper.args(["-c", &format!("umask {umask} && exec \"$0\" \"$@\""), SCAP]);
        fleet.restart_wrapped(i, wrapper);
        let (code, r) = fleet.sync_to(i, &v1);
        assert_eq!(code, 200, "{r}");
        let mut seen = 0;
        let mut stack = vec![fleet.live(i, "mediawiki")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let meta = fs::symlink_metadata(e.path()).unwrap();
                let mode = meta.permissions().mode() & 0o7777;
                let rel = e
                    .path()
                    .strip_prefix(fleet.live(i, "mediawiki"))
                    .unwrap()
                    .to_owned();
                let want = if meta.is_dir() {
                    stack.push(e.path());
                    0o755
                } else if meta.is_file() {
                    let staged = fs::metadata(staging.join(&rel)).unwrap();
                    if staged.permissions().mode() & 0o111 != 0 {
                        0o755
                    } else {
                        0o644
                    }
                } else {
                    continue;
                };
                assert_eq!(mode, want, "umask {umask}: {} is {mode:o}", rel.display());
                seen += 1;
            }
        }
        assert!(seen > 5, "umask {umask}: only {seen} entries checked");
    }
}

#[test]
fn a_backport_fetches_and_writes_only_what_changed() {
    let mut fleet = Fleet::start(1);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    let (code, first) = fleet.post(
        0,
        "/v1/sync",
        json!({"version": v1, "sources": [fleet.source()], "by": "test"}),
    );
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["how"], "full");

    // After each switch the agent brings its spare release slot to the
    // live version in the background; each deploy then writes its own diff.
    let mut v = String::new();
    let mut slots = Vec::new();
    for (n, file) in ["f07", "f08", "f09", "f10"].iter().enumerate() {
        write(
            &staging,
            &format!("includes/v/{file}.php"),
            format!("<?php // backport of {file}\n").as_bytes(),
        );
        v = fleet.env.build(&[("mediawiki", &staging)], &[]);
        let (code, r) = fleet.sync_to(0, &v);
        assert_eq!(code, 200, "{r}");
        // One chunk plus the trees on its path (root, mediawiki, includes, v).
        assert_eq!(r["fetched"]["chunks"], 1, "deploy {n}: {r}");
        assert_eq!(r["fetched"]["trees"], 4, "deploy {n}: {r}");
        assert_eq!(r["how"], "diff", "deploy {n}: {r}");
        assert_eq!(r["files_written"], 1, "deploy {n}: {r}");
        assert_eq!(
            snapshot(&fleet.live(0, "mediawiki")),
            snapshot(&staging),
            "deploy {n}"
        );
        slots.push(r["slot"].as_str().unwrap().to_string());
    }
    slots.dedup();
    assert_eq!(slots.len(), 4, "a different slot each time: {slots:?}");
    let v3 = v;

    // Syncing again is a no-op that fetches nothing.
    let (_, again) = fleet.sync_to(0, &v3);
    assert_eq!(again["noop"], true);
    assert_eq!(again["fetched"]["bytes"], 0);
}

#[test]
fn a_reader_never_sees_a_mix_of_versions() {
    let mut fleet = Fleet::start(1);
    let staging = fleet.env.path("staging");
    let mut versions = Vec::new();
    for tag in ["va", "vb"] {
        fs::remove_dir_all(&staging).ok();
        versioned_tree(&staging, tag);
        versions.push((tag, fleet.env.build(&[("mediawiki", &staging)], &[])));
    }
    fleet.serve();
    let link = fleet.hosts[0].dir.join("current");
    let (code, r) = fleet.post(
        0,
        "/v1/sync",
        json!({"version": versions[0].1, "sources": [fleet.source()]}),
    );
    assert_eq!(code, 200, "{r}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, link) = (stop.clone(), link.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // What a request does: resolve the docroot once, then read files.
                let Ok(root) = fs::canonicalize(&link) else {
                    continue;
                };
                let tag = fs::read_to_string(root.join("mediawiki/VERSION")).unwrap();
                for i in 0..40 {
                    let f =
                        fs::read_to_string(root.join(format!("mediawiki/includes/v/f{i:02}.php")))
                            .unwrap();
                    assert!(
                        f.contains(&format!("{tag} file {i}")),
                        "mixed tree: {tag} with {f:?}"
                    );
                }
                reads += 1;
            }
            reads
        })
    };
    for round in 0..6 {
        // vb was built after va: a sync takes the host forward to it, and
        // back to va is a rollback (a sync refuses to go back in time when
        // the two builds' timestamps differ).
        let (code, r) = if round % 2 == 0 {
            fleet.sync_to(0, &versions[1].1)
        } else {
            fleet.post(
                0,
                "/v1/rollback",
                json!({"to": versions[0].1, "by": "test"}),
            )
        };
        assert_eq!(code, 200, "round {round}: {r}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw only whole versions");
    assert!(reads > 0);
}

#[test]
fn rollback_is_a_switch_and_promote_sets_stable() {
    let mut fleet = Fleet::start(1);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    versioned_tree(&staging, "v2");
    let v2 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    let mut server_url = fleet.serve();
    let mut v2_slot = String::new();
    for v in [&v1, &v2] {
        let (code, r) = fleet.post(
            0,
            "/v1/sync",
            json!({"version": v, "sources": [server_url]}),
        );
        assert_eq!(code, 200, "{r}");
        v2_slot = r["slot"].as_str().unwrap().to_string();
    }
    let (code, r) = fleet.post(0, "/v1/promote", json!({"version": v1}));
    assert_eq!(code, 409, "only the live version can be promoted: {r}");
    assert!(r["error"].as_str().unwrap().contains("sync it first"));

    // With the deploy host gone, rollback still works: nothing is fetched.
    fleet.server.take();
    server_url.clear();
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous", "by": "test"}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["version"], v1.as_str());
    assert_eq!(r["how"], "reused");
    assert_eq!(r["fetched"]["bytes"], 0);
    // The release that was live a moment ago is the previous one now:
    // the background work must leave it alone (requests may still run there).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fleet.get(0, "/v1/state").1["busy"] == true {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (_, st) = fleet.get(0, "/v1/state");
    let slot = st["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == v2_slot.as_str())
        .unwrap()
        .clone();
    assert_eq!(slot["meta"]["version"], v2.as_str(), "{st}");
    assert_eq!(slot["meta"]["clean"], true);
    assert_eq!(
        fs::read_to_string(fleet.live(0, "mediawiki").join("VERSION")).unwrap(),
        "v1"
    );
    let (code, st) = fleet.post(0, "/v1/promote", json!({"version": v1, "by": "test"}));
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["stable"]["version"], v1.as_str());
    // Rolling "back" to previous is now v2 again; then to stable is v1.
    let (_, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous"}));
    assert_eq!(r["version"], v2.as_str());
    let (_, r) = fleet.post(0, "/v1/rollback", json!({"to": "stable"}));
    assert_eq!(r["version"], v1.as_str());
    // A switch between versions the host holds leaves its store's gc
    // nothing to do, and it writes nothing: the gc generation stays (no
    // fsync, no syncfs in the background after a canary step).
    let settled = || {
        wait_for(20, "the work after the switch", || {
            fleet.get(0, "/v1/state").1["busy"] == false
        })
    };
    let generation =
        || fs::read_to_string(fleet.hosts[0].dir.join("store/gc-generation")).unwrap_or_default();
    settled();
    let before = generation();
    let (_, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous"}));
    assert_eq!(r["version"], v2.as_str());
    settled();
    assert_eq!(
        generation(),
        before,
        "a gc with nothing to collect wrote nothing"
    );
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "0".repeat(64)}));
    assert_eq!(code, 409);
    assert!(
        r["error"].as_str().unwrap().contains("not on this host"),
        "{r}"
    );
}

#[test]
fn wrong_token_changes_nothing() {
    // The lab transport: plain HTTP with a bearer token.
    let mut fleet = Fleet::start_insecure(1);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    let plain = reqwest::blocking::Client::new();
    for auth in [
        Some("Bearer wrong"),
        Some("Bearer "),
        None,
        Some("Basic xyz"),
    ] {
        let mut req = plain
            .post(format!("{}/v1/sync", fleet.hosts[0].proc.url))
            .json(&fleet.sync_body(&v1, &[&fleet.source()]));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let status = req.send().unwrap().status().as_u16();
        assert_eq!(status, 401, "{auth:?}");
    }
    assert_eq!(fleet.current(0), None);
    assert!(!fleet.hosts[0].dir.join("current").exists());

    // The CLI refuses a token file others can read.
    fs::set_permissions(&fleet.token_file, fs::Permissions::from_mode(0o644)).unwrap();
    let out = fleet.sync(&[0], &v1);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[test]
fn corrupt_or_dying_sources_are_survived() {
    let mut fleet = Fleet::start(1);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    // A second store with the same objects, one of them corrupted.
    let bad_store = fleet.env.path("bad-store");
    copy_tree(&fleet.env.store, &bad_store);
    let id = blake3::Hasher::new_derive_key("scap 2026-11-26 object chunk v1")
        .update(b"<?php // v1 file 3\n")
        .finalize()
        .to_hex()
        .to_string();
    let obj = bad_store.join("objects").join(&id[..2]).join(&id[2..]);
    let mut bytes = fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    fs::write(&obj, bytes).unwrap();
    let good = fleet.serve();
    let bad = fleet.serve_store(&bad_store, &[]);

    // Only the corrupt source: the sync fails, naming the object; nothing changes.
    let (code, r) = fleet.post(0, "/v1/sync", fleet.sync_body(&v1, &[&bad.url]));
    assert_eq!(code, 502, "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(err.contains(&id) && err.contains(&bad.url), "{err}");
    assert_eq!(fleet.current(0), None);
    let (_, st) = fleet.get(0, "/v1/state");
    assert!(
        st["state"]["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains(&id)
    );

    // Corrupt first, good second: the object is rejected and fetched again elsewhere.
    let (code, r) = fleet.post(0, "/v1/sync", fleet.sync_body(&v1, &[&bad.url, &good]));
    assert_eq!(code, 200, "{r}");
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), snapshot(&staging));

    // A version no source has.
    let mut body = fleet.sync_body(&v1, &[&good]);
    body["version"] = json!("ab".repeat(32));
    let (code, r) = fleet.post(0, "/v1/sync", body);
    assert_eq!(code, 403);
    assert!(
        r["error"].as_str().unwrap().contains("is about version"),
        "{r}"
    );
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
}

#[test]
fn a_plain_static_server_is_a_source() {
    // Plain HTTP is a lab's (--insecure-http): a host on TLS refuses an
    // http:// source, naming it.
    let tls = Fleet::start(1);
    let (code, r) = tls.post(
        0,
        "/v1/sync",
        json!({"version": "ab".repeat(32), "sources": ["http://127.0.0.1:9/"]}),
    );
    assert_eq!(code, 400, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("http://127.0.0.1:9/") && e.contains("https://"),
        "{e}"
    );
    drop(tls);
    let fleet = Fleet::start_insecure(1);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    // python3's http.server knows nothing of scap: objects come one GET each.
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-u", "-c", "import http.server,socketserver,sys,os\nos.chdir(sys.argv[1])\nh=http.server.SimpleHTTPRequestHandler\nh.log_message=lambda *a: None\ns=socketserver.TCPServer(('127.0.0.1',0),h)\nprint('serving on http://127.0.0.1:%d' % s.server_address[1], flush=True)\ns.serve_forever()"])
        .arg(&fleet.env.store);
    let stat = Proc::start(cmd);
    // Not even the signature comes with the request: it is one of the
    // static files too.
    let (code, r) = fleet.post(0, "/v1/sync", json!({"version": v1, "sources": [stat.url]}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), snapshot(&staging));
}

#[test]
fn hooks_run_around_the_switch() {
    let mut fleet = Fleet::start_with(
        1,
        &[
            "--pre-switch",
            "test ! -e $SCAP_RELEASE_DIR/mediawiki/BLOCK",
            "--post-switch",
            "echo $SCAP_VERSION $SCAP_PREVIOUS_VERSION > $SCAP_RELEASE_DIR/../../post-hook-ran",
        ],
    );
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    write(
        &staging,
        "BLOCK",
        b"the pre-switch hook refuses this version\n",
    );
    let v2 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    let ran = fs::read_to_string(fleet.hosts[0].dir.join("post-hook-ran")).unwrap();
    assert_eq!(
        ran.trim(),
        v1,
        "post hook sees the version; no previous yet"
    );
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 500, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("pre-switch hook failed"),
        "{r}"
    );
    assert_eq!(
        fleet.current(0).as_deref(),
        Some(v1.as_str()),
        "a failing pre-switch hook aborts the switch"
    );
    assert!(!fleet.live(0, "mediawiki").join("BLOCK").exists());
}

#[test]
fn drift_lists_files_edited_by_hand() {
    let mut fleet = Fleet::start(1);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    let (code, _) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200);
    let dir = fleet.hosts[0].dir.to_str().unwrap().to_string();
    assert!(
        fleet
            .env
            .ok(&["verify", "--live", "--dir", &dir])
            .contains("0 changed by hand")
    );
    let live = fleet.live(0, "mediawiki");
    fs::write(live.join("index.php"), b"<?php die('hotfix');\n").unwrap();
    fs::write(live.join("includes/hack.php"), b"<?php\n").unwrap();
    fs::remove_file(live.join("includes/v/f01.php")).unwrap();
    fs::set_permissions(
        live.join("maintenance/run.php"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = fleet.env.raw(&["verify", "--live", "--dir", &dir]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "A\tmediawiki/includes/hack.php",
        "D\tmediawiki/includes/v/f01.php",
        "M\tmediawiki/index.php\t(content differs)",
        "M\tmediawiki/maintenance/run.php\t(executable bit differs)",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }
    let (_, d) = fleet.get(0, "/v1/verify");
    assert_eq!(d["changes"].as_array().unwrap().len(), 4, "{d}");
}

#[test]
fn sync_reports_a_failing_host_and_fails() {
    let mut fleet = Fleet::start(2);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    // Host 1 answers polls but refuses to sync: it accepts changes from
    // another deployer only.
    fleet.hosts[1].extra = vec!["--deployer".into(), "someone-else".into()];
    fleet.restart(1);
    let group = fleet.group("group", &[0, 1]);
    let sync = |version: &str| {
        fleet
            .env
            .cmd()
            .args(["sync", "--hosts"])
            .arg(&group)
            .args(["--version", version, "--source", &fleet.source()])
            .args(ungated(&[]))
            .output()
            .unwrap()
    };
    let out = sync("0000000000");
    assert_eq!(
        out.status.code(),
        Some(4),
        "unknown version: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sync(&v1);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bad = format!("127.0.0.1:{}", fleet.hosts[1].proc.port());
    assert!(
        stdout.contains(&bad) && stdout.contains("FAIL") && stdout.contains("HTTP 403"),
        "{stdout}"
    );
    assert!(stdout.contains("host calls: 1 of 2 ok"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sync-100%: 100% (ok: 1; fail: 1; left: 0)"),
        "{stderr}"
    );
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    assert_eq!(fleet.current(1), None);
}

#[test]
fn full_disk_on_a_host_keeps_the_live_release() {
    let env_dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&env_dir.path().join("small"), "3m");
    let mnt = small.path().to_path_buf();
    let mut fleet = Fleet::start_with(0, &[]);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    write(&staging, "big/l10n.cdb", &noise(2 << 20, 1));
    let v2 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    fleet.add_host("mw-small", &mnt.join("scap"));
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    // v2 needs 2 MB in the store and 2 MB in a release: it does not fit.
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 500, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("No space left on device"),
        "{r}"
    );
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), {
        let mut s = snapshot(&staging);
        s.retain(|p, _| !p.starts_with(b"big"));
        s
    });
    let (_, st) = fleet.get(0, "/v1/state");
    let dirty: Vec<_> = st["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["meta"]["clean"] == false && s["meta"]["version"] != serde_json::Value::Null)
        .collect();
    assert!(
        dirty.is_empty(),
        "no half-written release is left marked: {st}"
    );
    for s in st["slots"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        if s["meta"]["clean"] == false {
            assert!(
                !mnt.join("scap/releases").join(name).exists(),
                "partial release {name} removed"
            );
        }
    }
}

/// On a filesystem with little room (under 1 GiB free), a fresh host
/// compresses what it fetches as it arrives, rather than storing it
/// uncompressed for gc to compress after the switch (which needs room
/// for both until then), and says so.
#[test]
fn a_host_low_on_disk_compresses_what_it_fetches_as_it_arrives() {
    let env_dir = tempfile::tempdir().unwrap();
    let small = Tmpfs::mount(&env_dir.path().join("small"), "64m");
    let mnt = small.path().to_path_buf();
    let mut fleet = Fleet::start_with(0, &[]);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    // More objects than a small session keeps loose.
    for i in 0..400 {
        let body = format!("<?php\n// {i}\n{}", "$wgX[] = 'same text';\n".repeat(50));
        write(&staging, &format!("gen/f{i:03}.php"), body.as_bytes());
    }
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    fleet.add_host("mw-small", &mnt.join("scap"));
    let log = env_dir.path().join("agent.log");
    fleet.restart_logged(0, &[("SCAP_LOG", "scap=info")], &log);
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["fetched"]["pack"], true, "{r}");
    let said = fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("compressing what arrives as it is stored"),
        "{said}"
    );
    // The pack it wrote was never flagged for gc to compress.
    for e in fs::read_dir(mnt.join("scap/store/objects/pack")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "pack") {
            let data = fs::read(&p).unwrap();
            assert_eq!(
                data[12..16],
                [0, 0, 0, 0],
                "{}: not flagged raw",
                p.display()
            );
        }
    }
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), snapshot(&staging));
}

/// A TCP proxy that forwards at most `budget` bytes of each response, then
/// cuts the connection: a source dying mid-transfer.
fn cutting_proxy(upstream: &str, budget: usize) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let scheme = upstream.split("://").next().unwrap().to_string();
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let upstream = upstream.split("://").nth(1).unwrap().to_string();
    let handle = std::thread::spawn(move || {
        for client in listener.incoming().take(64) {
            let Ok(mut client) = client else { return };
            let Ok(mut up) = TcpStream::connect(&upstream) else {
                return;
            };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut u2);
            });
            std::thread::spawn(move || {
                let mut left = budget;
                let mut buf = [0u8; 4096];
                while left > 0 {
                    let n = match up.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(left),
                    };
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = up.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (url, handle)
}

#[test]
fn a_source_dying_mid_transfer_is_resumed_elsewhere() {
    let mut fleet = Fleet::start(1);
    let staging = fleet.env.path("staging");
    versioned_tree(&staging, "v1");
    for i in 0..200 {
        write(&staging, &format!("big/f{i}.bin"), &noise(5_000, i));
    }
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    let good = fleet.serve();
    let (dying, _t) = cutting_proxy(&good, 300_000);

    // Only the dying source: the sync fails and the host stays as it was...
    let (code, r) = fleet.post(0, "/v1/sync", fleet.sync_body(&v1, &[&dying]));
    assert_eq!(code, 502, "{r}");
    assert!(r["error"].as_str().unwrap().contains(&dying), "{r}");
    assert_eq!(fleet.current(0), None);
    // ...but keeps the objects that arrived whole: the next sync resumes.
    let (code, r) = fleet.post(0, "/v1/sync", fleet.sync_body(&v1, &[&dying, &good]));
    assert_eq!(code, 200, "{r}");
    let fetched = r["fetched"]["chunks"].as_u64().unwrap();
    let total = fleet.env.ok(&["verify", &v1]);
    let chunks: u64 = total
        .split(" chunks")
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(fetched < chunks, "re-fetched {fetched} of {chunks} chunks");
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), snapshot(&staging));
}

#[test]
fn a_hostile_tree_from_a_source_is_rejected() {
    // A store holding one tree object whose entry is named "..": its hash is
    // right, its content is not a tree scap accepts.
    let fleet = Fleet::start(1);
    let store = fleet.env.path("hostile-store");
    fs::create_dir_all(&store).unwrap();
    fs::write(store.join("scap-store"), "scap store\nformat 1\n").unwrap();
    let payload: &[u8] = &[1, 1, 2, b'.', b'.', 3, 1, b'x'];
    let id = blake3::Hasher::new_derive_key("scap 2026-11-26 object tree v1")
        .update(payload)
        .finalize()
        .to_hex()
        .to_string();
    let mut file = b"scap".to_vec();
    file.extend_from_slice(&[1, 2, 0, 0]);
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(payload);
    fs::create_dir_all(store.join("objects").join(&id[..2])).unwrap();
    fs::write(store.join("objects").join(&id[..2]).join(&id[2..]), file).unwrap();
    let server = fleet.serve_store(&store, &[]);
    // Signed by the deploy key (as a compromised deploy host could):
    // still refused, for what it is.
    let key = scap::store::signature::SigningKey::load(&fleet.env.pki.deploy_key()).unwrap();
    let doc = key
        .sign(&scap::store::signature::Statement::new(
            id.parse().unwrap(),
            None,
            vec![],
            "mallory",
            1,
        ))
        .unwrap();
    let (code, r) = fleet.post(
        0,
        "/v1/sync",
        json!({"version": id, "sources": [server.url], "signature": doc}),
    );
    assert_eq!(code, 502, "{r}");
    assert!(r["error"].as_str().unwrap().contains("bad name"), "{r}");
    assert_eq!(fleet.current(0), None);
    assert!(!fleet.hosts[0].dir.join("current").exists());
}

/// A tree of more files than the agent writes, links or re-hashes in one
/// batch (8,192 and 4,096): what the later batches hold is written, shared
/// and checked like the first.
#[test]
fn a_tree_larger_than_one_batch_is_written_and_checked_whole() {
    let mut fleet = Fleet::start(1);
    let staging = fleet.env.path("staging");
    let n = 10_000;
    for i in 0..n {
        write(
            &staging,
            &format!("d{:03}/f{i:05}.php", i / 97),
            format!("<?php // v1 {i}\n").as_bytes(),
        );
    }
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["files_written"], n, "{r}");
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), snapshot(&staging));
    // A deploy past the first batches: the spare slot, brought up by
    // links, is checked and changed in place of a full write.
    for i in [3, 5_000, 9_999] {
        write(
            &staging,
            &format!("d{:03}/f{i:05}.php", i / 97),
            b"<?php // v2\n",
        );
    }
    let v2 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["how"], "diff", "{r}");
    assert_eq!(r["files_written"], 3, "{r}");
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), snapshot(&staging));
    // Drift finds edits in the first batch and the last.
    let live = fleet.live(0, "mediawiki");
    fs::write(live.join("d000/f00000.php"), b"<?php // by hand\n").unwrap();
    fs::remove_file(live.join("d103/f09998.php")).unwrap();
    let dir = fleet.hosts[0].dir.to_str().unwrap().to_string();
    let out = fleet.env.raw(&["verify", "--live", "--dir", &dir]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "M\tmediawiki/d000/f00000.php\t(content differs)",
        "D\tmediawiki/d103/f09998.php",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }
    let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        all.contains(&format!("{} files checked", n - 1)) && all.contains("2 changed by hand"),
        "{all}"
    );
}
