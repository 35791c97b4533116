//! Integration tests: one binary (cargo's `tests/testsuite` style) that runs
//! the real `scap` executable against real directories.
//!
//! Table of contents:
//! - `support`: the fixture builder (temp dirs, running scap, tree helpers).
//! - `manifest`: build-manifest determinism, symlinks, exec bits, odd names,
//!   the stat cache, bad input.
//! - `diff`: `scap diff` against a brute-force comparison of two trees.
//! - `inspect`: ls, cat, log, resolve, labels.
//! - `integrity`: verify, gc, crashes, a full disk.

mod diff;
mod inspect;
mod integrity;
mod manifest;
mod support;
