//! How versions descend from each other, from the deploy host's version
//! records: a build's parent is the version it was built after; a change's
//! (sync-file, sync-dir) is the version it was made from, and all the
//! versions one change made share its ID.
//!
//! `scap diff` uses it to say how two versions descend. It never decides
//! what a name deploys: a version ID means exactly that version, and a
//! train's head is a label (`fleet::trains`).

use std::collections::BTreeMap;

use crate::store::VersionId;
use crate::store::disk::VersionRecord;

/// A version's parent, and the change that made it (if one did).
type Origin = (Option<VersionId>, Option<String>);

#[derive(Clone, Debug, Default)]
pub struct Lineage {
    parents: BTreeMap<VersionId, Origin>,
}

impl Lineage {
    pub fn new(records: &[VersionRecord]) -> Lineage {
        let mut l = Lineage::default();
        for r in records {
            l.parents.insert(r.version, (r.parent, r.change.clone()));
        }
        l
    }

    /// The change that made `v`, if a change did.
    pub fn change(&self, v: &VersionId) -> Option<&str> {
        self.parents.get(v).and_then(|(_, c)| c.as_deref())
    }

    pub fn parent(&self, v: &VersionId) -> Option<VersionId> {
        self.parents.get(v).and_then(|(p, _)| *p)
    }

    /// How `b` descends from `a`: the changes on the way, oldest first, if
    /// `a` is an ancestor of `b` (through builds or changes).
    pub fn path(&self, a: &VersionId, b: &VersionId) -> Option<Vec<VersionId>> {
        let mut chain = vec![*b];
        let mut at = *b;
        while at != *a {
            at = self.parent(&at)?;
            if chain.contains(&at) || chain.len() > 10_000 {
                return None;
            }
            chain.push(at);
        }
        chain.reverse();
        Some(chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectKind;

    fn v(s: &str) -> VersionId {
        VersionId::new(ObjectKind::Tree.hash(s.as_bytes()))
    }

    fn rec(
        ver: VersionId,
        parent: Option<VersionId>,
        change: Option<&str>,
        t: u64,
    ) -> VersionRecord {
        VersionRecord {
            parent,
            change: change.map(str::to_string),
            ..VersionRecord::bare(ver, t)
        }
    }

    #[test]
    fn changes_and_paths() {
        let (t1, t2, t1c, t2c, t1cc) = (v("t1"), v("t2"), v("t1c"), v("t2c"), v("t1cc"));
        let l = Lineage::new(&[
            rec(t1, None, None, 1),
            rec(t2, Some(t1), None, 2),
            rec(t1c, Some(t1), Some("c1"), 3),
            rec(t2c, Some(t2), Some("c1"), 3),
            rec(t1cc, Some(t1c), Some("c2"), 4),
        ]);
        assert_eq!(l.path(&t1, &t1cc), Some(vec![t1, t1c, t1cc]));
        assert_eq!(l.path(&t2, &t1c), None);
        assert_eq!(l.change(&t2c), Some("c1"));
    }
}
