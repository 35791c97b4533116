//! `scap.toml`, the whole tool's configuration: what to build (named
//! components, each a staging directory, and the exclude globs, also from
//! `--component NAME=PATH` flags), where the store and the fleet are, the
//! site's policy, its pools (`[pools]`) and gates (`[[gate]]`).
//!
//! **Invariant:** it sits below every module that reads it and imports
//! none of them: the settings a module reads from scap.toml are defined
//! here, and the module gives them meaning.

use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::tree::TreeName;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--component {0:?}: expected NAME=PATH, e.g. mediawiki=/srv/mediawiki-staging")]
    BadComponentFlag(String),
    #[error("component name {0:?}: {1}")]
    BadName(String, String),
    #[error("component {0:?} is named twice: give each component one name")]
    Duplicate(String),
    #[error(
        "no components to build: pass --component NAME=PATH or a scap.toml with [[component]] tables"
    )]
    Empty,
    #[error("exclude glob {glob:?}: {source}")]
    BadGlob {
        glob: String,
        #[source]
        source: globset::Error,
    },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{path}: {source}{}", unknown_key_hint(source))]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
}

/// What to do about a key this release does not know: after an upgrade it
/// is most often one the other release had (or a typo).
fn unknown_key_hint(e: &toml::de::Error) -> String {
    if e.message().starts_with("unknown field") {
        format!(
            "scap {} has no such key: correct its spelling, or remove it if it belongs to another scap release (every key this release knows is in /usr/share/doc/scap/examples/scap.toml and the README)",
            env!("CARGO_PKG_VERSION")
        )
    } else {
        String::new()
    }
}

/// `scap.toml`, as written by users. Unknown keys are refused (toml names
/// the key and lists the known ones).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Store directory, when `--store`/`SCAP_STORE` do not say.
    pub store: Option<PathBuf>,
    /// URLs hosts fetch objects from (`scap sync --source`): the deploy
    /// host(s), tried after every cache.
    #[serde(default)]
    pub sources: Vec<String>,
    /// HTTP caches in front of the deploy host, by datacenter (`[caches]
    /// eqiad = ["https://..."]`): a host tries its own datacenter's first,
    /// then the others', then `sources`.
    #[serde(default)]
    pub caches: std::collections::BTreeMap<String, Vec<String>>,
    /// The fleet: dsh group files (`--hosts`), or an inventory with
    /// weights (`--inventory`); flags replace them.
    #[serde(default)]
    pub hosts: Vec<PathBuf>,
    pub inventory: Option<PathBuf>,
    /// dsh group files of canary hosts (`--canary-group`).
    #[serde(default)]
    pub canary_groups: Vec<PathBuf>,
    /// How `scap sync` rolls out when no share is given.
    pub policy: Option<PolicyConfig>,
    /// Health gates run after each step (flags add to them).
    #[serde(default, rename = "gate")]
    pub gates: Vec<GateConfig>,
    /// The load balancer's pools in etcd (conftool): the fleet and its
    /// traffic shares.
    pub pools: Option<PoolsConfig>,
    /// Where the deploy state lives (the lock, the rollout record, the
    /// desired state, the history): etcd, shared by the deploy hosts;
    /// without it, files beside the store.
    pub state: Option<StateConfig>,
    /// Restarts after a step: batch and, with pools, drain and floor.
    pub restarts: Option<RestartsConfig>,
    /// The IRC/SAL relay every fleet-changing command and lock tells.
    pub announce: Option<AnnounceConfig>,
    /// What is checked before anything is built or sent (php -l, JSON,
    /// wikiversions).
    pub checks: Option<ChecksConfig>,
    /// Build steps run on the deploy host before hashing, cached by the
    /// content of their inputs.
    #[serde(default, rename = "build")]
    pub builds: Vec<BuildStepConfig>,
    /// The global lock: a file that stops every deploy on this deploy
    /// host, whatever store it uses (`scap lock --all`).
    pub global_lock: Option<PathBuf>,
    /// Bearer token file for agents, with `--insecure-http` only.
    pub token_file: Option<PathBuf>,
    /// Certificates for TLS (the default transport).
    pub tls: Option<TlsConfig>,
    /// The deploy key that signs every version built here (`scap keygen`).
    pub sign_key: Option<PathBuf>,
    /// Exclude globs for every component.
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default, rename = "component")]
    pub components: Vec<ComponentFile>,
}

