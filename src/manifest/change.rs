//! A change (`scap sync-file`, `scap sync-dir`, a backport, a config
//! change) applied to every live train at once.
//!
//! A fleet often runs two trains (the new one on a canary share, the old
//! one on the rest) and holds others as previous or stable. A change is
//! tree surgery on each of those versions: the path is taken from staging
//! (a file or symlink, or a whole directory, hashed once) and set in each
//! version, everything else untouched. Each base gets its own new version,
//! recorded with the base as parent and one change ID and message shared by
//! all of them, so `scap log` and `scap diff` can show how they descend.
//!
//! A change reaches only the versions that have the path, or (to create
//! it, with `create`) the directory it goes in: a file under
//! `php-1.46.0-wmf.6/` never creates `php-1.46.0-wmf.6/` in another
//! train. No directory is ever created on the way to the path.
//!
//! **Invariant:** no version is recorded until every new tree is durable
//! (one commit for all of them), and the whole change is refused, with no
//! record written, if the path is a file in one live version and a
//! directory in another, or in none of them (unless `create`, and then
//! some version must have its directory).

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use super::{BuildError, hash_file, put_tree};
use crate::config::Component;
use crate::progress::Meter;
use crate::store::disk::{ComponentRecord, Store, VersionRecord, Writer};
use crate::store::tree::{Content, Entry, Tree, TreeName};
use crate::store::{TreeId, VersionId};

/// What a change takes from staging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A file or symlink (`sync-file`).
    File,
    /// A directory and everything in it (`sync-dir`).
    Dir,
}

/// A check of a base before a change is built: what is wrong, for people.
pub type BaseCheck<'a> = dyn Fn(&Store, &VersionId) -> Vec<String> + Sync + 'a;

pub struct ChangeSpec<'a> {
    /// Shared by every version this change makes.
    pub id: String,
    /// The live versions to apply it to.
    pub bases: Vec<VersionId>,
    /// The component (its name, staging directory and exclude globs).
    pub component: &'a Component,
    /// Path inside the component, e.g. "wmf-config/InitialiseSettings.php".
    pub path: &'a str,
    pub kind: Kind,
    /// Allow a path that no live version has (a new file).
    pub create: bool,
    pub message: String,
    pub author: String,
    /// The deploy key that signs the new versions (none: unsigned).
    pub signer: Option<&'a super::SigningKey>,
    /// Build the trees but record and sign nothing (`--dry-run`).
    pub dry_run: bool,
    /// Checked against each base before anything is built (wikiversions.json's
    /// branches in each train): what is wrong, for people.
    pub check: Option<&'a BaseCheck<'a>>,
}

/// One base and what the change made of it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Applied {
    pub base: VersionId,
    pub version: VersionId,
    /// The paths that differ, `git --name-status` style ("M wmf-config/x").
    pub files: Vec<String>,
    /// Why the change leaves this base alone (it has neither the path
    /// nor the directory it is in), if it does.
    pub skipped: Option<String>,
    /// The path is new in this base (`create`).
    pub created: bool,
    /// The new version was recorded before (the change gives an earlier
    /// tree back: a revert): a new step in the train's history.
    pub revert: bool,
}

impl Applied {
    /// Whether the change altered this base at all.
    pub fn changed(&self) -> bool {
        self.base != self.version
    }
}

/// What a path is in a version or in staging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum What {
    File,
    Dir,
}

impl What {
    fn of(c: &Content) -> What {
        match c {
            Content::Dir { .. } => What::Dir,
            _ => What::File,
        }
    }

    fn name(self) -> &'static str {
        match self {
            What::File => "a file",
            What::Dir => "a directory",
        }
    }
}

fn bad(path: &str, why: String) -> BuildError {
    BuildError::BadEntry {
        path: path.into(),
        why,
    }
}

