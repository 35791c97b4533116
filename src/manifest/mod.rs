//! The deploy host's side: turns staging directories into a version.
//!
//! Data path: walk each component (symlinks never followed) ->
//! reuse chunk lists from the stat cache or read, chunk and store the file
//! (rayon, in parallel) -> assemble one tree per directory bottom-up -> a
//! root tree over the components, whose ID is the version ID -> one
//! `syncfs` -> the version record and label. Nothing references an object
//! before it is durable, so a crash or a full disk at any point leaves the
//! store valid (at worst with unreferenced objects that gc removes).

pub mod change;
pub mod statcache;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rayon::prelude::*;
use thiserror::Error;

use crate::config::Component;
use crate::progress::Meter;
use crate::store::chunk;
use crate::store::disk::{ComponentRecord, Store, StoreError, VersionRecord, Writer};
use crate::store::id::{ChunkId, ObjectKind, TreeId, VersionId};
use crate::store::signature::{SignatureError, SignedVersion, SigningKey, Statement};
use crate::store::tree::{ChunkRef, Content, Entry, MAX_DEPTH, MAX_TARGET_LEN, Tree, TreeName};
use statcache::{Cached, Stamp, StatCache};

/// How often a file that keeps changing under us is re-read before giving up.
const CHANGE_RETRIES: usize = 3;

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("component {component}: {path}: {source}")]
    Walk {
        component: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: cannot read it ({source}): fix its permissions or exclude it")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: is a {kind}; scap deploys regular files, symlinks and directories: remove it or exclude it"
    )]
    Special { path: PathBuf, kind: &'static str },
    #[error("{path}: {why}")]
    BadEntry { path: PathBuf, why: String },
    #[error(
        "{path}: changed while being hashed, {CHANGE_RETRIES} times: stop whatever is writing to it, then build again"
    )]
    KeptChanging { path: PathBuf },
    #[error("component {name}: {path} is not a directory")]
    NotADirectory { name: String, path: PathBuf },
    #[error(
        "label {label:?} already names version {existing}: choose another label, or pass --move-label"
    )]
    LabelTaken { label: String, existing: VersionId },
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

/// Signs version `v` with `key`: adds the key's signature to the version's
/// statement (made from its record and labels if it has none yet), in
/// `versions/<id>.sig`. Returns the signatures.
pub fn sign_version(
    store: &Store,
    v: &VersionId,
    key: &SigningKey,
) -> Result<SignedVersion, BuildError> {
    let mut doc = match store.signature(v)? {
        Some(doc) => doc,
        None => {
            let record = store
                .record(v)?
                .ok_or_else(|| StoreError::UnknownVersion(v.to_hex()))?;
            let labels: Vec<String> = store
                .labels()?
                .into_iter()
                .filter(|(_, lv)| lv == v)
                .map(|(l, _)| l)
                .collect();
            let statement = Statement::new(*v, record.parent, labels, &record.author, record.time);
            key.sign(&statement)?
        }
    };
    key.sign_into(&mut doc)?;
    store.write_signature(v, &doc)?;
    Ok(doc)
}

pub struct BuildOptions {
    pub components: Vec<Component>,
    pub label: Option<String>,
    pub move_label: bool,
    pub message: Option<String>,
    pub author: String,
    /// The version this one derives from; default: the newest recorded one.
    pub parent: Option<VersionId>,
    /// The deploy key that signs the version (none: unsigned).
    pub signer: Option<std::sync::Arc<SigningKey>>,
}

/// What a build did, for people and benchmarks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    pub version: VersionId,
    pub record: VersionRecord,
    /// False when this exact version was already in the store.
    pub new_version: bool,
    pub files: u64,
    pub bytes: u64,
    /// Files read and hashed (the rest came from the stat cache).
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    pub new_objects: u64,
    pub new_object_bytes: u64,
    pub seconds: f64,
}

/// One thing found by the walk, in pre-order: a directory comes before
/// everything inside it, siblings in name order.
struct Item {
    depth: usize,
    /// Where the last path element starts in `rel` (saves a second copy of
    /// every name: this list has an entry per file of the tree).
    name_at: u32,
    /// Path relative to the component root, as bytes: the stat cache key.
    rel: Vec<u8>,
    kind: ItemKind,
}