/// `[policy]` in scap.toml: the rollout `scap sync --version V` does with
/// no share flags. Unset fields take the built-in default (today's scap:
/// the canary hosts, the wait, the gates, then every host).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// e.g. ["canary", "10%", "50%", "100%"]
    pub stages: Option<Vec<String>>,
    /// Wait before each step's gates: "20s", "5m".
    pub wait: Option<String>,
    /// Hosts that may fail or be down before a step stops: "2" or "5%".
    pub max_failures: Option<String>,
    /// Hosts synced at once.
    pub concurrency: Option<usize>,
}

/// `[[gate]]` in scap.toml: an HTTP probe, a command, or a PromQL query.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// URL template with {host} or {addr}, e.g. "http://{host}/wiki/Main_Page".
    pub url: Option<String>,
    /// The status the URL must answer (default 200).
    pub status: Option<u16>,
    /// A command; gets SCAP_VERSION, SCAP_HOSTS, SCAP_PERCENT.
    pub command: Option<String>,
    /// Prometheus' URL, with `query` and `max` or `ratio` (and `floor`).
    pub prometheus: Option<String>,
    pub query: Option<String>,
    pub max: Option<f64>,
    pub ratio: Option<f64>,
    pub floor: Option<f64>,
}

impl GateConfig {
    /// The Prometheus gate this table describes, if it is one.
    pub fn prom(&self) -> Option<PromGate> {
        Some(PromGate {
            url: self.prometheus.clone()?,
            query: self.query.clone().unwrap_or_default(),
            max: self.max,
            ratio: self.ratio,
            floor: self.floor,
        })
    }
}

/// `[restarts]` in scap.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartsConfig {
    /// A batch: this share of each cluster's pooled weight ("10%").
    pub batch: Option<String>,
    /// Wait after a depool ("5s").
    pub drain: Option<String>,
    /// Never leave less than this share of a cluster pooled ("75%").
    pub min_pooled: Option<String>,
}

/// `[announce]` in scap.toml: the command that relays a line to IRC and
/// the Server Admin Log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceConfig {
    /// Run with `sh -c`; gets the line as `$SCAP_ANNOUNCE`.
    pub command: String,
    /// How long it may run before it is killed ("10s").
    pub timeout: Option<String>,
}

/// `[checks]` in scap.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksConfig {
    /// The component the checks read (default "mediawiki").
    pub component: Option<String>,
    /// The PHP binary for `php -l` (default "php").
    pub php: Option<String>,
    /// Directories of the component whose PHP files `scap sync-world`
    /// lints (default: wmf-config, multiversion).
    pub lint: Option<Vec<String>>,
    /// wikiversions.json, relative to the component (default
    /// "wikiversions.json"; "" turns the check off).
    pub wikiversions: Option<String>,
}

/// `[[build]]` in scap.toml: one build step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildStepConfig {
    pub name: String,
    /// Run with `sh -c` in `dir`; gets SCAP_BRANCH (per branch) and
    /// SCAP_COMPONENT_DIR.
    pub command: String,
    /// The component it works in (default: the first one).
    pub component: Option<String>,
    /// Once per top-level directory of the component matching this glob
    /// (e.g. "php-*"); `{branch}` in dir, inputs and outputs is its name.
    pub per_branch: Option<String>,
    /// Working directory, relative to the component (default: its root).
    pub dir: Option<String>,
    /// Globs of the files whose content decides whether it runs again.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Paths it writes (files or directories); nothing else may change.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// How long it may run before it is killed ("30m").
    pub timeout: Option<String>,
}

