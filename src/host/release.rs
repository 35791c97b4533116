//! Release directories and the atomic switch.
//!
//! The agent keeps a few release directories ("slots", default 3) under
//! `DIR/releases/`, each holding one whole version, and one symlink,
//! `DIR/current -> releases/<slot>`, that says which is live. Deploying
//! version V:
//!
//! 1. pick a slot that is neither live nor the previous release (those two
//!    stay untouched: requests still running on the old tree keep a whole
//!    tree, and rollback is a switch away);
//! 2. bring it from the version it holds to V by applying the Merkle diff:
//!    only changed files are written (beside their final name, then renamed
//!    in), removed ones deleted, identical subtrees skipped by ID; a slot
//!    with no usable version is written in full;
//! 3. one `syncfs`, then record the slot as clean at V;
//! 4. switch: a new symlink renamed over `current` (one `rename(2)`).
//!
//! A crash during 2 leaves the slot marked dirty; it is never switched to
//! and is rewritten in full next time. The live slot is never written.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::store::disk::IoContext;
use crate::store::fsutil::{FSYNC_EACH_MAX, atomic_write, sync_dir};
use crate::store::{Content, Store, StoreError, TreeId, VersionId};

/// What a slot holds, in `releases/<slot>.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotMeta {
    pub version: Option<VersionId>,
    /// False while the slot is being changed: its content is then neither
    /// `version` nor the target, and it must be rewritten before use.
    pub clean: bool,
    /// Unix seconds of the last time it was made or switched to.
    #[serde(default)]
    pub used: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Slot {
    pub name: String,
    pub meta: SlotMeta,
}

/// What preparing a slot cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Prepared {
    pub slot: String,
    /// "reused" (already at the version), "diff" (changes applied) or "full".
    pub how: &'static str,
    pub files_written: u64,
    pub bytes_written: u64,
    pub removed: u64,
}

pub struct Releases {
    dir: PathBuf,
    slots: Vec<String>,
}

impl Releases {
    pub fn new(base: &Path, slots: usize) -> io::Result<Releases> {
        let dir = base.join("releases");
        fs::create_dir_all(&dir)?;
        let slots = (0..slots.max(3))
            .map(|i| ((b'a' + i as u8) as char).to_string())
            .collect();
        Ok(Releases { dir, slots })
    }

    pub fn path(&self, slot: &str) -> PathBuf {
        self.dir.join(slot)
    }

    fn meta_path(&self, slot: &str) -> PathBuf {
        self.dir.join(format!("{slot}.json"))
    }

    pub fn meta(&self, slot: &str) -> SlotMeta {
        fs::read(self.meta_path(slot))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(SlotMeta {
                version: None,
                clean: false,
                used: 0,
            })
    }

    fn set_meta(&self, slot: &str, meta: &SlotMeta) -> Result<(), StoreError> {
        atomic_write(
            &self.meta_path(slot),
            &serde_json::to_vec(meta).expect("serializes"),
        )
    }

    pub fn list(&self) -> Vec<Slot> {
        self.slots
            .iter()
            .map(|s| Slot {
                name: s.clone(),
                meta: self.meta(s),
            })
            .collect()
    }

    /// A clean slot holding `v`, if any.
    pub fn find(&self, v: &VersionId) -> Option<String> {
        self.list()
            .into_iter()
            .find(|s| s.meta.clean && s.meta.version == Some(*v))
            .map(|s| s.name)
    }

    /// Brings a slot other than those in `keep` to version `v`.
    pub fn prepare(
        &self,
        store: &Store,
        v: &VersionId,
        keep: &[&str],
        spare: Option<&VersionId>,
    ) -> Result<Prepared, StoreError> {
        if let Some(slot) = self.find(v) {
            return Ok(Prepared {
                slot,
                how: "reused",
                ..Default::default()
            });
        }
        let slot = self.choose(keep, spare);
        self.prepare_into(store, v, slot)
    }

    /// Brings the spare slot (one not in `keep`) to `v` ahead of time, so
    /// that the next deploy applies only the diff from `v`. `None` if it is
    /// already there.
    pub fn prepare_spare(
        &self,
        store: &Store,
        v: &VersionId,
        keep: &[&str],
    ) -> Result<Option<Prepared>, StoreError> {
        let slot = self.choose(keep, None);
        if slot.meta.clean && slot.meta.version == Some(*v) {
            return Ok(None);
        }
        self.prepare_into(store, v, slot).map(Some)
    }

