//! What the commands share to say things: exit codes, JSON, the progress
//! line, the per-host report, the clock, a runtime.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::ctx::Ctx;
use crate::fleet::agents::HostResult;
use crate::proto::Outcome;
use crate::store::{Store, VersionId};
use crate::time::fmt_bytes;

/// Exit codes, documented in README.md.
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const PROBLEMS_FOUND: i32 = 3;
    pub const NOT_FOUND: i32 = 4;

    /// `OK` on success, else `FAILURE`.
    pub fn from(ok: bool) -> i32 {
        if ok { OK } else { FAILURE }
    }
}

/// A path that a version does not have.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct NotFound {
    pub what: String,
}

/// Parses `20`, `20s`, `2m` or `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::time::parse_duration(s)
}

/// Writes a JSON value and a newline to stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Resolves a version name with the deploy host's store if there is one;
/// without a store only a full ID will do.
pub fn resolve_version(ctx: &Ctx, name: &str) -> anyhow::Result<VersionId> {
    match Store::open(&ctx.store_path) {
        Ok(store) => Ok(store.resolve(name)?),
        Err(_) => name.parse::<VersionId>().with_context(|| {
            format!(
                "no store at {} to resolve {name:?}: give the full 64-digit version ID or --store",
                ctx.store_path.display()
            )
        }),
    }
}

/// One line per host: what it did, or why it failed.
pub fn report(results: &[HostResult<Outcome>]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for r in results {
        match &r.result {
            Ok(o) => writeln!(
                out,
                "{:<24} ok    {:>6.2}s  {}{}  fetched {} in {} objects, wrote {} files{}",
                r.host.to_string(),
                r.seconds,
                o.version.short(),
                if o.noop { " (already there)" } else { "" },
                fmt_bytes(o.fetched.bytes),
                o.fetched.trees + o.fetched.chunks,
                o.files_written,
                if o.repaired > 0 {
                    format!(
                        ", rewrote {} changed by hand (see verify --live)",
                        o.repaired
                    )
                } else {
                    String::new()
                },
            )?,
            Err(e) => writeln!(
                out,
                "{:<24} FAIL  {:>6.2}s  {e}",
                r.host.to_string(),
                r.seconds,
            )?,
        }
    }
    // What each call to a host answered; what the fleet now runs is the
    // command's outcome, its last line.
    let ok = results.iter().filter(|r| r.ok()).count();
    writeln!(out, "host calls: {ok} of {} ok", results.len())?;
    Ok(())
}

pub fn clock() -> String {
    let now = crate::time::fmt_utc(crate::time::unix_now());
    now[11..19].to_string()
}

/// scap's progress line, `sync-x: 40% (ok: 4; fail: 0; left: 6)`: an
/// indicatif bar on a terminal, else a line at most once a second.
pub struct ProgressLine {
    name: String,
    total: usize,
    state: Mutex<(usize, usize, Instant)>,
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressLine {
    pub fn new(name: &str, total: usize) -> ProgressLine {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{prefix}: [{bar:30}] {pos}/{len} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(name.to_string());
            b
        });
        ProgressLine {
            name: name.to_string(),
            total,
            state: Mutex::new((0, 0, Instant::now() - Duration::from_secs(10))),
            bar,
        }
    }

    fn text(&self, ok: usize, fail: usize) -> String {
        let done = ok + fail;
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        format!(
            "{}: {pct}% (ok: {ok}; fail: {fail}; left: {})",
            self.name,
            self.total - done
        )
    }

    pub fn done(&self, ok: bool) {
        let mut s = self.state.lock().expect("not poisoned");
        if ok {
            s.0 += 1;
        } else {
            s.1 += 1;
        }
        match &self.bar {
            Some(b) => {
                b.inc(1);
                b.set_message(format!("(ok: {}; fail: {})", s.0, s.1));
            }
            // The last one is printed by `finish`.
            None if s.2.elapsed() >= Duration::from_secs(1) && s.0 + s.1 < self.total => {
                s.2 = Instant::now();
                eprintln!("{} {}", clock(), self.text(s.0, s.1));
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        let s = self.state.lock().expect("not poisoned");
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!("{} {}", clock(), self.text(s.0, s.1));
    }
}
