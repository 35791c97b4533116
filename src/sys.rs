//! Who and where: this machine's host name and the person running scap, as
//! scap records them in version records, the deploy lock, history and host
//! state files.

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The person running scap: `$SUDO_USER` (the human behind `sudo`), else
/// the name the password database gives this process's real user (never
/// `$USER`, which a cron job or a unit may leave unset or anyone may set:
/// `uid N` when the database has no name for it).
pub fn user() -> String {
    match std::env::var("SUDO_USER") {
        Ok(u) if valid_user_name(&u) => u,
        _ => user_name(rustix::process::getuid().as_raw()),
    }
}

/// A user name as `useradd` makes them: letters, digits, `.`, `_`, `-`,
/// at most 64 bytes (what goes into history lines and announcements).
fn valid_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Heap arenas a long-running scap process lets glibc's malloc keep: one
/// per core of the machines this runs on is enough for its few busy
/// threads.
const MALLOC_ARENAS: i32 = 2;

/// Size from which glibc's malloc gives a block its own mapping, returned
/// to the system when freed, instead of carving it from a heap arena.
const MALLOC_MMAP_THRESHOLD: i32 = 1 << 20;

/// Free bytes at the top of a heap that glibc's malloc keeps instead of
/// giving them back at once: twice the mmap threshold, as glibc's own
/// adjustment of the two sets it. Fixing the mmap threshold leaves this at
/// its default (128 KiB), below a single chunk or file write buffer (256
/// KiB), each of which would then be given back when freed at a heap's top
/// and faulted in again by the next.
const MALLOC_TRIM_THRESHOLD: i32 = 2 * MALLOC_MMAP_THRESHOLD;

/// Sets glibc's malloc up for a process that runs for months: at most
/// [`MALLOC_ARENAS`] heap arenas, blocks of [`MALLOC_MMAP_THRESHOLD`] or
/// more mapped on their own, and [`MALLOC_TRIM_THRESHOLD`] of free memory
/// kept at a heap's top. False where that cannot be set (another C
/// library). Call it before the process starts a thread: it is not
/// thread-safe, and it has no effect once a thread has been given an arena
/// of its own.
///
/// - glibc gives each thread that allocates while another holds an arena a
///   new arena, up to eight per core, and keeps what is freed in it for
///   reuse. The agent's background work after a deploy (gc, the drift
///   check, bringing the spare slot up) runs on whichever pool thread is
///   free, so at production size its resident set grew by about 5 MB with
///   each deploy, from 52 MB after a fresh sync of 263k files to 87 MB
///   after six backports; with two arenas it stopped at 60 MB, and a fresh
///   sync took no longer (BENCHMARKS.md, "At production size").
/// - glibc maps a block of its own only above a threshold that it raises
///   to the size of each such block freed (up to 32 MB): after the first
///   version's file list (two vectors of ~5 MB at 263k files) is freed,
///   the next lists, gc's live set and a pack's prefixes come from the
///   heap, where what is freed around blocks still in use stays resident.
///   A fixed threshold keeps those few large blocks out of the heap; the
///   agent's many small ones (a chunk is at most 256 KiB, a file's write
///   buffer 256 KiB) stay in it. A buffer of a megabyte or more that the
///   deploy's path allocates again and again is reused instead (a pack's
///   segments: `net::pack::decompress_segment_into`), or each would be a
///   new mapping whose every page faults in (three times the page faults
///   of a fresh sync at 30k files, before it was).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_malloc() -> bool {
    // SAFETY: mallopt(3) takes two integers and reads or writes no memory
    // of ours: it changes malloc's own settings. glibc's manual marks it
    // MT-Unsafe (it writes settings that other threads' mallocs read
    // without a lock), so the caller calls it before the process starts
    // any thread. It is `unsafe` only because it is a foreign function,
    // and nothing safe reaches these settings: the only other way in is
    // `GLIBC_TUNABLES` (`glibc.malloc.arena_max`, `.mmap_threshold`,
    // `.trim_threshold`) in the environment the process starts with, which
    // scap cannot count on a service unit to set.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1
    }
}

/// See the glibc version: elsewhere there is nothing to set.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_malloc() -> bool {
    false
}

/// Hands the free pages malloc keeps back to the system (nothing to do
/// with another C library).
///
/// glibc returns memory only from the top of a heap: pages freed in the
/// middle, between blocks still in use, stay resident, and after a deploy
/// at production size they were two thirds of the agent's anonymous memory
/// (49 MB resident against a heap that peaked at 17 MB). The agent calls
/// this when the work after a switch ends, so that each deploy starts from
/// what the agent holds, not from the last one's high-water mark.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_malloc() {
    // SAFETY: malloc_trim(3) takes an integer, reads or writes no memory
    // of ours, and takes each arena's lock as it walks it: glibc marks it
    // MT-Safe. It is `unsafe` only because it is a foreign function, and
    // no safe interface to it exists. Its result (whether any memory was
    // given back) is of no use here.
    unsafe { libc::malloc_trim(0) };
}

