//! Shared by the benchmarks: run commands, time them, read peak RSS, and
//! print a results table. The benchmarks drive the release `scap` binary
//! and the real alternatives (casync, rsync, b3sum, zstd) on the same data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const SCAP: &str = env!("CARGO_BIN_EXE_scap");

/// Generates the sample tree (`scap-workload generate DIR --files N`).
pub fn generate(dir: &Path, files: usize) {
    let mut spec = if files >= 10_000 {
        scap_workload::Spec::mediawiki()
    } else {
        scap_workload::Spec::small(files)
    };
    spec.files = files;
    scap_workload::generate(dir, &spec)
        .unwrap_or_else(|e| panic!("generating {}: {e}", dir.display()));
}

/// The three large wmf-config files of production (InitialiseSettings.php
/// is ~400 KB): replaced by ~400 KB files of settings, so a config
/// backport has production's shape.
pub const BIG_CONFIGS: [&str; 3] = [
    "InitialiseSettings.php",
    "CommonSettings.php",
    "ProductionServices.php",
];

/// Writes [`BIG_CONFIGS`] under `dir`'s staging wmf-config, ~400 KB each.
pub fn big_configs(dir: &Path) {
    let wmf = dir.join("mediawiki-staging/wmf-config");
    for (k, name) in BIG_CONFIGS.iter().enumerate() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ (k as u64 + 1);
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out =
            String::from("<?php\n# This file is generated: settings per wiki.\nreturn [\n");
        let mut i = 0;
        while out.len() < 400_000 {
            let r = next();
            out.push_str(&format!(
                "'wmg{}Setting{i}' => [\n\t'default' => {},\n\t'{}wiki' => '{:x}',\n],\n",
                ["Use", "Enable", "Max", "Default"][(r % 4) as usize],
                r % 1000 == 0,
                ["en", "de", "fr", "commons", "wikidata"][(r >> 8) as usize % 5],
                r >> 40
            ));
            i += 1;
        }
        out.push_str("];\n");
        std::fs::write(wmf.join(name), out).unwrap();
    }
}

/// Applies one kind of deploy's change (`scap-workload mutate`), or
/// `bigconfig`: one line added in the middle of each of [`BIG_CONFIGS`].
pub fn mutate(dir: &Path, kind: &str, seed: u64) {
    if kind == "bigconfig" {
        let wmf = dir.join("mediawiki-staging/wmf-config");
        for name in BIG_CONFIGS {
            let p = wmf.join(name);
            let mut data = std::fs::read(&p).unwrap();
            let at = data.len() / 2;
            let line = data[at..].iter().position(|&b| b == b'\n').unwrap() + at + 1;
            let text = format!("'wmgUseFeature{seed}' => true, // T{}\n", 300_000 + seed);
            data.splice(line..line, text.bytes());
            std::fs::write(&p, data).unwrap();
        }
        return;
    }
    let kind: scap_workload::Mutation = kind.parse().expect("a mutation kind");
    scap_workload::mutate(dir, kind, seed)
        .unwrap_or_else(|e| panic!("changing {}: {e}", dir.display()));
}

/// Wall seconds and peak RSS (KiB) of one run.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub secs: f64,
    pub rss_kib: u64,
}

/// Runs `cmd` under GNU time; panics with its output if it fails.
pub fn timed(cmd: &mut Command) -> (Run, String) {
    let out_file = std::env::temp_dir().join(format!("scap-bench-time-{}", std::process::id()));
    let mut wrapped = Command::new("/usr/bin/time");
    wrapped
        .arg("-f")
        .arg("%e %M")
        .arg("-o")
        .arg(&out_file)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        wrapped.current_dir(d);
    }
    let started = Instant::now();
    let out = wrapped
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .expect("run /usr/bin/time (apt-get install time)");
    let secs = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = std::fs::read_to_string(&out_file).unwrap_or_default();
    let rss_kib = stats
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let _ = std::fs::remove_file(&out_file);
    (
        Run { secs, rss_kib },
        stdout + &String::from_utf8_lossy(&out.stderr),
    )
}

pub fn sh(script: &str) -> (Run, String) {
    timed(Command::new("bash").arg("-c").arg(script))
}

pub fn scap(store: &Path) -> Command {
    let mut c = Command::new(SCAP);
    c.arg("--store").arg(store);
    c
}