impl Item {
    fn name(&self, component: &Component) -> TreeName {
        if self.depth == 0 {
            return component.name.clone();
        }
        TreeName::new(self.file_name().as_bytes().to_vec()).expect("checked by the walk")
    }

    /// The last element of its path.
    fn file_name(&self) -> &OsStr {
        OsStr::from_bytes(&self.rel[self.name_at as usize..])
    }
}

enum ItemKind {
    File { executable: bool, stamp: Stamp },
    Symlink { target: Vec<u8> },
    Dir,
}

pub fn build(
    store: &Store,
    opts: &BuildOptions,
    meter: &dyn Meter,
) -> Result<BuildReport, BuildError> {
    let started = Instant::now();
    if let Some(label) = &opts.label {
        crate::store::disk::check_label(label)?;
    }
    let writer = store.writer()?;
    let generation = store.gc_generation()?;
    let mut totals = Totals::default();
    let mut root_entries = Vec::new();
    let mut components = Vec::new();
    let mut caches = Vec::new();
    for component in &opts.components {
        let (tree, files, bytes, cache) =
            build_component(&writer, component, b"", generation, meter, &mut totals)?;
        caches.extend(cache);
        components.push(ComponentRecord {
            name: component.name.to_string(),
            tree,
            files,
            bytes,
        });
        root_entries.push(Entry {
            name: component.name.clone(),
            content: Content::Dir {
                tree,
                size: bytes,
                files,
            },
        });
    }
    let root = Tree::new(root_entries).expect("component names are unique");
    let root_id = put_tree(&writer, &root)?;
    let version = VersionId::from(root_id);
    let (new_objects, new_object_bytes) = writer.written();
    crate::failpoint::hit("build:objects-written");
    let phase = Instant::now();
    // Held until the record and label are durable: gc cannot sweep the new
    // objects before something references them.
    let committed = writer.commit()?;
    tracing::debug!("commit (syncfs) in {:?}", phase.elapsed());
    crate::failpoint::hit("build:committed");

    let (bytes, files) = root.totals();
    // Where the label points now: moved only from there (unless
    // `move_label`), so a build never overwrites a label made meanwhile.
    let seen = match &opts.label {
        Some(label) => store.label(label)?,
        None => None,
    };
    if let Some(label) = &opts.label
        && let Some(existing) = seen
        && existing != version
        && !opts.move_label
    {
        return Err(BuildError::LabelTaken {
            label: label.clone(),
            existing,
        });
    }
    let existing = store.record(&version)?;
    let new_version = existing.is_none();
    let record = match existing {
        Some(r) => r,
        None => {
            let parent = match opts.parent {
                Some(p) => Some(p),
                None => store.records()?.first().map(|r| r.version),
            };
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let record = VersionRecord {
                format: 1,
                version,
                label: opts.label.clone(),
                message: opts.message.clone(),
                author: opts.author.clone(),
                time: now.as_secs(),
                time_nanos: now.subsec_nanos(),
                parent: parent.filter(|p| *p != version),
                change: None,
                components,
                files,
                bytes,
            };
            store.write_record(&record)?;
            crate::failpoint::hit("build:recorded");
            record
        }
    };
    if let Some(label) = &opts.label {
        let mv = crate::store::disk::LabelMove::now(
            &opts.author,
            version,
            "build",
            opts.message.as_deref().unwrap_or("build-manifest"),
        );
        store.move_label(label, (!opts.move_label).then_some(seen), &mv)?;
    }
    if let Some(key) = &opts.signer {
        sign_version(store, &version, key)?;
    }
    drop(committed);
    crate::failpoint::hit("build:labelled");
    // Only now: a cache saved before the commit could describe chunks a
    // crash then tore (recovery would bump the gc generation, but the
    // cache must never be ahead of the store it describes).
    for (path, bytes) in caches {
        if let Err(e) = statcache::write(&path, &bytes) {
            tracing::warn!("{}: cannot save the stat cache: {e}", path.display());
        }
    }
    Ok(BuildReport {
        version,
        record,
        new_version,
        files,
        bytes,
        hashed_files: totals.hashed_files,
        hashed_bytes: totals.hashed_bytes,
        new_objects,
        new_object_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[derive(Default)]
struct Totals {
    hashed_files: u64,
    hashed_bytes: u64,
}

/// Stores what each of `rels` (paths relative to `component`'s root: a
/// file, a symlink or a directory) holds now, each as a tree of one entry
/// named as the path's last element: what a build step produced, kept so
/// that it can be put back without running the step ([`extract`]).
/// Returns the trees, in the order of `rels`, and the store lock to hold
/// until they are referenced.
pub fn store_paths(
    store: &Store,
    component: &Component,
    rels: &[String],
) -> Result<(Vec<TreeId>, crate::store::disk::Committed), BuildError> {
    let writer = store.writer()?;
    let generation = store.gc_generation()?;
    let mut out = Vec::new();
    for rel in rels {
        let path = component.path.join(rel);
        let name = path
            .file_name()
            .and_then(|n| TreeName::new(n.as_bytes().to_vec()).ok())
            .ok_or_else(|| BuildError::BadEntry {
                path: path.clone(),
                why: "not a path to a file or directory".into(),
            })?;
        let meta = fs::symlink_metadata(&path).map_err(|source| BuildError::Walk {
            component: component.name.to_string(),
            path: path.clone(),
            source,
        })?;
        let content = if meta.is_dir() {
            let mut totals = Totals::default();
            let (tree, files, size, _) = build_component(
                &writer,
                component,
                rel.as_bytes(),
                generation,
                &crate::progress::Silent,
                &mut totals,
            )?;
            Content::Dir { tree, size, files }
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).map_err(|source| BuildError::Unreadable {
                path: path.clone(),
                source,
            })?;
            Content::Symlink {
                target: target.into_os_string().into_vec(),
            }
        } else if meta.is_file() {
            let c = hash_file(&writer, &path, Stamp::of(&meta))?;
            Content::File {
                executable: meta.permissions().mode() & 0o111 != 0,
                size: c.stamp.size,
                chunks: c.chunks,
            }
        } else {
            return Err(BuildError::Special {
                path,
                kind: "special file",
            });
        };
        let tree = Tree::new(vec![Entry { name, content }]).expect("one entry");
        out.push(put_tree(&writer, &tree)?);
    }
    let committed = writer.commit()?;
    Ok((out, committed))
}

/// Whether every object `content` reaches is in `store`.
pub fn complete(store: &Store, content: &Content) -> bool {
    match content {
        Content::File { chunks, .. } => chunks.iter().all(|c| store.has(&c.id.object())),
        Content::Symlink { .. } => true,
        Content::Dir { tree, .. } => store
            .tree(tree)
            .is_ok_and(|t| t.entries().iter().all(|e| complete(store, &e.content))),
    }
}

/// Writes `content` at `dest` (which must not exist), from `store`: a
/// directory with everything in it, a file (with its executable bit), or
/// a symlink. Symlinks are written as links, never followed.
pub fn extract(store: &Store, content: &Content, dest: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: dest.to_path_buf(),
        source,
    };
    match content {
        Content::Dir { tree, .. } => {
            fs::create_dir(dest).map_err(io)?;
            for e in store.tree(tree)?.entries() {
                extract(
                    store,
                    &e.content,
                    &dest.join(OsStr::from_bytes(e.name.as_bytes())),
                )?;
            }
        }
        Content::Symlink { target } => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), dest).map_err(io)?;
        }
        Content::File { executable, .. } => {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if *executable { 0o755 } else { 0o644 })
                .open(dest)
                .map_err(io)?;
            store.write_file(content, &mut f, dest)?;
        }
    }
    Ok(())
}

