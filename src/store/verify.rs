//! `scap verify`: re-hash every object reachable from some versions and
//! report each missing or corrupt one by ID and by a path that uses it.

use std::collections::{HashMap, HashSet};

use rayon::prelude::*;

use super::disk::{Store, StoreError};
use super::id::{ChunkId, ObjectId, ObjectKind, TreeId, VersionId};
use super::tree::Content;
use super::{TreePath, join};
use crate::progress::Meter;

/// (bytes, files) of regular files below a directory.
type Totals = (u64, u64);

#[derive(Clone, Debug, serde::Serialize)]
pub struct Problem {
    pub kind: String,
    pub id: String,
    /// A path (in the first version that reaches it) that uses the object.
    pub path: String,
    pub version: VersionId,
    pub error: String,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub versions: u64,
    pub trees: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

pub fn verify(
    store: &Store,
    versions: &[VersionId],
    meter: &dyn Meter,
) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport {
        versions: versions.len() as u64,
        ..Default::default()
    };
    let mut seen_trees: HashSet<TreeId> = HashSet::new();
    let mut chunks: HashMap<ChunkId, (u32, TreePath, VersionId)> = HashMap::new();
    for v in versions {
        // (tree, its path, the totals its parent entry claims)
        let mut stack: Vec<(TreeId, TreePath, Option<Totals>)> = vec![(v.root(), Vec::new(), None)];
        while let Some((id, path, expect)) = stack.pop() {
            if !seen_trees.insert(id) {
                continue;
            }
            report.trees += 1;
            let tree = match store.tree_from_disk(&id) {
                Ok(t) => t,
                Err(e) => {
                    report
                        .problems
                        .push(problem(ObjectKind::Tree, id.object(), &path, *v, &e));
                    continue;
                }
            };
            if let Some(expect) = expect
                && tree.totals() != expect
            {
                report.problems.push(Problem {
                    kind: "tree".into(),
                    id: id.to_hex(),
                    path: show(&path),
                    version: *v,
                    error: format!(
                        "its parent records {} bytes in {} files, it holds {} in {}",
                        expect.0,
                        expect.1,
                        tree.totals().0,
                        tree.totals().1
                    ),
                });
            }
            for e in tree.entries() {
                let p = join(&path, &e.name);
                match &e.content {
                    Content::Dir { tree, size, files } => {
                        stack.push((*tree, p, Some((*size, *files))))
                    }
                    Content::File { chunks: cs, .. } => {
                        for c in cs {
                            chunks.entry(c.id).or_insert_with(|| (c.len, p.clone(), *v));
                        }
                    }
                    Content::Symlink { .. } => {}
                }
            }
        }
    }
    report.chunks = chunks.len() as u64;
    meter.start(chunks.len() as u64, "verifying");
    let bar = meter;
    let mut list: Vec<_> = chunks.into_iter().collect();
    list.sort_by(|a, b| a.1.1.cmp(&b.1.1));
    let results: Vec<(u64, Option<Problem>)> = list
        .par_iter()
        .map(|(id, (len, path, v))| {
            let r = store.read(&id.object(), ObjectKind::Chunk);
            bar.inc(1);
            match r {
                Ok(data) if data.len() == *len as usize => (data.len() as u64, None),
                Ok(data) => (
                    0,
                    Some(Problem {
                        kind: "chunk".into(),
                        id: id.to_hex(),
                        path: show(path),
                        version: *v,
                        error: format!("{} bytes, its tree says {len}", data.len()),
                    }),
                ),
                Err(e) => (
                    0,
                    Some(problem(ObjectKind::Chunk, id.object(), path, *v, &e)),
                ),
            }
        })
        .collect();
    bar.finish();
    for (bytes, p) in results {
        report.bytes += bytes;
        report.problems.extend(p);
    }
    report
        .problems
        .sort_by(|a, b| a.path.cmp(&b.path).then(a.id.cmp(&b.id)));
    Ok(report)
}

fn problem(kind: ObjectKind, id: ObjectId, path: &[u8], v: VersionId, e: &StoreError) -> Problem {
    Problem {
        kind: kind.to_string(),
        id: id.to_hex(),
        path: show(path),
        version: v,
        error: match e {
            StoreError::Missing { .. } => "missing".into(),
            other => other.to_string(),
        },
    }
}

fn show(path: &[u8]) -> String {
    if path.is_empty() {
        "/".into()
    } else {
        String::from_utf8_lossy(path).into_owned()
    }
}
