//! Two trains at once (issue "two trains"), measured as deployed (TLS,
//! signed versions):
//!
//! 1. A backport (`scap sync-file` of one config file) on a fleet of
//!    SCAP_BENCH_HOSTS (default 100) agents running two trains 50/50,
//!    beside the same kind of backport on the fleet all on one version:
//!    wall time and bytes the deploy host served. Order A B B A (one
//!    version, two trains, two trains, one version).
//! 2. A reimaged host catching up by itself (agent started on an empty
//!    directory with `--source`) on the ~30k-file tree, beside rsync of the
//!    same tree into an empty directory. Order A B B A.
//! 3. A revert SWAT (the old file put back in staging, `sync-file` again:
//!    every host goes back to the version it ran before, on a deploy order
//!    newer than the SWAT's) beside the SWAT it reverts, on SCAP_BENCH_HOSTS
//!    agents on one version: wall time and bytes served. Order: SWAT,
//!    revert, three times (A B A B A B), best of each.
//!
//! Run: `cargo bench --bench trains` (`SCAP_BENCH_ONLY=reverts` for 3
//! alone).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

struct Fleet {
    dir: PathBuf,
    store: PathBuf,
    config: PathBuf,
    staging: PathBuf,
    group: PathBuf,
    proxy: CountingProxy,
    server: Child,
    agents: Vec<Child>,
}

/// The agents and the server go with the fleet, even when a bench panics.
impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Fleet {
    fn scap(&self) -> Command {
        let mut c = scap(&self.store);
        c.arg("--config").arg(&self.config);
        c
    }

    fn build(&self) -> String {
        build_version(&mut self.scap(), "mediawiki", &self.staging).1
    }

    /// `scap sync` of `v` to `share`, no gates (this measures transfer).
    fn sync(&self, v: &str, share: &str) {
        timed(
            self.scap()
                .args(["sync", "--hosts"])
                .arg(&self.group)
                .args(["--version", v, "--source", &self.proxy.url])
                .args(["--wait", "0", "--yes", "--force", "--canary", share]),
        );
    }

    /// A backport of `file` (new content from `seed`), on every live
    /// train: (wall seconds, bytes served).
    fn backport(&self, file: &str, seed: u64) -> (f64, u64) {
        let path = self.staging.join(file);
        let mut body = std::fs::read(&path).unwrap();
        body.extend_from_slice(format!("\n// backport {seed}\n").as_bytes());
        std::fs::write(&path, body).unwrap();
        self.sync_file(file, &format!("Backport {seed}"))
    }

    /// `scap sync-file` of `file` as staging has it, to every host at once:
    /// (wall seconds, bytes served).
    fn sync_file(&self, file: &str, message: &str) -> (f64, u64) {
        std::thread::sleep(Duration::from_secs(2)); // agents' background work settles
        self.proxy.take();
        let started = Instant::now();
        let (_, out) = timed(
            self.scap()
                .args(["sync-file", file, message, "--hosts"])
                .arg(&self.group)
                .args(["--staging"])
                .arg(&self.staging)
                .args(["--source", &self.proxy.url])
                .args(["--wait", "0", "--yes", "--force", "--canary", "100%"]),
        );
        let secs = started.elapsed().as_secs_f64();
        assert!(out.contains("100.0% of production traffic"), "{out}");
        (secs, self.proxy.take())
    }

    /// A SWAT of `file` (content from `seed`), then its revert (the file as
    /// it was put back): ((secs, bytes) of the SWAT, of the revert).
    fn swat_and_revert(&self, file: &str, seed: u64) -> ((f64, u64), (f64, u64)) {
        let path = self.staging.join(file);
        let before = std::fs::read(&path).unwrap();
        let swat = self.backport(file, seed);
        std::fs::write(&path, &before).unwrap();
        (
            swat,
            self.sync_file(file, &format!("Revert backport {seed}")),
        )
    }

    /// How many versions the agents run now.
    fn trains(&self) -> usize {
        let (_, out) = timed(
            self.scap()
                .args(["status", "--json", "--hosts"])
                .arg(&self.group),
        );
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        st["versions"].as_array().unwrap().len()
    }
}

