//! The MediaWiki work on the deploy host before a version is built:
//! checks ([`checks`]: `php -l`, JSON, wikiversions.json) and build steps
//! ([`steps`]: wikiversions compile, localisation caches, cached by
//! content), then the build itself. `scap sync-world` runs [`prepare`],
//! then deploys the version by the site's policy; `scap sync-file` runs
//! [`Checks::change`] on the path it takes.
//!
//! **Invariant:** nothing is built when a check or a step fails: the
//! version is hashed only after every check passed and every step
//! succeeded, so a failure leaves the store and the fleet as they were.

pub mod checks;
pub mod steps;

use std::path::Path;
use std::sync::Arc;

use crate::config::{Component, ConfigFile};
use crate::manifest::{BuildOptions, BuildReport};
use crate::store::signature::SigningKey;
use crate::store::{Store, VersionId};
use checks::{CheckError, Failure, LintCache};

/// The checks' settings (`[checks]` in scap.toml, with defaults).
#[derive(Debug, Clone)]
pub struct Checks {
    /// The component checked.
    pub component: String,
    pub php: String,
    /// Directories whose PHP files sync-world lints.
    pub lint: Vec<String>,
    /// wikiversions.json, relative to the component (none: no check).
    pub wikiversions: Option<String>,
    /// `php -l` processes at once.
    pub jobs: usize,
}

impl Checks {
    pub fn from_config(cfg: &ConfigFile) -> Checks {
        let c = cfg.checks.clone().unwrap_or_default();
        Checks {
            component: c.component.unwrap_or_else(|| "mediawiki".into()),
            php: c.php.unwrap_or_else(|| "php".into()),
            lint: c
                .lint
                .unwrap_or_else(|| vec!["wmf-config".into(), "multiversion".into()]),
            wikiversions: match c.wikiversions {
                Some(w) if w.is_empty() => None,
                Some(w) => Some(w),
                None => Some("wikiversions.json".into()),
            },
            jobs: std::thread::available_parallelism().map_or(2, |n| n.get() * 2),
        }
    }

    /// sync-world's checks on `root` (the component's staging directory):
    /// `php -l` of the lint directories' PHP files, their JSON files and
    /// wikiversions.json parsed, and every branch wikiversions.json names
    /// present in staging. Returns how many PHP files `php -l` read (the
    /// rest passed before, as they are).
    pub fn world(&self, root: &Path, cache: &LintCache) -> Result<usize, CheckError> {
        let bad = |what: String| CheckError {
            failures: vec![Failure {
                path: root.display().to_string(),
                line: None,
                what,
            }],
        };
        let php = checks::files_under(root, &self.lint, "php").map_err(bad)?;
        let mut json = checks::files_under(root, &self.lint, "json").map_err(bad)?;
        let (mut failures, linted) = checks::lint_php(&self.php, root, &php, cache, self.jobs);
        if let Some(w) = &self.wikiversions
            && root.join(w).exists()
        {
            json.push(w.clone());
        }
        failures.extend(checks::check_json(root, &json));
        if let Some(w) = &self.wikiversions
            && let Ok(bytes) = std::fs::read(root.join(w))
        {
            failures.extend(checks::check_wikiversions(w, &bytes, "staging", &|b| {
                std::fs::symlink_metadata(root.join(b)).is_ok_and(|m| m.is_dir())
            }));
        }
        cache.save();
        if failures.is_empty() {
            Ok(linted)
        } else {
            Err(CheckError { failures })
        }
    }

