//! What to build: named components, each a staging directory, and the
//! exclude globs. From `--component NAME=PATH` flags and/or `scap.toml`.

use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;
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
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
}

/// `scap.toml`, as written by users.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Store directory, when `--store`/`SCAP_STORE` do not say.
    pub store: Option<PathBuf>,
    /// URLs hosts fetch objects from (`scap sync --source`).
    #[serde(default)]
    pub sources: Vec<String>,
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
        for p in [&mut cfg.sign_key, &mut cfg.token_file, &mut cfg.store]
            .into_iter()
            .flatten()
        {
            fix(p);
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
}