fn start_fleet(n: usize) -> Fleet {
    let dir = fresh("trains");
    let tree = dir.join("tree");
    generate(&tree, 300);
    let staging = tree.join("mediawiki-staging");
    let store = dir.join("store");
    let (pki, config) = lab(&dir);
    let scap_cfg = || {
        let mut c = scap(&store);
        c.arg("--config").arg(&config);
        c
    };
    // The store exists before `scap serve` starts.
    timed(
        scap_cfg()
            .args(["build-manifest", "--component"])
            .arg(format!("mediawiki={}", staging.display())),
    );
    let (server, url) = start_listening(
        scap_cfg()
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK),
    );
    let group_file = dir.join("mediawiki-installation");
    let agents = start_agents(n, &pki, &dir, &group_file);
    Fleet {
        dir,
        store,
        config,
        staging,
        group: group_file,
        proxy: CountingProxy::start(&url),
        server,
        agents,
    }
}

/// A config file both trains have.
fn config_file(staging: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(staging.join("wmf-config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let f = files.first().expect("a wmf-config file");
    f.strip_prefix(staging).unwrap().display().to_string()
}

fn backports(n: usize, table: &mut Table) {
    let f = start_fleet(n);
    let file = config_file(&f.staging);
    let v1 = f.build();
    f.sync(&v1, "100%");
    let mut one = Vec::new();
    let mut two = Vec::new();
    // A: one version.
    one.push(f.backport(&file, 1));
    assert_eq!(f.trains(), 1);
    // The next train to 50%.
    mutate(f.staging.parent().unwrap(), "train", 7);
    let t2 = f.build();
    f.sync(&t2, "50%");
    assert_eq!(f.trains(), 2);
    // B, B: two trains.
    two.push(f.backport(&file, 2));
    assert_eq!(f.trains(), 2, "each host stayed on its train");
    two.push(f.backport(&file, 3));
    // A: the new train everywhere (with its backports), then one more.
    f.sync(&t2, "100%");
    assert_eq!(f.trains(), 1);
    one.push(f.backport(&file, 4));
    let best = |v: &[(f64, u64)]| v.iter().map(|x| x.0).fold(f64::MAX, f64::min);
    let bytes = |v: &[(f64, u64)]| v.iter().map(|x| x.1).sum::<u64>() / v.len() as u64;
    println!("one version: {one:?}\ntwo trains: {two:?}");
    table.row(vec![
        format!("backport (sync-file), {n} hosts on one version"),
        ms(best(&one)),
        mb(bytes(&one)),
        String::new(),
    ]);
    table.row(vec![
        format!("the same during a 50% canary: {n} hosts on two trains"),
        ms(best(&two)),
        mb(bytes(&two)),
        format!("{:.2}x", best(&two) / best(&one)),
    ]);
    let dir = f.dir.clone();
    drop(f);
    let _ = std::fs::remove_dir_all(&dir);
}

fn reverts(n: usize, table: &mut Table) {
    let f = start_fleet(n);
    let file = config_file(&f.staging);
    let v1 = f.build();
    f.sync(&v1, "100%");
    let mut swats = Vec::new();
    let mut reverts = Vec::new();
    for seed in 1..=3 {
        let (s, r) = f.swat_and_revert(&file, 100 + seed);
        swats.push(s);
        reverts.push(r);
        assert_eq!(f.trains(), 1, "every host took the revert");
    }
    println!("SWATs: {swats:?}\nreverts: {reverts:?}");
    let best = |v: &[(f64, u64)]| v.iter().map(|x| x.0).fold(f64::MAX, f64::min);
    let bytes = |v: &[(f64, u64)]| v.iter().map(|x| x.1).sum::<u64>() / v.len() as u64;
    table.row(vec![
        format!("SWAT (sync-file of one config file), {n} hosts"),
        ms(best(&swats)),
        mb(bytes(&swats)),
        String::new(),
    ]);
    table.row(vec![
        format!("its revert (the old file back, sync-file again), {n} hosts"),
        ms(best(&reverts)),
        mb(bytes(&reverts)),
        format!("{:.2}x", best(&reverts) / best(&swats)),
    ]);
    let dir = f.dir.clone();
    drop(f);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seconds from an agent's start on an empty directory to its state file
/// naming `v`.
fn reimage(scap_cfg: &dyn Fn() -> Command, pki: &Path, dir: &Path, source: &str, v: &str) -> f64 {
    let _ = std::fs::remove_dir_all(dir);
    let started = Instant::now();
    let (mut child, _) = start_listening(
        scap_cfg()
            .args([
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--host",
                "mw1000",
                "--source",
                source,
            ])
            .arg("--trusted-key")
            .arg(pki.join("deploy.pub"))
            .args(tls_flags(pki, "agent"))
            .arg("--dir")
            .arg(dir),
    );
    let state = dir.join("state.json");
    loop {
        if let Ok(b) = std::fs::read(&state)
            && let Ok(s) = serde_json::from_slice::<serde_json::Value>(&b)
            && s["current"]["version"] == v
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "no catch-up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    secs
}

fn catch_up(table: &mut Table) {
    assert!(
        have("rsync"),
        "rsync is not installed (apt-get install rsync)"
    );
    let files: usize = std::env::var("SCAP_BENCH_FILES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    let dir = fresh("trains-catchup");
    let tree = dir.join("tree");
    println!("generating {files} files ...");
    generate(&tree, files);
    let staging = tree.join("mediawiki-staging");
    let store = dir.join("store");
    let (pki, config) = lab(&dir);
    let scap_cfg = || {
        let mut c = scap(&store);
        c.arg("--config").arg(&config);
        c
    };
    let (_, v) = build_version(&mut scap_cfg(), "mediawiki", &staging);
    let (mut server, url) = start_listening(
        scap_cfg()
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK),
    );
    let proxy = CountingProxy::start(&url);
    // The host's target: one deploy to it, as a rollout leaves it.
    let host = dir.join("host");
    let (mut agent, agent_url) = start_listening(
        scap_cfg()
            .args(["agent", "--listen", "127.0.0.1:0", "--host", "mw1000"])
            .arg("--trusted-key")
            .arg(pki.join("deploy.pub"))
            .args(tls_flags(&pki, "agent"))
            .arg("--dir")
            .arg(&host),
    );
    let group = dir.join("group");
    std::fs::write(
        &group,
        format!("{}\n", agent_url.split("://").nth(1).unwrap()),
    )
    .unwrap();
    // The desired state is keyed by the agent's name.
    timed(
        scap_cfg()
            .args(["sync", "--hosts"])
            .arg(&group)
            .args(["--version", &v, "--source", &proxy.url])
            .args(["--wait", "0", "--yes", "--force", "--canary", "100%"]),
    );
    let _ = agent.kill();
    let _ = agent.wait();

    let (mut daemon, port) = rsync_daemon(&dir, &staging);
    let rsync_to = dir.join("rsync-host");
    let rsync = || {
        let _ = std::fs::remove_dir_all(&rsync_to);
        let (r, _) = timed(
            Command::new("rsync")
                .args(["-a", "--delete", &format!("rsync://127.0.0.1:{port}/mw/")])
                .arg(&rsync_to),
        );
        r.secs
    };
    let mut scap_t = Vec::new();
    let mut rsync_t = Vec::new();
    let mut bytes = 0;
    // A B B A.
    for order in [true, false, false, true] {
        std::thread::sleep(Duration::from_secs(2));
        if order {
            proxy.take();
            scap_t.push(reimage(&scap_cfg, &pki, &host, &proxy.url, &v));
            bytes = proxy.take();
        } else {
            rsync_t.push(rsync());
        }
    }
    println!("reimaged host catch-up: scap {scap_t:?}, rsync {rsync_t:?}");
    let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    table.row(vec![
        format!("a reimaged host catching up by itself ({files} files)"),
        ms(best(&scap_t)),
        mb(bytes),
        format!("{:.2}x rsync", best(&scap_t) / best(&rsync_t)),
    ]);
    table.row(vec![
        format!("rsync -a of the same tree into an empty directory"),
        ms(best(&rsync_t)),
        String::new(),
        String::new(),
    ]);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = server.kill();
    let _ = server.wait();
    done(&dir);
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let n: usize = std::env::var("SCAP_BENCH_HOSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    println!("machine: {}", machine());
    let mut table = Table::new(&["what", "wall time (best)", "bytes served", "ratio"]);
    let only = std::env::var("SCAP_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "backports" {
        backports(n, &mut table);
    }
    if only.is_empty() || only == "reverts" {
        reverts(n, &mut table);
    }
    if only.is_empty() || only == "catch-up" {
        catch_up(&mut table);
    }
    table.save("trains", &format!("machine: {}\nhosts: {n}", machine()));
}