/// See the glibc version: elsewhere there is nothing to trim.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_malloc() {}

/// Starts writing `len` bytes of `file` from `offset` to disk, without
/// waiting for them (`sync_file_range(2)` with `SYNC_FILE_RANGE_WRITE`): a
/// hint, so that a later `fsync` of a large file being appended to waits
/// only for its tail. Nothing is made durable by this alone.
///
/// A writer session appends a fresh host's whole fetch to one pack (about
/// the tree's size, stored uncompressed); the `fsync` that seals it, also
/// when a rollback cancels the fetch, then had every byte of it to write,
/// and the rollback waited for it.
#[cfg(target_os = "linux")]
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range(2) takes a descriptor, two integers and
    // flags, and reads or writes no memory of ours; `file` keeps the
    // descriptor open for the call. It is `unsafe` only because it is a
    // foreign function: rustix, the crate's safe system-call layer, does
    // not wrap it, and `File::sync_data` would wait for the write, which
    // is what this avoids. Its result is of no use (a failure only means
    // the later `fsync` does the writing).
    unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// See the Linux version: elsewhere the later `fsync` does it all.
#[cfg(not(target_os = "linux"))]
pub fn start_writeback(_file: &std::fs::File, _offset: u64, _len: u64) {}

/// A private key file (TLS, the deploy key) must not be readable by group
/// or others: `Err` says why, and what to run.
pub fn check_private(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "readable by others (mode {mode:o}): run `chmod 600 {}`",
            path.display()
        ));
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one (systemd's default
/// soft limit is 1024): a server's connection caps are set below it
/// ([`crate::net::conns::Limits::for_this_process`]), and hooks and HTTP
/// clients add their own files.
pub fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::debug!("cannot raise the open-files limit: {e}");
        }
    }
}

/// The name of user `uid`, from the password database (`getent passwd`,
/// so that LDAP and sssd users have their names too), else /etc/passwd;
/// `uid N` when neither has one.
pub fn user_name(uid: u32) -> String {
    let from_getent = std::process::Command::new("getent")
        .args(["passwd", &uid.to_string()])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let passwd = from_getent
        .or_else(|| std::fs::read_to_string("/etc/passwd").ok())
        .unwrap_or_default();
    passwd_name(&passwd, uid).unwrap_or_else(|| format!("uid {uid}"))
}

/// The name of `uid` in passwd(5) lines.
fn passwd_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse::<u32>().ok()?;
        (id == uid && valid_user_name(name)).then(|| name.to_string())
    })
}

/// Tells the service manager `state` (`"READY=1"`, `"STOPPING=1"`, with
/// `STATUS=...` lines) when it asked to be told (`Type=notify` units set
/// `$NOTIFY_SOCKET`: a socket path, or `@name` in the abstract namespace);
/// nothing otherwise. A failure to tell is only logged: systemd then
/// times the start out, which is its own report.
pub fn notify(state: &str) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!("cannot tell the service manager {state:?} at $NOTIFY_SOCKET: {e}");
    }
}

/// CPU niceness of the agent's background work that no operation waits
/// for ([`lower_background_priority`]).
pub const BACKGROUND_NICE: i32 = 19;

/// The name of the thread the work after a switch runs on, one of its own
/// each time (`host::api`).
pub const BACKGROUND_THREAD: &str = "scap-background";

/// Gives the calling thread, if it is a [`BACKGROUND_THREAD`], the lowest
/// CPU priority short of idle (nice [`BACKGROUND_NICE`]), for the rest of
/// its life: the tail of the work after a switch (gc, emptying the
/// trash), which a deploy arriving cancels rather than waits for, then
/// yields to the app server's PHP and to other hosts' deploys on one
/// machine, yet is never starved outright (`SCHED_IDLE` could be, on a
/// host busy for hours). Only on a thread of its own: an unprivileged
/// process cannot raise a thread's priority back. A no-op on any other
/// thread; logged, not fatal, if refused.
pub fn lower_background_priority() {
    if std::thread::current().name() != Some(BACKGROUND_THREAD) {
        return;
    }
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), BACKGROUND_NICE) {
        tracing::debug!("cannot lower the background thread's priority: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_never_comes_from_user_and_is_never_unknown() {
        let lines = "root:x:0:0:root:/root:/bin/bash\njdoe:x:1000:1000::/home/jdoe:/bin/sh\n";
        assert_eq!(passwd_name(lines, 1000).as_deref(), Some("jdoe"));
        assert_eq!(passwd_name(lines, 7), None);
        assert!(!valid_user_name("a b"));
        assert!(!valid_user_name(""));
        // This process's user has a name in the database (root here, or
        // the developer's), whatever $USER says.
        let me = user_name(rustix::process::getuid().as_raw());
        assert!(!me.starts_with("uid "), "{me}");
        assert_ne!(user(), "unknown");
    }
}
