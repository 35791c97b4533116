//! Announcements: the lines a deploy sends to IRC and the Server Admin Log
//! through the site's relay command (`[announce] command` in scap.toml,
//! or `--announce CMD`), as scap has always sent them:
//!
//! ```text
//! jdoe: Started scap sync-world: 1.46.0-wmf.7 to group0
//! jdoe: Finished scap sync-world: 1.46.0-wmf.7 to group0 (duration: 7m 12s): 375 of 375 hosts run 1.46.0-wmf.7 ...
//! jdoe: FAILED scap sync-file: SWAT: [[gerrit:1234]] (duration: 0m 41s): health gate failed ...
//! ```
//!
//! Every fleet-changing command (sync, sync-world, sync-file, sync-dir,
//! rollback, promote) announces its start and its end with the duration
//! and the outcome; `scap lock` announces taking and releasing a lock.
//! Dry runs announce nothing.
//!
//! **Invariant:** an announcement never stops or changes a deploy. The
//! relay runs with a deadline ([`DEFAULT_TIMEOUT`] unless configured), in
//! its own process group; a relay that fails or hangs is killed and
//! reported (the warning names the command and why), and the deploy goes on.

use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::config::AnnounceConfig;

/// How long the relay may take for one line unless scap.toml says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends a command's start and end lines.
#[derive(Debug)]
pub struct Announcer {
    command: Option<String>,
    timeout: Duration,
    user: String,
    what: String,
    message: String,
    started: Instant,
}

/// What an announcement did, for the command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// No relay is configured.
    Off,
    Sent(String),
    /// The relay failed or hung: the line, and why (the deploy went on).
    Failed {
        line: String,
        why: String,
    },
}

impl Sent {
    /// A warning for the operator, if the relay failed.
    pub fn warning(&self) -> Option<String> {
        match self {
            Sent::Failed { line, why } => Some(format!(
                "warning: the announcement {line:?} was not sent: {why}; the deploy goes on (tell IRC by hand)"
            )),
            _ => None,
        }
    }
}

impl Announcer {
    /// The announcer of command `what` (e.g. "sync-world") with the
    /// deployer's `message`: the relay is `flag` if given, else scap.toml's
    /// `[announce]`, else none.
    pub fn new(
        cfg: Option<&AnnounceConfig>,
        flag: Option<&str>,
        what: &str,
        message: &str,
    ) -> Result<Announcer, String> {
        let timeout = match cfg.and_then(|c| c.timeout.as_deref()) {
            Some(t) => crate::time::parse_duration(t)
                .map_err(|e| format!("scap.toml [announce] timeout: {e}"))?,
            None => DEFAULT_TIMEOUT,
        };
        let command = flag
            .map(str::to_string)
            .or_else(|| cfg.map(|c| c.command.clone()))
            .filter(|c| !c.trim().is_empty());
        Ok(Announcer {
            command,
            timeout,
            user: crate::sys::user(),
            what: what.to_string(),
            message: one_line(message),
            started: Instant::now(),
        })
    }

    /// Whether a relay is configured.
    pub fn enabled(&self) -> bool {
        self.command.is_some()
    }

    /// "Started scap WHAT: MESSAGE"; the duration counts from here.
    pub fn start(&mut self) -> Sent {
        self.started = Instant::now();
        let line = format!(
            "{}: Started scap {}: {}",
            self.user, self.what, self.message
        );
        self.send(&line, &[("SCAP_ANNOUNCE_EVENT", "start".into())])
    }

    /// "Finished scap WHAT: MESSAGE (duration: 7m 12s): SUMMARY", or
    /// "FAILED ..." when `ok` is false.
    pub fn finish(&self, ok: bool, summary: &str) -> Sent {
        let elapsed = self.started.elapsed();
        let line = format!(
            "{}: {} scap {}: {} (duration: {}){}",
            self.user,
            if ok { "Finished" } else { "FAILED" },
            self.what,
            self.message,
            duration(elapsed),
            if summary.is_empty() {
                String::new()
            } else {
                format!(": {}", one_line(summary))
            }
        );
        self.send(
            &line,
            &[
                ("SCAP_ANNOUNCE_EVENT", "end".into()),
                (
                    "SCAP_ANNOUNCE_OUTCOME",
                    if ok { "ok" } else { "failed" }.into(),
                ),
                (
                    "SCAP_ANNOUNCE_DURATION",
                    format!("{:.1}", elapsed.as_secs_f64()),
                ),
            ],
        )
    }

    /// Any other line (a lock taken or released).
    pub fn say(&self, line: &str) -> Sent {
        let line = format!("{}: {}", self.user, one_line(line));
        self.send(&line, &[("SCAP_ANNOUNCE_EVENT", "note".into())])
    }

    fn send(&self, line: &str, extra: &[(&str, String)]) -> Sent {
        let Some(cmd) = &self.command else {
            return Sent::Off;
        };
        let mut env: Vec<(&str, String)> = vec![
            ("SCAP_ANNOUNCE", line.to_string()),
            ("SCAP_ANNOUNCE_USER", self.user.clone()),
            ("SCAP_ANNOUNCE_COMMAND", self.what.clone()),
            ("SCAP_ANNOUNCE_MESSAGE", self.message.clone()),
        ];
        env.extend(extra.iter().cloned());
        match crate::hooks::run(cmd, &env, self.timeout, &Cancel::new()) {
            Ok(()) => Sent::Sent(line.to_string()),
            Err(f) => Sent::Failed {
                line: line.to_string(),
                why: format!(
                    "announce command {cmd:?}: {}{}",
                    f.status,
                    if f.output.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", crate::text::clip(&f.output, 300))
                    }
                ),
            },
        }
    }
}

/// "7m 12s", "0m 03s", "1h 02m 05s": as scap has always written it.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}m {:02}s", s / 60, s % 60)
    }
}

/// A message on one line, bounded: what IRC can carry.
fn one_line(s: &str) -> String {
    let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
    crate::text::clip(&joined, 400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_start_end_duration_and_outcome_and_a_hung_relay_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let cfg = AnnounceConfig {
            command: format!(
                "printf '%s|%s|%s\\n' \"$SCAP_ANNOUNCE_EVENT\" \"$SCAP_ANNOUNCE_OUTCOME\" \"$SCAP_ANNOUNCE\" >> {}",
                log.display()
            ),
            timeout: None,
        };
        let mut a = Announcer::new(Some(&cfg), None, "sync-file", "SWAT:\n fix").unwrap();
        assert!(matches!(a.start(), Sent::Sent(_)));
        assert!(matches!(a.finish(false, "gate failed"), Sent::Sent(_)));
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("start||")
                && lines[0].ends_with("Started scap sync-file: SWAT: fix"),
            "{text}"
        );
        assert!(lines[1].starts_with("end|failed|"), "{text}");
        assert!(
            lines[1].contains("FAILED scap sync-file: SWAT: fix (duration: 0m 00s): gate failed"),
            "{text}"
        );

        let hung = AnnounceConfig {
            command: "sleep 30".into(),
            timeout: Some("1s".into()),
        };
        let mut a = Announcer::new(Some(&hung), None, "sync", "x").unwrap();
        let t = Instant::now();
        let sent = a.start();
        assert!(t.elapsed() < Duration::from_secs(5));
        let w = sent.warning().expect("a warning");
        assert!(w.contains("sleep 30") && w.contains("timeout"), "{w}");
        assert_eq!(duration(Duration::from_secs(432)), "7m 12s");
        assert_eq!(duration(Duration::from_secs(3725)), "1h 02m 05s");
    }
}
