//! Canary arithmetic: from every host's reading, count the traffic already
//! on a version and pick just enough more hosts to reach a share.
//!
//! Everything here is a pure function of the hosts' answers (no I/O), so a
//! rollout can be resumed from anywhere: re-running the same command picks
//! the same hosts (the order is a function of the version and the host
//! names) and finds nothing left to do.

use std::collections::BTreeMap;

use serde::Serialize;

use super::inventory::Member;
use super::poll::Reading;
use crate::store::VersionId;

/// A percentage of traffic in hundredths (0..=10000), parsed from "12.5%".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Percent(pub u32);

impl Percent {
    pub const ALL: Percent = Percent(10_000);

    pub fn parse(s: &str) -> Result<Percent, String> {
        let t = s.trim().trim_end_matches('%').trim();
        let bad =
            || format!("{s:?} is not a percentage: give a number from 0 to 100, like 10% or 12.5%");
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        if whole.is_empty()
            || frac.len() > 2
            || !whole
                .bytes()
                .chain(frac.bytes())
                .all(|c| c.is_ascii_digit())
        {
            return Err(bad());
        }
        let whole: u32 = whole.parse().map_err(|_| bad())?;
        let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
        let v = whole
            .checked_mul(100)
            .and_then(|w| w.checked_add(frac))
            .ok_or_else(bad)?;
        if v > 10_000 {
            return Err(format!("{s:?}: a share of traffic cannot exceed 100%"));
        }
        Ok(Percent(v))
    }

    /// The weight needed to reach this share of `total`, rounded up: 10% of
    /// 375 hosts of weight 1 is 37.5, so 38 hosts.
    pub fn of(self, total: u64) -> u64 {
        (u64::from(self.0) * total).div_ceil(10_000)
    }
}

impl std::fmt::Display for Percent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_multiple_of(100) {
            write!(f, "{}%", self.0 / 100)
        } else {
            write!(f, "{}.{:02}%", self.0 / 100, self.0 % 100)
        }
    }
}

/// One step of a rollout: the canary group (every host marked canary), or a
/// share of traffic. Written `canary` or `10%`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Canary,
    Share(Percent),
}

impl Stage {
    pub fn parse(s: &str) -> Result<Stage, String> {
        match s.trim() {
            "canary" | "canaries" => Ok(Stage::Canary),
            p => Percent::parse(p).map(Stage::Share),
        }
    }

    /// Whether a step of this stage brings the version to every host.
    pub fn is_all(self) -> bool {
        self == Stage::Share(Percent::ALL)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stage::Canary => f.write_str("canary"),
            Stage::Share(p) => p.fmt(f),
        }
    }
}

impl Serialize for Stage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Stage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Stage, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Stage::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a rollout brings hosts to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Every host to exactly this version: a host counts as on it only if
    /// it runs this very tree (a version made from it by a later change is
    /// another version; deploying a train by name deploys its head).
    One { version: VersionId },
    /// A change applied to every live train: each host on a key version
    /// goes to its value, so the share of traffic on each train stays. A
    /// host on one of `unchanged` (a train the change leaves as it is: it
    /// lacks the path's directory, or has the path as staging has it) has
    /// all the change brings.
    Change {
        id: String,
        map: BTreeMap<VersionId, VersionId>,
        unchanged: std::collections::BTreeSet<VersionId>,
    },
}

impl Goal {
    /// Every host to `v`.
    pub fn one(v: VersionId) -> Goal {
        Goal::One { version: v }
    }

    /// A change's ID (a train's rollout is named by its record instead).
    pub fn rollout_id(&self) -> Option<&str> {
        match self {
            Goal::One { .. } => None,
            Goal::Change { id, .. } => Some(id),
        }
    }

    /// The version a host running `current` should go to, if any.
    pub fn target(&self, current: Option<VersionId>) -> Option<VersionId> {
        match self {
            Goal::One { version } => (!self.reached(current)).then_some(*version),
            Goal::Change { map, .. } => current.and_then(|c| map.get(&c).copied()),
        }
    }

