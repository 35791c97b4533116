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
}

impl Host {
    pub fn base_url(&self) -> String {
        format!("http://{}:{}", self.name, self.port)
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.port == DEFAULT_AGENT_PORT {
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
    #[error("{path}:{line}: host {host} is listed twice (first on line {first}): remove one")]
    Duplicate {
        path: PathBuf,
        line: usize,
        host: String,
        first: usize,
    },
}

/// Reads a dsh group file.
pub fn read_group(path: &Path) -> Result<Vec<Host>, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_group(path, &text)
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
        let (name, port) = match line.rsplit_once(':') {
            Some((n, p)) => (
                n,
                p.parse::<u16>().map_err(|_| {
                    bad(format!(
                        "{line:?}: port {p:?} is not a number from 1 to 65535"
                    ))
                })?,
            ),
            None => (line, DEFAULT_AGENT_PORT),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'));
        if !valid || port == 0 {
            return Err(bad(format!("{line:?} is not a host name")));
        }
        let host = Host {
            name: name.to_string(),
            port,
        };
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
        assert_eq!(hosts[0].base_url(), "http://mw1001:8470");
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
