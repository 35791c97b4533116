//! Canary arithmetic: poll every host, count the traffic already on a
//! version, and pick just enough more hosts to reach a share.
//!
//! Everything here is a pure function of the hosts' answers, so a rollout
//! can be resumed from anywhere: re-running the same command picks the same
//! hosts (the order is a function of the version and the host names) and
//! finds nothing left to do.

use serde::Serialize;

use super::inventory::Member;
use super::sync::Agents;
use crate::host::state::STATE_FORMAT;
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

/// `weight / total` as a percentage with one decimal, for people.
pub fn share(weight: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (weight as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

/// What one host said when polled.
#[derive(Clone, Debug, Serialize)]
pub struct Reading {
    pub member: Member,
    /// The agent's `/v1/state` answer, or why there is none.
    pub view: Result<HostView, String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostView {
    pub current: Option<VersionId>,
    pub previous: Option<VersionId>,
    pub stable: Option<VersionId>,
    pub since: Option<u64>,
    pub busy: bool,
    pub last_error: Option<String>,
    /// Seconds the last sync took, and when it happened.
    pub last_sync: Option<(f64, u64)>,
    /// Files the host's last drift check found edited by hand (`None`: not
    /// checked since the host switched).
    pub drift: Option<u64>,
}

impl Reading {
    pub fn current(&self) -> Option<VersionId> {
        self.view.as_ref().ok().and_then(|v| v.current)
    }

    pub fn on(&self, v: &VersionId) -> bool {
        self.current().as_ref() == Some(v)
    }
}

fn version_at(state: &serde_json::Value, key: &str) -> Option<VersionId> {
    state[key]["version"].as_str().and_then(|s| s.parse().ok())
}

/// Reads an agent's `/v1/state` answer; refuses a state format newer than
/// this scap knows rather than misread it.
pub fn view_of(member: &Member, body: &serde_json::Value) -> Result<HostView, String> {
    let st = &body["state"];
    let format = st["format"].as_u64().unwrap_or(0);
    if format > u64::from(STATE_FORMAT) {
        return Err(format!(
            "{}: state file is format v{format}, this scap reads up to v{STATE_FORMAT}: upgrade scap on the deploy host",
            member.host
        ));
    }
    let last_sync = st["history"]
        .as_array()
        .and_then(|h| h.iter().find(|e| e["action"] == "sync" && e["ok"] == true))
        .map(|e| {
            (
                e["seconds"].as_f64().unwrap_or(0.0),
                e["time"].as_u64().unwrap_or(0),
            )
        });
    Ok(HostView {
        current: version_at(st, "current"),
        previous: version_at(st, "previous"),
        stable: version_at(st, "stable"),
        since: st["current"]["since"].as_u64(),
        busy: body["busy"] == true,
        last_error: st["last_error"]["message"].as_str().map(str::to_string),
        last_sync,
        drift: body["drift"]["changed"].as_u64(),
    })
}

/// Reads every host's state, all at once; a host that does not answer
/// within the agents' timeout is unreachable, never "on" anything.
pub async fn poll(agents: &Agents, members: &[Member], concurrency: usize) -> Vec<Reading> {
    use futures_util::StreamExt;
    futures_util::stream::iter(members.iter().cloned())
        .map(|member| async move {
            let view = agents
                .get(&member.host, "/v1/state")
                .await
                .and_then(|body| view_of(&member, &body));
            Reading { member, view }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await
}

/// The order in which hosts are given a version: canary-group hosts first,
/// then round-robin across (datacenter, cluster) groups, each group in an
/// order that is a hash of the version and the host name. Stable for a
/// version, different for the next one (so the same hosts are not always
/// first), spread across the fleet.
pub fn selection_order(members: &[Member], version: &VersionId) -> Vec<usize> {
    let key = |m: &Member| {
        let mut h = blake3::Hasher::new();
        h.update(version.object().as_bytes());
        h.update(m.host.to_string().as_bytes());
        let b = h.finalize();
        u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
    };
    let mut canaries: Vec<usize> = (0..members.len()).filter(|&i| members[i].canary).collect();
    canaries.sort_by_key(|&i| key(&members[i]));
    let mut groups: std::collections::BTreeMap<(String, String), Vec<usize>> = Default::default();
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
    pub target: Percent,
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
}

impl TopUp {
    pub fn reached(&self) -> f64 {
        share(self.reached_weight, self.total_weight)
    }

    /// True when not enough reachable hosts are left to reach the target.
    pub fn short(&self) -> bool {
        self.reached_weight < self.needed_weight
    }
}

/// Plans a step to `target` of traffic on `version`. Never lowers the
/// share: hosts already on the version stay, whatever the target.
pub fn top_up(readings: &[Reading], version: &VersionId, target: Percent) -> TopUp {
    let members: Vec<Member> = readings.iter().map(|r| r.member.clone()).collect();
    let total_weight: u64 = members.iter().map(|m| m.weight).sum();
    let needed_weight = target.of(total_weight);
    let already: Vec<usize> = (0..readings.len())
        .filter(|&i| readings[i].on(version))
        .collect();
    let unreachable: Vec<usize> = (0..readings.len())
        .filter(|&i| readings[i].view.is_err())
        .collect();
    let mut reached_weight: u64 = already.iter().map(|&i| members[i].weight).sum();
    let mut add = Vec::new();
    for i in selection_order(&members, version) {
        if reached_weight >= needed_weight {
            break;
        }
        if readings[i].view.is_ok() && !readings[i].on(version) {
            add.push(i);
            reached_weight += members[i].weight;
        }
    }
    TopUp {
        target,
        total_weight,
        needed_weight,
        already,
        add,
        unreachable,
        reached_weight,
    }
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
                    Err("unreachable".into())
                } else {
                    Ok(HostView {
                        current: Some(if on.contains(&i) { v } else { old }),
                        previous: None,
                        stable: None,
                        since: None,
                        busy: false,
                        last_error: None,
                        last_sync: None,
                        drift: None,
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
        let p10 = top_up(&r, &v, Percent(1000));
        assert_eq!(p10.add.len(), 2);
        // The two picked are in two datacenters.
        assert_ne!(m[p10.add[0]].dc, m[p10.add[1]].dc);
        // Those two now on v: 20% adds exactly two more, not the first two again.
        let r = readings(&m, &p10.add, v, old, &[]);
        let p20 = top_up(&r, &v, Percent(2000));
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
        assert!(top_up(&r, &v, Percent(2000)).add.is_empty());
        assert!(top_up(&r, &v, Percent(1000)).add.is_empty());
        // Deterministic for a version, different for another.
        let again = top_up(&readings(&m, &[], v, old, &[]), &v, Percent(1000));
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
        let t = top_up(&r, &v, Percent(1000));
        assert_eq!(t.total_weight, 19);
        assert_eq!(t.needed_weight, 2, "10% of 19 is 1.9: rounds up");
        assert_eq!(t.add[0], 7, "canary first");
        assert!(t.reached_weight >= 2);
        // A down host counts in the total and is never picked or "on".
        let r = readings(&m, &[], v, old, &[7]);
        let t = top_up(&r, &v, Percent(1000));
        assert!(!t.add.contains(&7));
        assert_eq!(t.unreachable, vec![7]);
        assert_eq!(t.total_weight, 19);
        // 100% cannot be reached with a host down.
        let t = top_up(&r, &v, Percent::ALL);
        assert!(t.short());
        assert_eq!(t.reached(), 94.7);
    }

    #[test]
    fn a_newer_state_format_is_refused_not_misread() {
        let m = member(1, 1, "eqiad", false);
        let (v, _) = ids();
        let ok = serde_json::json!({"state": {"format": 1, "current": {"version": v, "since": 5}}, "busy": false});
        assert_eq!(view_of(&m, &ok).unwrap().current, Some(v));
        let newer = serde_json::json!({"state": {"format": 3, "current": {"version": v}}});
        let e = view_of(&m, &newer).unwrap_err();
        assert_eq!(
            e,
            "mw1001: state file is format v3, this scap reads up to v1: upgrade scap on the deploy host"
        );
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