    /// Whether a host running `current` has what this goal brings.
    pub fn reached(&self, current: Option<VersionId>) -> bool {
        match (self, current) {
            (Goal::One { version }, Some(c)) => c == *version,
            (Goal::Change { map, unchanged, .. }, Some(c)) => {
                unchanged.contains(&c) || map.values().any(|n| *n == c)
            }
            (_, None) => false,
        }
    }

    /// What orders hosts for this goal (different for each version or
    /// change, stable for one).
    pub fn key(&self) -> Vec<u8> {
        match self {
            Goal::One { version, .. } => version.object().as_bytes().to_vec(),
            Goal::Change { id, .. } => id.as_bytes().to_vec(),
        }
    }

    /// Every version this goal may bring a host to.
    pub fn versions(&self) -> Vec<VersionId> {
        match self {
            Goal::One { version, .. } => vec![*version],
            Goal::Change { map, .. } => {
                let mut v: Vec<VersionId> = map.values().copied().collect();
                v.sort();
                v.dedup();
                v
            }
        }
    }
}

/// A share (percent) with one decimal, for people: `12.5%`.
pub fn pct(v: f64) -> String {
    format!("{v:.1}%")
}

/// `weight / total` as a percentage with one decimal, for people.
pub fn share(weight: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (weight as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

/// The order in which hosts are given a version: canary-group hosts first,
/// then round-robin across (datacenter, cluster) groups, each group in an
/// order that is a hash of the version and the host name. Stable for a
/// version, different for the next one (so the same hosts are not always
/// first), spread across the fleet.
pub fn selection_order(members: &[Member], goal_key: &[u8]) -> Vec<usize> {
    let key = |m: &Member| {
        let mut h = blake3::Hasher::new();
        h.update(goal_key);
        h.update(m.host.to_string().as_bytes());
        let b = h.finalize();
        u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
    };
    let mut canaries: Vec<usize> = (0..members.len()).filter(|&i| members[i].canary).collect();
    canaries.sort_by_key(|&i| key(&members[i]));
    let mut groups: BTreeMap<(String, String), Vec<usize>> = Default::default();
    for (i, m) in members.iter().enumerate().filter(|(_, m)| !m.canary) {
        groups
            .entry((m.dc.clone(), m.cluster.clone()))
            .or_default()
            .push(i);
    }
    let mut lists: Vec<Vec<usize>> = groups
        .into_values()
        .map(|mut g| {
            g.sort_by_key(|&i| key(&members[i]));
            g.reverse(); // pop() takes from the front
            g
        })
        .collect();
    let mut order = canaries;
    while lists.iter().any(|l| !l.is_empty()) {
        for l in &mut lists {
            if let Some(i) = l.pop() {
                order.push(i);
            }
        }
    }
    order
}

/// Which hosts a step changes, and what share it reaches.
#[derive(Clone, Debug, Serialize)]
pub struct TopUp {
    pub target: Stage,
    pub total_weight: u64,
    pub needed_weight: u64,
    /// Indices (into the readings) of hosts already on the version.
    pub already: Vec<usize>,
    /// Hosts to sync now, in selection order.
    pub add: Vec<usize>,
    /// Hosts that did not answer (they count in the total, never as on).
    pub unreachable: Vec<usize>,
    /// Weight on the version once `add` succeeds.
    pub reached_weight: u64,
    /// The same, per cluster (a share is taken of each cluster's traffic).
    pub clusters: Vec<ClusterShare>,
}

/// A cluster's part of a step.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClusterShare {
    pub cluster: String,
    pub total_weight: u64,
    pub needed_weight: u64,
    pub reached_weight: u64,
}

impl TopUp {
    pub fn reached(&self) -> f64 {
        share(self.reached_weight, self.total_weight)
    }

    /// True when not enough reachable hosts are left to reach the target.
    pub fn short(&self) -> bool {
        self.reached_weight < self.needed_weight
            || self
                .clusters
                .iter()
                .any(|c| c.reached_weight < c.needed_weight)
    }
}

/// Plans a step of `goal` to `stage`: the canary group, or a share of the
/// traffic **of each cluster** (appserver, api_appserver, ...: the canary
/// sees every kind of traffic). Never lowers the share: hosts already there
/// stay, whatever the stage. A host not reachable, or (for a change) on no
/// live train, is never picked; a host that takes no traffic (depooled,
/// inactive, in no pool) is never picked to reach a share below 100%, and
/// gets the version when a step reaches 100%.
pub fn top_up(readings: &[Reading], goal: &Goal, stage: Stage) -> TopUp {
    let members: Vec<Member> = readings.iter().map(|r| r.member.clone()).collect();
    let total_weight: u64 = members.iter().map(|m| m.weight).sum();
    let on = |i: usize| goal.reached(readings[i].current());
    let eligible = |i: usize| {
        readings[i].view.is_ok() && !on(i) && goal.target(readings[i].current()).is_some()
    };
    let already: Vec<usize> = (0..readings.len()).filter(|&i| on(i)).collect();
    let unreachable: Vec<usize> = (0..readings.len())
        .filter(|&i| readings[i].view.is_err())
        .collect();
    let order = selection_order(&members, &goal.key());
    let mut add = Vec::new();
    let mut names: Vec<&str> = members.iter().map(|m| m.cluster.as_str()).collect();
    names.sort();
    names.dedup();
    let mut clusters: Vec<ClusterShare> = names
        .iter()
        .map(|c| {
            let in_c = |i: &usize| members[*i].cluster == *c;
            ClusterShare {
                cluster: c.to_string(),
                total_weight: (0..members.len())
                    .filter(in_c)
                    .map(|i| members[i].weight)
                    .sum(),
                needed_weight: 0,
                reached_weight: already
                    .iter()
                    .filter(|i| in_c(i))
                    .map(|&i| members[i].weight)
                    .sum(),
            }
        })
        .collect();
    let cluster_of = |i: usize| {
        names
            .iter()
            .position(|c| *c == members[i].cluster)
            .expect("every cluster is listed")
    };
    match stage {
        Stage::Share(p) if p == Percent::ALL => {
            for &i in &order {
                if eligible(i) {
                    add.push(i);
                    clusters[cluster_of(i)].reached_weight += members[i].weight;
                }
            }
            for c in &mut clusters {
                c.needed_weight = c.total_weight;
            }
        }
        Stage::Share(p) => {
            for c in &mut clusters {
                c.needed_weight = p.of(c.total_weight);
            }
            for &i in &order {
                let c = &mut clusters[cluster_of(i)];
                if c.reached_weight >= c.needed_weight {
                    continue;
                }
                if eligible(i) && members[i].weight > 0 {
                    add.push(i);
                    c.reached_weight += members[i].weight;
                }
            }
        }
        Stage::Canary => {
            for &i in &order {
                if members[i].canary && eligible(i) {
                    add.push(i);
                    clusters[cluster_of(i)].reached_weight += members[i].weight;
                }
            }
            // The canary group plus what was already there.
            for (n, c) in clusters.iter_mut().enumerate() {
                let canary: u64 = (0..members.len())
                    .filter(|&i| cluster_of(i) == n && members[i].canary && !on(i))
                    .map(|i| members[i].weight)
                    .sum();
                let there: u64 = already
                    .iter()
                    .filter(|&&i| cluster_of(i) == n)
                    .map(|&i| members[i].weight)
                    .sum();
                c.needed_weight = there + canary;
            }
        }
    }
    let needed_weight = clusters.iter().map(|c| c.needed_weight).sum();
    let reached_weight = clusters.iter().map(|c| c.reached_weight).sum();
    TopUp {
        target: stage,
        total_weight,
        needed_weight,
        already,
        add,
        unreachable,
        reached_weight,
        clusters,
    }
}

/// Which hosts to take off `version` to leave at most `keep` of the traffic
/// on it: the reverse of the selection order (the last hosts given it are
/// the first taken back). Indices into `readings`, sorted.
pub fn take_back(readings: &[Reading], version: &VersionId, keep: Percent) -> Vec<usize> {
    let members: Vec<Member> = readings.iter().map(|r| r.member.clone()).collect();
    let total: u64 = members.iter().map(|m| m.weight).sum();
    let mut order = selection_order(&members, version.object().as_bytes());
    order.reverse();
    let mut on: u64 = readings
        .iter()
        .filter(|r| r.on(version))
        .map(|r| r.member.weight)
        .sum();
    let limit = keep.of(total);
    let mut out = Vec::new();
    for i in order {
        if on <= limit {
            break;
        }
        if readings[i].on(version) {
            out.push(i);
            on -= members[i].weight;
        }
    }
    out.sort();
    out
}

/// `--max-failures`: a count, or a percentage of the fleet's hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Hosts(usize),
    Share(Percent),
}

