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
/// `$USER`, else "unknown".
pub fn user() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into())
}
