//! Integration tests: one binary (cargo's `tests/testsuite` style) that runs
//! the real `scap` executable against real directories.
//!
//! Table of contents:
//! - `support`: the fixture builder (temp dirs, running scap, tree helpers,
//!   `Fleet::start(n)`: real agents and a real server on 127.0.0.1).
//! - `agent`: serve + agents: fetch by difference, atomic switch, state
//!   file, rollback, hooks, drift, faults (corrupt source, kill -9, full disk).
//! - `names`: what a name deploys: exact version IDs, trains as heads with
//!   a history, failed changes never deployed by name, reverts by
//!   sync-file, changes only where their directory is, rollbacks that say
//!   what the fleet runs.
//! - `manifest`: build-manifest determinism, symlinks, exec bits, odd names,
//!   the stat cache, bad input.
//! - `canary`: `scap sync --canary`, stages, gates, failure budgets, the
//!   lock, rollback, promote, status, history, sync-file on a local fleet.
//! - `dashboard`: the web page in a real headless Chromium during a
//!   rollout, the JSON API's errors, both /metrics endpoints.
//! - `diff`: `scap diff` against a brute-force comparison of two trees.
//! - `fanout`: real nginx caches (contrib/nginx) in front of `scap serve`:
//!   delta packs once per cache, a corrupt cache entry, a cache down, an
//!   interrupted pack resumed, bandwidth caps, staging.
//! - `faults`: fault injection: hostile trees, hostile sources and agents,
//!   crashes at every step of a build and a sync, gc racing writers,
//!   concurrent recoveries, rollback pre-empting work, kill -9 rounds.
//! - `fuzz_corpora`: the fuzz targets' corpora, replayed.
//! - `inspect`: ls, cat, log, resolve, labels.
//! - `integrity`: verify, gc, crashes, a full disk.
//! - `package`: the Debian package built, installed with dpkg, its units
//!   verified by systemd-analyze, its man pages and completions loaded,
//!   purged without touching a store.
//! - `production`: the load balancer's pools in a real etcd (per-cluster
//!   shares, depooled hosts), batched restarts watched on etcd, gates that
//!   read a real Prometheus.
//! - `state`: the deploy state in a real three-member etcd cluster: the
//!   deploy lock as a lease under kill -9 and SIGSTOP, a rollout resumed
//!   from its record in etcd, a member or every member stopped mid-rollout,
//!   two deploy hosts on one state.
//! - `trains`: two trains at once: changes on every live train, the fleet
//!   policy, desired state and hosts that converge, `--resume`, gc that
//!   knows the fleet.
//! - `transport`: TLS and signed versions: every refusal, a key rotation,
//!   a capture of the wire.
//! - `upgrade`: the previous release's scap beside this one: mixed
//!   agents under either controller, its store opened by this one, a
//!   future store refused.
//! - `world`: the MediaWiki work around a deploy with the real php:
//!   sync-world's checks and build steps cached by content, sync-file's
//!   checks, announcements, restarts without pools, locks, real authors.
//! - `trust`: each trust boundary tested as the attack on it: a
//!   compromised cache (replayed desired states, stale signatures,
//!   segments forever), a key rotation then a rollback, packs between
//!   subtrees, idle connections, a wildcard certificate, a pull flood, an
//!   edit during the post-switch hook, a crash repair, DNS rebinding.

mod agent;
mod canary;
mod dashboard;
mod diff;
mod fanout;
mod faults;
mod fuzz_corpora;
mod inspect;
mod integrity;
mod manifest;
mod names;
mod package;
mod production;
mod share;
mod state;
mod support;
mod trains;
mod transport;
mod trust;
mod upgrade;
mod world;
