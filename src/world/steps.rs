//! Build steps (`[[build]]` in scap.toml): commands run on the deploy host
//! before hashing, such as compiling wikiversions.json or rebuilding a
//! branch's localisation cache, cached by content.
//!
//! A step (or, with `per_branch`, each of its branches) has a **key**: the
//! BLAKE3 hash of its name, command, working directory, declared outputs,
//! and the path and content of every file its `inputs` globs match. When a
//! step with that key ran before, it does not run again:
//!
//! - its outputs are still in staging as it left them (the size, mtime and
//!   inode of every file match what was recorded): nothing to do;
//! - else they are written back from the store, where the outputs of every
//!   run are kept ([`crate::manifest::store_paths`]); if the store no
//!   longer has them all (gc), the step runs.
//!
//! A step that runs must finish within its timeout, exit 0, write every
//! output it declares, and change nothing else its component deploys
//! (compared by stat before and after; excluded paths may change): otherwise the deploy stops there, with the
//! step's output, before anything is built. Files matched by `inputs` are
//! hashed again only when their stat changed since the last key.
//!
//! On disk, in the store's cache directory (`cache/steps/`): `<key>.json`
//! per run (its outputs' trees and stamps), `<instance>.last.json` per
//! step and branch (the input hashes of its last key). Both are caches: a
//! lost or corrupt one means a step runs again, never a wrong output.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use globset::{Glob, GlobMatcher, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::cancel::Cancel;
use crate::config::{BuildStepConfig, Component, ConfigFile};
use crate::store::{Content, Store, TreeId};

/// How long a step may run unless scap.toml says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Paths listed when a step wrote outside its outputs.
const SHOWN_PATHS: usize = 10;

/// One `[[build]]` step, validated.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub command: String,
    pub component: Component,
    per_branch: Option<(String, GlobMatcher)>,
    dir: Option<String>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    timeout: Duration,
}

/// What a step (for one branch) did.
#[derive(Debug, Clone, Serialize)]
pub struct StepRun {
    pub step: String,
    pub branch: Option<String>,
    pub how: How,
    pub seconds: f64,
    pub key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum How {
    /// The command ran.
    Ran,
    /// Its inputs were as before and its outputs still in staging.
    Cached,
    /// Its inputs were as before; its outputs were written back from the
    /// store.
    Restored,
}

impl std::fmt::Display for StepRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match &self.branch {
            Some(b) => format!("{} ({b})", self.step),
            None => self.step.clone(),
        };
        match self.how {
            How::Ran => write!(f, "build step {name}: ran in {:.1}s", self.seconds),
            How::Cached => write!(f, "build step {name}: inputs unchanged, outputs in place"),
            How::Restored => write!(
                f,
                "build step {name}: inputs unchanged, outputs written back from the store in {:.1}s",
                self.seconds
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("scap.toml [[build]] {name:?}: {why}")]
    Config { name: String, why: String },
    #[error(
        "build step {name} failed ({status}); nothing was built or deployed{}",
        if output.is_empty() { String::new() } else { format!(":\n{output}") }
    )]
    Failed {
        name: String,
        status: String,
        output: String,
    },
    #[error(
        "build step {name} wrote outside its declared outputs ({outputs}): {paths}; nothing was built or deployed: declare them in scap.toml's [[build]] outputs, or fix the step"
    )]
    Outside {
        name: String,
        outputs: String,
        paths: String,
    },
    #[error(
        "build step {name} did not write its output {path}: fix the step or its outputs in scap.toml"
    )]
    NoOutput { name: String, path: String },
    #[error(
        "build step {name}: {path} is a symlink, on the way to its output {output}: scap writes and reads a step's outputs only through real directories; make it a directory"
    )]
    Symlink {
        name: String,
        path: PathBuf,
        output: String,
    },
    #[error("build step {name}: {path}: {source}")]
    Io {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("build step {name}: {source}")]
    Store {
        name: String,
        #[source]
        source: Box<crate::manifest::BuildError>,
    },
}