/// A lab PKI in `dir/pki` and a scap.toml for the deploy host's commands
/// (TLS as the deployer, signing with the deploy key): what a bench uses
/// to run scap as deployed. Returns (pki dir, scap.toml).
pub fn lab(dir: &Path) -> (PathBuf, PathBuf) {
    let pki = dir.join("pki");
    let out = Command::new(SCAP)
        .args(["pki", "init"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(out.status.success());
    let config = dir.join("scap.toml");
    let p = |f: &str| pki.join(f).display().to_string();
    std::fs::write(
        &config,
        format!(
            "sign_key = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            p("deploy.key"),
            p("ca.pem"),
            p("deployer.pem"),
            p("deployer.key")
        ),
    )
    .unwrap();
    (pki, config)
}

/// `--ca --cert --key` of `role` in a lab PKI.
pub fn tls_flags(pki: &Path, role: &str) -> Vec<String> {
    let p = |f: String| pki.join(f).display().to_string();
    vec![
        "--ca".into(),
        p("ca.pem".into()),
        "--cert".into(),
        p(format!("{role}.pem")),
        "--key".into(),
        p(format!("{role}.key")),
    ]
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A fresh directory under the bench root (`SCAP_BENCH_DIR`, default
/// /tmp/scap-bench), emptied first.
pub fn fresh(name: &str) -> PathBuf {
    let root =
        PathBuf::from(std::env::var("SCAP_BENCH_DIR").unwrap_or_else(|_| "/tmp/scap-bench".into()));
    let p = root.join(name);
    if p.exists() {
        remove_tree(&p);
    }
    std::fs::create_dir_all(&p).unwrap();
    wait_out_deletions(&root);
    p
}

/// How long ext4 without a journal keeps a freed inode from being reused:
/// 60 s after its deletion, 360 s while its inode table block is dirty
/// (`recently_deleted` in fs/ext4/ialloc.c; a new file in the same block
/// dirties it). Until then every inode allocation in its group scans past
/// it from the group's start, and every tool measured is several times
/// slower than on a filesystem with a journal, as production's are.
const INODE_QUARANTINE: Duration = Duration::from_secs(365);

/// Where the bench root records when a bench last deleted a large tree.
fn deleted_marker(root: &Path) -> PathBuf {
    root.join(".deleted-at")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Removes a bench's tree, noting when (see [`INODE_QUARANTINE`]).
fn remove_tree(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    if let Some(root) = dir.parent() {
        let _ = std::fs::write(deleted_marker(root), unix_now().to_string());
    }
}

/// Whether `dir` is on an ext4 without a journal (this machine's root
/// filesystem), where deleted inodes are quarantined.
fn unjournaled_ext4(dir: &Path) -> bool {
    let Ok(out) = Command::new("findmnt")
        .args(["-no", "FSTYPE,SOURCE", "-T"])
        .arg(dir)
        .output()
    else {
        return false;
    };
    let out = String::from_utf8_lossy(&out.stdout);
    let mut it = out.split_whitespace();
    let (Some("ext4"), Some(source)) = (it.next(), it.next()) else {
        return false;
    };
    let dev = source.rsplit('/').next().unwrap_or(source);
    !Path::new("/proc/fs/jbd2").join(format!("{dev}-8")).exists()
}

/// Waits until no tree a bench deleted under `root` is still quarantined
/// ([`INODE_QUARANTINE`]), on a filesystem that quarantines them.
fn wait_out_deletions(root: &Path) {
    let Some(at) = std::fs::read_to_string(deleted_marker(root))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    let now = unix_now();
    let left = (at + INODE_QUARANTINE.as_secs()).saturating_sub(now);
    if left == 0 || !unjournaled_ext4(root) {
        return;
    }
    println!(
        "a bench deleted a tree under {} {} s ago; waiting {left} s for ext4 (no journal) to stop quarantining its inodes",
        root.display(),
        now.saturating_sub(at)
    );
    std::thread::sleep(Duration::from_secs(left));
}

/// Removes a bench's directory once it is done (the 263k-file sync bench
/// leaves ~70 GB behind, enough to fill the disk under the next bench),
/// unless `SCAP_BENCH_KEEP` is set.
pub fn done(dir: &Path) {
    if std::env::var_os("SCAP_BENCH_KEEP").is_some() {
        println!("kept {} (SCAP_BENCH_KEEP)", dir.display());
        return;
    }
    remove_tree(dir);
}

/// Fails, naming the numbers, if the filesystem of `dir` has less than
/// `bytes` free: a bench that runs out of disk half-way measures nothing
/// and leaves a full disk behind.
pub fn need_space(dir: &Path, bytes: u64) {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .expect("df (coreutils) runs");
    let avail: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot read df's answer for {}", dir.display()));
    assert!(
        avail >= bytes,
        "this bench needs about {:.0} GB free under {}, and there are {:.1} GB: free some, or point SCAP_BENCH_DIR elsewhere",
        bytes as f64 / 1e9,
        dir.display(),
        avail as f64 / 1e9
    );
}

pub fn du(path: &Path) -> u64 {
    let out = Command::new("du").arg("-sb").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {mem} GiB RAM, Linux")
}

/// Prints a markdown table row by row, and keeps it for a results file.
pub struct Table {
    pub lines: Vec<String>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        let mut t = Table { lines: Vec::new() };
        t.row(headers.iter().map(|s| s.to_string()).collect());
        t.row(headers.iter().map(|_| "---".to_string()).collect());
        t
    }

    pub fn row(&mut self, cells: Vec<String>) {
        let line = format!("| {} |", cells.join(" | "));
        println!("{line}");
        self.lines.push(line);
    }

    pub fn save(&self, name: &str, preamble: &str) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("{name}.md")),
            format!("{preamble}\n\n{}\n", self.lines.join("\n")),
        )
        .unwrap();
    }
}

pub fn ms(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.1} ms", secs * 1000.0)
    } else {
        format!("{secs:.2} s")
    }
}

