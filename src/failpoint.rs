//! Crash points, for the crash and race tests. With `SCAP_FAILPOINT=<name>`
//! in its environment, a scap process kills itself with SIGKILL (as `kill
//! -9` would: no cleanup, no `Drop`) when it reaches the point called
//! `<name>`; with `SCAP_FAILPOINT=<name>:pause=<ms>` it sleeps there
//! instead, so a test can start a racing command inside that window;
//! with `SCAP_FAILPOINT=<name>:errno=<n>` the system call made at a point
//! that asks for [`errno`] fails with error `n` (a filesystem without
//! hardlinks, say), every time; with `SCAP_FAILPOINT=<name>:value=<n>` a
//! point that asks for [`value`] gets `n` (the size of a tiny inotify
//! queue, say).
//! Without the variable a point costs one cached lookup. The points are
//! listed in ARCHITECTURE.md ("Crash points").

use std::sync::OnceLock;
use std::time::Duration;

enum Act {
    Die,
    Pause(Duration),
    Errno(i32),
    Value(u64),
}

fn want() -> &'static Option<(String, Act)> {
    static WANT: OnceLock<Option<(String, Act)>> = OnceLock::new();
    WANT.get_or_init(|| {
        let v = std::env::var("SCAP_FAILPOINT").ok()?;
        Some(if let Some((n, ms)) = v.split_once(":pause=") {
            (
                n.to_string(),
                Act::Pause(Duration::from_millis(ms.parse().unwrap_or(1000))),
            )
        } else if let Some((n, e)) = v.split_once(":errno=") {
            (n.to_string(), Act::Errno(e.parse().unwrap_or(5)))
        } else if let Some((n, x)) = v.split_once(":value=") {
            (n.to_string(), Act::Value(x.parse().unwrap_or(1)))
        } else {
            (v, Act::Die)
        })
    })
}

/// The error the system call at point `name` is to fail with, if
/// `SCAP_FAILPOINT` says `name:errno=<n>`.
pub fn errno(name: &str) -> Option<i32> {
    match want() {
        Some((n, Act::Errno(e))) if n == name => Some(*e),
        _ => None,
    }
}

/// The value point `name` is to use, if `SCAP_FAILPOINT` says
/// `name:value=<n>`.
pub fn value(name: &str) -> Option<u64> {
    match want() {
        Some((n, Act::Value(x))) if n == name => Some(*x),
        _ => None,
    }
}

/// [`hit`], where a pause ends early once `cancel` is cancelled (work a
/// request stops: a test shows it does not wait for it).
pub fn hit_or_cancel(name: &str, cancel: &crate::cancel::Cancel) {
    match want() {
        Some((n, Act::Pause(d))) if n == name => {
            let until = std::time::Instant::now() + *d;
            while std::time::Instant::now() < until && !cancel.is_cancelled() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        _ => hit(name),
    }
}

/// Dies (or pauses) here if `SCAP_FAILPOINT` names this point.
pub fn hit(name: &str) {
    match want() {
        Some((n, Act::Die)) if n == name => {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            // SIGKILL cannot be caught; this is never reached.
            std::process::abort();
        }
        Some((n, Act::Pause(d))) if n == name => std::thread::sleep(*d),
        _ => {}
    }
}
