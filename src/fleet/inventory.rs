//! Host lists: dsh-style group files, the format scap uses today
//! (`mediawiki-installation`, `mediawiki-appserver-canaries`): one
//! `host[:port]` per line, `#` comments, blank lines ignored.

use std::path::{Path, PathBuf};

/// Port agents listen on when a host line names none.
pub const DEFAULT_AGENT_PORT: u16 = 8470;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Host {
    /// As written in the group file (without the default port).
    pub name: String,
    pub port: u16,
    /// Where the agent listens, when that is not `name:port` (an
    /// inventory's `address`).
    pub addr: Option<String>,
}

impl Host {
    /// Where its agent listens: `host:port`.
    pub fn authority(&self) -> String {
        match &self.addr {
            Some(a) => a.clone(),
            None => format!("{}:{}", self.name, self.port),
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.port == DEFAULT_AGENT_PORT || self.addr.is_some() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}:{}", self.name, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {why}")]
    Bad {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{path}: no hosts in it (only comments or blank lines)")]
    Empty { path: PathBuf },
    #[error("no hosts: pass --hosts GROUPFILE or --inventory FILE (or set them in scap.toml)")]
    NoHosts,
    #[error("{path}:{line}: host {host} is listed twice (first on line {first}): remove one")]
    Duplicate {
        path: PathBuf,
        line: usize,
        host: String,
        first: usize,
    },
}

/// A host's state in the load balancer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooled {
    Yes,
    No,
    Inactive,
}

impl std::fmt::Display for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pooled::Yes => "yes",
            Pooled::No => "no",
            Pooled::Inactive => "inactive",
        })
    }
}

pub use crate::proto::valid_host_name;

/// Reads a dsh group file.
pub fn read_group(path: &Path) -> Result<Vec<Host>, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_group(path, &text)
}

/// A host as a group file line or `--agent` names it: `host[:port]` (the
/// agent's default port without one).
pub fn parse_host(s: &str) -> Result<Host, String> {
    let (name, port) = match s.rsplit_once(':') {
        Some((n, p)) => (
            n,
            p.parse::<u16>()
                .map_err(|_| format!("{s:?}: port {p:?} is not a number from 1 to 65535"))?,
        ),
        None => (s, DEFAULT_AGENT_PORT),
    };
    if !valid_host_name(name) || port == 0 {
        return Err(format!("{s:?} is not a host name"));
    }
    Ok(Host {
        name: name.to_string(),
        port,
        addr: None,
    })
}

