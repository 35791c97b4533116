//! Commands scap runs for the site: the agent's pre- and post-switch hooks
//! and the controller's check commands. Each runs with `sh -c` in its own
//! process group, with a deadline; a cancel (a rollback arriving) or the
//! deadline kills the whole group. Its output is kept up to
//! [`OUTPUT_MAX`] bytes and shown through `text::clip`, so a command that
//! prints gigabytes or invalid UTF-8 costs nothing and breaks nothing.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cancel::Cancel;

/// Bytes of a hook's output kept for the error message.
pub const OUTPUT_MAX: usize = 16 * 1024;
/// Bytes of it shown in an error.
pub const SHOWN_MAX: usize = 2000;

/// Why a hook did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookFailure {
    /// "exit status: 3", "killed after 300 s (timeout)", "not started: ..."
    pub status: String,
    /// Its output (stderr, then stdout), clipped.
    pub output: String,
}

/// Runs `cmd` with `env`; `Ok` on exit status 0.
pub fn run(
    cmd: &str,
    env: &[(&str, String)],
    timeout: Duration,
    cancel: &Cancel,
) -> Result<(), HookFailure> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().map_err(|e| HookFailure {
        status: "not started".into(),
        output: e.to_string(),
    })?;
    let err_buf = Arc::new(Mutex::new(Vec::new()));
    let out_buf = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = [
        child
            .stderr
            .take()
            .map(|r| (Box::new(r) as Box<dyn Read + Send>, err_buf.clone())),
        child
            .stdout
            .take()
            .map(|r| (Box::new(r) as Box<dyn Read + Send>, out_buf.clone())),
    ]
    .into_iter()
    .flatten()
    .map(|(mut r, buf)| {
        std::thread::spawn(move || {
            let mut piece = [0u8; 8192];
            while let Ok(n) = r.read(&mut piece) {
                if n == 0 {
                    break;
                }
                let mut b = buf.lock().expect("not poisoned");
                let room = OUTPUT_MAX.saturating_sub(b.len());
                b.extend_from_slice(&piece[..n.min(room)]);
            }
        })
    })
    .collect();
    let started = Instant::now();
    let killed = loop {
        match child.try_wait() {
            Ok(Some(_)) => break None,
            Ok(None) => {}
            Err(e) => break Some(format!("lost track of it: {e}")),
        }
        if cancel.is_cancelled() {
            break Some(format!("killed: {}", cancel.why()));
        }
        if started.elapsed() >= timeout {
            break Some(format!("killed after {} s (timeout)", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if killed.is_some() {
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = child.kill();
    }
    let status = child.wait();
    // A daemon that left the group may hold the pipes open: wait a little
    // for the readers, then go on with what they have.
    let until = Instant::now() + Duration::from_secs(1);
    for r in readers {
        while !r.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut text = err_buf.lock().expect("not poisoned").clone();
    text.extend_from_slice(&out_buf.lock().expect("not poisoned"));
    let output = crate::text::clip_bytes(&text, SHOWN_MAX).trim().to_string();
    match (killed, status) {
        (None, Ok(s)) if s.success() => Ok(()),
        (Some(why), _) => Err(HookFailure {
            status: why,
            output,
        }),
        (None, Ok(s)) => Err(HookFailure {
            status: s.to_string(),
            output,
        }),
        (None, Err(e)) => Err(HookFailure {
            status: format!("lost track of it: {e}"),
            output,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_bounded_and_any_bytes_are_fine() {
        let c = Cancel::new();
        let r = run(
            "head -c 10000000 /dev/urandom; printf '\\303\\251%.0s' $(seq 3000); exit 3",
            &[],
            Duration::from_secs(30),
            &c,
        )
        .unwrap_err();
        assert_eq!(r.status, "exit status: 3");
        assert!(r.output.len() <= SHOWN_MAX + 4);
        assert!(run("true", &[], Duration::from_secs(5), &c).is_ok());
    }

    #[test]
    fn timeout_and_cancel_kill_the_group() {
        let c = Cancel::new();
        let t = Instant::now();
        let r = run("sleep 30 & sleep 30", &[], Duration::from_millis(200), &c).unwrap_err();
        assert!(r.status.contains("timeout"), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
        let c2 = c.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c2.cancel("a rollback arrived");
        });
        let r = run("sleep 30", &[], Duration::from_secs(60), &c).unwrap_err();
        assert!(r.status.contains("a rollback arrived"), "{r:?}");
    }
}