    /// The slot to overwrite: not in `keep`, preferably not holding
    /// `stable`; of those, a clean one most recently made (the spare that
    /// the agent keeps at the live version, so the diff to apply is the
    /// deploy's own), else an empty or dirty one.
    fn choose(&self, keep: &[&str], stable: Option<&VersionId>) -> Slot {
        let mut candidates: Vec<Slot> = self
            .list()
            .into_iter()
            .filter(|s| !keep.contains(&s.name.as_str()))
            .collect();
        let without_stable: Vec<Slot> = candidates
            .iter()
            .filter(|s| stable.is_none() || s.meta.version.as_ref() != stable)
            .cloned()
            .collect();
        if !without_stable.is_empty() {
            candidates = without_stable;
        }
        candidates.sort_by_key(|s| (!s.meta.clean, std::cmp::Reverse(s.meta.used)));
        candidates
            .into_iter()
            .next()
            .expect("at least 3 slots, at most 2 kept")
    }

    fn prepare_into(
        &self,
        store: &Store,
        v: &VersionId,
        slot: Slot,
    ) -> Result<Prepared, StoreError> {
        let dir = self.path(&slot.name);
        let base = match (slot.meta.clean, slot.meta.version) {
            (true, Some(old)) if store.has(&old.object()) => Some(old),
            _ => None,
        };
        self.set_meta(
            &slot.name,
            &SlotMeta {
                version: slot.meta.version,
                clean: false,
                used: slot.meta.used,
            },
        )?;
        let mut plan = Plan::default();
        let how = match base {
            Some(old) => {
                plan_diff(store, &dir, Some(&old.root()), &v.root(), &mut plan)?;
                "diff"
            }
            None => {
                if fs::symlink_metadata(&dir).is_ok() {
                    plan.ops.push(Op::RemoveAll(dir.clone()));
                }
                plan.ops.push(Op::MkDir(dir.clone()));
                plan_diff(store, &dir, None, &v.root(), &mut plan)?;
                "full"
            }
        };
        let mut prepared = Prepared {
            slot: slot.name.clone(),
            how,
            ..Default::default()
        };
        let result = plan.execute(store, &mut prepared).and_then(|touched| {
            // A small diff fsyncs what it touched; a big one syncs the
            // filesystem once (see `disk::FSYNC_EACH_MAX`).
            if touched.files.len() + touched.dirs.len() <= FSYNC_EACH_MAX {
                for f in &touched.files {
                    File::open(f).and_then(|f| f.sync_all()).at(f)?;
                }
                touched.dirs.iter().try_for_each(|d| sync_dir(d))
            } else {
                let f = File::open(&dir).at(&dir)?;
                rustix::fs::syncfs(&f).map_err(io::Error::from).at(&dir)
            }
        });
        if let Err(e) = result {
            // Nothing half-written stays behind: the slot is emptied.
            let _ = fs::remove_dir_all(&dir);
            let _ = fs::remove_file(self.meta_path(&slot.name));
            return Err(e);
        }
        self.set_meta(
            &slot.name,
            &SlotMeta {
                version: Some(*v),
                clean: true,
                used: crate::time::unix_now(),
            },
        )?;
        Ok(prepared)
    }

    /// Marks a slot as just used (for choosing which to overwrite next).
    pub fn touch(&self, slot: &str) -> Result<(), StoreError> {
        let mut m = self.meta(slot);
        m.used = crate::time::unix_now();
        self.set_meta(slot, &m)
    }
}

