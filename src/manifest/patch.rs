//! `scap sync-file`: a new version made from an existing one with one path
//! taken from staging, everything else untouched (today's sync-file).

use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use super::{BuildError, hash_file, put_tree};
use crate::store::disk::{ComponentRecord, Store, VersionRecord, Writer};
use crate::store::tree::{Content, Entry, Tree, TreeName};
use crate::store::{TreeId, VersionId};

pub struct Patch<'a> {
    pub base: VersionId,
    /// Component name (first path element of the version), e.g. "mediawiki".
    pub component: &'a str,
    /// The component's staging directory.
    pub staging: &'a Path,
    /// Path inside the component, e.g. "wmf-config/InitialiseSettings.php".
    pub path: &'a str,
    pub message: Option<String>,
    pub author: String,
    /// The deploy key that signs the new version (none: unsigned).
    pub signer: Option<&'a super::SigningKey>,
}

/// Builds the new version; returns it and whether `path` changed at all.
pub fn patch(store: &Store, p: &Patch<'_>) -> Result<(VersionId, bool), BuildError> {
    let parts: Vec<TreeName> = p
        .path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .map(|s| {
            TreeName::new(s.as_bytes().to_vec()).map_err(|e| BuildError::BadEntry {
                path: p.path.into(),
                why: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    if parts.is_empty() {
        return Err(BuildError::BadEntry {
            path: p.path.into(),
            why: "name a file inside the component".into(),
        });
    }
    let source = p.staging.join(p.path);
    let writer = store.writer()?;
    let new_entry = match std::fs::symlink_metadata(&source) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source_err) => {
            return Err(BuildError::Unreadable {
                path: source,
                source: source_err,
            });
        }
        Ok(meta) if meta.is_dir() => {
            return Err(BuildError::BadEntry {
                path: source,
                why: "is a directory: sync-file takes files and symlinks; use build-manifest for directories".into(),
            });
        }
        Ok(meta) if meta.file_type().is_symlink() => {
            let target = std::fs::read_link(&source).map_err(|e| BuildError::Unreadable {
                path: source.clone(),
                source: e,
            })?;
            Some(Content::Symlink {
                target: target.into_os_string().into_vec(),
            })
        }
        Ok(meta) => {
            use std::os::unix::fs::PermissionsExt;
            let c = hash_file(&writer, &source, super::statcache::Stamp::of(&meta))?;
            Some(Content::File {
                executable: meta.permissions().mode() & 0o111 != 0,
                size: c.stamp.size,
                chunks: c.chunks,
            })
        }
    };
    let component =
        TreeName::new(p.component.as_bytes().to_vec()).map_err(|e| BuildError::BadEntry {
            path: p.component.into(),
            why: e.to_string(),
        })?;
    let mut full = vec![component];
    full.extend(parts);
    let root = set(&writer, &p.base.root(), &full, new_entry.as_ref(), p.path)?;
    let version = VersionId::from(root);
    // Held until the record is durable: gc cannot sweep the new trees first.
    let _committed = writer.commit()?;
    crate::failpoint::hit("patch:committed");
    if version == p.base {
        return Ok((version, false));
    }
    if store.record(&version)?.is_none() {
        let tree = store.tree(&root)?;
        let (bytes, files) = tree.totals();
        let components = tree
            .entries()
            .iter()
            .filter_map(|e| match &e.content {
                Content::Dir { tree, size, files } => Some(ComponentRecord {
                    name: e.name.to_string(),
                    tree: *tree,
                    files: *files,
                    bytes: *size,
                }),
                _ => None,
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        store.write_record(&VersionRecord {
            format: 1,
            version,
            label: None,
            message: p
                .message
                .clone()
                .or_else(|| Some(format!("sync-file {}/{}", p.component, p.path))),
            author: p.author.clone(),
            time: now.as_secs(),
            time_nanos: now.subsec_nanos(),
            parent: Some(p.base),
            components,
            files,
            bytes,
        })?;
    }
    if let Some(key) = p.signer {
        super::sign_version(store, &version, key)?;
    }
    Ok((version, true))
}

/// Returns `tree` with the entry at `path` set to `content` (or removed),
/// storing every tree on the way up.
fn set(
    writer: &Writer<'_>,
    tree: &TreeId,
    path: &[TreeName],
    content: Option<&Content>,
    shown: &str,
) -> Result<TreeId, BuildError> {
    let store = writer.store();
    let t = store.tree(tree)?;
    let mut entries: Vec<Entry> = t.entries().to_vec();
    let name = &path[0];
    let at = entries.iter().position(|e| &e.name == name);
    if path.len() == 1 {
        match (at, content) {
            (Some(i), Some(c)) => entries[i].content = c.clone(),
            (None, Some(c)) => entries.push(Entry {
                name: name.clone(),
                content: c.clone(),
            }),
            (Some(i), None) => {
                entries.remove(i);
            }
            (None, None) => {
                return Err(BuildError::BadEntry {
                    path: shown.into(),
                    why: "is neither in staging nor in the version".into(),
                });
            }
        }
    } else {
        let sub = match at.map(|i| &entries[i].content) {
            Some(Content::Dir { tree, .. }) => *tree,
            Some(_) => {
                return Err(BuildError::BadEntry {
                    path: shown.into(),
                    why: format!("{name} is not a directory in the version"),
                });
            }
            None => put_tree(writer, &Tree::default())?,
        };
        let new_sub = set(writer, &sub, &path[1..], content, shown)?;
        let (size, files) = store.tree(&new_sub)?.totals();
        let c = Content::Dir {
            tree: new_sub,
            size,
            files,
        };
        match at {
            Some(i) => entries[i].content = c,
            None => entries.push(Entry {
                name: name.clone(),
                content: c,
            }),
        }
    }
    let t = Tree::new(entries).expect("names stay unique");
    Ok(put_tree(writer, &t)?)
}