    /// sync-file's and sync-dir's checks on `path` of `root`: `php -l` of
    /// the PHP files it is or holds, its JSON files parsed, and, if it is
    /// wikiversions.json, every branch it names present in staging.
    /// (Each train the change applies to is checked by
    /// [`Checks::wikiversions_in`] once the trains are known.)
    pub fn change(&self, root: &Path, path: &str, cache: &LintCache) -> Result<(), CheckError> {
        let full = root.join(path);
        let is_dir = std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir());
        let (php, json) = if is_dir {
            let dirs = [path.to_string()];
            let err = |what: String| CheckError {
                failures: vec![Failure {
                    path: path.to_string(),
                    line: None,
                    what,
                }],
            };
            (
                checks::files_under(root, &dirs, "php").map_err(err)?,
                checks::files_under(root, &dirs, "json").map_err(err)?,
            )
        } else if std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_file()) {
            let of = |ext: &str| {
                if path.ends_with(ext) {
                    vec![path.to_string()]
                } else {
                    vec![]
                }
            };
            (of(".php"), of(".json"))
        } else {
            (vec![], vec![])
        };
        let (mut failures, _) = checks::lint_php(&self.php, root, &php, cache, self.jobs);
        failures.extend(checks::check_json(root, &json));
        if failures.is_empty()
            && let Some(w) = self.touches_wikiversions(path)
            && let Ok(bytes) = std::fs::read(root.join(w))
        {
            failures.extend(checks::check_wikiversions(w, &bytes, "staging", &|b| {
                std::fs::symlink_metadata(root.join(b)).is_ok_and(|m| m.is_dir())
            }));
        }
        cache.save();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CheckError { failures })
        }
    }

    /// sync-file's and sync-dir's checks of `path` of `component`, before
    /// anything is built: [`Checks::change`] on staging now (lint results
    /// remembered in `store`), and, when the change takes wikiversions.json
    /// of the checked component, the check of each train it applies to
    /// (named by `trains`), for `fleet::change::build` to run once it knows
    /// the trains.
    pub fn for_change<'a>(
        &'a self,
        store: &Store,
        component: &'a Component,
        path: &str,
        trains: &'a crate::fleet::trains::Trains,
    ) -> Result<Option<Box<crate::manifest::change::BaseCheck<'a>>>, CheckError> {
        let cache = LintCache::open(Some(&store.cache_dir()), &self.php);
        self.change(&component.path, path, &cache)?;
        if component.name.to_string() != self.component || self.touches_wikiversions(path).is_none()
        {
            return Ok(None);
        }
        Ok(Some(Box::new(move |store: &Store, v: &VersionId| {
            self.wikiversions_in(&component.path, store, v, &trains.name(v).to_string())
                .iter()
                .map(|f| f.to_string())
                .collect()
        })))
    }

    /// wikiversions.json, if a change of `path` takes it.
    pub fn touches_wikiversions(&self, path: &str) -> Option<&str> {
        let w = self.wikiversions.as_deref()?;
        let p = path.trim_matches('/');
        (p == w || p.is_empty() || w.starts_with(&format!("{p}/"))).then_some(w)
    }

    /// The branches staging's wikiversions.json (under `root`) names must
    /// be directories of version `v`'s component (`name` says which train
    /// it is, for the message).
    pub fn wikiversions_in(
        &self,
        root: &Path,
        store: &Store,
        v: &VersionId,
        name: &str,
    ) -> Vec<Failure> {
        let Some(w) = &self.wikiversions else {
            return vec![];
        };
        let Ok(bytes) = std::fs::read(root.join(w)) else {
            return vec![];
        };
        let where_ = format!("train {name}");
        checks::check_wikiversions(w, &bytes, &where_, &|b| {
            let path = format!("{}/{b}", self.component);
            matches!(
                store.lookup(&v.root(), path.as_bytes()),
                Ok(Some(crate::store::Content::Dir { .. }))
            )
        })
    }
}

/// The train a sync-world's version belongs to: the newest branch
/// wikiversions.json sends a wiki to (`php-1.46.0-wmf.7` is train
/// `1.46.0-wmf.7`), by version order of its numbers.
pub fn train_of(wikiversions: &[u8]) -> Option<String> {
    let branches = checks::wiki_branches(wikiversions).ok()?;
    branches
        .into_keys()
        .map(|b| b.strip_prefix("php-").map(str::to_string).unwrap_or(b))
        .filter(|t| crate::store::disk::check_label(t).is_ok())
        .max_by(|a, b| version_cmp(a, b))
}

/// Compares "1.46.0-wmf.10" above "1.46.0-wmf.9": digit runs as numbers.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut digits = false;
        for c in s.chars() {
            if c.is_ascii_digit() != digits && !cur.is_empty() {
                out.push(if digits {
                    cur.parse().map_err(|_| cur.clone())
                } else {
                    Err(cur.clone())
                });
                cur.clear();
            }
            digits = c.is_ascii_digit();
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(if digits {
                cur.parse().map_err(|_| cur.clone())
            } else {
                Err(cur)
            });
        }
        out
    }
    parts(a).cmp(&parts(b))
}