/// The live slot: where `current` points, if anywhere.
pub fn live_slot(base: &Path) -> Option<String> {
    let target = fs::read_link(base.join("current")).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Points `current` at `slot`, atomically.
pub fn switch(base: &Path, slot: &str) -> Result<(), StoreError> {
    let tmp = base.join(".current.tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(Path::new("releases").join(slot), &tmp).at(&tmp)?;
    let current = base.join("current");
    fs::rename(&tmp, &current).at(&current)?;
    sync_dir(base)
}

#[derive(Debug)]
enum Op {
    RemoveAll(PathBuf),
    MkDir(PathBuf),
    Symlink(PathBuf, Vec<u8>),
    /// (path, content, whether something is there to be replaced)
    Write(PathBuf, Content, bool),
    Chmod(PathBuf, bool),
}

#[derive(Default)]
struct Plan {
    ops: Vec<Op>,
}

/// Plans the changes that turn directory `dir` (holding tree `old`, or
/// nothing) into tree `new`.
fn plan_diff(
    store: &Store,
    dir: &Path,
    old: Option<&TreeId>,
    new: &TreeId,
    plan: &mut Plan,
) -> Result<(), StoreError> {
    if old == Some(new) {
        return Ok(());
    }
    let old_tree = old.map(|t| store.tree(t)).transpose()?;
    let new_tree = store.tree(new)?;
    if let Some(old_tree) = &old_tree {
        for e in old_tree.entries() {
            if new_tree.get(e.name.as_bytes()).is_none() {
                plan.ops
                    .push(Op::RemoveAll(dir.join(e.name.to_os_string())));
            }
        }
    }
    for e in new_tree.entries() {
        let path = dir.join(e.name.to_os_string());
        let before = old_tree
            .as_ref()
            .and_then(|t| t.get(e.name.as_bytes()))
            .map(|e| &e.content);
        match (before, &e.content) {
            (Some(a), b) if a == b => {}
            (Some(Content::Dir { tree: a, .. }), Content::Dir { tree: b, .. }) => {
                plan_diff(store, &path, Some(a), b, plan)?;
            }
            (
                Some(Content::File { chunks: a, .. }),
                Content::File {
                    chunks: b,
                    executable,
                    ..
                },
            ) if a == b => {
                plan.ops.push(Op::Chmod(path, *executable));
            }
            (Some(Content::File { .. }), new @ Content::File { .. }) => {
                plan.ops.push(Op::Write(path, new.clone(), true));
            }
            (before, new) => {
                if before.is_some() {
                    plan.ops.push(Op::RemoveAll(path.clone()));
                }
                match new {
                    Content::Dir { tree, .. } => {
                        plan.ops.push(Op::MkDir(path.clone()));
                        plan_diff(store, &path, None, tree, plan)?;
                    }
                    Content::Symlink { target } => plan.ops.push(Op::Symlink(path, target.clone())),
                    file @ Content::File { .. } => {
                        plan.ops.push(Op::Write(path, file.clone(), false))
                    }
                }
            }
        }
    }
    Ok(())
}

impl Plan {
    /// Runs removals, directories and symlinks in order, then writes files
    /// in parallel (their directories exist by then).
    fn execute(self, store: &Store, stats: &mut Prepared) -> Result<Touched, StoreError> {
        let mut writes = Vec::new();
        let mut touched = Touched::default();
        for op in self.ops {
            let (Op::RemoveAll(p)
            | Op::MkDir(p)
            | Op::Symlink(p, _)
            | Op::Chmod(p, _)
            | Op::Write(p, ..)) = &op;
            if let Some(parent) = p.parent() {
                touched.dirs.push(parent.to_path_buf());
            }
            match op {
                Op::RemoveAll(p) => {
                    let meta = fs::symlink_metadata(&p).at(&p)?;
                    if meta.is_dir() {
                        fs::remove_dir_all(&p).at(&p)?;
                    } else {
                        fs::remove_file(&p).at(&p)?;
                    }
                    stats.removed += 1;
                }
                Op::MkDir(p) => {
                    fs::create_dir(&p).at(&p)?;
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).at(&p)?;
                    touched.dirs.push(p);
                }
                Op::Symlink(p, target) => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(&target), &p).at(&p)?;
                }
                Op::Chmod(p, exec) => {
                    fs::set_permissions(&p, fs::Permissions::from_mode(mode(exec))).at(&p)?;
                    touched.files.push(p);
                }
                Op::Write(p, c, replace) => writes.push((p, c, replace)),
            }
        }
        let bytes: Vec<u64> = writes
            .par_iter()
            .map(|(p, c, replace)| write_file(store, p, c, *replace))
            .collect::<Result<_, _>>()?;
        stats.files_written += bytes.len() as u64;
        stats.bytes_written += bytes.iter().sum::<u64>();
        touched.files.extend(writes.into_iter().map(|(p, ..)| p));
        touched.dirs.sort();
        touched.dirs.dedup();
        Ok(touched)
    }
}

/// What a plan changed, to make durable.
#[derive(Default)]
struct Touched {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

fn mode(executable: bool) -> u32 {
    if executable { 0o755 } else { 0o644 }
}

/// Writes one file from the store; a file being replaced is written beside
/// it and renamed over it, so no reader ever sees it half-written.
fn write_file(
    store: &Store,
    path: &Path,
    content: &Content,
    replace: bool,
) -> Result<u64, StoreError> {
    let Content::File {
        executable, size, ..
    } = content
    else {
        unreachable!("only files are written")
    };
    let dest = if replace {
        let mut name = std::ffi::OsString::from(".");
        name.push(path.file_name().unwrap_or_default());
        name.push(".scap-tmp");
        path.with_file_name(name)
    } else {
        path.to_path_buf()
    };
    let mut f = File::create(&dest).at(&dest)?;
    let mut w = io::BufWriter::with_capacity(256 * 1024, &mut f);
    store.write_file(content, &mut w, &dest)?;
    w.flush().at(&dest)?;
    drop(w);
    f.set_permissions(fs::Permissions::from_mode(mode(*executable)))
        .at(&dest)?;
    if replace {
        fs::rename(&dest, path).at(path)?;
    }
    Ok(*size)
}
