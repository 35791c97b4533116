//! The fixture: a temp dir per test, the real binary, small tree builders.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const SCAP: &str = env!("CARGO_BIN_EXE_scap");

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("store");
        Env { dir, store }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(SCAP);
        c.arg("--store").arg(&self.store);
        c.env_remove("SCAP_STORE")
            .env_remove("SCAP_CONFIG")
            .current_dir(self.dir.path());
        c
    }

    /// Runs scap; panics with its output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("run scap");
        assert!(
            out.status.success(),
            "scap {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs scap expecting failure; returns (exit code, stderr).
    pub fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.cmd().args(args).output().expect("run scap");
        assert!(
            !out.status.success(),
            "scap {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn raw(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run scap")
    }

    /// Builds a version of `components` (NAME=PATH) and returns its ID.
    pub fn build(&self, components: &[(&str, &Path)], extra: &[&str]) -> String {
        let mut args = vec!["build-manifest".to_string()];
        for (name, path) in components {
            args.push("--component".into());
            args.push(format!("{name}={}", path.display()));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ok(&args);
        let id = out
            .lines()
            .last()
            .expect("a version line")
            .trim()
            .to_string();
        assert_eq!(id.len(), 64, "last line is the version ID: {out}");
        id
    }

    pub fn build_json(&self, components: &[(&str, &Path)]) -> serde_json::Value {
        let mut args = vec!["build-manifest".to_string(), "--json".into()];
        for (name, path) in components {
            args.push("--component".into());
            args.push(format!("{name}={}", path.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&self.ok(&args)).expect("json report")
    }
}

pub fn write(root: &Path, rel: &str, content: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
}

pub fn write_exec(root: &Path, rel: &str, content: &[u8]) {
    write(root, rel, content);
    fs::set_permissions(root.join(rel), fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn symlink(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, p).unwrap();
}

/// A small tree with every kind of entry scap must round-trip.
pub fn sample_tree(root: &Path) {
    write(
        root,
        "index.php",
        b"<?php require __DIR__ . '/includes/WebStart.php';\n",
    );
    write(root, "includes/WebStart.php", b"<?php\n// start\n");
    write(
        root,
        "includes/libs/rdbms/database/Database.php",
        &b"<?php class Database {}\n".repeat(40),
    );
    write_exec(root, "maintenance/run.php", b"#!/usr/bin/env php\n<?php\n");
    symlink(root, "w", "php-1.46.0-wmf.1");
    symlink(root, "docroot/w", "../w");
    symlink(
        root,
        "static-current",
        "/srv/mediawiki/php-1.46.0-wmf.1/resources",
    );
    symlink(
        root,
        "wmf-config/PrivateSettings.php",
        "/etc/mediawiki/private/PrivateSettings.php",
    );
    fs::create_dir_all(root.join("images/empty")).unwrap();
    write(root, "large.bin", &noise(700_000, 3));
}

/// Deterministic bytes that do not compress.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Copies a tree (files, modes, symlinks) like `cp -a` would.
pub fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}