pub fn mb(bytes: u64) -> String {
    if bytes < 10_000 {
        format!("{bytes} B")
    } else if bytes < 10_000_000 {
        format!("{:.1} KB", bytes as f64 / 1e3)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

/// Median of `n` runs of `f`.
pub fn median(n: usize, mut f: impl FnMut() -> f64) -> f64 {
    let mut v: Vec<f64> = (0..n).map(|_| f()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[n / 2]
}

/// Drops the page cache (root only) so "cold" means read from disk; returns
/// whether it could.
pub fn drop_caches() -> bool {
    Command::new("sh")
        .arg("-c")
        .arg("sync && echo 3 > /proc/sys/vm/drop_caches")
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A TCP proxy on 127.0.0.1 that counts the bytes it forwards, both ways:
/// what crossed "the wire", HTTP headers included.
pub struct CountingProxy {
    pub url: String,
    pub bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl CountingProxy {
    pub fn start(upstream: &str) -> CountingProxy {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (scheme, upstream) = upstream.split_once("://").unwrap_or(("http", upstream));
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let upstream = upstream.to_string();
        let bytes = Arc::new(AtomicU64::new(0));
        let counter = bytes.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(up) = TcpStream::connect(&upstream) else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = up.set_nodelay(true);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, client),
                ] {
                    let counter = counter.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 256 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        CountingProxy { url, bytes }
    }

    pub fn take(&self) -> u64 {
        self.bytes.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

/// `scap serve` on loopback ports of the system's choosing (its first line
/// says where: [`start_listening`]).
pub const SERVE_ON_LOOPBACK: [&str; 5] = [
    "serve",
    "--listen",
    "127.0.0.1:0",
    "--dashboard-listen",
    "127.0.0.1:0",
];

/// Starts a process that prints its `http://` or `https://` address first;
/// returns it with the address.
pub fn start_listening(cmd: &mut Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("a first line").expect("utf-8");
    let at = line
        .find("https://")
        .or_else(|| line.find("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let url = line[at..].split_whitespace().next().unwrap().to_string();
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

/// Starts `n` agents (`mw1000`, `mw1001`, ...) on 127.0.0.1 with the lab
/// PKI in `pki`, each in `dir/hosts/NAME`, and writes a dsh group file of
/// their addresses to `group`: the agents, in order.
pub fn start_agents(n: usize, pki: &Path, dir: &Path, group: &Path) -> Vec<std::process::Child> {
    println!("starting {n} agents ...");
    let mut lines = String::new();
    let mut agents = Vec::new();
    for i in 0..n {
        let (child, url) = start_listening(
            Command::new(SCAP)
                .args(["agent", "--listen", "127.0.0.1:0", "--host"])
                .arg(format!("mw{}", 1000 + i))
                .arg("--trusted-key")
                .arg(pki.join("deploy.pub"))
                .args(tls_flags(pki, "agent"))
                .arg("--dir")
                .arg(dir.join(format!("hosts/mw{}", 1000 + i))),
        );
        lines.push_str(url.split("://").nth(1).unwrap());
        lines.push('\n');
        agents.push(child);
    }
    std::fs::write(group, lines).unwrap();
    agents
}

/// Peak resident set of a running process, in KiB.
pub fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An rsync daemon on 127.0.0.1 serving `root` as module `mw`, once it
/// accepts connections: (the daemon, its port). The caller kills it.
pub fn rsync_daemon(dir: &Path, root: &Path) -> (std::process::Child, u16) {
    assert!(
        have("rsync"),
        "rsync is not installed (apt-get install rsync)"
    );
    let port = port();
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\n[mw]\npath = {}\nread only = yes\n",
            root.display()
        ),
    )
    .unwrap();
    let daemon = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg("--config")
        .arg(&conf)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rsync daemon did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (daemon, port)
}

/// The version ID `scap build-manifest` printed: the last line of its
/// stdout that is 64 hex digits.
pub fn version_id(out: &str) -> String {
    out.lines()
        .rev()
        .find(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no version ID in build-manifest's output:\n{out}"))
        .to_string()
}

/// `cmd build-manifest --component NAME=TREE`, timed: (the run, the
/// version ID).
pub fn build_version(cmd: &mut Command, component: &str, tree: &Path) -> (Run, String) {
    let (run, out) = timed(
        cmd.args(["build-manifest", "--component"])
            .arg(format!("{component}={}", tree.display())),
    );
    (run, version_id(&out))
}

/// CPU seconds (user + system) a process used so far.
pub fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the agent runs");
    // Fields after the command name's closing parenthesis: utime is the
    // 14th field of the line, stime the 15th.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    })
}

/// CPU seconds the processes `pids` used so far, together.
pub fn fleet_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|&p| cpu_of(p)).sum()
}

/// Waits until process `pid` used no CPU for 2 s (its work after a switch
/// is done), at most 120 s; returns its CPU seconds then.
pub fn settle_cpu(pid: u32) -> f64 {
    let started = Instant::now();
    let mut last = cpu_of(pid);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(2) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the agent is still busy after 120 s"
        );
        std::thread::sleep(Duration::from_millis(100));
        let now = cpu_of(pid);
        if now > last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    last
}

/// Waits until processes `pids` together used under 50 ms of CPU in 2 s
/// (the work after a deploy is done on every host), at most 300 s.
pub fn settle_fleet(pids: &[u32]) {
    let started = Instant::now();
    let total = || fleet_cpu(pids);
    let mut readings = std::collections::VecDeque::from([total()]);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        readings.push_back(total());
        if readings.len() > 5 {
            readings.pop_front();
            if readings.back().unwrap() - readings.front().unwrap() < 0.05 {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the agents are still busy after 300 s"
        );
    }
}

/// One deploy host and its agents, as deployed (TLS, signed versions): a
/// store of the tree's `mediawiki` component, `scap serve` on it, and
/// agents started on demand. What the one-host benches share.
pub struct OneHost {
    pub dir: PathBuf,
    pub staging: PathBuf,
    pub store: PathBuf,
    pub pki: PathBuf,
    pub config: PathBuf,
    pub server: std::process::Child,
    pub server_url: String,
    pub verbose: bool,
}

impl OneHost {
    /// Builds the staging tree `tree/mediawiki-staging` in a new store and
    /// serves it: (the deploy host, the first version).
    pub fn start(dir: &Path, tree: &Path) -> (OneHost, String) {
        let (pki, config) = lab(dir);
        let staging = tree.join("mediawiki-staging");
        let store = dir.join("store");
        let scap = || {
            let mut c = scap(&store);
            c.arg("--config").arg(&config);
            c
        };
        let v1 = build_version(&mut scap(), "mediawiki", &staging).1;
        let (server, server_url) = start_listening(
            scap()
                .args(tls_flags(&pki, "server"))
                .args(SERVE_ON_LOOPBACK),
        );
        let host = OneHost {
            dir: dir.to_path_buf(),
            staging,
            store,
            pki,
            config,
            server,
            server_url,
            verbose: std::env::var_os("SCAP_BENCH_VERBOSE").is_some(),
        };
        (host, v1)
    }

    /// A one-host bench's start, against rsync: its directory (room for
    /// `space_per_file` bytes a file checked), a generated tree of
    /// SCAP_BENCH_FILES files (`default_files`), the deploy host serving
    /// its first version: (dir, tree, files, host, version).
    pub fn bench(
        name: &str,
        default_files: usize,
        space_per_file: u64,
    ) -> (PathBuf, PathBuf, usize, OneHost, String) {
        assert!(
            have("rsync"),
            "this bench needs rsync: apt-get install rsync"
        );
        let files = env_number("SCAP_BENCH_FILES", default_files);
        let dir = fresh(name);
        need_space(&dir, files as u64 * space_per_file);
        println!("machine: {}", machine());
        let tree = dir.join("tree");
        println!("generating {files} files ...");
        generate(&tree, files);
        let (host, v1) = OneHost::start(&dir, &tree);
        (dir, tree, files, host, v1)
    }

    /// `scap` on the deploy host's store, with its scap.toml.
    pub fn scap(&self) -> Command {
        let mut c = scap(&self.store);
        c.arg("--config").arg(&self.config);
        c
    }

    /// `scap build-manifest` of the staging tree: the version ID.
    pub fn build(&self) -> String {
        build_version(&mut self.scap(), "mediawiki", &self.staging).1
    }

    /// An agent `name` in hosts/NAME, logging to NAME.log (at debug with
    /// SCAP_BENCH_VERBOSE): (the process, its group file, its log).
    pub fn agent(&self, name: &str) -> (std::process::Child, PathBuf, PathBuf) {
        let log = self.dir.join(format!("{name}.log"));
        let (child, url) = start_listening(
            Command::new(SCAP)
                .args(["agent", "--listen", "127.0.0.1:0", "--host", name])
                .arg("--trusted-key")
                .arg(self.pki.join("deploy.pub"))
                .args(tls_flags(&self.pki, "agent"))
                .arg("--dir")
                .arg(self.dir.join("hosts").join(name))
                .env(
                    "SCAP_LOG",
                    if self.verbose {
                        "scap=debug"
                    } else {
                        "scap=info"
                    },
                )
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        let group = self.dir.join(format!("{name}.hosts"));
        std::fs::write(&group, format!("{}\n", url.split("://").nth(1).unwrap())).unwrap();
        (child, group, log)
    }

    /// `scap sync` of `v` to the hosts of `group` (all of them, at once):
    /// the command's wall seconds.
    pub fn sync(&self, group: &Path, v: &str) -> f64 {
        let started = Instant::now();
        timed(
            self.scap()
                .args(["sync", "--hosts"])
                .arg(group)
                .args(["--version", v, "--source", &self.server_url])
                .args(["--wait", "0", "--yes", "--force", "--canary", "100%"]),
        );
        started.elapsed().as_secs_f64()
    }

    /// Waits (at most 600 s) until the agent logging to `log` says its
    /// maintenance after start is done, then until it is idle.
    pub fn after_maintenance(&self, pid: u32, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("maintenance done")
        {
            assert!(Instant::now() < deadline, "no maintenance in 600 s");
            std::thread::sleep(Duration::from_millis(500));
        }
        settle_cpu(pid);
    }

    pub fn stop(mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Wall seconds of `rsync -a --delete SRC/ DST/`.
pub fn rsync_wall(src: &Path, dst: &Path) -> f64 {
    let started = Instant::now();
    let st = Command::new("rsync")
        .args(["-a", "--delete"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .status()
        .expect("rsync runs");
    assert!(st.success(), "rsync failed");
    started.elapsed().as_secs_f64()
}

/// Writes every dirty page to disk (`sync`).
pub fn flush_dirty() {
    let st = Command::new("sync").status().expect("sync runs");
    assert!(st.success(), "sync failed");
}

/// The median of `v` (of an even count, the mean of the two middle
/// values).
pub fn median_of(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
}

/// A number from the environment variable `name`, else `default`.
pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