/// Applies the change to every base; returns one [`Applied`] per base, in
/// the order given.
pub fn apply(
    store: &Store,
    spec: &ChangeSpec<'_>,
    meter: &dyn Meter,
) -> Result<Vec<Applied>, BuildError> {
    let shown = format!("{}/{}", spec.component.name, spec.path);
    let parts: Vec<TreeName> = spec
        .path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .map(|s| {
            if s == ".." {
                return Err(bad(
                    spec.path,
                    "'..' is not allowed: give a path inside the component".into(),
                ));
            }
            TreeName::new(s.as_bytes().to_vec()).map_err(|e| bad(spec.path, e.to_string()))
        })
        .collect::<Result<_, _>>()?;
    if parts.is_empty() {
        return Err(bad(
            spec.path,
            "name a file or directory inside the component".into(),
        ));
    }
    if spec.bases.is_empty() {
        return Err(bad(
            &shown,
            "no live version to apply it to: deploy a version first (scap sync)".into(),
        ));
    }
    let mut full = vec![spec.component.name.clone()];
    full.extend(parts.iter().cloned());

    // What the path is in each live version, and whether the directory
    // it goes in is there. A base with neither is left alone.
    let mut seen: Vec<(VersionId, Option<What>)> = Vec::new();
    let mut has_dir: Vec<VersionId> = Vec::new();
    let dir_path = &full[..full.len() - 1];
    let dir_shown = dir_path
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join("/");
    for base in &spec.bases {
        let what = lookup(store, &base.root(), &full)?.map(|c| What::of(&c));
        let dir = matches!(
            lookup(store, &base.root(), dir_path)?,
            Some(Content::Dir { .. })
        );
        if dir {
            has_dir.push(*base);
        }
        seen.push((*base, what));
    }
    let mut kinds: Vec<What> = Vec::new();
    for w in seen.iter().filter_map(|(_, w)| *w) {
        if !kinds.contains(&w) {
            kinds.push(w);
        }
    }
    if kinds.len() > 1 {
        let list = |w: What| {
            seen.iter()
                .filter(|(_, x)| *x == Some(w))
                .map(|(v, _)| v.short())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(bad(
            &shown,
            format!(
                "is a file in {} and a directory in {}: a change cannot apply to both; deploy one train everywhere first, or build a new version with build-manifest",
                list(What::File),
                list(What::Dir)
            ),
        ));
    }
    let in_versions = kinds.first().copied();
    let listed = || {
        spec.bases
            .iter()
            .map(VersionId::short)
            .collect::<Vec<_>>()
            .join(", ")
    };

    // What it is in staging (no symlink crossed on the way there).
    let staging = &spec.component.path;
    let source = staging.join(spec.path.trim_start_matches('/'));
    check_no_symlink_above(staging, &parts)?;
    let in_staging = match std::fs::symlink_metadata(&source) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(BuildError::Unreadable {
                path: source,
                source: e,
            });
        }
        Ok(m) if m.is_dir() => Some(What::Dir),
        Ok(_) => Some(What::File),
    };
    if in_staging.is_some() && in_versions.is_none() && spec.create && has_dir.is_empty() {
        return Err(bad(
            &shown,
            format!(
                "its directory {dir_shown}/ is in none of the live versions ({}): a change never creates directories on the way; create the directory with sync-dir --create, or build a new version with build-manifest",
                listed()
            ),
        ));
    }
    match (spec.kind, in_staging, in_versions) {
        (_, None, None) => {
            return Err(bad(
                &shown,
                format!(
                    "is neither in staging ({}) nor in any live version ({}): check the path (relative to the component's staging directory)",
                    source.display(),
                    listed()
                ),
            ));
        }
        (_, Some(_), None) if !spec.create => {
            return Err(bad(
                &shown,
                format!(
                    "is in none of the live versions ({}): check the path, or pass --create to add it as a new {}",
                    listed(),
                    match spec.kind {
                        Kind::File => "file",
                        Kind::Dir => "directory",
                    }
                ),
            ));
        }
        (Kind::File, Some(What::Dir), _) | (Kind::File, None, Some(What::Dir)) => {
            return Err(bad(
                &shown,
                "is a directory: use `scap sync-dir` for directories".into(),
            ));
        }
        (Kind::Dir, Some(What::File), _) | (Kind::Dir, None, Some(What::File)) => {
            return Err(bad(
                &shown,
                "is a file (or symlink): use `scap sync-file` for files".into(),
            ));
        }
        (_, Some(s), Some(v)) if s != v => {
            return Err(bad(
                &shown,
                format!(
                    "is {} in staging but {} in the live versions ({}): build a new version with build-manifest instead",
                    s.name(),
                    v.name(),
                    listed()
                ),
            ));
        }
        _ => {}
    }

    let writer = store.writer()?;
    let new_content: Option<Content> = match in_staging {
        None => None,
        Some(What::Dir) => {
            let generation = store.gc_generation()?;
            let mut totals = super::Totals::default();
            let sub: Vec<u8> = parts
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect::<Vec<_>>()
                .join(&b'/');
            let (tree, files, size, _cache) = super::build_component(
                &writer,
                spec.component,
                &sub,
                generation,
                meter,
                &mut totals,
            )?;
            Some(Content::Dir { tree, size, files })
        }
        Some(What::File) => Some(file_content(&writer, &source)?),
    };

    // The bases the change reaches: those with the path, and (to create
    // it) those with its directory.
    let mut roots: Vec<(VersionId, TreeId, Option<String>, bool)> = Vec::new();
    for (base, what) in &seen {
        let reach = what.is_some() || (new_content.is_some() && has_dir.contains(base));
        if !reach {
            let why = if has_dir.contains(base) {
                format!("{shown} is not in it")
            } else {
                format!("it has no {dir_shown}/")
            };
            roots.push((*base, base.root(), Some(why), false));
            continue;
        }
        let root = set(&writer, &base.root(), &full, new_content.as_ref(), &shown)?;
        roots.push((*base, root, None, what.is_none()));
    }
    // Held until the records are durable: gc cannot sweep the new trees.
    let _committed = writer.commit()?;
    crate::failpoint::hit("change:committed");

    let mut out = Vec::new();
    for (base, root, skipped, created) in roots {
        let version = VersionId::from(root);
        let revert = version != base && store.record(&version)?.is_some();
        let mut files = Vec::new();
        crate::store::diff::diff(store, &base.root(), &root, &mut |c| {
            files.push(format!(
                "{} {}",
                c.status.letter(),
                String::from_utf8_lossy(&c.path)
            ));
            Ok(())
        })?;
        if version != base && !spec.dry_run {
            record(store, spec, base, version)?;
            // A revert's tree keeps the signature it has: agents take it
            // on a deploy order newer than any they took (fleet::orders).
            if let Some(key) = spec.signer {
                super::sign_version(store, &version, key)?;
            }
        }
        out.push(Applied {
            base,
            version,
            files,
            skipped,
            created: created && version != base,
            revert,
        });
    }
    Ok(out)
}

