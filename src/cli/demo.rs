//! `scap demo` (the README's first command) and `scap workload`.

use std::path::PathBuf;
use std::process::Command as Process;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::exit;
use crate::workload::{self, Mutation, Spec};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Work directory [default: a new temporary directory, removed afterwards]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Files in the generated tree
    #[arg(long, default_value_t = 2000)]
    files: usize,
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
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{}", limit_lines(&stdout, 25));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
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
        "\nDone. Versions are Merkle roots: {} -> {} -> {}",
        &v1[..12],
        &v2[..12],
        &v3[..12]
    );
    Ok(exit::OK)
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

#[derive(Args, Debug)]
pub struct WorkloadArgs {
    #[command(subcommand)]
    cmd: WorkloadCmd,
}

#[derive(Subcommand, Debug)]
enum WorkloadCmd {
    /// Generate a tree into DIR (which must not exist or be empty)
    Generate {
        dir: PathBuf,
        /// Regular files in all
        #[arg(long, default_value_t = 30_000)]
        files: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Large (l10n cache) files [default: 8 for >= 10k files, else 2]
        #[arg(long)]
        large_files: Option<usize>,
    },
    /// Apply one kind of deploy's change: backport, train, l10n or config
    Mutate {
        dir: PathBuf,
        #[arg(long)]
        kind: Mutation,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

pub fn workload(a: WorkloadArgs) -> anyhow::Result<i32> {
    match a.cmd {
        WorkloadCmd::Generate {
            dir,
            files,
            seed,
            large_files,
        } => {
            let mut spec = if files >= 10_000 {
                Spec::mediawiki()
            } else {
                Spec::small(files)
            };
            spec.files = files;
            spec.seed = seed;
            if let Some(n) = large_files {
                spec.large_files = n;
            }
            let g = workload::generate(&dir, &spec)
                .with_context(|| format!("generating {}", dir.display()))?;
            println!("{} files, {} bytes", g.files, g.bytes);
            println!("mediawiki={}", g.staging.display());
            println!("portals={}", g.portals.display());
        }
        WorkloadCmd::Mutate { dir, kind, seed } => {
            let m = workload::mutate(&dir, kind, seed)
                .with_context(|| format!("changing {}", dir.display()))?;
            for (letter, list) in [("M", &m.changed), ("A", &m.added), ("D", &m.removed)] {
                for p in list {
                    println!("{letter}\t{}", p.display());
                }
            }
        }
    }
    Ok(exit::OK)
}