/// A component's tree, its files and bytes, and its stat cache (path and
/// encoded bytes) to save once the build is committed.
type ComponentResult = (TreeId, u64, u64, Option<(PathBuf, Vec<u8>)>);

/// Builds a component's tree, or (`sub` not empty) the tree of one of its
/// directories, `sub` relative to the component root (`scap sync-dir`):
/// exclude globs and stat-cache keys stay relative to the component root.
/// A stat cache to save comes back only for a whole component.
fn build_component(
    writer: &Writer<'_>,
    component: &Component,
    sub: &[u8],
    generation: u64,
    meter: &dyn Meter,
    totals: &mut Totals,
) -> Result<ComponentResult, BuildError> {
    let root = &component.path;
    let top = if sub.is_empty() {
        root.clone()
    } else {
        root.join(OsStr::from_bytes(sub))
    };
    let meta = fs::symlink_metadata(&top).map_err(|source| BuildError::Walk {
        component: component.name.to_string(),
        path: top.clone(),
        source,
    })?;
    // A component root may be a symlink (to the staging checkout); a
    // directory inside one is a directory, never followed.
    let is_dir = meta.is_dir() || (sub.is_empty() && fs::metadata(&top).is_ok_and(|m| m.is_dir()));
    if !is_dir {
        return Err(BuildError::NotADirectory {
            name: component.name.to_string(),
            path: top,
        });
    }
    let store = writer.store();
    let cache_path = cache_path(store, component);
    let walk_start_ns = unix_now_ns();
    // The cache is read (and its checksum checked) while the tree is walked.
    let (cache, items) = std::thread::scope(|s| {
        let cache = s.spawn(|| StatCache::load(&cache_path));
        let phase = Instant::now();
        let items = walk(component, &top, sub);
        tracing::debug!(
            "{}: walked {} entries in {:?}",
            component.name,
            items.as_ref().map_or(0, Vec::len),
            phase.elapsed()
        );
        (
            cache.join().expect("loading a stat cache does not panic"),
            items,
        )
    });
    let items = items?;
    let trust_presence = cache.generation == generation;

    let phase = Instant::now();
    // Files whose stat matches the cache take its chunk lists; the others
    // are read. After a gc, cached chunks are checked for presence.
    let mut cache = cache;
    let cached_entries = cache.left();
    let mut chunks_of: Vec<Option<Cached>> = Vec::with_capacity(items.len());
    let mut unsure: Vec<usize> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let found = match &item.kind {
            ItemKind::File { stamp, .. } => cache.take(&item.rel, stamp),
            _ => None,
        };
        if found.is_some() && !trust_presence {
            unsure.push(i);
        }
        chunks_of.push(found);
    }
    drop(cache);
    let missing: Vec<usize> = unsure
        .par_iter()
        .copied()
        .filter(|&i| {
            let c = chunks_of[i].as_ref().expect("unsure entries are cached");
            !c.chunks.iter().all(|ch| store.has(&ch.id.object()))
        })
        .collect();
    for i in missing {
        chunks_of[i] = None;
    }
    let is_file = |item: &Item| matches!(item.kind, ItemKind::File { .. });
    let to_read = items
        .iter()
        .zip(&chunks_of)
        .filter(|(item, c)| is_file(item) && c.is_none())
        .count();
    tracing::debug!(
        "{}: {} of {cached_entries} cache entries used, {to_read} files to read",
        component.name,
        chunks_of.iter().filter(|c| c.is_some()).count(),
    );

    meter.start(to_read as u64, "hashing");
    let progress = meter;
    let hashed = Mutex::new((0u64, 0u64));
    items
        .par_iter()
        .zip(chunks_of.par_iter_mut())
        .filter(|(item, c)| is_file(item) && c.is_none())
        .try_for_each(|(item, slot)| {
            let ItemKind::File { stamp, .. } = &item.kind else {
                unreachable!("only files are read")
            };
            let path = root.join(OsStr::from_bytes(&item.rel));
            let c = hash_file(writer, &path, *stamp)?;
            let mut h = hashed.lock().expect("no panics while held");
            h.0 += 1;
            h.1 += c.stamp.size;
            drop(h);
            progress.inc(1);
            *slot = Some(c);
            Ok::<_, BuildError>(())
        })?;
    progress.finish();
    tracing::debug!(
        "{}: hashed and stored files in {:?}",
        component.name,
        phase.elapsed()
    );
    let phase = Instant::now();
    let (hf, hb) = hashed.into_inner().expect("no panics while held");
    totals.hashed_files += hf;
    totals.hashed_bytes += hb;

    // Assemble trees bottom-up. The walk is pre-order (a directory before
    // its contents), so a directory is complete when the walk comes back up
    // to its depth or above. The new stat cache is written on the way, in
    // the same order; a directory's build (`sub`) saves none (it would drop
    // every entry outside the directory).
    let mut next_cache = sub
        .is_empty()
        .then(|| statcache::Encoder::new(generation, walk_start_ns));
    let mut open: Vec<(usize, TreeName, Vec<Entry>)> = Vec::new();
    let mut root_tree = None;
    for (item, cached) in items.iter().zip(chunks_of) {
        while open.last().is_some_and(|(depth, ..)| *depth >= item.depth) {
            close_dir(writer, &mut open, &mut root_tree)?;
        }
        let content = match &item.kind {
            ItemKind::File { executable, .. } => {
                let c = cached.expect("every file was hashed");
                if let Some(enc) = &mut next_cache {
                    enc.push(&item.rel, &c);
                }
                Content::File {
                    executable: *executable,
                    size: c.stamp.size,
                    chunks: c.chunks,
                }
            }
            ItemKind::Symlink { target } => Content::Symlink {
                target: target.clone(),
            },
            ItemKind::Dir => {
                open.push((item.depth, item.name(component), Vec::new()));
                continue;
            }
        };
        let (.., parent) = open.last_mut().expect("the component root is open");
        parent.push(Entry {
            name: item.name(component),
            content,
        });
    }
    while !open.is_empty() {
        close_dir(writer, &mut open, &mut root_tree)?;
    }

    tracing::debug!("{}: stored trees in {:?}", component.name, phase.elapsed());
    let (tree, files, bytes) = root_tree.expect("the walk yields the component root last");
    let cache = next_cache.map(|enc| (cache_path, enc.finish()));
    Ok((tree, files, bytes, cache))
}