/// A path relative to a component: no leading `/`, no `..`, no empty part.
fn check_rel(p: &str) -> Result<(), String> {
    if p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|s| s.is_empty() || s == "..")
        || p.bytes().any(|b| b.is_ascii_control())
    {
        return Err(format!(
            "{p:?}: give a path relative to the component, without \"..\""
        ));
    }
    Ok(())
}

/// The steps scap.toml declares, with their components found among
/// `components`.
pub fn from_config(cfg: &ConfigFile, components: &[Component]) -> Result<Vec<Step>, StepError> {
    let mut out: Vec<Step> = Vec::new();
    for b in &cfg.builds {
        out.push(step(b, components)?);
        if out.iter().filter(|s| s.name == b.name).count() > 1 {
            return Err(StepError::Config {
                name: b.name.clone(),
                why: "two steps have this name: give each its own".into(),
            });
        }
    }
    Ok(out)
}

fn step(b: &BuildStepConfig, components: &[Component]) -> Result<Step, StepError> {
    let bad = |why: String| StepError::Config {
        name: b.name.clone(),
        why,
    };
    if b.name.is_empty()
        || b.name.len() > 64
        || !b
            .name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(bad(
            "name: letters, digits, '-', '_' and '.', at most 64".into()
        ));
    }
    if b.command.trim().is_empty() {
        return Err(bad("command is empty".into()));
    }
    let component = match &b.component {
        Some(c) => components.iter().find(|x| x.name.to_string() == *c),
        None => components.first(),
    }
    .ok_or_else(|| {
        bad(format!(
            "no component {:?} to run in: name one of scap.toml's [[component]]s",
            b.component.as_deref().unwrap_or("")
        ))
    })?
    .clone();
    let per_branch = b
        .per_branch
        .as_ref()
        .map(|g| {
            Glob::new(g)
                .map(|m| (g.clone(), m.compile_matcher()))
                .map_err(|e| bad(format!("per_branch {g:?}: {e}")))
        })
        .transpose()?;
    let uses_branch = |s: &str| s.contains("{branch}");
    if per_branch.is_none()
        && (b.dir.as_deref().is_some_and(uses_branch)
            || b.inputs.iter().chain(&b.outputs).any(|s| uses_branch(s)))
    {
        return Err(bad(
            "{branch} is used, but per_branch is not set: add per_branch = \"php-*\"".into(),
        ));
    }
    let sample = |s: &str| s.replace("{branch}", "php-x");
    if let Some(d) = &b.dir {
        check_rel(&sample(d)).map_err(|e| bad(format!("dir {e}")))?;
    }
    for o in &b.outputs {
        check_rel(&sample(o)).map_err(|e| bad(format!("outputs {e}")))?;
    }
    for i in &b.inputs {
        check_rel(&sample(i)).map_err(|e| bad(format!("inputs {e}")))?;
        Glob::new(&sample(i)).map_err(|e| bad(format!("inputs {i:?}: {e}")))?;
    }
    let timeout = match &b.timeout {
        Some(t) => crate::time::parse_duration(t).map_err(|e| bad(format!("timeout: {e}")))?,
        None => DEFAULT_TIMEOUT,
    };
    Ok(Step {
        name: b.name.clone(),
        command: b.command.clone(),
        component,
        per_branch,
        dir: b.dir.clone(),
        inputs: b.inputs.clone(),
        outputs: b.outputs.clone(),
        timeout,
    })
}

/// One step for one branch (or the step, without `per_branch`).
struct Instance<'a> {
    step: &'a Step,
    branch: Option<String>,
    command: String,
    dir: Option<String>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

impl Instance<'_> {
    fn shown(&self) -> String {
        match &self.branch {
            Some(b) => format!("{} ({b})", self.step.name),
            None => self.step.name.clone(),
        }
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> StepError {
        let name = self.shown();
        let path = path.to_path_buf();
        move |source| StepError::Io { name, path, source }
    }

    /// Names the cache files of this step and branch.
    fn id(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(self.step.name.as_bytes());
        h.update(&[0]);
        h.update(self.branch.as_deref().unwrap_or("").as_bytes());
        h.finalize().to_hex()[..24].to_string()
    }
}

