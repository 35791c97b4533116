//! The fixture: a temp dir per test, the real binary, small tree builders.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const SCAP: &str = env!("CARGO_BIN_EXE_scap");

/// A temp dir with a store, a lab PKI (`pki/`: CA, certificates, deploy
/// key) and a `scap.toml` that makes every command run in it use TLS with
/// the deployer's certificate and sign what it builds: the defaults a user
/// gets, exercised by every test.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub pki: scap::pki::Lab,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("store");
        let pki = scap::pki::init(&dir.path().join("pki"), &[], 30).expect("a lab PKI");
        fs::write(
            dir.path().join("scap.toml"),
            format!(
                "sign_key = \"{}\"\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                pki.deploy_key().display(),
                pki.ca().display(),
                pki.cert("deployer").display(),
                pki.key("deployer").display()
            ),
        )
        .unwrap();
        Env { dir, store, pki }
    }

    /// `--ca --cert --key` for a process of `role` (server, agent, deployer).
    pub fn tls_args(&self, role: &str) -> Vec<String> {
        [
            ("--ca", self.pki.ca()),
            ("--cert", self.pki.cert(role)),
            ("--key", self.pki.key(role)),
        ]
        .into_iter()
        .flat_map(|(f, p)| [f.to_string(), p.display().to_string()])
        .collect()
    }

    /// A blocking HTTPS client that trusts the lab CA and presents the
    /// certificate of `role`.
    pub fn client(&self, role: &str) -> reqwest::blocking::Client {
        let mut pem = fs::read(self.pki.cert(role)).unwrap();
        pem.extend(fs::read(self.pki.key(role)).unwrap());
        reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(&fs::read(self.pki.ca()).unwrap()).unwrap(),
            )
            .identity(reqwest::Identity::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }

    /// The signature file of version `v` in the deploy store, as JSON.
    pub fn signature(&self, v: &str) -> serde_json::Value {
        let p = self.store.join("versions").join(format!("{v}.sig"));
        serde_json::from_slice(&fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .unwrap()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn cmd(&self) -> Command {
        self.cmd_of(Path::new(SCAP))
    }

    /// [`Env::cmd`] with another scap binary (the previous release's).
    pub fn cmd_of(&self, scap: &Path) -> Command {
        let mut c = Command::new(scap);
        c.arg("--store").arg(&self.store);
        c.env_remove("SCAP_STORE")
            .env_remove("SCAP_CONFIG")
            .current_dir(self.dir.path());
        c
    }

    /// Runs scap; panics with its output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run scap");
        assert!(
            out.status.success(),
            "scap {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs scap expecting failure; returns (exit code, stderr).
    pub fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.cmd().args(args).output().expect("run scap");
        assert!(
            !out.status.success(),
            "scap {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn raw(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run scap")
    }

    /// Builds a version of `components` (NAME=PATH) and returns its ID.
    pub fn build(&self, components: &[(&str, &Path)], extra: &[&str]) -> String {
        let mut args = vec!["build-manifest".to_string()];
        for (name, path) in components {
            args.push("--component".into());
            args.push(format!("{name}={}", path.display()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ok(&args);
        let id = out
            .lines()
            .last()
            .expect("a version line")
            .trim()
            .to_string();
        assert_eq!(id.len(), 64, "last line is the version ID: {out}");
        id
    }

    pub fn build_json(&self, components: &[(&str, &Path)]) -> serde_json::Value {
        let mut args = vec!["build-manifest".to_string(), "--json".into()];
        for (name, path) in components {
            args.push("--component".into());
            args.push(format!("{name}={}", path.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&self.ok(&args)).expect("json report")
    }
}

pub fn write(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
}

pub fn write_exec(root: &Path, rel: &str, content: &[u8]) {
    write(root, rel, content);
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn symlink(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, p).unwrap();
}

/// A small tree with every kind of entry scap must round-trip.
pub fn sample_tree(root: &Path) {
    write(
        root,
        "index.php",
        b"<?php require __DIR__ . '/includes/WebStart.php';\n",
    );
    write(root, "includes/WebStart.php", b"<?php\n// start\n");
    write(
        root,
        "includes/libs/rdbms/database/Database.php",
        &b"<?php class Database {}\n".repeat(40),
    );
    write_exec(root, "maintenance/run.php", b"#!/usr/bin/env php\n<?php\n");
    symlink(root, "w", "php-1.46.0-wmf.1");
    symlink(root, "docroot/w", "../w");
    symlink(
        root,
        "static-current",
        "/srv/mediawiki/php-1.46.0-wmf.1/resources",
    );
    symlink(
        root,
        "wmf-config/PrivateSettings.php",
        "/etc/mediawiki/private/PrivateSettings.php",
    );
    fs::create_dir_all(root.join("images/empty")).unwrap();
    write(root, "large.bin", &noise(700_000, 3));
}

/// Deterministic bytes that do not compress.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Copies a tree (files, modes, symlinks) like `cp -a` would.
pub fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A child process that serves HTTP; killed on drop.
pub struct Proc {
    pub child: std::process::Child,
    /// The first URL it printed.
    pub url: String,
    /// Its first line of output.
    pub line: String,
}

impl Proc {
    /// Starts `cmd` and waits until it prints its `http://` address
    /// (readiness, not a sleep).
    pub fn start(cmd: Command) -> Proc {
        Proc::start_logging(cmd, std::process::Stdio::inherit())
    }

    /// [`Proc::start`], its stderr sent to `stderr` (a log file to read).
    pub fn start_logging(mut cmd: Command, stderr: std::process::Stdio) -> Proc {
        use std::io::BufRead;
        cmd.stdout(std::process::Stdio::piped()).stderr(stderr);
        let mut child = cmd.spawn().expect("spawn");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let line = match lines.next() {
            Some(Ok(l)) => l,
            other => {
                let status = child.wait();
                panic!("{cmd:?} did not start: {other:?} {status:?}");
            }
        };
        let url = line[line
            .find("http")
            .unwrap_or_else(|| panic!("no address in {line:?}"))..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        std::thread::spawn(move || for _ in lines {});
        Proc { child, url, line }
    }

    /// `scap serve`'s dashboard URL (no trailing slash).
    pub fn dashboard(&self) -> String {
        let at = self
            .line
            .find("dashboard on ")
            .unwrap_or_else(|| panic!("no dashboard in {:?}", self.line))
            + "dashboard on ".len();
        self.line[at..]
            .split(|c: char| c.is_whitespace() || c == ')')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_string()
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill(1) (procps)")
            .success();
        assert!(ok, "kill -{signal} {}", self.child.id());
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub const TOKEN: &str = "s3cret-test-token-0123456789";

/// One host: an agent process and its directory.
pub struct Host {
    pub name: String,
    pub dir: PathBuf,
    pub proc: Proc,
    pub extra: Vec<String>,
}

/// A deploy host (`scap serve` over `env.store`) and agents on loopback,
/// over TLS with the lab PKI (or, `insecure`, plain HTTP with a token).
pub struct Fleet {
    pub server: Option<Proc>,
    pub hosts: Vec<Host>,
    pub token_file: PathBuf,
    pub insecure: bool,
    /// The deployer's client (TLS), or a plain one (insecure).
    pub http: reqwest::blocking::Client,
    /// Last, so the processes above are killed before their files go.
    pub env: Env,
}

impl Fleet {
    /// `n` agents (no server yet: call `serve` once the store exists).
    pub fn start(n: usize) -> Fleet {
        Fleet::start_with(n, &[])
    }

    pub fn start_with(n: usize, agent_args: &[&str]) -> Fleet {
        Fleet::start_mode(n, agent_args, false)
    }

    /// `n` agents over plain HTTP with the bearer token (`--insecure-http`).
    pub fn start_insecure(n: usize) -> Fleet {
        Fleet::start_mode(n, &[], true)
    }

    fn start_mode(n: usize, agent_args: &[&str], insecure: bool) -> Fleet {
        let env = Env::new();
        let token_file = env.path("token");
        fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
        let http = if insecure {
            reqwest::blocking::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .unwrap()
        } else {
            env.client("deployer")
        };
        let mut fleet = Fleet {
            env,
            server: None,
            hosts: Vec::new(),
            token_file,
            insecure,
            http,
        };
        for i in 0..n {
            let name = format!("mw{}", 1001 + i);
            let dir = fleet.env.path(&format!("hosts/{name}"));
            let extra: Vec<String> = agent_args
                .iter()
                .map(|s| s.replace("{host}", &name))
                .collect();
            let proc = fleet.agent_proc(&name, &dir, "127.0.0.1:0", &extra);
            fleet.hosts.push(Host {
                name,
                dir,
                proc,
                extra,
            });
        }
        fleet
    }

    fn agent_proc(&self, name: &str, dir: &Path, listen: &str, extra: &[String]) -> Proc {
        self.agent_proc_env(name, dir, listen, extra, &[])
    }

    /// The transport flags of a process of `role` in this fleet.
    pub fn transport(&self, role: &str) -> Vec<String> {
        if self.insecure {
            vec![
                "--insecure-http".into(),
                "--token-file".into(),
                self.token_file.display().to_string(),
            ]
        } else {
            self.env.tls_args(role)
        }
    }

    fn agent_proc_env(
        &self,
        name: &str,
        dir: &Path,
        listen: &str,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Proc {
        Proc::start(self.agent_command(Command::new(SCAP), name, dir, listen, extra, env))
    }

    /// The agent command line for `name`, appended to `cmd` (the scap
    /// binary, or a wrapper that runs it).
    pub fn agent_command(
        &self,
        mut cmd: Command,
        name: &str,
        dir: &Path,
        listen: &str,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Command {
        let own_cert = extra.iter().any(|a| a == "--cert");
        cmd.args(["agent", "--listen", listen, "--host", name, "--trusted-key"])
            .arg(self.env.pki.deploy_pub())
            .args(if own_cert && !self.insecure {
                vec!["--ca".to_string(), self.env.pki.ca().display().to_string()]
            } else {
                self.transport("agent")
            })
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .env_remove("SCAP_FAILPOINT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts one more agent, `name`, in `dir`.
    pub fn add_host(&mut self, name: &str, dir: &Path) {
        self.add_host_with(name, dir, &[]);
    }

    /// Starts one more agent with `extra` flags (`--cert` and `--key`
    /// there replace the lab's agent certificate).
    pub fn add_host_with(&mut self, name: &str, dir: &Path, extra: &[String]) {
        let proc = self.agent_proc(name, dir, "127.0.0.1:0", extra);
        self.hosts.push(Host {
            name: name.into(),
            dir: dir.to_path_buf(),
            proc,
            extra: extra.to_vec(),
        });
    }

    /// Restarts host `i`'s agent on the port it had (an inventory that
    /// names it stays right).
    pub fn restart_same_port(&mut self, i: usize) {
        let port = self.hosts[i].proc.port();
        self.hosts[i].proc.kill();
        let (name, dir, extra) = (
            self.hosts[i].name.clone(),
            self.hosts[i].dir.clone(),
            self.hosts[i].extra.clone(),
        );
        self.hosts[i].proc =
            self.agent_proc_env(&name, &dir, &format!("127.0.0.1:{port}"), &extra, &[]);
    }

    /// Restarts host `i`'s agent (after a kill), on a new port.
    pub fn restart(&mut self, i: usize) {
        self.restart_with(i, &[]);
    }

    /// Restarts host `i`'s agent with `env` added (a crash point, say).
    pub fn restart_with(&mut self, i: usize, env: &[(&str, &str)]) {
        self.hosts[i].proc.kill();
        let (name, dir, extra) = (
            self.hosts[i].name.clone(),
            self.hosts[i].dir.clone(),
            self.hosts[i].extra.clone(),
        );
        self.hosts[i].proc = self.agent_proc_env(&name, &dir, "127.0.0.1:0", &extra, env);
    }

    /// Restarts host `i`'s agent run by `wrapper` (a command that execs
    /// the scap binary with the arguments it is given).
    pub fn restart_wrapped(&mut self, i: usize, wrapper: Command) {
        self.hosts[i].proc.kill();
        let h = &self.hosts[i];
        let cmd = self.agent_command(wrapper, &h.name, &h.dir, "127.0.0.1:0", &h.extra, &[]);
        self.hosts[i].proc = Proc::start(cmd);
    }

    /// Restarts host `i`'s agent with `env` added, its log (stderr) going
    /// to file `log`.
    pub fn restart_logged(&mut self, i: usize, env: &[(&str, &str)], log: &Path) {
        self.hosts[i].proc.kill();
        let h = &self.hosts[i];
        let cmd = self.agent_command(
            Command::new(SCAP),
            &h.name,
            &h.dir,
            "127.0.0.1:0",
            &h.extra,
            env,
        );
        let log = fs::File::create(log).unwrap();
        self.hosts[i].proc = Proc::start_logging(cmd, log.into());
    }

    pub fn serve(&mut self) -> String {
        let p = self.serve_store(&self.env.store.clone(), &[]);
        let url = p.url.clone();
        self.server = Some(p);
        url
    }

    /// `scap serve` of `store` with this fleet's transport; `extra` flags
    /// (--hosts, ...). Its dashboard listens on a port of its own.
    pub fn serve_store(&self, store: &Path, extra: &[&str]) -> Proc {
        Proc::start(self.serve_command(Command::new(SCAP), store, extra))
    }

    /// The `scap serve` command line for `store`, appended to `cmd` (the
    /// scap binary, or a wrapper that runs it).
    pub fn serve_command(&self, mut cmd: Command, store: &Path, extra: &[&str]) -> Command {
        cmd.env_remove("SCAP_STORE")
            .env_remove("SCAP_CONFIG")
            .current_dir(self.env.dir.path())
            .arg("--store")
            .arg(store)
            .args(self.transport("server"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--dashboard-listen",
                "127.0.0.1:0",
            ])
            .args(extra);
        cmd
    }

    pub fn source(&self) -> String {
        self.server.as_ref().expect("serve() first").url.clone()
    }

    /// A dsh group file listing `which` hosts.
    pub fn group(&self, name: &str, which: &[usize]) -> PathBuf {
        let p = self.env.path(name);
        let text: String = which
            .iter()
            .map(|&i| format!("127.0.0.1:{}\n", self.hosts[i].proc.port()))
            .collect();
        fs::write(&p, format!("# {name}\n{text}")).unwrap();
        p
    }

    /// `scap sync` of `version` to `which` hosts via the CLI.
    pub fn sync(&self, which: &[usize], version: &str) -> Output {
        let group = self.group("group", which);
        self.env
            .cmd()
            .args(["sync", "--hosts"])
            .arg(&group)
            .args(["--version", version, "--source", &self.source()])
            .args(ungated(&[]))
            .args(self.transport("deployer"))
            .args(["--json"])
            .output()
            .unwrap()
    }

    /// A request to host `i`'s agent as the deployer (its certificate, or
    /// the token when insecure).
    pub fn request(&self, method: &str, i: usize, path: &str) -> reqwest::blocking::RequestBuilder {
        let url = format!("{}{path}", self.hosts[i].proc.url);
        let r = match method {
            "GET" => self.http.get(url),
            _ => self.http.post(url),
        };
        if self.insecure {
            r.bearer_auth(TOKEN)
        } else {
            r
        }
    }

    /// POST to host `i`'s agent as the deployer.
    pub fn post(&self, i: usize, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self.request("POST", i, path).json(&body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }

    /// The body of a sync of `version` from `sources`, with its signature
    /// (as the controller sends it).
    pub fn sync_body(&self, version: &str, sources: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "version": version,
            "sources": sources,
            "signature": self.env.signature(version),
        })
    }

    /// Asks host `i` to sync to `version` from the fleet's server.
    pub fn sync_to(&self, i: usize, version: &str) -> (u16, serde_json::Value) {
        let body = self.sync_body(version, &[&self.source()]);
        self.post(i, "/v1/sync", body)
    }

    /// GET from host `i`'s agent as the deployer.
    pub fn get(&self, i: usize, path: &str) -> (u16, serde_json::Value) {
        let r = self.request("GET", i, path).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }

    /// The version host `i` says it runs.
    pub fn current(&self, i: usize) -> Option<String> {
        let r = self.request("GET", i, "/v1/state").send().ok()?;
        let st: serde_json::Value = r.json().ok()?;
        st["state"]["current"]["version"]
            .as_str()
            .map(str::to_string)
    }

    /// The live tree of host `i`, one component.
    pub fn live(&self, i: usize, component: &str) -> PathBuf {
        self.hosts[i].dir.join("current").join(component)
    }
}

#[derive(PartialEq, Debug, Clone)]
pub enum Node {
    File { exec: bool, data: Vec<u8> },
    Link(Vec<u8>),
    Dir,
}

/// Every path below `root` (relative, as bytes) with what it is.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    fn go(root: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, Node>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(
                    rel,
                    Node::Link(fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
                );
            } else if meta.is_dir() {
                out.insert(rel, Node::Dir);
                go(root, &p, out);
            } else {
                let exec = meta.permissions().mode() & 0o111 != 0;
                out.insert(
                    rel,
                    Node::File {
                        exec,
                        data: fs::read(&p).unwrap(),
                    },
                );
            }
        }
    }
    go(root, root, &mut out);
    out
}

impl Fleet {
    /// Runs a fleet command over every host, with batch-mode defaults.
    pub fn run(&self, args: &[&str]) -> Output {
        let group = self.group("all-hosts", &(0..self.hosts.len()).collect::<Vec<_>>());
        let mut cmd = self.env.cmd();
        cmd.args(args)
            .arg("--hosts")
            .arg(&group)
            .args(self.transport("deployer"));
        cmd.output().unwrap()
    }

    /// `scap sync` of `version` to every host, batch mode, no gate wait.
    pub fn rollout(&self, version: &str, extra: &[&str]) -> Output {
        let source = self.source();
        let mut args = vec![
            "sync",
            "--version",
            version,
            "--source",
            &source,
            "--wait",
            "0",
            "--yes",
        ];
        args.extend(extra);
        let args = ungated(&args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args)
    }

    /// The hosts now on `v`.
    pub fn on(&self, v: &str) -> Vec<usize> {
        (0..self.hosts.len())
            .filter(|&i| self.current(i).as_deref() == Some(v))
            .collect()
    }

    /// `scap status --json` over every host.
    pub fn status(&self) -> serde_json::Value {
        let out = self.run(&["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Fleet {
    /// Starts a sync of host `i` to whichever of `a` and `b` it does not
    /// run, in the background: the request in flight, for a test that
    /// stops the agent somewhere in it.
    pub fn sync_in_flight(&self, i: usize, a: &str, b: &str) -> std::thread::JoinHandle<()> {
        let target = if self.current(i).as_deref() == Some(a) {
            b
        } else {
            a
        };
        let req = self
            .request("POST", i, "/v1/sync")
            .json(&self.sync_body(target, &[&self.source()]));
        std::thread::spawn(move || {
            let _ = req.send();
        })
    }

    /// Host `i` runs exactly one of `versions` (each with the content of
    /// its tree's `VERSION` file): its state says so, its live tree's
    /// `VERSION` agrees, and its live tree is that version's, file for
    /// file (`/v1/verify`).
    pub fn assert_on_one_of(&self, i: usize, versions: &[(&str, &str)], round: u64) {
        let cur = self.current(i).expect("a version is live");
        let (_, want) = versions
            .iter()
            .find(|(v, _)| *v == cur)
            .unwrap_or_else(|| panic!("round {round}: host {i} runs {cur}, none of {versions:?}"));
        assert_eq!(
            fs::read_to_string(self.live(i, "mediawiki").join("VERSION")).unwrap(),
            *want,
            "round {round}"
        );
        let (_, d) = self.get(i, "/v1/verify");
        assert_eq!(
            d["changes"],
            serde_json::json!([]),
            "round {round}: the live tree is exactly {want}"
        );
    }
}

/// The next number of a xorshift sequence seeded by `*x`: the random
/// moments of the fault tests, the same in every run.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `args` for a rollout that tests something other than the policy: with
/// no share given, every host at once (`--canary 100%`), and with no gate
/// given, `--force` (the default policy wants canary hosts, and gates
/// before every host).
pub fn ungated(args: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let has = |p: &str| args.iter().any(|a| a.starts_with(p));
    if !has("--canary") && !has("--stages") && !has("--resume") && !has("--catch-up") {
        out.extend(["--canary".to_string(), "100%".to_string()]);
    }
    if !has("--check-") && !has("--force") {
        out.push("--force".into());
    }
    out
}

/// A TCP proxy to `upstream` (`http[s]://host:port`) that records every
/// byte it forwards, both ways: what someone on the wire would see.
pub fn recording_proxy(upstream: &str) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let scheme = upstream.split("://").next().unwrap().to_string();
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let upstream = upstream.split("://").nth(1).unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(up) = TcpStream::connect(&upstream) else {
                return;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), up.try_clone().unwrap()),
                (up, client),
            ] {
                let record = record.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (url, seen)
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Fails the test unless it runs as root (mounting a tmpfs, running scap
/// as another user): a test never passes by skipping.
pub fn require_root(why: &str) {
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    assert!(
        uid.stdout.starts_with(b"0\n"),
        "this test must run as root to {why}: run the tests as root (CI does), e.g. sudo ./scripts/test"
    );
}

/// A tmpfs of `size` (mount(8)'s syntax: `3m`) mounted at `dir`, which it
/// creates: a small disk for a test to fill. Unmounted (lazily: an agent
/// may still hold files in it) when dropped. Needs root.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        require_root("mount a small tmpfs");
        fs::create_dir(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs at {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Whether a pack file's header (`data`: the file) has flag `raw` (bit 0
/// of the u32 at offset 12, store-format.md): objects stored uncompressed
/// as they arrived, for gc to compress.
pub fn pack_flagged_raw(data: &[u8]) -> bool {
    u32::from_le_bytes(data[12..16].try_into().unwrap()) & 1 != 0
}

/// The pack files (`*.pack`) of the agent directory `dir`'s store, each
/// read whole; none if it has no pack directory yet.
pub fn host_packs(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(rd) = fs::read_dir(dir.join("store/objects/pack")) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .map(|p| fs::read(p).unwrap())
        .collect()
}

/// Runs `scap verify VERSION` on the store at `store`; fails the test if
/// any object is missing or damaged.
pub fn verify_store(store: &Path, version: &str) {
    let mut verify = Command::new(SCAP);
    verify.arg("--store").arg(store).args(["verify", version]);
    ok(&verify.output().unwrap());
}

/// Fails the test unless `path` exists, naming the Debian package to install.
pub fn require_program(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: apt-get install {package} (./scripts/test installs what the tests need)"
    );
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// Asserts a command succeeded; returns its stderr (the progress log).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Like [`ok`], but returns stdout (a command's result, `--json`).
pub fn ok_out(out: &Output) -> String {
    ok(out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for servers that
/// must be told their port: etcd, Prometheus, nginx).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits up to `secs` for `f`, polling; panics naming `what`.
pub fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < until {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("gave up after {secs} s waiting for {what}");
}

/// A command's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A second deploy key for a rotation: its key and public files, the lab
/// key's ID (the one to revoke), and the agent flags that trust both.
pub struct NewKey {
    pub key: PathBuf,
    pub public: PathBuf,
    pub lab_id: String,
    pub trust_both: Vec<String>,
}

impl NewKey {
    pub fn make(env: &Env) -> NewKey {
        let key = env.path("new.key");
        env.ok(&["keygen", "--out", key.to_str().unwrap()]);
        let public = env.path("new.key.pub");
        let lab_id = scap::store::signature::PublicKey::load(&env.pki.deploy_pub())
            .unwrap()
            .id
            .to_string();
        let trust_both = vec!["--trusted-key".to_string(), public.display().to_string()];
        NewKey {
            key,
            public,
            lab_id,
            trust_both,
        }
    }
}