/// `[tls]` in scap.toml: this process's certificate and the CA it trusts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentFile {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: ConfigFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        // Relative paths are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for c in &mut cfg.components {
            fix(&mut c.path);
        }
        if let Some(t) = &mut cfg.tls {
            fix(&mut t.ca);
            fix(&mut t.cert);
            fix(&mut t.key);
        }
        for p in [
            &mut cfg.global_lock,
            &mut cfg.sign_key,
            &mut cfg.token_file,
            &mut cfg.store,
            &mut cfg.inventory,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        for p in cfg.hosts.iter_mut().chain(&mut cfg.canary_groups) {
            fix(p);
        }
        for (i, g) in cfg.gates.iter().enumerate() {
            let invalid = |why: String| ConfigError::Invalid {
                path: path.to_path_buf(),
                why: format!("[[gate]] number {}: {why}", i + 1),
            };
            let kinds = [g.url.is_some(), g.command.is_some(), g.prometheus.is_some()];
            if kinds.iter().filter(|k| **k).count() != 1 {
                return Err(invalid(
                    "give one of url (with an optional status), command, or prometheus (with query and max or ratio)".into(),
                ));
            }
            if g.status.is_some() && g.url.is_none() {
                return Err(invalid("status goes with url".into()));
            }
            if g.prometheus.is_none()
                && (g.query.is_some() || g.max.is_some() || g.ratio.is_some() || g.floor.is_some())
            {
                return Err(invalid(
                    "query, max, ratio and floor go with prometheus".into(),
                ));
            }
            if let Some(p) = g.prom() {
                p.check().map_err(invalid)?;
            }
        }
        Ok(cfg)
    }
}

/// One validated component.
#[derive(Debug, Clone)]
pub struct Component {
    pub name: TreeName,
    pub path: PathBuf,
    pub exclude: GlobSet,
    pub exclude_globs: Vec<String>,
}

/// Validates components from a config file and from `NAME=PATH` flags.
/// A flag replaces a config component of the same name.
pub fn components(
    file: &ConfigFile,
    flags: &[String],
    extra_excludes: &[String],
) -> Result<Vec<Component>, ConfigError> {
    let mut raw: Vec<(String, PathBuf, Vec<String>)> = file
        .components
        .iter()
        .map(|c| (c.name.clone(), c.path.clone(), c.exclude.clone()))
        .collect();
    let mut seen_flags: Vec<&str> = Vec::new();
    for flag in flags {
        let (name, path) = flag
            .split_once('=')
            .filter(|(n, p)| !n.is_empty() && !p.is_empty())
            .ok_or_else(|| ConfigError::BadComponentFlag(flag.clone()))?;
        if seen_flags.contains(&name) {
            return Err(ConfigError::Duplicate(name.to_string()));
        }
        seen_flags.push(name);
        raw.retain(|(n, _, _)| n != name);
        raw.push((name.to_string(), PathBuf::from(path), Vec::new()));
    }
    if raw.is_empty() {
        return Err(ConfigError::Empty);
    }
    let mut out: Vec<Component> = Vec::new();
    for (name, path, own) in raw {
        let tree_name = TreeName::new(name.clone().into_bytes())
            .map_err(|e| ConfigError::BadName(name.clone(), e.to_string()))?;
        if out.iter().any(|c| c.name == tree_name) {
            return Err(ConfigError::Duplicate(name));
        }
        let globs: Vec<String> = file
            .exclude
            .iter()
            .chain(extra_excludes)
            .chain(&own)
            .cloned()
            .collect();
        out.push(Component {
            name: tree_name,
            path,
            exclude: glob_set(&globs)?,
            exclude_globs: globs,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn glob_set(globs: &[String]) -> Result<GlobSet, ConfigError> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = GlobBuilder::new(g)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|source| ConfigError::BadGlob {
                glob: g.clone(),
                source,
            })?;
        b.add(glob);
    }
    b.build().map_err(|source| ConfigError::BadGlob {
        glob: globs.join(" "),
        source,
    })
}

/// `[state]` in scap.toml: the deploy state in etcd (v3 API).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// etcd's client URLs, every member (e.g. "https://conf1001.eqiad.wmnet:2379").
    pub etcd: Vec<String>,
    /// The key prefix of this fleet's deploy state.
    #[serde(default = "default_state_prefix")]
    pub prefix: String,
    /// The deploy lock's lease ("15s"): how long after its holder dies
    /// another deploy host may take it.
    #[serde(default)]
    pub lease: Option<String>,
    /// One request's deadline ("3s").
    #[serde(default)]
    pub timeout: Option<String>,
    /// CA for https endpoints; cert and key when etcd asks for a client
    /// certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_state_prefix() -> String {
    "/scap/deploy".into()
}