impl Step {
    fn instances(&self) -> Result<Vec<Instance<'_>>, StepError> {
        let root = &self.component.path;
        let branches: Vec<Option<String>> = match &self.per_branch {
            None => vec![None],
            Some((_, m)) => {
                let mut found = Vec::new();
                let rd = std::fs::read_dir(root).map_err(|source| StepError::Io {
                    name: self.name.clone(),
                    path: root.clone(),
                    source,
                })?;
                for e in rd.flatten() {
                    let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                    let name = e.file_name();
                    if let Some(n) = name.to_str()
                        && is_dir
                        && m.is_match(n)
                        && check_rel(n).is_ok()
                    {
                        found.push(Some(n.to_string()));
                    }
                }
                found.sort();
                found
            }
        };
        Ok(branches
            .into_iter()
            .map(|branch| {
                let sub = |s: &str| match &branch {
                    Some(b) => s.replace("{branch}", b),
                    None => s.to_string(),
                };
                Instance {
                    step: self,
                    command: sub(&self.command),
                    dir: self.dir.as_deref().map(sub),
                    inputs: self.inputs.iter().map(|s| sub(s)).collect(),
                    outputs: self.outputs.iter().map(|s| sub(s)).collect(),
                    branch,
                }
            })
            .collect())
    }
}

/// A file's stat, as compared between runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            size: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
        }
    }
}

/// The input hashes behind a step's last key.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Last {
    inputs: BTreeMap<String, (FileStamp, String)>,
}

/// One run of a step: its outputs, kept.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    format: u32,
    step: String,
    branch: Option<String>,
    /// (path relative to the component, tree of one entry).
    outputs: Vec<(String, TreeId)>,
    /// Every file and symlink under the outputs, as staging had them.
    stamps: BTreeMap<String, FileStamp>,
    seconds: f64,
}

const ENTRY_FORMAT: u32 = 1;

fn cache_dir(store: &Store) -> PathBuf {
    store.cache_dir().join("steps")
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Writes `value` to `path` whole or not at all.
fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(value).expect("serializes"))?;
    std::fs::rename(&tmp, path)
}

/// The literal directory a glob starts in (`php-x/languages/i18n` for
/// `php-x/languages/i18n/**/*.json`).
fn glob_base(glob: &str) -> &str {
    let mut end = 0;
    for (i, part) in glob.split('/').enumerate() {
        if part.contains(['*', '?', '[', '{']) {
            break;
        }
        end = if i == 0 {
            part.len()
        } else {
            end + 1 + part.len()
        };
    }
    // A glob naming one file: its directory.
    if end == glob.len() {
        return glob.rsplit_once('/').map_or("", |(d, _)| d);
    }
    &glob[..end]
}

/// Every file and symlink under `rel` of `root` (or `rel` itself), with
/// its stat, symlinks not followed; nothing when `rel` does not exist.
fn stamps_under(
    root: &Path,
    rel: &str,
    skip: &dyn Fn(&str) -> bool,
    out: &mut BTreeMap<String, FileStamp>,
) -> std::io::Result<()> {
    let top = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let meta = match std::fs::symlink_metadata(&top) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        if !skip(rel) {
            out.insert(rel.to_string(), FileStamp::of(&meta));
        }
        return Ok(());
    }
    let mut stack = vec![(top, rel.to_string())];
    while let Some((dir, dir_rel)) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let name = e.file_name();
            let child_rel = if dir_rel.is_empty() {
                name.to_string_lossy().into_owned()
            } else {
                format!("{dir_rel}/{}", name.to_string_lossy())
            };
            if skip(&child_rel) {
                continue;
            }
            let m = e.metadata()?;
            if m.is_dir() {
                stack.push((e.path(), child_rel));
            } else {
                out.insert(child_rel, FileStamp::of(&m));
            }
        }
    }
    Ok(())
}

