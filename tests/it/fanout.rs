//! Fan-out through standard HTTP caches: real nginx caches (the
//! configuration shipped in contrib/nginx, filled in) in front of a real
//! `scap serve`, two "datacenters" of agents; delta packs served once per
//! cache, a corrupt cache entry, a cache down, an interrupted pack resumed,
//! bandwidth caps, and staging.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// A real nginx (Debian's) running contrib/nginx/scap-cache.conf, filled
/// in, in a temp dir; stopped when dropped.
struct Cache {
    child: Option<Child>,
    url: String,
    dir: tempfile::TempDir,
}

impl Cache {
    fn start(env: &Env, upstream: &str) -> Cache {
        require_program("/usr/sbin/nginx", "nginx");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let template = fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/nginx/scap-cache.conf"
        ))
        .unwrap();
        let d = dir.path();
        for sub in ["cache", "tmp", "logs"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let up = upstream.split("://").nth(1).unwrap();
        let site = template
            .replace("@CACHE_DIR@", &d.join("cache").display().to_string())
            .replace("@UPSTREAM@", up)
            .replace("@UPSTREAM_NAME@", "localhost")
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@CERT@", &env.pki.cert("server").display().to_string())
            .replace("@KEY@", &env.pki.key("server").display().to_string())
            .replace("@CA@", &env.pki.ca().display().to_string())
            .replace(
                "@ACCESS_LOG@",
                &d.join("logs/access.log").display().to_string(),
            );
        assert!(!site.contains('@'), "every placeholder filled: {site}");
        let tmp = d.join("tmp").display().to_string();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {}/nginx.pid;\nerror_log {}/logs/error.log warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n{site}\n}}\n",
            d.display(),
            d.display()
        );
        fs::write(d.join("nginx.conf"), conf).unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-p")
            .arg(d)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                fs::read_to_string(d.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Cache {
            child: Some(child),
            url: format!("https://127.0.0.1:{port}"),
            dir,
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The cached files whose key is `uri`.
    fn entries(&self, uri: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.path().join("cache")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if contains(&fs::read(&p).unwrap(), format!("KEY: {uri}\n").as_bytes()) {
                    out.push(p);
                }
            }
        }
        out
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `scap serve` of the fleet's store with an access log.
fn serve_logged(fleet: &mut Fleet, extra: &[&str]) -> PathBuf {
    let log = fleet.env.path("access.log");
    let log_s = log.display().to_string();
    let mut args = vec!["--access-log", log_s.as_str()];
    args.extend(extra);
    let store = fleet.env.store.clone();
    let p = fleet.serve_store(&store, &args);
    fleet.server = Some(p);
    log
}

/// Lines of the deploy host's access log with `needle`.
fn served(log: &Path, needle: &str) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// An inventory putting hosts 0..k in eqiad, the rest in codfw.
fn inventory(fleet: &Fleet, k: usize) -> PathBuf {
    let mut text = String::new();
    for (i, h) in fleet.hosts.iter().enumerate() {
        text.push_str(&format!(
            "[[host]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\ndc = \"{}\"\n\n",
            h.name,
            h.proc.port(),
            if i < k { "eqiad" } else { "codfw" }
        ));
    }
    let p = fleet.env.path("inventory.toml");
    fs::write(&p, text).unwrap();
    p
}

fn config(fleet: &Fleet, inv: &Path, caches: &[(&str, &str)]) {
    let base = fs::read_to_string(fleet.env.path("scap.base.toml")).unwrap_or_else(|_| {
        let b = fs::read_to_string(fleet.env.path("scap.toml")).unwrap();
        fs::write(fleet.env.path("scap.base.toml"), &b).unwrap();
        b
    });
    let caches: String = caches
        .iter()
        .map(|(dc, url)| format!("{dc} = [\"{url}\"]\n"))
        .collect();
    fs::write(
        fleet.env.path("scap.toml"),
        format!(
            "inventory = \"{}\"\nsources = [\"{}\"]\n{base}\n[caches]\n{caches}",
            inv.display(),
            fleet.source()
        ),
    )
    .unwrap();
}

fn scap(fleet: &Fleet, args: &[&str]) -> Output {
    fleet
        .env
        .cmd()
        .args(args)
        .args(fleet.transport("deployer"))
        .output()
        .unwrap()
}

/// The hosts' results of a `--json` rollout.
fn results(out: &Output) -> Vec<serde_json::Value> {
    let j: serde_json::Value = serde_json::from_str(&ok_out(out)).unwrap();
    j["hosts"].as_array().unwrap().clone()
}

/// A tree of `files` incompressible 16 KB files (the same for any tag),
/// plus an index.php naming `tag`.
fn tree(fleet: &Fleet, tag: &str, files: usize) -> String {
    let mw = fleet.env.path("mw");
    for i in 0..files {
        write(
            &mw,
            &format!("includes/f{i}.php"),
            &noise(16 << 10, i as u64),
        );
    }
    write(&mw, "index.php", format!("<?php // {tag}\n").as_bytes());
    fleet.env.build(&[("mediawiki", &mw)], &[])
}

/// The path of the deploy host's pack from `from` to `to`.
fn pack_file(fleet: &Fleet, from: &str, to: &str) -> PathBuf {
    fleet.env.store.join(format!("packs/{from}-{to}.4.pack"))
}

/// Waits up to 30 s for the pack `p` to be built ahead.
fn built_ahead(p: &Path) {
    wait_for(30, &format!("{} built ahead", p.display()), || p.exists());
}

/// A counter of `scap serve`'s /metrics (on its dashboard port).
fn serve_metric(fleet: &Fleet, line: &str, name: &str) -> u64 {
    let dash = line
        .split("dashboard on ")
        .nth(1)
        .and_then(|r| r.split('/').nth(2))
        .unwrap_or_else(|| panic!("no dashboard address in {line:?}"));
    let text = fleet
        .http
        .get(format!("http://{dash}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A new version's delta packs are built as soon as it is in the deploy
/// host's store, before any host asks: from the version it was built on,
/// and from what hosts last moved to. The first host's request finds the
/// pack built (the access log has no request before it), and it is the
/// pack a request would have built. `--packs-ahead 0` builds none.
#[test]
fn a_new_versions_packs_are_built_before_any_host_asks() {
    let mut fleet = Fleet::start(2);
    let v1 = tree(&fleet, "v1", 30);
    let log = serve_logged(&mut fleet, &[]);
    let line = fleet.server.as_ref().unwrap().line.clone();
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    let (code, r) = fleet.sync_to(1, &v1);
    assert_eq!(code, 200, "{r}");
    // Built on v1, which hosts run.
    let v2 = tree(&fleet, "v2", 31);
    built_ahead(&pack_file(&fleet, &v1, &v2));
    assert!(served(&log, &format!("/v1/pack4/{v1}/{v2}")).is_empty());
    assert_eq!(
        serve_metric(&fleet, &line, "scap_packs_built_ahead_total"),
        1
    );
    for i in 0..2 {
        let (code, r) = fleet.sync_to(i, &v2);
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["fetched"]["pack"], true, "{r}");
    }
    assert_eq!(
        served(&log, &format!("GET /v1/pack4/{v1}/{v2} 200")).len(),
        2
    );
    assert_eq!(fleet.on(&v2), vec![0, 1]);
    // A version built on another one than hosts run: packs from both.
    write(&fleet.env.path("mw"), "index.php", b"<?php // v3\n");
    let v3 = fleet.env.build(
        &[("mediawiki", &fleet.env.path("mw"))],
        &["--parent", &v1, "--message", "v3 on v1"],
    );
    assert_ne!(v3, v2);
    let on_v1 = pack_file(&fleet, &v1, &v3);
    let on_v2 = pack_file(&fleet, &v2, &v3);
    built_ahead(&on_v1);
    built_ahead(&on_v2);
    assert!(
        !pack_file(&fleet, "empty", &v3).exists(),
        "no fresh-host pack ahead"
    );
    assert_eq!(
        serve_metric(&fleet, &line, "scap_packs_built_ahead_total"),
        3
    );
    assert_eq!(
        serve_metric(&fleet, &line, "scap_packs_ahead_failed_total"),
        0
    );
    // What a request builds, byte for byte: remove it, ask, compare.
    let ahead = fs::read(&on_v2).unwrap();
    fs::remove_file(&on_v2).unwrap();
    let asked = fleet
        .http
        .get(format!("{}/v1/pack4/{v2}/{v3}", fleet.source()))
        .send()
        .unwrap();
    assert!(asked.status().is_success());
    let asked = asked.bytes().unwrap();
    assert!(asked.len() > 100, "{}", asked.len());
    assert!(
        asked.as_ref() == ahead.as_slice(),
        "the pack built ahead differs"
    );

    // Nothing ahead with --packs-ahead 0, however long one waits.
    let mut p = fleet.server.take().unwrap();
    let _ = p.child.kill();
    let _ = p.child.wait();
    fleet.server = Some(fleet.serve_store(&fleet.env.store.clone(), &["--packs-ahead", "0"]));
    write(&fleet.env.path("mw"), "index.php", b"<?php // v4\n");
    let v4 = fleet
        .env
        .build(&[("mediawiki", &fleet.env.path("mw"))], &[]);
    std::thread::sleep(Duration::from_secs(2));
    let built: Vec<_> = fs::read_dir(fleet.env.store.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&v4))
        .collect();
    assert!(built.is_empty(), "{built:?}");
}

#[test]
fn packs_are_served_once_per_cache_and_a_bad_cache_is_skipped() {
    let mut fleet = Fleet::start(6);
    let v1 = tree(&fleet, "v1", 60);
    let log = serve_logged(&mut fleet, &[]);
    let mut eqiad = Cache::start(&fleet.env, &fleet.source());
    let codfw = Cache::start(&fleet.env, &fleet.source());
    let inv = inventory(&fleet, 3);
    config(
        &fleet,
        &inv,
        &[("eqiad", &eqiad.url), ("codfw", &codfw.url)],
    );
    let rollout = |v: &str, stages: &str| {
        scap(
            &fleet,
            &[
                "sync",
                "--version",
                v,
                "--stages",
                stages,
                "--yes",
                "--wait",
                "0",
                "--force",
                "--json",
            ],
        )
    };
    // Six fresh hosts: the deploy host serves the whole-version pack once
    // per cache, and nothing else but small requests.
    let hosts = results(&rollout(&v1, "100"));
    assert_eq!(hosts.len(), 6);
    for h in &hosts {
        let o = &h["outcome"]["fetched"];
        assert_eq!(o["pack"], true, "{h}");
        let i: usize = h["host"].as_str().unwrap()[2..].parse::<usize>().unwrap() - 1001;
        let own = if i < 3 { &eqiad.url } else { &codfw.url };
        assert!(o["by_source"][own.as_str()].as_u64().unwrap() > 0, "{h}");
    }
    let packs = served(&log, &format!("GET /v1/pack4/empty/{v1} 200"));
    assert_eq!(packs.len(), 2, "one per cache: {packs:?}");
    // A train to every host, in three steps: each pack once per cache.
    let v2 = tree(&fleet, "v2", 80);
    ok(&rollout(&v2, "10,50,100"));
    let packs = served(&log, &format!("GET /v1/pack4/{v1}/{v2} "));
    assert_eq!(packs.len(), 2, "{packs:?}");
    // The packs were complete: no host had to ask for anything else, so
    // nothing uncacheable reached the deploy host.
    let batches = served(&log, "POST /batch");
    assert!(batches.is_empty(), "{batches:?}");
    assert_eq!(fleet.on(&v2).len(), 6);
    // Status: bytes per source in the last rollout.
    let st: serde_json::Value =
        serde_json::from_str(&ok_out(&scap(&fleet, &["status", "--json"]))).unwrap();
    let src = st["sources_last_rollout"].as_object().unwrap();
    assert!(
        src.contains_key(&eqiad.url) && src.contains_key(&codfw.url),
        "{st}"
    );

    // A corrupt pack in eqiad's cache: its hosts reject it by hash, name
    // the cache, and get everything elsewhere.
    let v3 = tree(&fleet, "v3", 90);
    let r = fleet
        .http
        .get(format!("{}/v1/pack4/{v2}/{v3}", eqiad.url))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    let body = r.bytes().unwrap();
    assert!(body.len() > 10_000);
    let mut entries = Vec::new();
    for _ in 0..50 {
        entries = eqiad.entries(&format!("/v1/pack4/{v2}/{v3}"));
        if !entries.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(entries.len(), 1, "the pack is cached");
    let mut bytes = fs::read(&entries[0]).unwrap();
    let at = bytes.len() - body.len() / 2;
    for b in &mut bytes[at..at + 64] {
        *b ^= 0x5a;
    }
    fs::write(&entries[0], bytes).unwrap();
    let out = rollout(&v3, "100");
    let e = stderr(&out);
    let hosts = results(&out);
    assert_eq!(fleet.on(&v3).len(), 6, "{e}");
    let named = hosts
        .iter()
        .filter(|h| {
            h["outcome"]["fetched"]["skipped"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x.as_str().unwrap().contains(&eqiad.url)))
        })
        .count();
    assert!(
        named >= 1,
        "the bad cache is named in the hosts' results: {hosts:?}"
    );
    assert!(
        e.contains("skipped source") && e.contains(&eqiad.url),
        "{e}"
    );
    // Every host's tree is right (drift check: nothing differs).
    for i in 0..6 {
        let (code, d) = fleet.get(i, "/v1/verify");
        assert_eq!(code, 200);
        assert_eq!(d["changes"].as_array().unwrap().len(), 0, "{d}");
    }

    // A cache down: its hosts use the other cache or the deploy host.
    eqiad.stop();
    let v4 = tree(&fleet, "v4", 95);
    let out = rollout(&v4, "100");
    let e = stderr(&out);
    ok(&out);
    assert_eq!(fleet.on(&v4).len(), 6, "{e}");
    assert!(
        e.contains("skipped source") && e.contains(&eqiad.url),
        "{e}"
    );
    drop(codfw);
}

/// A TCP proxy that cuts the first response it relays after `cut` bytes
/// (then relays everything): an interrupted download.
fn cutting_proxy(upstream: &str, cut: usize) -> String {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let upstream = upstream.split("://").nth(1).unwrap().to_string();
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(up) = std::net::TcpStream::connect(&upstream) else {
                return;
            };
            // The response direction of the first connection is cut.
            let cut_this = first.swap(false, std::sync::atomic::Ordering::SeqCst);
            for (i, (mut from, mut to)) in [
                (client.try_clone().unwrap(), up.try_clone().unwrap()),
                (up, client),
            ]
            .into_iter()
            .enumerate()
            {
                let limit = if cut_this && i == 1 { cut } else { usize::MAX };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    let mut sent = 0usize;
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let n = n.min(limit - sent);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n;
                        if sent >= limit {
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    url
}

#[test]
fn an_interrupted_pack_resumes_and_caps_hold() {
    let mut fleet = Fleet::start(1);
    let v1 = tree(&fleet, "v1", 200);
    let log = serve_logged(&mut fleet, &["--max-rate", "1M"]);
    // The first connection is cut after 1.5 MB (well into the pack, past
    // its first 1 MiB segment).
    let proxy = cutting_proxy(&fleet.source(), 1_500_000);
    let body = fleet.sync_body(&v1, &[&proxy]);
    let started = Instant::now();
    let (code, r) = fleet.post(0, "/v1/sync", body);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(code, 200, "{r}");
    let f = &r["fetched"];
    assert_eq!(f["pack"], true, "{r}");
    let pack_len = fs::metadata(fleet.env.store.join(format!("packs/empty-{v1}.4.pack")))
        .unwrap()
        .len();
    // Resumed, not restarted: what arrived is the pack once, plus at most
    // the part of a segment that was cut off (it is asked for again from
    // the end of the last whole segment).
    let got = f["bytes"].as_u64().unwrap();
    assert!(
        pack_len > 3_000_000 && got < pack_len + 1_100_000,
        "{got} bytes for a {pack_len}-byte pack: {r}"
    );
    let ranges = served(&log, &format!("GET /v1/pack4/empty/{v1} 206"));
    assert_eq!(
        ranges.len(),
        1,
        "one range request resumed it: {:?}",
        served(&log, "/v1/pack4/")
    );
    // The server's cap (1 MB/s, one second of burst) paced it.
    let floor = (pack_len as f64 - 1e6) / 1e6;
    assert!(
        floor > 1.0 && secs >= floor * 0.8,
        "{secs} s for {pack_len} bytes at 1 MB/s"
    );
    // A pack nobody can build: 404, and the agent falls back to objects.
    let r = fleet
        .http
        .get(format!(
            "{}/v1/pack4/{}/{v1}",
            fleet.source(),
            "0".repeat(64)
        ))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = fleet
        .http
        .get(format!("{}/v1/pack4/nonsense/{v1}", fleet.source()))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // Packs are cacheable: a strong ETag, immutable, ranges.
    let r = fleet
        .http
        .get(format!("{}/v1/pack4/empty/{v1}", fleet.source()))
        .header("range", "bytes=0-7")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert!(
        r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable")
    );
    assert!(
        r.headers()["etag"]
            .to_str()
            .unwrap()
            .starts_with("\"pack4-")
    );
    // Format 3: the first segment's compressed length, then its zstd frame.
    assert_eq!(&r.bytes().unwrap()[4..], &[0x28, 0xb5, 0x2f, 0xfd]);
}

/// Regular files in the host's release slots (not their records).
fn release_files(host_dir: &Path) -> usize {
    fn count(d: &Path) -> usize {
        fs::read_dir(d).map_or(0, |rd| {
            rd.filter_map(Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => count(&e.path()),
                    Ok(t) if t.is_file() => 1,
                    _ => 0,
                })
                .sum()
        })
    }
    fs::read_dir(host_dir.join("releases")).map_or(0, |rd| {
        rd.filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| count(&e.path()))
            .sum()
    })
}

/// Bytes of the pack the host's store is writing (a fetch's, before its
/// commit), if any.
fn pending_pack(host_dir: &Path) -> Option<u64> {
    fs::read_dir(host_dir.join("store/objects/pack"))
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(".pack."))
        .and_then(|e| e.metadata().ok())
        .map(|m| m.len())
}

/// Syncs host 0 to `v` in the background, calling `watch` with the host's
/// directory every `every` until the sync ends or `watch` has seen what it
/// looks for (returns `false`). Returns the sync's answer.
fn sync_watching(
    fleet: &Fleet,
    v: &str,
    every: Duration,
    mut watch: impl FnMut(&Path) -> bool,
) -> (u16, serde_json::Value) {
    let body = fleet.sync_body(v, &[&fleet.source()]);
    let dir = fleet.hosts[0].dir.clone();
    std::thread::scope(|s| {
        let sync = s.spawn(|| fleet.post(0, "/v1/sync", body));
        while !sync.is_finished() && watch(&dir) {
            std::thread::sleep(every);
        }
        sync.join().unwrap()
    })
}

/// Syncs host 0 to `v` in the background; while it runs, watches for the
/// first file in a release slot. Returns the sync's answer and, if a file
/// appeared before it ended, the size of the pack the host was writing
/// at that moment (`None`: none was being written).
fn sync_watching_release(
    fleet: &Fleet,
    v: &str,
) -> ((u16, serde_json::Value), Option<Option<u64>>) {
    let mut seen = None;
    let answer = sync_watching(fleet, v, Duration::from_millis(20), |dir| {
        if release_files(dir) > 0 {
            seen = Some(pending_pack(dir));
        }
        seen.is_none()
    });
    (answer, seen)
}

#[test]
fn a_fresh_host_writes_its_release_while_the_pack_arrives() {
    let mut fleet = Fleet::start(1);
    let v1 = tree(&fleet, "v1", 200);
    serve_logged(&mut fleet, &["--max-rate", "1M"]);
    let pack_len = {
        // Built ahead, so the sync's time is the transfer's.
        let r = fleet
            .http
            .get(format!("{}/v1/pack4/empty/{v1}", fleet.source()))
            .header("range", "bytes=0-0")
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 206);
        fs::metadata(fleet.env.store.join(format!("packs/empty-{v1}.4.pack")))
            .unwrap()
            .len()
    };
    assert!(pack_len > 3_000_000, "{pack_len}");
    let ((code, r), seen) = sync_watching_release(&fleet, &v1);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["fetched"]["pack"], true, "{r}");
    assert_eq!(r["how"], "full", "{r}");
    // Paced at 1 MB/s, the pack takes seconds: the release's first files
    // were written while it still arrived (its pack file being written),
    // not after.
    let at = seen.expect("files in a release slot before the sync ended");
    assert!(
        at.is_some(),
        "the first release files appeared only after the fetch was committed: {r}"
    );
    // And the result is the version, whole, recorded clean, its objects
    // in the store.
    assert_eq!(
        snapshot(&fleet.live(0, "mediawiki")),
        snapshot(&fleet.env.path("mw"))
    );
    let (_, d) = fleet.get(0, "/v1/verify");
    assert_eq!(d["changes"], serde_json::json!([]), "{d}");
    let slot = r["slot"].as_str().unwrap();
    let meta: serde_json::Value = serde_json::from_slice(
        &fs::read(fleet.hosts[0].dir.join(format!("releases/{slot}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["clean"], true, "{meta}");
    assert_eq!(meta["version"], v1.as_str(), "{meta}");
    assert_eq!(pending_pack(&fleet.hosts[0].dir), None);
}

/// A fresh host writes the bytes it receives once: the pack's segments as
/// they came (compressed), its objects entries into them. The pack file
/// it writes never grows past the pack it was sent, where the objects'
/// own bytes are several times that; its gc rewrites it after the switch
/// (pack file 1, compressed object by object), and every object reads
/// back.
#[test]
fn a_fresh_host_stores_the_pack_it_receives_as_it_came() {
    let mut fleet = Fleet::start(1);
    let mw = fleet.env.path("mw");
    let mut tree_bytes = 0;
    for i in 0..300 {
        let body: String = (0..300)
            .map(|j| format!("$wgConf['setting{j}']['wiki{i}'] = {};\n", i * j))
            .collect();
        tree_bytes += body.len() as u64;
        write(
            &mw,
            &format!("includes/c{}/f{i}.php", i % 7),
            body.as_bytes(),
        );
    }
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    serve_logged(&mut fleet, &["--max-rate", "1M"]);
    let dir = fleet.hosts[0].dir.clone();
    let mut largest = None;
    let (code, r) = sync_watching(&fleet, &v1, Duration::from_millis(5), |dir| {
        if let Some(n) = pending_pack(dir) {
            largest = largest.max(Some(n));
        }
        true
    });
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["fetched"]["pack"], true, "{r}");
    let pack_len = fs::metadata(fleet.env.store.join(format!("packs/empty-{v1}.4.pack")))
        .unwrap()
        .len();
    assert!(pack_len * 4 < tree_bytes, "{pack_len} of {tree_bytes}");
    let largest = largest.expect("the host's pack seen while it was written");
    // Its segments, plus the trees (stored on their own, each once all it
    // lists is) and the pack's header.
    assert!(
        largest <= pack_len + 64 * 1024,
        "the host wrote {largest} bytes of pack for a {pack_len}-byte pack ({tree_bytes} bytes of files)"
    );
    assert_eq!(
        snapshot(&fleet.live(0, "mediawiki")),
        snapshot(&fleet.env.path("mw"))
    );
    // The work after the switch rewrites it: no pack holds segments.
    wait_for(60, "the host to rewrite the pack it received", || {
        let packs = host_packs(&dir);
        !packs.is_empty()
            && packs
                .iter()
                .all(|p| p[8..12] == 1u32.to_le_bytes() && !pack_flagged_raw(p))
    });
    verify_store(&dir.join("store"), &v1);
}

/// A file larger than the few pack segments a host keeps decompressed is
/// written as its chunks arrive, not once they all have: paced at 4 MB/s,
/// its first bytes are in the release while the host's pack holds less
/// than half of it (it is incompressible: the pack grows with it). The
/// release is the version, whole.
#[test]
fn a_fresh_host_writes_a_large_file_as_its_chunks_arrive() {
    let mut fleet = Fleet::start(1);
    let mw = fleet.env.path("mw");
    let big_len = 8u64 << 20;
    write(&mw, "cache/l10n/big.cdb", &noise(big_len as usize, 7));
    for i in 0..20 {
        write(&mw, &format!("includes/f{i}.php"), &noise(4 << 10, i));
    }
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    serve_logged(&mut fleet, &["--max-rate", "4M"]);
    // The file's size and the pack's, the first time the file has bytes.
    let mut seen = None;
    let (code, r) = sync_watching(&fleet, &v1, Duration::from_millis(10), |dir| {
        let pack = pending_pack(dir);
        for slot in fs::read_dir(dir.join("releases"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let big = slot.path().join("mediawiki/cache/l10n/big.cdb");
            if let Ok(m) = fs::metadata(&big)
                && m.len() > 0
            {
                seen = Some((m.len(), pack));
            }
        }
        seen.is_none()
    });
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["fetched"]["pack"], true, "{r}");
    let (len, pack) = seen.expect("the large file seen in the release before the sync ended");
    assert!(
        pack.is_some_and(|p| p < big_len / 2),
        "the large file had its first {len} bytes written when the host's pack held {pack:?} of its {big_len}"
    );
    assert_eq!(
        snapshot(&fleet.live(0, "mediawiki")),
        snapshot(&fleet.env.path("mw"))
    );
    let (_, d) = fleet.get(0, "/v1/verify");
    assert_eq!(d["changes"], serde_json::json!([]), "{d}");
}

#[test]
fn a_fetch_cancelled_while_its_release_is_written_leaves_nothing_used() {
    let mut fleet = Fleet::start(1);
    let v1 = tree(&fleet, "v1", 200);
    serve_logged(&mut fleet, &["--max-rate", "1M"]);
    let body = fleet.sync_body(&v1, &[&fleet.source()]);
    let dir = fleet.hosts[0].dir.clone();
    let (code, r) = std::thread::scope(|s| {
        let sync = s.spawn(|| fleet.post(0, "/v1/sync", body));
        // Cancelled once the release has files, the pack half there.
        let deadline = Instant::now() + Duration::from_secs(60);
        while release_files(&dir) == 0 {
            assert!(Instant::now() < deadline, "no release file in 60 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (code, c) = fleet.post(0, "/v1/cancel", serde_json::json!({"by": "test"}));
        assert_eq!(code, 200, "{c}");
        sync.join().unwrap()
    });
    assert_eq!(code, 409, "{r}");
    assert!(
        // Who cancelled is the deployer's certificate, not the body's "by".
        r["error"]
            .as_str()
            .unwrap()
            .contains("cancelled by scap-deployer"),
        "{r}"
    );
    // The host runs nothing, and the slot it was writing is marked dirty
    // (never switched to; written again next time).
    assert_eq!(fleet.current(0), None);
    assert!(!dir.join("current").exists());
    let metas: Vec<serde_json::Value> = fs::read_dir(dir.join("releases"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| serde_json::from_slice(&fs::read(p).unwrap()).unwrap())
        .collect();
    assert!(
        !metas.is_empty() && metas.iter().all(|m| m["clean"] == false),
        "{metas:?}"
    );
    // The next sync ends whole.
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        snapshot(&fleet.live(0, "mediawiki")),
        snapshot(&fleet.env.path("mw"))
    );
    let (_, d) = fleet.get(0, "/v1/verify");
    assert_eq!(d["changes"], serde_json::json!([]), "{d}");
}

#[test]
fn staged_versions_make_each_step_a_switch() {
    let mut fleet = Fleet::start(5);
    let v1 = tree(&fleet, "v1", 40);
    fleet.serve();
    let inv = inventory(&fleet, 5);
    config(&fleet, &inv, &[]);
    ok(&scap(
        &fleet,
        &[
            "sync",
            "--version",
            &v1,
            "--canary",
            "100%",
            "--yes",
            "--wait",
            "0",
            "--force",
        ],
    ));
    let v2 = tree(&fleet, "v2", 120);
    let out = scap(&fleet, &["stage", "--version", &v2]);
    assert!(
        ok_out(&out).contains("staged on 5 host(s)"),
        "{}",
        stderr(&out)
    );
    assert!(fleet.on(&v2).is_empty(), "staging switches nothing");
    let st: serde_json::Value =
        serde_json::from_str(&ok_out(&scap(&fleet, &["status", "--json"]))).unwrap();
    assert_eq!(st["staged"][v2.as_str()], 5, "{st}");
    let out = scap(
        &fleet,
        &[
            "sync",
            "--version",
            &v2,
            "--stages",
            "20,60,100",
            "--yes",
            "--wait",
            "0",
            "--force",
            "--json",
        ],
    );
    for h in results(&out) {
        assert_eq!(h["outcome"]["how"], "reused", "a switch only: {h}");
        assert_eq!(h["outcome"]["fetched"]["bytes"], 0, "{h}");
        // Staging watched the slot it wrote: the switch stats nothing.
        assert_eq!(h["outcome"]["files_checked"], 0, "{h}");
    }
    assert_eq!(fleet.on(&v2).len(), 5);
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..5 {
        let (_, s) = fleet.get(i, "/v1/state");
        for e in s["state"]["history"].as_array().unwrap() {
            *by.entry(e["action"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(by["stage"], 5, "{by:?}");
}

/// A PHP config file of about 400 KB, distinct per `seed`, in the shape of
/// InitialiseSettings.php (one setting per few lines).
fn config_file(seed: u64) -> Vec<u8> {
    let n = noise(60_000, seed);
    let mut out = b"<?php\nreturn [\n".to_vec();
    let mut i = 0;
    while out.len() < 400_000 {
        let w = &n[(i * 4) % (n.len() - 4)..][..4];
        out.extend_from_slice(
            format!(
                "'wg{seed}Setting{i}' => [\n\t'default' => {},\n\t'enwiki' => '{:02x}{:02x}{:02x}',\n],\n",
                w[0], w[1], w[2], w[3]
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.extend_from_slice(b"];\n");
    out
}

#[test]
fn a_backport_travels_as_deltas_and_without_the_base_falls_back() {
    let fleet = Fleet::start(2);
    let mw = fleet.env.path("mw");
    let names = [
        "wmf-config/InitialiseSettings.php",
        "wmf-config/CommonSettings.php",
        "wmf-config/ProductionServices.php",
    ];
    let mut files: Vec<Vec<u8>> = (0..3).map(|k| config_file(k as u64 + 1)).collect();
    for (name, data) in names.iter().zip(&files) {
        write(&mw, name, data);
    }
    write(&mw, "index.php", b"<?php // v1\n");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let mut fleet = fleet;
    fleet.serve();
    for i in 0..2 {
        let (code, r) = fleet.sync_to(i, &v1);
        assert_eq!(code, 200, "{r}");
    }
    // One line changed in the middle of each file.
    for (name, data) in names.iter().zip(files.iter_mut()) {
        let at = data.len() / 2;
        let line = data[at..].iter().position(|&b| b == b'\n').unwrap() + at + 1;
        data.splice(
            line..line,
            b"\t'wmgUseNewThing' => true, // T12345\n".iter().copied(),
        );
        write(&mw, name, data);
    }
    let v2 = fleet.env.build(&[("mediawiki", &mw)], &[]);

    // Host 0 holds v1: the pack sends each changed chunk (and each changed
    // tree) as a delta against the one it replaces.
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 200, "{r}");
    let f = &r["fetched"];
    assert_eq!(f["pack"], true, "{r}");
    let bytes = f["bytes"].as_u64().unwrap();
    let pack = fs::read(fleet.env.store.join(format!("packs/{v1}-{v2}.4.pack"))).unwrap();
    // 3 chunk deltas + the trees on the changed path, a few hundred bytes
    // each at most: far below one whole 64 KiB-class chunk per file.
    assert!(
        (pack.len() as u64) < 6_000,
        "a 3-line backport makes a {}-byte pack",
        pack.len()
    );
    assert!(bytes < 12_000, "host 0 fetched {bytes} bytes: {r}");
    for (name, data) in names.iter().zip(&files) {
        assert_eq!(
            &fs::read(fleet.live(0, "mediawiki").join(name)).unwrap(),
            data
        );
    }

    // A train: the same files again under a new branch directory. Host 0
    // holds every one of them (at other paths): the pack carries only the
    // new trees.
    for (name, data) in names.iter().zip(&files) {
        write(&mw, &format!("php-1.46.0-wmf.2/{name}"), data);
    }
    let v3 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    let (code, r) = fleet.sync_to(0, &v3);
    assert_eq!(code, 200, "{r}");
    let pack = fs::metadata(fleet.env.store.join(format!("packs/{v2}-{v3}.4.pack")))
        .unwrap()
        .len();
    assert!(
        pack < 2_000,
        "a train of files the host holds: {pack}-byte pack"
    );
    assert_eq!(r["fetched"]["chunks"], 0, "{r}");

    // Host 1 holds v1 but its store lost every object (a store that
    // differs from what its version implies): the deltas' bases are not
    // there, so the agent skips them and fetches those objects whole.
    let objects = fleet.hosts[1].dir.join("store/objects");
    let mut removed = 0;
    for d in fs::read_dir(&objects).unwrap() {
        let d = d.unwrap().path();
        if d.is_dir() {
            for f in fs::read_dir(&d).unwrap() {
                fs::remove_file(f.unwrap().path()).unwrap();
                removed += 1;
            }
        }
    }
    assert!(removed > 5, "{removed} objects removed");
    let (code, r) = fleet.sync_to(1, &v2);
    assert_eq!(code, 200, "{r}");
    assert!(
        r["fetched"]["bytes"].as_u64().unwrap() > 100_000,
        "the whole chunks came after all: {r}"
    );
    assert_eq!(fleet.current(1).as_deref(), Some(v2.as_str()));
    for (name, data) in names.iter().zip(&files) {
        assert_eq!(
            &fs::read(fleet.live(1, "mediawiki").join(name)).unwrap(),
            data
        );
    }
    let (code, v) = fleet.get(1, "/v1/verify");
    assert_eq!(code, 200, "{v}");
}

/// Object files under `store/objects`, packs included: (bytes, how many
/// store their payload uncompressed although it is over 200 bytes, or are
/// packs flagged as holding objects stored uncompressed for gc to
/// compress).
fn object_files(store: &std::path::Path) -> (u64, usize) {
    let (mut bytes, mut raw) = (0, 0);
    for d in fs::read_dir(store.join("objects")).unwrap() {
        let d = d.unwrap().path();
        if !d.is_dir() {
            continue;
        }
        for f in fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".dead") {
                continue;
            }
            let data = fs::read(&f).unwrap();
            bytes += data.len() as u64;
            if name.ends_with(".pack") {
                if pack_flagged_raw(&data) {
                    raw += 1;
                }
            } else if data.len() > 216 && data[6] == 0 {
                raw += 1;
            }
        }
    }
    (bytes, raw)
}

#[test]
fn a_fresh_pack_compresses_files_against_each_other_and_hosts_store_them_compressed() {
    let mut fleet = Fleet::start(1);
    // Many small files that differ in one line and share the rest (a
    // licence header, the same boilerplate): each compresses poorly alone,
    // very well against the others.
    let mw = fleet.env.path("mw");
    let header: String = (0..40)
        .map(|i| format!(" * Licence line {i}: the same text in every file of the tree.\n"))
        .collect();
    for i in 0..400 {
        write(
            &mw,
            &format!("includes/c{}/F{i}.php", i % 10),
            format!("<?php\n/**\n{header} */\nclass F{i} extends Base {{ const N = {i}; }}\n")
                .as_bytes(),
        );
    }
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    fleet.serve();
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["fetched"]["pack"], true, "{r}");
    assert_eq!(snapshot(&fleet.live(0, "mediawiki")), snapshot(&mw));
    let (stored, _) = object_files(&fleet.env.store);
    let fetched = r["fetched"]["bytes"].as_u64().unwrap();
    assert!(
        fetched * 4 < stored,
        "the fresh host fetched {fetched} bytes for {stored} bytes of object files"
    );
    // What arrived uncompressed is stored as it came (no zstd on the
    // deploy's path), and compressed by the host's work after the switch.
    let host_store = fleet.hosts[0].dir.join("store");
    wait_for(60, "the host to compress what it fetched", || {
        object_files(&host_store).1 == 0
    });
    let (host_bytes, _) = object_files(&host_store);
    assert!(
        host_bytes <= stored + stored / 20,
        "{host_bytes} vs {stored}"
    );
}

/// `scap serve` of the fleet's store with `env` added, its access log in
/// the returned file.
fn serve_with_env(fleet: &mut Fleet, extra: &[&str], env: &[(&str, &str)]) -> PathBuf {
    let log = fleet.env.path("access.log");
    let log_s = log.display().to_string();
    let mut args = vec!["--access-log", log_s.as_str()];
    args.extend(extra);
    let store = fleet.env.store.clone();
    let mut cmd = fleet.serve_command(Command::new(SCAP), &store, &args);
    cmd.envs(env.iter().copied());
    fleet.server = Some(Proc::start(cmd));
    log
}

/// The first host to ask for a pack nobody built yet gets it as it is
/// built, not after: its first bytes arrive while the pack file is not
/// in place yet, the answer has no length (it is not known yet), and the
/// bytes are the pack's. The next request gets the file, with its length.
#[test]
fn the_first_host_of_a_version_gets_its_pack_while_it_is_built() {
    let mut fleet = Fleet::start(1);
    let v1 = tree(&fleet, "v1", 300);
    // Nothing built ahead; each segment's write pauses, so the build takes
    // seconds.
    serve_with_env(
        &mut fleet,
        &["--packs-ahead", "0"],
        &[("SCAP_FAILPOINT", "pack:segment:pause=400")],
    );
    let pack = pack_file(&fleet, "empty", &v1);
    let mut r = fleet
        .http
        .get(format!("{}/v1/pack4/empty/{v1}", fleet.source()))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers().get("content-length").is_none(),
        "{:?}",
        r.headers()
    );
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut r, &mut first).unwrap();
    assert!(
        !pack.exists(),
        "the first bytes came before the build ended"
    );
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut rest).unwrap();
    let mut got = first.to_vec();
    got.extend(rest);
    let want = fs::read(&pack).unwrap();
    assert!(want.len() > 3_000_000, "several segments: {}", want.len());
    assert!(
        got == want,
        "{} bytes streamed, the pack has {}",
        got.len(),
        want.len()
    );
    let r = fleet
        .http
        .get(format!("{}/v1/pack4/empty/{v1}", fleet.source()))
        .send()
        .unwrap();
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        want.len().to_string()
    );
    let (code, out) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["fetched"]["pack"], true, "{out}");
}

/// A build that fails while its pack is streamed cuts the stream after
/// what was sent: the host asks for the rest, which cannot be built
/// either, and fetches by objects what it still lacks, from the same
/// deploy host; its release is the version, whole.
#[test]
fn a_pack_stream_cut_by_a_failed_build_falls_back_to_objects() {
    let mut fleet = Fleet::start(1);
    let v1 = tree(&fleet, "v1", 300);
    // The third segment's write fails (EIO), every build: two were sent.
    serve_with_env(
        &mut fleet,
        &["--packs-ahead", "0"],
        &[("SCAP_FAILPOINT", "pack:segment:errno=5")],
    );
    let (code, out) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{out}");
    let f = &out["fetched"];
    assert_eq!(f["pack"], false, "{out}");
    assert!(f["bytes"].as_u64().unwrap() > 0, "{out}");
    assert!(!pack_file(&fleet, "empty", &v1).exists());
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    let (_, d) = fleet.get(0, "/v1/verify");
    assert_eq!(d["changes"], serde_json::json!([]), "{d}");
}
