//! `scap-workload`: generate or change a MediaWiki-like sample tree from the
//! shell (benchmarks by hand, the README's large-tree recipe).
//!
//! ```text
//! scap-workload generate DIR [--files N] [--seed S] [--large-files N]
//! scap-workload mutate DIR --kind backport|train|l10n|config [--seed S]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use scap_workload::{Mutation, Spec, generate, mutate};

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scap-workload: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Vec<String>) -> Result<(), String> {
    let usage = "usage: scap-workload generate DIR [--files N] [--seed S] [--large-files N]\n       scap-workload mutate DIR --kind backport|train|l10n|config [--seed S]";
    let (cmd, dir, flags) = match args.as_slice() {
        [cmd, dir, flags @ ..] => (cmd.as_str(), PathBuf::from(dir), flags),
        _ => return Err(usage.into()),
    };
    let mut opts = std::collections::HashMap::new();
    for pair in flags.chunks(2) {
        match pair {
            [k, v] if k.starts_with("--") => {
                opts.insert(k.trim_start_matches("--").to_string(), v.clone());
            }
            _ => return Err(format!("bad flags {flags:?}\n{usage}")),
        }
    }
    let num = |k: &str, default: u64| -> Result<u64, String> {
        opts.get(k)
            .map(|v| v.parse().map_err(|_| format!("--{k} {v:?}: not a number")))
            .unwrap_or(Ok(default))
    };
    match cmd {
        "generate" => {
            let files = num("files", 30_000)? as usize;
            let mut spec = if files >= 10_000 {
                Spec::mediawiki()
            } else {
                Spec::small(files)
            };
            spec.files = files;
            spec.seed = num("seed", 1)?;
            if opts.contains_key("large-files") {
                spec.large_files = num("large-files", 0)? as usize;
            }
            let g =
                generate(&dir, &spec).map_err(|e| format!("generating {}: {e}", dir.display()))?;
            println!("{} files, {} bytes", g.files, g.bytes);
            println!("mediawiki={}", g.staging.display());
            println!("portals={}", g.portals.display());
        }
        "mutate" => {
            let kind: Mutation = opts
                .get("kind")
                .ok_or("mutate needs --kind")?
                .parse()
                .map_err(|e| format!("--kind: {e}"))?;
            let m = mutate(&dir, kind, num("seed", 1)?)
                .map_err(|e| format!("changing {}: {e}", dir.display()))?;
            for (letter, list) in [("M", &m.changed), ("A", &m.added), ("D", &m.removed)] {
                for p in list {
                    println!("{letter}\t{}", p.display());
                }
            }
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