/// Whether `rel` is one of `outputs` or inside one.
fn in_outputs(outputs: &[String], rel: &str) -> bool {
    outputs.iter().any(|o| {
        rel == o
            || rel
                .strip_prefix(o.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// The key of an instance: its definition and its inputs' content (hashed
/// again only where the stat changed since `last`). Returns the key and
/// the inputs as hashed.
fn key(inst: &Instance<'_>, last: &Last) -> Result<(String, Last), StepError> {
    let root = &inst.step.component.path;
    let mut set = GlobSetBuilder::new();
    for g in &inst.inputs {
        set.add(
            globset::GlobBuilder::new(g)
                .literal_separator(true)
                .build()
                .map_err(|e| StepError::Config {
                    name: inst.step.name.clone(),
                    why: format!("inputs {g:?}: {e}"),
                })?,
        );
    }
    let set: GlobSet = set.build().map_err(|e| StepError::Config {
        name: inst.step.name.clone(),
        why: e.to_string(),
    })?;
    let mut files = BTreeMap::new();
    let mut bases: Vec<&str> = inst.inputs.iter().map(|g| glob_base(g)).collect();
    bases.sort();
    bases.dedup();
    for base in &bases {
        // A base inside another is walked with it.
        if bases
            .iter()
            .any(|b| b != base && (b.is_empty() || base.starts_with(&format!("{b}/"))))
        {
            continue;
        }
        stamps_under(root, base, &|_| false, &mut files).map_err(inst.io(&root.join(base)))?;
    }
    files.retain(|rel, _| set.is_match(rel));
    let mut next = Last::default();
    let mut h = blake3::Hasher::new();
    h.update(b"scap build step 1\0");
    for part in [
        inst.step.name.as_str(),
        inst.branch.as_deref().unwrap_or(""),
        inst.command.as_str(),
        inst.dir.as_deref().unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        h.update(&[0]);
    }
    for o in &inst.outputs {
        h.update(o.as_bytes());
        h.update(&[0]);
    }
    h.update(b"\0inputs\0");
    for (rel, stamp) in files {
        let hash = match last.inputs.get(&rel) {
            Some((s, hash)) if *s == stamp => hash.clone(),
            _ => {
                let path = root.join(&rel);
                let meta = std::fs::symlink_metadata(&path).map_err(inst.io(&path))?;
                if meta.file_type().is_symlink() {
                    let t = std::fs::read_link(&path).map_err(inst.io(&path))?;
                    format!("l:{}", blake3::hash(t.as_os_str().as_bytes()).to_hex())
                } else {
                    let mut hasher = blake3::Hasher::new();
                    let mut f = std::fs::File::open(&path).map_err(inst.io(&path))?;
                    std::io::copy(&mut f, &mut hasher).map_err(inst.io(&path))?;
                    hasher.finalize().to_hex().to_string()
                }
            }
        };
        h.update(rel.as_bytes());
        h.update(&[0]);
        h.update(hash.as_bytes());
        h.update(&[0]);
        next.inputs.insert(rel, (stamp, hash));
    }
    Ok((h.finalize().to_hex().to_string(), next))
}

/// Runs every step (each branch of a `per_branch` step) whose key is new,
/// and puts the outputs of the others in place. Stops at the first that
/// fails. `say` hears each step's result as it comes.
pub fn run(
    store: &Store,
    steps: &[Step],
    say: &mut dyn FnMut(&StepRun),
) -> Result<Vec<StepRun>, StepError> {
    let dir = cache_dir(store);
    let mut runs = Vec::new();
    for step in steps {
        for inst in step.instances()? {
            let started = Instant::now();
            let last_path = dir.join(format!("{}.last.json", inst.id()));
            let last: Last = read_json(&last_path).unwrap_or_default();
            let (key, inputs) = key(&inst, &last)?;
            let entry_path = dir.join(format!("{key}.json"));
            let entry: Option<Entry> =
                read_json(&entry_path).filter(|e: &Entry| e.format == ENTRY_FORMAT);
            let how = match entry {
                Some(e) if outputs_in_place(&inst, &e)? => How::Cached,
                Some(e) if restore(store, &inst, &e, &entry_path)? => How::Restored,
                _ => {
                    run_one(store, &inst, &entry_path)?;
                    How::Ran
                }
            };
            // A lost write only means hashing the inputs again next time.
            let _ = write_json(&last_path, &inputs);
            let r = StepRun {
                step: step.name.clone(),
                branch: inst.branch.clone(),
                how,
                seconds: started.elapsed().as_secs_f64(),
                key,
            };
            say(&r);
            runs.push(r);
        }
    }
    Ok(runs)
}

fn output_stamps(inst: &Instance<'_>) -> Result<BTreeMap<String, FileStamp>, StepError> {
    let root = &inst.step.component.path;
    let mut out = BTreeMap::new();
    for o in &inst.outputs {
        stamps_under(root, o, &|_| false, &mut out).map_err(inst.io(&root.join(o)))?;
    }
    Ok(out)
}

fn outputs_in_place(inst: &Instance<'_>, e: &Entry) -> Result<bool, StepError> {
    Ok(output_stamps(inst)? == e.stamps)
}

/// Refuses an output below a symlink (a directory of the component
/// replaced by a link, say to /etc): its outputs are read and written only
/// through real directories of the component.
fn check_parents(inst: &Instance<'_>) -> Result<(), StepError> {
    let root = &inst.step.component.path;
    for o in &inst.outputs {
        let mut at = root.clone();
        let parts: Vec<&str> = o.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            at.push(part);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(StepError::Symlink {
                        name: inst.shown(),
                        path: at,
                        output: o.clone(),
                    });
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Writes a run's outputs back from the store; false (nothing touched)
/// if the store no longer has all of them.
fn restore(
    store: &Store,
    inst: &Instance<'_>,
    e: &Entry,
    entry_path: &Path,
) -> Result<bool, StepError> {
    let mut contents = Vec::new();
    for (rel, tree) in &e.outputs {
        let Ok(t) = store.tree(tree) else {
            return Ok(false);
        };
        let Some(entry) = t.entries().first() else {
            return Ok(false);
        };
        if !crate::manifest::complete(store, &entry.content) {
            return Ok(false);
        }
        contents.push((rel.clone(), entry.content.clone()));
    }
    check_parents(inst)?;
    let root = &inst.step.component.path;
    for (rel, content) in &contents {
        put_back(store, inst, &root.join(rel), content)?;
    }
    let entry = Entry {
        stamps: output_stamps(inst)?,
        outputs: e.outputs.clone(),
        step: e.step.clone(),
        branch: e.branch.clone(),
        format: ENTRY_FORMAT,
        seconds: e.seconds,
    };
    let _ = write_json(entry_path, &entry);
    Ok(true)
}

/// Replaces `dest` with `content`: written beside it, then renamed over
/// it, so that `dest` is the old output or the new one, never half.
fn put_back(
    store: &Store,
    inst: &Instance<'_>,
    dest: &Path,
    content: &Content,
) -> Result<(), StepError> {
    let name = dest.file_name().unwrap_or(OsStr::new("output"));
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(inst.io(parent))?;
    let tmp = parent.join(format!(".{}.scap-new", name.to_string_lossy()));
    let old = parent.join(format!(".{}.scap-old", name.to_string_lossy()));
    remove_any(&tmp).map_err(inst.io(&tmp))?;
    remove_any(&old).map_err(inst.io(&old))?;
    crate::manifest::extract(store, content, &tmp).map_err(|e| StepError::Store {
        name: inst.shown(),
        source: Box::new(e.into()),
    })?;
    let had = std::fs::symlink_metadata(dest).is_ok();
    if had {
        std::fs::rename(dest, &old).map_err(inst.io(dest))?;
    }
    std::fs::rename(&tmp, dest).map_err(inst.io(dest))?;
    if had {
        remove_any(&old).map_err(inst.io(&old))?;
    }
    Ok(())
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Runs the command, checks what it wrote, and keeps its outputs.
fn run_one(store: &Store, inst: &Instance<'_>, entry_path: &Path) -> Result<(), StepError> {
    let root = &inst.step.component.path;
    let started = Instant::now();
    // Its outputs, and what the component excludes (never deployed), may
    // change; nothing else.
    let outputs = inst.outputs.clone();
    let exclude = inst.step.component.exclude.clone();
    let skip = move |rel: &str| in_outputs(&outputs, rel) || exclude.is_match(rel);
    let mut before = BTreeMap::new();
    stamps_under(root, "", &skip, &mut before).map_err(inst.io(root))?;
    let workdir = match &inst.dir {
        Some(d) => root.join(d),
        None => root.clone(),
    };
    let script = format!("cd -- \"$SCAP_STEP_DIR\" || exit 97\n{}", inst.command);
    let env = [
        ("SCAP_STEP", inst.step.name.clone()),
        ("SCAP_STEP_DIR", workdir.display().to_string()),
        ("SCAP_COMPONENT_DIR", root.display().to_string()),
        ("SCAP_BRANCH", inst.branch.clone().unwrap_or_default()),
    ];
    crate::hooks::run(&script, &env, inst.step.timeout, &Cancel::new()).map_err(|f| {
        StepError::Failed {
            name: inst.shown(),
            status: f.status,
            output: f.output,
        }
    })?;
    let mut after = BTreeMap::new();
    stamps_under(root, "", &skip, &mut after).map_err(inst.io(root))?;
    let mut changed: Vec<String> = Vec::new();
    for (rel, s) in &after {
        match before.get(rel) {
            None => changed.push(format!("{rel} (new)")),
            Some(b) if b != s => changed.push(format!("{rel} (changed)")),
            _ => {}
        }
    }
    for rel in before.keys() {
        if !after.contains_key(rel) {
            changed.push(format!("{rel} (removed)"));
        }
    }
    if !changed.is_empty() {
        let n = changed.len();
        changed.truncate(SHOWN_PATHS);
        let mut paths = changed.join(", ");
        if n > SHOWN_PATHS {
            paths.push_str(&format!(" and {} more", n - SHOWN_PATHS));
        }
        return Err(StepError::Outside {
            name: inst.shown(),
            outputs: if inst.outputs.is_empty() {
                "none".into()
            } else {
                inst.outputs.join(", ")
            },
            paths,
        });
    }
    check_parents(inst)?;
    for o in &inst.outputs {
        if std::fs::symlink_metadata(root.join(o)).is_err() {
            return Err(StepError::NoOutput {
                name: inst.shown(),
                path: o.clone(),
            });
        }
    }
    let (trees, committed) =
        crate::manifest::store_paths(store, &inst.step.component, &inst.outputs).map_err(
            |source| StepError::Store {
                name: inst.shown(),
                source: Box::new(source),
            },
        )?;
    let entry = Entry {
        format: ENTRY_FORMAT,
        step: inst.step.name.clone(),
        branch: inst.branch.clone(),
        outputs: inst.outputs.iter().cloned().zip(trees).collect(),
        stamps: output_stamps(inst)?,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_json(entry_path, &entry).map_err(inst.io(entry_path))?;
    drop(committed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_mediawiki_steps_are_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/mediawiki/scap.toml");
        let cfg = ConfigFile::load(&path).unwrap();
        let components = crate::config::components(&cfg, &[], &[]).unwrap();
        let steps = from_config(&cfg, &components).unwrap();
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["wikiversions", "l10n", "gitinfo"]);
        assert!(cfg.announce.is_some() && cfg.checks.is_some() && cfg.restarts.is_some());
    }

    #[test]
    fn glob_bases_and_outputs() {
        assert_eq!(
            glob_base("php-x/languages/i18n/**/*.json"),
            "php-x/languages/i18n"
        );
        assert_eq!(glob_base("wikiversions.json"), "");
        assert_eq!(glob_base("a/b/c.json"), "a/b");
        assert_eq!(glob_base("**/*.json"), "");
        let outs = vec!["php-x/cache/l10n".to_string()];
        assert!(in_outputs(&outs, "php-x/cache/l10n"));
        assert!(in_outputs(&outs, "php-x/cache/l10n/en.json"));
        assert!(!in_outputs(&outs, "php-x/cache/l10n2"));
        assert!(check_rel("../x").is_err());
        assert!(check_rel("/x").is_err());
        assert!(check_rel("a//b").is_err());
        assert!(check_rel("a/b").is_ok());
    }
}