/// Stores the innermost open directory's tree and adds it to its parent
/// (or, for the component root, to `root`).
fn close_dir(
    writer: &Writer<'_>,
    open: &mut Vec<(usize, TreeName, Vec<Entry>)>,
    root: &mut Option<(TreeId, u64, u64)>,
) -> Result<(), BuildError> {
    let (_, name, entries) = open.pop().expect("a directory is open");
    let tree = Tree::new(entries).expect("a directory lists each name once");
    let id = put_tree(writer, &tree)?;
    let (size, files) = tree.totals();
    match open.last_mut() {
        Some((.., parent)) => parent.push(Entry {
            name,
            content: Content::Dir {
                tree: id,
                size,
                files,
            },
        }),
        None => *root = Some((id, files, size)),
    }
    Ok(())
}

fn cache_path(store: &Store, component: &Component) -> PathBuf {
    let abs = fs::canonicalize(&component.path).unwrap_or_else(|_| component.path.clone());
    let mut key = component.name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(abs.as_os_str().as_bytes());
    for g in &component.exclude_globs {
        key.push(0);
        key.extend_from_slice(g.as_bytes());
    }
    let hex = blake3::hash(&key).to_hex();
    store.cache_dir().join(format!("stat-{}", &hex[..32]))
}

pub(crate) fn put_tree(writer: &Writer<'_>, tree: &Tree) -> Result<TreeId, StoreError> {
    let put = writer.put(ObjectKind::Tree, &tree.encode())?;
    Ok(TreeId::new(put.id))
}

