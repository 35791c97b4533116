//! Deploying to a host: `scap serve` + `scap agent` against an rsync daemon
//! (what scap runs today: `rsync -a --delete --compress`), on loopback, on
//! the same generated MediaWiki-like tree, side by side in one run: a fresh
//! host, a backport, a train, a no-op, config changes. Then how long a
//! rollback takes while the agent is busy (a fresh-host fetch, the work
//! after a big switch).
//!
//! Run: `cargo bench --bench sync` (needs rsync; SCAP_BENCH_FILES, default
//! 30000; 263000 is production's size). scap runs twice side by side, each
//! with its own store, server and agents: over TLS with client certificates
//! (the default) and over plain HTTP (`--insecure-http`, left out with
//! SCAP_BENCH_PLAIN=0), both with signed versions. With
//! `SCAP_BENCH_BASELINE=/path/to/an/older/scap`, that binary runs beside
//! them for a before/after comparison: over TLS like the first stack if it
//! has `scap pki` (a binary from after the transport work), else plain
//! HTTP with its own flags.
//!
//! Each row also gives the deploy host's build of that change (the TLS
//! stack's: wall time and peak RSS) and how long after it the server had
//! built the hosts' pack ahead (the runs start once it has, as a real
//! deploy's sync comes long after its build), and the disk each host uses
//! after it:
//! the agent's whole directory (store, release slots, state) against the
//! rsync host's tree, each inode counted once (`du`).
//!
//! Every deploy is measured on two hosts per tool that make the same
//! transition, in the order A B C D D C B A (this disk's speed drifts);
//! the fresh host below 100k files on four (A B C C B A A B C C B A: a
//! fresh sync writes the whole tree, at the mercy of this machine's memory
//! and disk, whose cost for one run varies 2-3x from minute to minute);
//! rows report the lower median of each tool's samples.
//! Bytes on the wire are counted by TCP proxies (HTTP headers, TLS
//! included), both agent <-> server and controller <-> agent; for rsync
//! they are rsync's own `--stats` totals. Each sync is sent, as `scap
//! sync` sends it, on the connection a poll of the host's state opened
//! just before (not timed, not counted): no sample pays a TLS handshake
//! that another does not.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

fn rsync(port: u16, dest: &Path) -> (f64, u64) {
    let (run, out) = timed(
        Command::new("rsync")
            .args(["-a", "--delete", "--compress", "--exclude=.git", "--stats"])
            .arg(format!("rsync://127.0.0.1:{port}/mw/"))
            .arg(dest),
    );
    let total = |what: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with(what))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.split_whitespace().next().unwrap_or("0").replace(',', ""))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        run.secs,
        total("Total bytes sent") + total("Total bytes received"),
    )
}

/// How a stack talks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// This scap: TLS with client certificates, signed versions.
    Tls,
    /// This scap: `--insecure-http` with a token, signed versions.
    Plain,
    /// An older scap from before TLS (`SCAP_BENCH_BASELINE`): plain
    /// HTTP, a token, unsigned versions.
    Before,
}

struct Host {
    child: Child,
    url: String,
    front: CountingProxy,
}

/// One scap binary with its own store, server and two agents.
struct Stack {
    name: &'static str,
    mode: Mode,
    exe: PathBuf,
    store: PathBuf,
    server: Child,
    source: CountingProxy,
    hosts: Vec<Host>,
    token: PathBuf,
    pki: PathBuf,
    dir: PathBuf,
    http: reqwest::blocking::Client,
}