/// What sync-world prepares.
pub struct World<'a> {
    pub store: &'a Store,
    pub components: Vec<Component>,
    pub checks: Checks,
    pub steps: Vec<steps::Step>,
    /// The train; default: [`train_of`] the staged wikiversions.json.
    pub label: Option<String>,
    pub message: String,
    pub author: String,
    pub signer: Option<Arc<SigningKey>>,
}

impl std::fmt::Display for Prepared {
    /// "built V (train T): N files, ...; prepared in X s (checks, steps,
    /// build)": where a sync-world's time before the deploy went.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "built {}{}: {} files, {} read, {} new objects; prepared in {:.2}s (checks {:.2}s, {} build step(s) run in {:.2}s, build {:.2}s)",
            self.version.short(),
            self.label
                .as_deref()
                .map(|l| format!(" (train {l})"))
                .unwrap_or_default(),
            self.build.files,
            self.build.hashed_files,
            self.build.new_objects,
            self.seconds,
            self.check_seconds,
            self.steps
                .iter()
                .filter(|r| r.how == steps::How::Ran)
                .count(),
            self.step_seconds,
            self.build.seconds
        )
    }
}

/// What [`prepare`] did.
#[derive(Debug, serde::Serialize)]
pub struct Prepared {
    pub version: VersionId,
    pub label: Option<String>,
    /// PHP files linted (the others passed before, unchanged).
    pub linted: usize,
    pub steps: Vec<steps::StepRun>,
    pub build: BuildReport,
    /// Seconds spent on the checks, the build steps, and all of it
    /// (build included).
    pub check_seconds: f64,
    pub step_seconds: f64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Step(#[from] steps::StepError),
    #[error(transparent)]
    Build(#[from] crate::manifest::BuildError),
    #[error(
        "no component {0:?} to check: add it to scap.toml's [[component]]s, or set [checks] component"
    )]
    NoComponent(String),
}

/// Runs the checks, then the build steps, then builds (signed, labelled
/// with the train) the version to deploy. `say` hears each step as it
/// ends.
pub fn prepare(w: &World<'_>, say: &mut dyn FnMut(String)) -> Result<Prepared, WorldError> {
    let component = w
        .components
        .iter()
        .find(|c| c.name.to_string() == w.checks.component)
        .ok_or_else(|| WorldError::NoComponent(w.checks.component.clone()))?;
    let started = std::time::Instant::now();
    let cache = LintCache::open(Some(&w.store.cache_dir()), &w.checks.php);
    let linted = w.checks.world(&component.path, &cache)?;
    let check_seconds = started.elapsed().as_secs_f64();
    say(format!(
        "checks passed: php -l of {linted} changed PHP file(s) in {}, JSON and wikiversions",
        w.checks.lint.join(", ")
    ));
    let steps_started = std::time::Instant::now();
    let runs = steps::run(w.store, &w.steps, &mut |r| say(r.to_string()))?;
    let step_seconds = steps_started.elapsed().as_secs_f64();
    let label = w.label.clone().or_else(|| {
        let file = w.checks.wikiversions.as_ref()?;
        train_of(&std::fs::read(component.path.join(file)).ok()?)
    });
    let report = crate::manifest::build(
        w.store,
        &BuildOptions {
            components: w.components.clone(),
            label: label.clone(),
            move_label: true,
            message: Some(w.message.clone()),
            author: w.author.clone(),
            parent: None,
            signer: w.signer.clone(),
        },
        &crate::progress::Silent,
    )?;
    Ok(Prepared {
        version: report.version,
        label,
        linted,
        steps: runs,
        build: report,
        check_seconds,
        step_seconds,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_train_is_the_newest_branch() {
        let w = br#"{"a": "php-1.46.0-wmf.9", "b": "php-1.46.0-wmf.10", "c": "php-1.45.0-wmf.30"}"#;
        assert_eq!(train_of(w).as_deref(), Some("1.46.0-wmf.10"));
        assert_eq!(train_of(b"[]"), None);
    }
}