/// Directory depth down to which the walk fans out over rayon; below it,
/// each subtree is read by one thread.
const PARALLEL_DEPTH: usize = 3;

/// Walks one component, symlinks not followed, excluded paths pruned, in
/// pre-order with siblings sorted by name bytes (the stat cache's order,
/// [`statcache::walk_cmp`]). The top levels are read in parallel, each
/// subtree below them by one thread. Every `stat` is relative to its
/// directory's descriptor (`statx(dirfd, name)`), not a path looked up again
/// from the root.
fn walk(component: &Component, top: &Path, sub: &[u8]) -> Result<Vec<Item>, BuildError> {
    let mut items = vec![Item {
        depth: 0,
        name_at: 0,
        rel: sub.to_vec(),
        kind: ItemKind::Dir,
    }];
    items.extend(scan(component, top, sub, 1)?);
    Ok(items)
}

/// The items below directory `abs` (component-relative `rel`), whose
/// entries are at `depth`.
fn scan(
    component: &Component,
    abs: &Path,
    rel: &[u8],
    depth: usize,
) -> Result<Vec<Item>, BuildError> {
    if depth > PARALLEL_DEPTH {
        let mut out = Vec::new();
        scan_into(component, abs, rel, depth, &mut out)?;
        return Ok(out);
    }
    let own = read_one(component, abs, rel, depth)?;
    let below: Vec<Vec<Item>> = own
        .par_iter()
        .filter(|it| matches!(it.kind, ItemKind::Dir))
        .map(|it| scan(component, &abs.join(it.file_name()), &it.rel, depth + 1))
        .collect::<Result<_, _>>()?;
    let mut below = below.into_iter();
    let mut out = Vec::with_capacity(own.len());
    for it in own {
        let is_dir = matches!(it.kind, ItemKind::Dir);
        out.push(it);
        if is_dir {
            out.extend(below.next().expect("one list per subdirectory"));
        }
    }
    Ok(out)
}