/// The record of a version a change made from `base`.
fn record(
    store: &Store,
    spec: &ChangeSpec<'_>,
    base: VersionId,
    version: VersionId,
) -> Result<(), BuildError> {
    if store.record(&version)?.is_some() {
        return Ok(());
    }
    let tree = store.tree(&version.root())?;
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
        message: Some(spec.message.clone()),
        author: spec.author.clone(),
        time: now.as_secs(),
        time_nanos: now.subsec_nanos(),
        parent: Some(base),
        change: Some(spec.id.clone()),
        components,
        files,
        bytes,
    })?;
    Ok(())
}

/// A file or symlink from staging, its content stored.
fn file_content(writer: &Writer<'_>, source: &Path) -> Result<Content, BuildError> {
    let meta = std::fs::symlink_metadata(source).map_err(|e| BuildError::Unreadable {
        path: source.to_path_buf(),
        source: e,
    })?;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(source).map_err(|e| BuildError::Unreadable {
            path: source.to_path_buf(),
            source: e,
        })?;
        return Ok(Content::Symlink {
            target: target.into_os_string().into_vec(),
        });
    }
    if !meta.is_file() {
        return Err(BuildError::BadEntry {
            path: source.to_path_buf(),
            why: "is not a regular file, symlink or directory: scap does not deploy it".into(),
        });
    }
    use std::os::unix::fs::PermissionsExt;
    let c = hash_file(writer, source, super::statcache::Stamp::of(&meta))?;
    Ok(Content::File {
        executable: meta.permissions().mode() & 0o111 != 0,
        size: c.stamp.size,
        chunks: c.chunks,
    })
}

/// Refuses a path whose directories in staging include a symlink: the
/// version has a symlink there (or nothing), and reading through it would
/// take content from elsewhere.
fn check_no_symlink_above(staging: &Path, parts: &[TreeName]) -> Result<(), BuildError> {
    let mut p = staging.to_path_buf();
    for name in &parts[..parts.len() - 1] {
        p.push(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name.as_bytes()));
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(BuildError::BadEntry {
                    path: p,
                    why: "is a symlink in staging: a change is made below real directories only; sync the symlink itself, or the directory it points to".into(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// The content at `path` under `tree`, if any.
fn lookup(store: &Store, tree: &TreeId, path: &[TreeName]) -> Result<Option<Content>, BuildError> {
    let mut at = *tree;
    for (i, name) in path.iter().enumerate() {
        let t = store.tree(&at)?;
        let Some(e) = t.entries().iter().find(|e| &e.name == name) else {
            return Ok(None);
        };
        if i + 1 == path.len() {
            return Ok(Some(e.content.clone()));
        }
        match &e.content {
            Content::Dir { tree, .. } => at = *tree,
            _ => return Ok(None),
        }
    }
    Ok(None)
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
            // Not in this version, nor in staging: nothing to do here.
            (None, None) => return Ok(*tree),
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
            None if content.is_none() => return Ok(*tree),
            None => {
                return Err(BuildError::BadEntry {
                    path: shown.into(),
                    why: format!(
                        "{name}/ is not in the version: a change never creates directories on the way"
                    ),
                });
            }
        };
        let new_sub = set(writer, &sub, &path[1..], content, shown)?;
        if new_sub == sub && at.is_some() {
            return Ok(*tree);
        }
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

/// A change ID: the time and a hash of what it is, e.g.
/// `20261127T083012Z-3f9a1c2e`.
pub fn new_id(message: &str, path: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(message.as_bytes());
    h.update(path.as_bytes());
    h.update(&std::process::id().to_le_bytes());
    format!(
        "{}-{}",
        crate::time::fmt_compact(now.as_secs()),
        &h.finalize().to_hex()[..8]
    )
}

/// Maps each base to its new version (only those the change altered).
pub fn map(applied: &[Applied]) -> BTreeMap<VersionId, VersionId> {
    applied
        .iter()
        .filter(|a| a.changed())
        .map(|a| (a.base, a.version))
        .collect()
}