impl Stack {
    /// Builds the first version of `staging` (so the store exists), then
    /// starts a server and two agents.
    fn start(
        name: &'static str,
        mode: Mode,
        exe: &Path,
        dir: &Path,
        staging: &Path,
        token: &Path,
    ) -> (Stack, Run, String) {
        std::fs::create_dir_all(dir).unwrap();
        let pki = dir.join("pki");
        if mode != Mode::Before {
            let out = Command::new(exe)
                .args(["pki", "init"])
                .arg(&pki)
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        let mut http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(900));
        if mode == Mode::Tls {
            let mut pem = std::fs::read(pki.join("deployer.pem")).unwrap();
            pem.extend(std::fs::read(pki.join("deployer.key")).unwrap());
            let ca = std::fs::read(pki.join("ca.pem")).unwrap();
            http = http
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
                .identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        let mut s = Stack {
            name,
            mode,
            exe: exe.to_path_buf(),
            store: dir.join("store"),
            server: Command::new("true").spawn().unwrap(),
            source: CountingProxy {
                url: String::new(),
                bytes: Default::default(),
            },
            hosts: Vec::new(),
            token: token.to_path_buf(),
            pki,
            dir: dir.to_path_buf(),
            http: http.build().unwrap(),
        };
        let (run, v) = s.build(staging);
        let mut serve = Command::new(exe);
        serve
            .arg("--store")
            .arg(&s.store)
            .args(s.transport("server"))
            .args(["serve", "--listen", "127.0.0.1:0"]);
        if mode != Mode::Before {
            serve.args(["--dashboard-listen", "127.0.0.1:0"]);
        }
        let (server, server_url) = start_listening(&mut serve);
        s.server = server;
        s.source = CountingProxy::start(&server_url);
        for i in 0..2 {
            let h = s.agent(&format!("host{i}"));
            s.hosts.push(h);
        }
        (s, run, v)
    }

    /// Transport flags for a process of `role` (server, agent).
    fn transport(&self, role: &str) -> Vec<String> {
        let p = |f: &str| self.pki.join(f).display().to_string();
        match self.mode {
            Mode::Tls => vec![
                "--ca".into(),
                p("ca.pem"),
                "--cert".into(),
                p(&format!("{role}.pem")),
                "--key".into(),
                p(&format!("{role}.key")),
            ],
            Mode::Plain => vec![
                "--insecure-http".into(),
                "--token-file".into(),
                self.token.display().to_string(),
            ],
            Mode::Before => vec![],
        }
    }

    fn agent(&self, name: &str) -> Host {
        let mut cmd = Command::new(&self.exe);
        cmd.args(self.transport("agent"))
            .args(["agent", "--listen", "127.0.0.1:0", "--host", name])
            .arg("--dir")
            .arg(self.dir.join(name));
        match self.mode {
            Mode::Before => cmd.arg("--token-file").arg(&self.token),
            _ => cmd.arg("--trusted-key").arg(self.pki.join("deploy.pub")),
        };
        let (child, url) = start_listening(&mut cmd);
        let front = CountingProxy::start(&url);
        Host { child, url, front }
    }

    /// Builds (and signs) a version of `staging`: (time and peak RSS,
    /// version).
    fn build(&self, staging: &Path) -> (Run, String) {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--store").arg(&self.store);
        if self.mode != Mode::Before {
            cmd.arg("--config").arg("/dev/null");
        }
        cmd.args(["build-manifest", "--exclude", "**/.git", "--component"])
            .arg(format!("mediawiki={}", staging.display()));
        if self.mode != Mode::Before {
            cmd.arg("--sign-key").arg(self.pki.join("deploy.key"));
        }
        let (run, out) = timed(&mut cmd);
        (run, version_id(&out))
    }

    /// Waits until this stack's server has built the pack from `from` to
    /// `to` ahead of any request, as `scap serve` does when a version
    /// appears in its store (long before a person types the sync, in a
    /// real deploy): the runs that follow find it built, and no build runs
    /// beside them.
    fn pack_ahead(&self, from: &str, to: &str) {
        let p = self.store.join(format!(
            "packs/{from}-{to}.{}.pack",
            scap::net::pack::PACK_FORMAT
        ));
        let started = Instant::now();
        while !p.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "{}: scap serve built no pack from {from} to {to} ahead in 10 minutes",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A sync request's body, with the signature as the controller sends it.
    fn body(&self, v: &str) -> serde_json::Value {
        let mut body =
            serde_json::json!({"version": v, "sources": [self.source.url], "by": "bench"});
        if self.mode != Mode::Before {
            let sig = std::fs::read(self.store.join(format!("versions/{v}.sig"))).unwrap();
            body["signature"] = serde_json::from_slice(&sig).unwrap();
        }
        body
    }

    fn auth(&self, r: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        if self.mode == Mode::Tls {
            r
        } else {
            r.bearer_auth("bench-token")
        }
    }

    fn post(&self, url: &str, body: serde_json::Value) -> (u16, f64) {
        let t = Instant::now();
        let r = self.auth(self.http.post(url)).json(&body).send().unwrap();
        (r.status().as_u16(), t.elapsed().as_secs_f64())
    }

    /// Syncs host `i` to `v`: (seconds, bytes on the wire, the answer).
    fn sync(&self, i: usize, v: &str) -> (f64, u64, serde_json::Value) {
        let h = &self.hosts[i];
        let body = self.body(v);
        // As `scap sync` does: it polls every host's state, then sends the
        // sync on the connection the poll opened (its client keeps them).
        // Without this, whether a sample pays a TLS handshake depends on
        // the row before it: the client drops a connection idle for 90 s,
        // and only at 263k files do the rsync runs between two of one
        // host's samples take that long.
        let polled = self
            .auth(self.http.get(format!("{}/v1/state", h.front.url)))
            .send()
            .unwrap();
        assert!(polled.status().is_success(), "{}", polled.text().unwrap());
        polled.bytes().unwrap();
        self.source.take();
        h.front.take();
        let started = Instant::now();
        let r = self
            .auth(self.http.post(format!("{}/v1/sync", h.front.url)))
            .json(&body)
            .send()
            .unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
        let answer: serde_json::Value = r.json().unwrap();
        // Let the proxies' threads finish counting.
        std::thread::sleep(Duration::from_millis(50));
        let bytes = self.source.take() + h.front.take();
        self.settle(&h.url);
        (secs, bytes, answer)
    }

    /// Waits until an agent's after-switch work (spare release, gc) is
    /// done, as it would be between two real deploys minutes apart.
    fn settle(&self, agent: &str) {
        loop {
            let st: serde_json::Value = self
                .auth(self.http.get(format!("{agent}/v1/state")))
                .send()
                .unwrap()
                .json()
                .unwrap();
            if st["busy"] == false {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        let _ = self.server.kill();
        for h in &mut self.hosts {
            let _ = h.child.kill();
        }
    }
}

/// Seconds a rollback to `previous` takes on a fresh agent that is busy
/// with `busy`: "fetch" (a fresh-host fetch of `big` in progress) or
/// "after-switch" (the background work right after switching to `big`).
fn rollback_while_busy(s: &Stack, tiny: &[String; 2], big: &str, busy: &str, n: usize) -> f64 {
    let h = s.agent(&format!("rollback-{busy}-{n}"));
    for v in tiny {
        let (code, _) = s.post(&format!("{}/v1/sync", h.url), s.body(v));
        assert_eq!(code, 200);
        s.settle(&h.url);
    }
    let sync = s
        .auth(s.http.post(format!("{}/v1/sync", h.url)))
        .json(&s.body(big));
    let mut t = Some(std::thread::spawn(move || {
        let r = sync.send().unwrap();
        (r.status().as_u16(), r.text().unwrap_or_default())
    }));
    if busy == "fetch" {
        // Well into the fetch (a fresh host takes seconds).
        std::thread::sleep(Duration::from_millis(1500));
    } else {
        let (code, text) = t.take().unwrap().join().unwrap();
        assert_eq!(code, 200, "{text}");
    }
    let (code, secs) = s.post(
        &format!("{}/v1/rollback", h.url),
        serde_json::json!({"to": "previous", "by": "bench"}),
    );
    assert_eq!(code, 200);
    if let Some(t) = t {
        let (code, text) = t.join().unwrap();
        assert_eq!(code, 409, "{text}");
        assert!(
            text.contains("cancel") || text.contains("rollback"),
            "the fetch was cancelled: {text}"
        );
    }
    let mut child = h.child;
    let _ = child.kill();
    let _ = child.wait();
    secs
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    assert!(
        have("rsync"),
        "rsync is not installed (apt-get install rsync)"
    );
    let files: usize = std::env::var("SCAP_BENCH_FILES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    let baseline = std::env::var("SCAP_BENCH_BASELINE").ok().map(PathBuf::from);
    let dir = fresh("sync");
    // What a run took at 263k files, TLS only: ~260 KB a file of the tree
    // (the trees, two rsync hosts, the agents, the stores, a train).
    let stacks = 1
        + u64::from(std::env::var("SCAP_BENCH_PLAIN").as_deref() != Ok("0"))
        + u64::from(baseline.is_some());
    // The fresh-host row's extra hosts (four more of each tool below 100k
    // files, where one pair of samples is at the mercy of this disk).
    let fresh_passes: usize = if files <= 100_000 { 6 } else { 2 };
    let extra = (fresh_passes as u64 - 2) * (15_000 + 21_000 * stacks);
    need_space(&dir, files as u64 * (180_000 + 80_000 * stacks + extra));
    let tree = dir.join("tree");
    println!("machine: {}\ngenerating {files} files ...", machine());
    generate(&tree, files);
    big_configs(&tree);
    let staging = tree.join("mediawiki-staging");
    std::thread::sleep(Duration::from_millis(1100));

    let (mut daemon, port) = rsync_daemon(&dir, &staging);
    let rsync_dest: Vec<PathBuf> = (0..fresh_passes)
        .map(|i| dir.join(format!("rsync-host{i}")))
        .collect();

    let token = dir.join("token");
    std::fs::write(&token, "bench-token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let exe = Path::new(SCAP);
    let (tls, first_build, v1) = Stack::start(
        "scap TLS",
        Mode::Tls,
        exe,
        &dir.join("tls"),
        &staging,
        &token,
    );
    let mut stacks = vec![tls];
    let with_plain = std::env::var("SCAP_BENCH_PLAIN").as_deref() != Ok("0");
    if with_plain {
        let (plain, _, v) = Stack::start(
            "scap plain",
            Mode::Plain,
            exe,
            &dir.join("plain"),
            &staging,
            &token,
        );
        assert_eq!(v, v1);
        stacks.push(plain);
    }
    if let Some(before) = &baseline {
        // A baseline from after the transport work (it has `pki`) runs as
        // this binary's TLS stack does; an older one plain and unsigned.
        let speaks_tls = Command::new(before)
            .args(["pki", "--help"])
            .output()
            .is_ok_and(|o| o.status.success());
        let (s, _, v) = Stack::start(
            "before",
            if speaks_tls { Mode::Tls } else { Mode::Before },
            before,
            &dir.join("before"),
            &staging,
            &token,
        );
        assert_eq!(v, v1, "both binaries make the same version");
        stacks.push(s);
    }

    let mut headers: Vec<String> = vec!["deploy".into()];
    headers.extend(stacks.iter().map(|s| format!("{} time", s.name)));
    headers.extend(
        [
            "rsync time",
            "scap bytes",
            "rsync bytes",
            "TLS / rsync time",
            "TLS / rsync, paired",
            "TLS / rsync bytes",
        ]
        .map(String::from),
    );
    if with_plain {
        headers.extend(["TLS - plain", "TLS / plain"].map(String::from));
    }
    headers.extend(
        [
            "build (deploy host)",
            "builder RSS",
            "agent disk",
            "rsync disk",
            "agent disk / rsync",
        ]
        .map(String::from),
    );
    if baseline.is_some() {
        headers.push("TLS / before".into());
    }
    // The fresh host runs on more hosts than the rows after it, which go
    // on with the first two (the others stay idle until the end).
    for s in &mut stacks {
        for i in 2..fresh_passes {
            let h = s.agent(&format!("host{i}"));
            s.hosts.push(h);
        }
    }
    let agent_dir = stacks[0].dir.join("host0");
    let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut table = Table::new(&header_refs);
    let mut current = v1.clone();
    // A deploy kind: `rounds` successive changes (each mutates the tree,
    // builds in every stack, then runs every tool on `passes` hosts that
    // make the same transition, A B C C B A A B C ...); the lower median of
    // each tool.
    let mut deploy = |name: &str,
                      passes: usize,
                      rounds: &[Option<(&str, u64)>],
                      table: &mut Table| {
        let mut r = Vec::new();
        let mut per: Vec<Vec<(f64, u64)>> = vec![Vec::new(); stacks.len()];
        let mut builds: Vec<Run> = Vec::new();
        let mut ahead: Vec<f64> = Vec::new();
        for change in rounds {
            let v = match change {
                Some((kind, seed)) => {
                    mutate(&tree, kind, *seed);
                    std::thread::sleep(Duration::from_millis(1100));
                    let (run, v) = stacks[0].build(&staging);
                    let built = Instant::now();
                    builds.push(run);
                    for s in &stacks[1..] {
                        assert_eq!(s.build(&staging).1, v, "every stack makes the same version");
                    }
                    // The baseline (an older binary) may build no packs
                    // ahead: its first host waits for the build.
                    for s in stacks.iter().filter(|s| s.exe == exe) {
                        s.pack_ahead(&current, &v);
                    }
                    ahead.push(built.elapsed().as_secs_f64());
                    v
                }
                None => current.clone(),
            };
            for (pass, dest) in rsync_dest.iter().enumerate().take(passes) {
                let mut order: Vec<usize> = (0..=stacks.len()).collect();
                if pass % 2 == 1 {
                    order.reverse();
                }
                for step in order {
                    // No run pays for the one before's dirty pages (an
                    // rsync leaves its tree to the kernel's writeback;
                    // scap's switch has synced its own).
                    flush_dirty();
                    if step == 0 {
                        r.push(rsync(port, dest));
                        continue;
                    }
                    let (t, n, out) = stacks[step - 1].sync(pass, &v);
                    if pass == 0 && step == 1 {
                        println!("scap {name}: {out}");
                    }
                    per[step - 1].push((t, n));
                }
            }
            current = v;
        }
        let med = |v: &mut Vec<(f64, u64)>| -> (f64, u64) {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v[(v.len() - 1) / 2]
        };
        println!("samples {name}: {per:?} rsync {r:?}");
        // Each TLS sample beside the rsync run next to it in time (they
        // alternate), so a minute in which this machine is slow counts
        // against both: the lower median of the ratios.
        let mut paired: Vec<f64> = per[0].iter().zip(&r).map(|(s, r)| s.0 / r.0).collect();
        paired.sort_by(f64::total_cmp);
        let paired = paired[(paired.len() - 1) / 2];
        let (rt, rb) = med(&mut r);
        let meds: Vec<(f64, u64)> = per.iter_mut().map(med).collect();
        let (tt, tb) = meds[0];
        let mut row = vec![name.to_string()];
        row.extend(meds.iter().map(|m| ms(m.0)));
        row.extend([
            ms(rt),
            mb(tb),
            mb(rb),
            format!("{:.2}", tt / rt),
            format!("{paired:.2}"),
            format!("{:.3}", tb as f64 / rb.max(1) as f64),
        ]);
        if with_plain {
            let pt = meds[1].0;
            row.extend([
                format!("{:+.1} ms", (tt - pt) * 1000.0),
                format!("{:.2}", tt / pt),
            ]);
        }
        builds.sort_by(|a, b| a.secs.total_cmp(&b.secs));
        ahead.sort_by(f64::total_cmp);
        match builds.get(builds.len().saturating_sub(1) / 2) {
            Some(b) => row.extend([
                // Then the pack the hosts ask for, built ahead by the
                // TLS stack's server: how long after its build it was
                // there (the server lists new versions every 500 ms; the
                // other stacks build meanwhile).
                format!("{} + {} pack", ms(b.secs), ms(ahead[(ahead.len() - 1) / 2])),
                format!("{} MB", b.rss_kib / 1024),
            ]),
            None => row.extend(["-".into(), "-".into()]),
        }
        let (agent_disk, rsync_disk) = (du(&agent_dir), du(&rsync_dest[0]));
        row.extend([
            mb(agent_disk),
            mb(rsync_disk),
            format!("{:.2}", agent_disk as f64 / rsync_disk.max(1) as f64),
        ]);
        if baseline.is_some() {
            row.push(format!("{:.2}", tt / meds[stacks.len() - 1].0));
        }
        table.row(row);
    };

    deploy(
        &format!("fresh host ({files} files; median of {fresh_passes})"),
        fresh_passes,
        &[None],
        &mut table,
    );

    let hwm = vm_hwm(stacks[0].hosts[0].child.id());
    deploy(
        "backport (1-3 files; 3 in a row, median of 6)",
        2,
        &[
            Some(("backport", 3)),
            Some(("backport", 31)),
            Some(("backport", 32)),
        ],
        &mut table,
    );
    deploy(
        "config backport: one line in each of three ~400 KB files (3 in a row, median of 6)",
        2,
        &[
            Some(("bigconfig", 1)),
            Some(("bigconfig", 2)),
            Some(("bigconfig", 3)),
        ],
        &mut table,
    );
    // Before the train doubles the tree: the agent's peak at this size.
    let hwm_before_train = vm_hwm(stacks[0].hosts[0].child.id());
    deploy(
        "train (new php-* branch)",
        2,
        &[Some(("train", 4))],
        &mut table,
    );
    deploy("no-op (median of 6)", 2, &[None, None, None], &mut table);
    deploy(
        "config change (3 in a row, median of 6)",
        2,
        &[
            Some(("config", 5)),
            Some(("config", 6)),
            Some(("config", 7)),
        ],
        &mut table,
    );
    // A rollback to the previous release and a sync back to the live
    // version: each a switch to a slot the agent holds, after the check of
    // the files in it the slots' watch reported (host::share, host::watch).
    let mut back: Vec<f64> = Vec::new();
    let mut forth: Vec<f64> = Vec::new();
    for _ in 0..3 {
        // The two hosts the rows after the fresh host went on with.
        for (i, h) in stacks[0].hosts.iter().enumerate().take(2) {
            let (code, secs) = stacks[0].post(
                &format!("{}/v1/rollback", h.url),
                serde_json::json!({"to": "previous", "by": "bench"}),
            );
            assert_eq!(code, 200);
            stacks[0].settle(&h.url);
            back.push(secs);
            let (secs, _, out) = stacks[0].sync(i, &current);
            assert_eq!(out["how"], "reused", "{out}");
            forth.push(secs);
        }
    }
    back.sort_by(f64::total_cmp);
    forth.sort_by(f64::total_cmp);
    println!("rollback to previous: {back:?}; back to live: {forth:?}");
    let cols = headers.len();
    let mut note = |text: String| {
        let mut cells = vec![text];
        cells.resize(cols, String::new());
        table.row(cells);
    };
    note(format!(
        "agent peak RSS (TLS): {} MB during the fresh sync; {} MB over it and the backports ({files} files); {} MB over the whole run (the train doubles the tree)",
        hwm / 1024,
        hwm_before_train / 1024,
        vm_hwm(stacks[0].hosts[0].child.id()) / 1024
    ));
    note(format!(
        "build-manifest (deploy host, not in the times above): cold {}, peak RSS {} MB",
        ms(first_build.secs),
        first_build.rss_kib / 1024
    ));
    note(format!(
        "rollback to the previous release (TLS: a switch after the check of the files the slots' watch reported): median {}, worst {} (6 runs); sync back to the live version: median {}",
        ms(back[(back.len() - 1) / 2]),
        ms(back[back.len() - 1]),
        ms(forth[(forth.len() - 1) / 2]),
    ));

    // A rollback while the agent is busy: a fresh-host fetch of the whole
    // tree in progress, or the work after switching to it.
    let scap = &stacks[0];
    let tiny_dir = dir.join("tiny");
    let tiny: [String; 2] = std::array::from_fn(|i| {
        std::fs::create_dir_all(&tiny_dir).unwrap();
        std::fs::write(tiny_dir.join("index.php"), format!("<?php // tiny {i}\n")).unwrap();
        scap.build(&tiny_dir).1
    });
    // The whole tree again, built after the tiny versions: agents refuse a
    // sync to a version built before the one they run (a replay).
    std::fs::write(staging.join("rollback-bench.php"), "<?php // newer\n").unwrap();
    let big = scap.build(&staging).1;
    let mut during_fetch: Vec<f64> = (0..3)
        .map(|n| rollback_while_busy(scap, &tiny, &big, "fetch", n))
        .collect();
    let mut during_bg: Vec<f64> = (0..3)
        .map(|n| rollback_while_busy(scap, &tiny, &big, "after-switch", n))
        .collect();
    during_fetch.sort_by(f64::total_cmp);
    during_bg.sort_by(f64::total_cmp);
    println!("rollback during a fetch: {during_fetch:?}; after a switch: {during_bg:?}");
    note(format!(
        "rollback while a fresh-host fetch of {files} files runs (TLS): median {}, worst {} (3 runs)",
        ms(during_fetch[1]),
        ms(during_fetch[2])
    ));
    note(format!(
        "rollback right after switching to it (spare slot being written): median {}, worst {} (3 runs)",
        ms(during_bg[1]),
        ms(during_bg[2])
    ));
    table.save(
        "sync",
        &format!(
            "machine: {}\nfiles: {files}\nbaseline: {}",
            machine(),
            baseline
                .as_ref()
                .map_or("none".into(), |b| b.display().to_string())
        ),
    );
    for s in stacks {
        s.stop();
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    done(&dir);
}