/// Appends the items below directory `abs` to `out`, in pre-order, on this
/// thread.
fn scan_into(
    component: &Component,
    abs: &Path,
    rel: &[u8],
    depth: usize,
    out: &mut Vec<Item>,
) -> Result<(), BuildError> {
    for it in read_one(component, abs, rel, depth)? {
        if matches!(it.kind, ItemKind::Dir) {
            let path = abs.join(it.file_name());
            let rel = it.rel.clone();
            out.push(it);
            scan_into(component, &path, &rel, depth + 1, out)?;
        } else {
            out.push(it);
        }
    }
    Ok(())
}

/// The entries of directory `abs` (component-relative `rel`) as items at
/// `depth`, sorted by name, excluded ones left out.
fn read_one(
    component: &Component,
    abs: &Path,
    rel: &[u8],
    depth: usize,
) -> Result<Vec<Item>, BuildError> {
    let walk_err = |path: &Path, source: io::Error| walk_error(component, path, source);
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(abs)
        .map_err(|e| walk_err(abs, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| walk_err(abs, e))?;
    entries.sort_by_cached_key(|e| e.file_name());
    let mut own: Vec<Item> = Vec::with_capacity(entries.len());
    for e in entries {
        let child = child_rel(rel, e.file_name().as_bytes());
        if component.exclude.is_match(OsStr::from_bytes(&child)) {
            continue;
        }
        let path = || e.path();
        let ft = e.file_type().map_err(|err| walk_err(&path(), err))?;
        let kind = classify(&path, ft, || e.metadata())?;
        own.push(item(&path, child, depth, kind)?);
    }
    Ok(own)
}

fn child_rel(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut child = Vec::with_capacity(rel.len() + 1 + name.len());
    if !rel.is_empty() {
        child.extend_from_slice(rel);
        child.push(b'/');
    }
    child.extend_from_slice(name);
    child
}

fn walk_error(component: &Component, path: &Path, source: io::Error) -> BuildError {
    if source.kind() == io::ErrorKind::PermissionDenied {
        BuildError::Unreadable {
            path: path.to_path_buf(),
            source,
        }
    } else {
        BuildError::Walk {
            component: component.name.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }
}

fn item(
    path: &dyn Fn() -> PathBuf,
    rel: Vec<u8>,
    depth: usize,
    kind: ItemKind,
) -> Result<Item, BuildError> {
    if depth > MAX_DEPTH {
        return Err(BuildError::BadEntry {
            path: path(),
            why: format!("nested deeper than {MAX_DEPTH} directories: no host would accept it"),
        });
    }
    let name_at = rel.iter().rposition(|&c| c == b'/').map_or(0, |i| i + 1);
    // Checked once here; `Item::name` relies on it.
    TreeName::new(rel[name_at..].to_vec()).map_err(|e| BuildError::BadEntry {
        path: path(),
        why: e.to_string(),
    })?;
    Ok(Item {
        depth,
        name_at: name_at as u32,
        rel,
        kind,
    })
}

/// What a directory entry is; fails on what scap does not deploy.
fn classify(
    path: &dyn Fn() -> PathBuf,
    ft: fs::FileType,
    meta: impl FnOnce() -> io::Result<fs::Metadata>,
) -> Result<ItemKind, BuildError> {
    let walk_err = |source| BuildError::Walk {
        component: String::new(),
        path: path(),
        source,
    };
    if ft.is_dir() {
        Ok(ItemKind::Dir)
    } else if ft.is_symlink() {
        let target = fs::read_link(path())
            .map_err(walk_err)?
            .into_os_string()
            .into_vec();
        if target.len() > MAX_TARGET_LEN {
            return Err(BuildError::BadEntry {
                path: path(),
                why: "symlink target longer than 4095 bytes".into(),
            });
        }
        Ok(ItemKind::Symlink { target })
    } else if ft.is_file() {
        let meta = meta().map_err(|e| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                BuildError::Unreadable {
                    path: path(),
                    source: e,
                }
            } else {
                walk_err(e)
            }
        })?;
        Ok(ItemKind::File {
            executable: meta.permissions().mode() & 0o111 != 0,
            stamp: Stamp::of(&meta),
        })
    } else {
        let kind = if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() {
            "block device"
        } else {
            "character device"
        };
        Err(BuildError::Special { path: path(), kind })
    }
}

