//! Crash points, for the crash and race tests. With `SCAP_FAILPOINT=<name>`
//! in its environment, a scap process kills itself with SIGKILL (as `kill
//! -9` would: no cleanup, no `Drop`) when it reaches the point called
//! `<name>`; with `SCAP_FAILPOINT=<name>:pause=<ms>` it sleeps there
//! instead, so a test can start a racing command inside that window.
//! Without the variable a point costs one cached lookup. The points are
//! listed in ARCHITECTURE.md ("Crash points").

use std::sync::OnceLock;
use std::time::Duration;

enum Act {
    Die,
    Pause(Duration),
}

/// Dies (or pauses) here if `SCAP_FAILPOINT` names this point.
pub fn hit(name: &str) {
    static WANT: OnceLock<Option<(String, Act)>> = OnceLock::new();
    let want = WANT.get_or_init(|| {
        let v = std::env::var("SCAP_FAILPOINT").ok()?;
        Some(match v.split_once(":pause=") {
            Some((n, ms)) => (
                n.to_string(),
                Act::Pause(Duration::from_millis(ms.parse().unwrap_or(1000))),
            ),
            None => (v, Act::Die),
        })
    });
    match want {
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