impl Budget {
    pub fn parse(s: &str) -> Result<Budget, String> {
        if s.trim().ends_with('%') {
            return Percent::parse(s).map(Budget::Share);
        }
        s.trim().parse().map(Budget::Hosts).map_err(|_| {
            format!("--max-failures {s:?}: give a number of hosts (2) or a share of them (5%)")
        })
    }

    pub fn allows(self, failures: usize, hosts: usize) -> bool {
        match self {
            Budget::Hosts(n) => failures <= n,
            Budget::Share(p) => failures as u64 * 10_000 <= u64::from(p.0) * hosts as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::inventory::Host;
    use crate::fleet::poll::HostView;
    use crate::store::ObjectKind;

    fn member(i: usize, weight: u64, dc: &str, canary: bool) -> Member {
        Member {
            host: Host {
                name: format!("mw{}", 1000 + i),
                port: 8470,
                addr: None,
            },
            weight,
            dc: dc.into(),
            cluster: String::new(),
            canary,
            pooled: None,
        }
    }

    fn readings(
        members: &[Member],
        on: &[usize],
        v: VersionId,
        old: VersionId,
        down: &[usize],
    ) -> Vec<Reading> {
        members
            .iter()
            .enumerate()
            .map(|(i, m)| Reading {
                member: m.clone(),
                view: if down.contains(&i) {
                    Err(crate::fleet::agents::CallError::Unreachable {
                        host: m.host.to_string(),
                    })
                } else {
                    Ok(HostView {
                        current: Some(if on.contains(&i) { v } else { old }),
                        ..HostView::default()
                    })
                },
            })
            .collect()
    }

    fn ids() -> (VersionId, VersionId) {
        (
            VersionId::new(ObjectKind::Tree.hash(b"new")),
            VersionId::new(ObjectKind::Tree.hash(b"old")),
        )
    }

    #[test]
    fn percentages() {
        assert_eq!(Percent::parse("20%"), Ok(Percent(2000)));
        assert_eq!(Percent::parse("12.5"), Ok(Percent(1250)));
        assert_eq!(Percent::parse("100%"), Ok(Percent::ALL));
        for bad in ["", "%", "-5%", "101%", "1e3", "ten%", "12.345%", "5.%x"] {
            assert!(Percent::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Percent(1000).of(375), 38, "10% of 375 rounds up to 38");
        assert_eq!(Percent(1000).of(20), 2);
        assert_eq!(Percent(0).of(20), 0);
        assert_eq!(Percent(1250).to_string(), "12.50%");
    }

    #[test]
    fn top_up_is_exact_and_idempotent() {
        let (v, old) = ids();
        let m: Vec<Member> = (0..20)
            .map(|i| member(i, 1, if i % 2 == 0 { "eqiad" } else { "codfw" }, false))
            .collect();
        let r = readings(&m, &[], v, old, &[]);
        let p10 = top_up(&r, &Goal::one(v), Stage::Share(Percent(1000)));
        assert_eq!(p10.add.len(), 2);
        // The two picked are in two datacenters.
        assert_ne!(m[p10.add[0]].dc, m[p10.add[1]].dc);
        // Those two now on v: 20% adds exactly two more, not the first two again.
        let r = readings(&m, &p10.add, v, old, &[]);
        let p20 = top_up(&r, &Goal::one(v), Stage::Share(Percent(2000)));
        assert_eq!(p20.already, {
            let mut a = p10.add.clone();
            a.sort();
            a
        });
        assert_eq!(p20.add.len(), 2);
        assert!(p20.add.iter().all(|i| !p10.add.contains(i)));
        // Re-running 20% once there: nothing to do. Asking for less: nothing either.
        let mut on = p10.add.clone();
        on.extend(&p20.add);
        let r = readings(&m, &on, v, old, &[]);
        assert!(
            top_up(&r, &Goal::one(v), Stage::Share(Percent(2000)))
                .add
                .is_empty()
        );
        assert!(
            top_up(&r, &Goal::one(v), Stage::Share(Percent(1000)))
                .add
                .is_empty()
        );
        // Deterministic for a version, different for another.
        let again = top_up(
            &readings(&m, &[], v, old, &[]),
            &Goal::one(v),
            Stage::Share(Percent(1000)),
        );
        assert_eq!(again.add, p10.add);
    }

    #[test]
    fn weights_canaries_and_down_hosts() {
        let (v, old) = ids();
        // One heavy host carries half the traffic.
        let mut m: Vec<Member> = (0..10).map(|i| member(i, 1, "eqiad", false)).collect();
        m[3].weight = 10;
        m[7].canary = true;
        let r = readings(&m, &[], v, old, &[]);
        let t = top_up(&r, &Goal::one(v), Stage::Share(Percent(1000)));
        assert_eq!(t.total_weight, 19);
        assert_eq!(t.needed_weight, 2, "10% of 19 is 1.9: rounds up");
        assert_eq!(t.add[0], 7, "canary first");
        assert!(t.reached_weight >= 2);
        // A down host counts in the total and is never picked or "on".
        let r = readings(&m, &[], v, old, &[7]);
        let t = top_up(&r, &Goal::one(v), Stage::Share(Percent(1000)));
        assert!(!t.add.contains(&7));
        assert_eq!(t.unreachable, vec![7]);
        assert_eq!(t.total_weight, 19);
        // 100% cannot be reached with a host down.
        let t = top_up(&r, &Goal::one(v), Stage::Share(Percent::ALL));
        assert!(t.short());
        assert_eq!(t.reached(), 94.7);
    }

    #[test]
    fn a_canary_stage_and_a_change_keep_each_train_share() {
        let (v, old) = ids();
        let mut m: Vec<Member> = (0..10).map(|i| member(i, 1, "eqiad", false)).collect();
        m[2].canary = true;
        m[5].canary = true;
        let r = readings(&m, &[], v, old, &[]);
        let t = top_up(&r, &Goal::one(v), Stage::Canary);
        let mut add = t.add.clone();
        add.sort();
        assert_eq!(add, vec![2, 5], "exactly the canary group");
        // A change on a fleet running two trains: each host goes to its
        // own train's new version; a share counts hosts with the change.
        let (v2, old2) = (
            VersionId::new(ObjectKind::Tree.hash(b"new'")),
            VersionId::new(ObjectKind::Tree.hash(b"old'")),
        );
        let goal = Goal::Change {
            id: "c1".into(),
            map: [(v, v2), (old, old2)].into_iter().collect(),
            unchanged: Default::default(),
        };
        let r = readings(&m, &[0, 1, 2, 3, 4], v, old, &[]);
        let t = top_up(&r, &goal, Stage::Share(Percent::ALL));
        assert_eq!(t.add.len(), 10);
        for &i in &t.add {
            let want = if i < 5 { v2 } else { old2 };
            assert_eq!(goal.target(r[i].current()), Some(want));
        }
        // A version ID is exact: a host on a version made from it by a
        // later change is not on it.
        let goal = Goal::one(v);
        assert!(!goal.reached(Some(v2)));
        assert_eq!(goal.target(Some(v2)), Some(v));
        assert_eq!(goal.target(Some(v)), None);
        assert_eq!(Stage::parse("canary"), Ok(Stage::Canary));
        assert_eq!(Stage::parse("10%"), Ok(Stage::Share(Percent(1000))));
        assert_eq!(Stage::Share(Percent(1000)).to_string(), "10%");
    }

    #[test]
    fn budgets() {
        assert_eq!(Budget::parse("2"), Ok(Budget::Hosts(2)));
        assert_eq!(Budget::parse("10%"), Ok(Budget::Share(Percent(1000))));
        assert!(Budget::parse("two").is_err());
        assert!(Budget::Hosts(1).allows(1, 20));
        assert!(!Budget::Hosts(1).allows(2, 20));
        assert!(Budget::Share(Percent(1000)).allows(2, 20));
        assert!(!Budget::Share(Percent(1000)).allows(3, 20));
    }
}