/// The server of an `https://` (or `http://`) URL, as a host to call:
/// `scap serve` at one of scap.toml's `sources`.
pub fn host_of_url(url: &str) -> Result<Host, String> {
    let (rest, default_port) = if let Some(r) = url.strip_prefix("https://") {
        (r, 443)
    } else if let Some(r) = url.strip_prefix("http://") {
        (r, 80)
    } else {
        return Err(format!("{url:?}: not an http(s) URL"));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains(':') {
        parse_host(authority)
    } else {
        parse_host(&format!("{authority}:{default_port}"))
    }
    .map_err(|e| format!("source {url:?}: {e}"))
}

pub fn parse_group(path: &Path, text: &str) -> Result<Vec<Host>, InventoryError> {
    let mut hosts: Vec<(Host, usize)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| InventoryError::Bad {
            path: path.to_path_buf(),
            line: i + 1,
            why,
        };
        if line.split_whitespace().count() > 1 {
            return Err(bad(format!("{line:?}: one host per line")));
        }
        let host = parse_host(line).map_err(bad)?;
        if let Some((_, first)) = hosts.iter().find(|(h, _)| *h == host) {
            return Err(InventoryError::Duplicate {
                path: path.to_path_buf(),
                line: i + 1,
                host: host.to_string(),
                first: *first,
            });
        }
        hosts.push((host, i + 1));
    }
    if hosts.is_empty() {
        return Err(InventoryError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(hosts.into_iter().map(|(h, _)| h).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsh_files() {
        let p = Path::new("mediawiki-installation");
        let hosts = parse_group(
            p,
            "# canaries\nmw1001\n\nmw1002:9000 # api\n127.0.0.1:8471\n",
        )
        .unwrap();
        assert_eq!(
            hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            ["mw1001", "mw1002:9000", "127.0.0.1:8471"]
        );
        assert_eq!(hosts[0].authority(), "mw1001:8470");
        let e = parse_group(p, "mw1001\nmw1002\nmw1001\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "mediawiki-installation:3: host mw1001 is listed twice (first on line 1): remove one"
        );
        assert!(
            parse_group(p, "# nothing\n\n")
                .unwrap_err()
                .to_string()
                .contains("no hosts")
        );
        assert!(
            parse_group(p, "mw1001 mw1002\n")
                .unwrap_err()
                .to_string()
                .contains(":1: ")
        );
        assert!(
            parse_group(p, "mw1001:http\n")
                .unwrap_err()
                .to_string()
                .contains("port")
        );
        assert!(
            parse_group(p, "mw/1001\n")
                .unwrap_err()
                .to_string()
                .contains("not a host name")
        );
    }
}

/// A host as the fleet controller sees it: where, how much traffic, where
/// in the fleet.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Member {
    pub host: Host,
    /// Share of traffic relative to the others: from the pools, its weight
    /// when pooled and 0 otherwise; from an inventory, its weight; from a
    /// group file, 1.
    pub weight: u64,
    pub dc: String,
    pub cluster: String,
    /// In a canary group: chosen first.
    pub canary: bool,
    /// Its state in the load balancer's pools (`None`: the fleet does not
    /// come from pools, or the host is in none).
    pub pooled: Option<Pooled>,
}

/// `inventory.toml`: hosts with weights and labels.
///
/// ```toml
/// [[host]]
/// name = "mw1001.eqiad.wmnet"   # host or host:port
/// address = "10.64.0.1:8470"    # optional: where the agent listens, if not at name
/// weight = 10                   # default 1
/// dc = "eqiad"
/// cluster = "appserver"
/// canary = true
/// ```
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryFile {
    #[serde(default, rename = "host")]
    hosts: Vec<InventoryHost>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryHost {
    name: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default = "one")]
    weight: u64,
    #[serde(default)]
    dc: String,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    canary: bool,
}

fn one() -> u64 {
    1
}

/// Builds the fleet from dsh group files (weight 1), a TOML inventory
/// (weights, labels) and canary group files. A host named in several
/// sources is one host; its inventory entry wins.
pub fn fleet(
    groups: &[PathBuf],
    inventory: Option<&Path>,
    canary_groups: &[PathBuf],
) -> Result<Vec<Member>, InventoryError> {
    let mut members: Vec<Member> = Vec::new();
    if let Some(path) = inventory {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: InventoryFile = toml::from_str(&text).map_err(|e| InventoryError::Bad {
            path: path.to_path_buf(),
            line: e
                .span()
                .map(|s| text[..s.start].lines().count().max(1))
                .unwrap_or(0),
            why: e.message().to_string(),
        })?;
        for (i, h) in file.hosts.iter().enumerate() {
            let mut parsed = parse_group(path, &h.name)?.remove(0);
            if let Some(a) = &h.address {
                parse_group(path, a)?; // a host[:port] too
                parsed.addr = Some(a.clone());
            }
            if h.weight == 0 {
                return Err(InventoryError::Bad {
                    path: path.to_path_buf(),
                    line: i + 1,
                    why: format!(
                        "host {}: weight 0 takes no traffic: remove the host instead",
                        h.name
                    ),
                });
            }
            if members.iter().any(|m| m.host == parsed) {
                return Err(InventoryError::Duplicate {
                    path: path.to_path_buf(),
                    line: i + 1,
                    host: parsed.to_string(),
                    first: 0,
                });
            }
            members.push(Member {
                host: parsed,
                weight: h.weight,
                dc: h.dc.clone(),
                cluster: h.cluster.clone(),
                canary: h.canary,
                pooled: None,
            });
        }
    }
    for g in groups {
        for host in read_group(g)? {
            if !members.iter().any(|m| m.host == host) {
                members.push(Member {
                    host,
                    weight: 1,
                    dc: String::new(),
                    cluster: String::new(),
                    canary: false,
                    pooled: None,
                });
            }
        }
    }
    for g in canary_groups {
        for host in read_group(g)? {
            match members.iter_mut().find(|m| m.host == host) {
                Some(m) => m.canary = true,
                None => members.push(Member {
                    host,
                    weight: 1,
                    dc: String::new(),
                    cluster: String::new(),
                    canary: true,
                    pooled: None,
                }),
            }
        }
    }
    if members.is_empty() {
        return Err(InventoryError::NoHosts);
    }
    Ok(members)
}
