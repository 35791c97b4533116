//! `scap demo` (the README's first command, and the installed package's
//! smoke test: it needs nothing but the binary and 127.0.0.1).

use std::path::PathBuf;
use std::process::Command as Process;

use anyhow::{Context, bail};
use clap::Args;

use super::output::exit;
use scap_workload::{self as workload, Mutation, Spec};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Work directory [default: a new temporary directory, removed afterwards]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Files in the generated tree
    #[arg(long, default_value_t = 2000)]
    files: usize,
    /// App servers in the demo fleet
    #[arg(long, default_value_t = 20)]
    hosts: usize,
}

/// Runs the real binary step by step, echoing each command like a tutorial.
pub fn demo(a: DemoArgs) -> anyhow::Result<i32> {
    let tmp;
    let dir = match a.dir {
        Some(d) => d,
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let exe = std::env::current_exe().context("cannot find the scap binary")?;
    let store = dir.join("store");
    let root = dir.join("staging");
    // Everything over TLS with client certificates, every version signed:
    // a throw-away CA, certificates and deploy key, and a scap.toml for
    // the deploy host's commands.
    let pki = crate::pki::init(&dir.join("pki"), &[], 30)?;
    let config = dir.join("scap.toml");
    std::fs::write(
        &config,
        format!(
            "sign_key = \"{}\"\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.deploy_key().display(),
            pki.ca().display(),
            pki.cert("deployer").display(),
            pki.key("deployer").display()
        ),
    )?;
    println!(
        "== a throw-away PKI in {} (CA, certificates, deploy key); every connection below is TLS with client certificates, every version signed",
        pki.dir.display()
    );
    println!(
        "== generating a MediaWiki-like staging tree ({} files) in {}",
        a.files,
        root.display()
    );
    let g = workload::generate(&root, &Spec::small(a.files))
        .with_context(|| format!("generating {}", root.display()))?;
    println!("   {} files, {} bytes", g.files, g.bytes);
    // Files changed in the last second are always re-read ("racily clean");
    // let the fresh tree age so the rebuilds below show the stat cache.
    std::thread::sleep(std::time::Duration::from_millis(1100));

    let run = |args: &[&str]| -> anyhow::Result<String> {
        println!("\n$ scap {}", args.join(" "));
        let out = Process::new(&exe)
            .arg("--store")
            .arg(&store)
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        // Progress (stderr) comes before results (stdout) in a real terminal.
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        print!("{}", limit_lines(&stdout, 25));
        if !out.status.success() {
            bail!("scap {} failed ({})", args.join(" "), out.status);
        }
        Ok(stdout.lines().last().unwrap_or_default().trim().to_string())
    };
    let mw = format!("mediawiki={}", g.staging.display());
    let portals = format!("portals={}", g.portals.display());
    let c = [
        "--component",
        &mw,
        "--component",
        &portals,
        "--exclude",
        "**/.git",
    ];

    let v1 = run(&[
        &["build-manifest"][..],
        &c,
        &["--label", "1.46.0-wmf.1", "-m", "weekly train"],
    ]
    .concat())?;
    println!("\n== a backport changes a few files");
    let m = workload::mutate(&root, Mutation::Backport, 7)?;
    for p in &m.changed {
        println!("   changed {}", p.display());
    }
    let v2 = run(&[
        &["build-manifest"][..],
        &c,
        &["-m", "backport: fix a notice"],
    ]
    .concat())?;
    run(&["diff", &v1, &v2])?;
    run(&["diff", "--stat", &v1, &v2])?;
    println!("\n== the next train: a new php-* branch, mostly the same files");
    workload::mutate(&root, Mutation::Train, 8)?;
    let v3 = run(&[
        &["build-manifest"][..],
        &c,
        &["--label", "1.46.0-wmf.2", "-m", "weekly train"],
    ]
    .concat())?;
    run(&["diff", "--stat", &v2, &v3])?;
    run(&["ls", "1.46.0-wmf.2", "mediawiki"])?;
    run(&["log", "-n", "3"])?;
    run(&["verify"])?;

    println!(
        "\n== a fleet of {} app servers on this machine: `scap agent` each, weights from an inventory",
        a.hosts
    );
    let fleet = DemoFleet::start(&exe, &dir, &store, &pki, a.hosts)?;
    let flags = fleet.flags();
    let with = |args: &[&str]| -> anyhow::Result<String> {
        let all: Vec<&str> = args
            .iter()
            .copied()
            .chain(flags.iter().map(String::as_str))
            .collect();
        run(&all)
    };
    let src = fleet.source.clone();
    with(&[
        "sync",
        "--version",
        "1.46.0-wmf.1",
        "--source",
        &src,
        "--yes",
        "--wait",
        "0",
        "--check-url",
        "https://{addr}/v1/health",
    ])?;
    with(&["promote", "1.46.0-wmf.1"])?;
    println!("\n== the train, by share of traffic: each step tops up to its percentage");
    for p in ["--canary=10%", "--canary=50%", "--canary=100%"] {
        with(&[
            "sync",
            "--version",
            "1.46.0-wmf.2",
            p,
            "--source",
            &src,
            "--yes",
            "--wait",
            "0",
            "--check-url",
            "https://{addr}/v1/health",
        ])?;
        with(&["status", "--version", "1.46.0-wmf.2"])?;
    }
    println!(
        "\n== something is wrong after all: back to the previous release (a switch, no fetch)"
    );
    with(&["rollback", "--version", "1.46.0-wmf.2", "--yes"])?;
    with(&["status"])?;
    run(&["history", "-n", "6"])?;
    drop(fleet);
    println!(
        "\nDone. Versions are Merkle roots: {} -> {} -> {}",
        &v1[..12],
        &v2[..12],
        &v3[..12]
    );
    Ok(exit::OK)
}

/// `scap serve` and N `scap agent` processes on 127.0.0.1, killed on drop.
struct DemoFleet {
    children: Vec<std::process::Child>,
    inventory: PathBuf,

    source: String,
}

impl DemoFleet {
    fn start(
        exe: &std::path::Path,
        dir: &std::path::Path,
        store: &std::path::Path,
        pki: &crate::pki::Lab,
        n: usize,
    ) -> anyhow::Result<DemoFleet> {
        use std::io::BufRead;
        let tls = |role: &str| -> Vec<std::ffi::OsString> {
            vec![
                "--ca".into(),
                pki.ca().into(),
                "--cert".into(),
                pki.cert(role).into(),
                "--key".into(),
                pki.key(role).into(),
            ]
        };
        let mut fleet = DemoFleet {
            children: Vec::new(),
            inventory: dir.join("inventory.toml"),
            source: String::new(),
        };
        let mut spawn = |cmd: &mut Process| -> anyhow::Result<String> {
            let mut child = cmd
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let stdout = child.stdout.take().context("no stdout")?;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let line = lines.next().context("no address line")??;
            std::thread::spawn(move || for _ in lines {});
            fleet.children.push(child);
            let at = line.find("://").context("no address")?;
            Ok(line[at + 3..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string())
        };
        let source = spawn(
            Process::new(exe)
                .arg("--store")
                .arg(store)
                .args(tls("server"))
                .args([
                    "serve",
                    "--dashboard-listen",
                    "127.0.0.1:0",
                    "--listen",
                    "127.0.0.1:0",
                ]),
        )?;
        let mut inventory = String::from("# The demo fleet: two datacenters, four big servers.\n");
        for i in 0..n {
            let name = format!("mw{}", 2001 + i);
            let addr = spawn(
                Process::new(exe)
                    .args([
                        "agent",
                        "--listen",
                        "127.0.0.1:0",
                        "--host",
                        &name,
                        "--trusted-key",
                    ])
                    .arg(pki.deploy_pub())
                    .args(tls("agent"))
                    .arg("--dir")
                    .arg(dir.join("hosts").join(&name)),
            )?;
            let weight = if i % 5 == 0 { 3 } else { 1 };
            let dc = if i % 2 == 0 { "eqiad" } else { "codfw" };
            inventory.push_str(&format!(
                "[[host]]\nname = \"{name}\"\naddress = \"{addr}\"\nweight = {weight}\ndc = \"{dc}\"\ncanary = {}\n",
                i < 2
            ));
        }
        std::fs::write(&fleet.inventory, inventory)?;
        fleet.source = format!("https://{source}");
        Ok(fleet)
    }

    fn flags(&self) -> Vec<String> {
        vec!["--inventory".into(), self.inventory.display().to_string()]
    }
}

impl Drop for DemoFleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn limit_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= n {
        return s.to_string();
    }
    let mut out = lines[..n].join("\n");
    out.push_str(&format!("\n... ({} more lines)\n", lines.len() - n));
    out
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("scap-demo-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