/// `[pools]` in scap.toml.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsConfig {
    /// etcd's client URL(s), e.g. "https://conf1001.eqiad.wmnet:2379".
    pub etcd: Vec<String>,
    /// Where conftool keeps the pools.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The service whose pool state counts, when a host has several (e.g.
    /// "apache2"); with one service per host it may be left out.
    #[serde(default)]
    pub service: Option<String>,
    /// The port agents listen on, for hosts the pools name (default 8470).
    #[serde(default)]
    pub agent_port: Option<u16>,
}

fn default_prefix() -> String {
    "/conftool/v1/pools".into()
}

/// `[[gate]] prometheus = ...` in scap.toml.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct PromGate {
    /// Prometheus' URL, e.g. "http://prometheus.svc:9090".
    pub url: String,
    pub query: String,
    /// Absolute: fail when the step's value exceeds this.
    pub max: Option<f64>,
    /// Comparison: fail when the step's value exceeds `ratio` x the rest's
    /// (and `floor`).
    pub ratio: Option<f64>,
    /// With `ratio`: values at or under this always pass.
    pub floor: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_globs() {
        let cfg = ConfigFile::default();
        let c = components(
            &cfg,
            &["mediawiki=/srv/x".into(), "portals=/srv/p".into()],
            &["**/.git".into(), "**/cache/l10n/*.cdb".into()],
        )
        .unwrap();
        assert_eq!(c[0].name.to_string(), "mediawiki");
        assert!(c[0].exclude.is_match(".git"));
        assert!(c[0].exclude.is_match("php-1.46/.git"));
        assert!(
            c[0].exclude
                .is_match("php-1.46/cache/l10n/l10n_cache-en.cdb")
        );
        assert!(!c[0].exclude.is_match("php-1.46/cache/l10n/sub/x.cdb"));
        assert!(matches!(
            components(&cfg, &["nope".into()], &[]),
            Err(ConfigError::BadComponentFlag(_))
        ));
        assert!(matches!(
            components(&cfg, &["a/b=/x".into()], &[]),
            Err(ConfigError::BadName(..))
        ));
        assert!(matches!(
            components(&cfg, &[], &[]),
            Err(ConfigError::Empty)
        ));
        assert!(matches!(
            components(&cfg, &[], &["a[".into()]),
            Err(ConfigError::Empty)
        ));
        assert!(matches!(
            components(&cfg, &["a=/x".into()], &["a[".into()]),
            Err(ConfigError::BadGlob { .. })
        ));
    }

    #[test]
    fn the_packaged_config_parses_with_its_examples_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/debian/scap.toml");
        let as_shipped = ConfigFile::load(&path).unwrap();
        assert!(as_shipped.store.is_none() && as_shipped.components.is_empty());
        // Every commented setting (`#key = ...`, `#[table]`) must be valid
        // when a user uncomments it.
        let text = std::fs::read_to_string(&path).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.is_empty() && !rest.starts_with([' ', '#']) => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let edited = dir.path().join("scap.toml");
        std::fs::write(&edited, uncommented).unwrap();
        let cfg = ConfigFile::load(&edited).unwrap();
        assert_eq!(cfg.components.len(), 1);
        assert!(cfg.tls.is_some() && cfg.sign_key.is_some());
    }

    #[test]
    fn an_unknown_key_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scap.toml");
        std::fs::write(&path, "store = \"/srv/s\"\nretired_key = 1\n").unwrap();
        let e = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:", path.display())), "{e}");
        assert!(e.contains("line 2") && e.contains("retired_key"), "{e}");
        assert!(
            e.contains("has no such key") && e.contains("another scap release"),
            "{e}"
        );
        // A key in a table too.
        std::fs::write(&path, "[restarts]\nbatch = \"10%\"\nbatchsize = 3\n").unwrap();
        let e = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("batchsize") && e.contains("has no such key"),
            "{e}"
        );
        // Other errors get no such hint.
        std::fs::write(&path, "store = [\n").unwrap();
        let e = ConfigFile::load(&path).unwrap_err().to_string();
        assert!(!e.contains("has no such key"), "{e}");
    }
}