/// Reads, chunks and stores one file; retries when it changes underneath.
/// `stamp` is what the walk saw; the file must still match it after being
/// read, or it is read again.
pub(crate) fn hash_file(
    writer: &Writer<'_>,
    path: &Path,
    stamp: Stamp,
) -> Result<Cached, BuildError> {
    let unreadable = |source| BuildError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut before = stamp;
    for _ in 0..CHANGE_RETRIES {
        let read_start_ns = unix_now_ns();
        let file = File::open(path).map_err(unreadable)?;
        let mut chunks = Vec::new();
        let mut read: u64 = 0;
        chunk::for_each_chunk(&file, before.size, |data| -> Result<(), BuildError> {
            let put = writer.put(ObjectKind::Chunk, data)?;
            read += data.len() as u64;
            chunks.push(ChunkRef {
                id: ChunkId::new(put.id),
                len: data.len() as u32,
            });
            Ok(())
        })
        .map_err(|e| match e {
            chunk::ChunkError::Read(source) => unreadable(source),
            chunk::ChunkError::Sink(e) => e,
        })?;
        let after = Stamp::of(&file.metadata().map_err(unreadable)?);
        // The bytes we stored are the bytes we hashed, always; but if the file
        // changed meanwhile they may be a mix of two contents, so read again.
        // Timestamps are coarse (a jiffy on ext4): a same-size rewrite of a
        // file changed within the last second may leave its stat data as it
        // was, so such a file is read twice and must read the same.
        let racy = after.mtime_ns >= read_start_ns - 1_000_000_000
            || after.ctime_ns >= read_start_ns - 1_000_000_000;
        if before == after
            && read == after.size
            && (!racy || rehash(path, after.size).as_ref() == Some(&chunks))
        {
            return Ok(Cached {
                stamp: after,
                chunks,
            });
        }
        before = after;
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BuildError::KeptChanging {
        path: path.to_path_buf(),
    })
}

/// The chunk list of what `path` holds now (nothing stored), or `None` if
/// it cannot be read.
fn rehash(path: &Path, size: u64) -> Option<Vec<ChunkRef>> {
    let file = File::open(path).ok()?;
    let mut chunks = Vec::new();
    chunk::for_each_chunk::<_, ()>(&file, size, |data| {
        chunks.push(ChunkRef {
            id: ChunkId::new(ObjectKind::Chunk.hash(data)),
            len: data.len() as u32,
        });
        Ok(())
    })
    .ok()?;
    Some(chunks)
}

fn unix_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
