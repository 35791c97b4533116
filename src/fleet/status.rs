//! The fleet at a glance: which versions run where and on what share of
//! traffic. One JSON shape, shared by `scap status --json`, the dashboard
//! and its API.

use super::history;
use super::inventory::Member;
use super::lock;
use super::poll::Reading;
use super::rollout::share;
use super::trains::Trains;
use crate::store::VersionId;
use crate::time::unix_now;

/// A version for people: its train and changes with the hash beside it
/// (`1.46.0-wmf.6 +2: SWAT: ... (3f9a1c2e4b5d)`).
pub fn label_of(trains: &Trains, v: &VersionId) -> String {
    trains.name(v).to_string()
}

/// The rollout recorded on the deploy host, for people: version, stages,
/// which are done, the next and when it is due.
/// Every standby deploy host's last report, with a line for people.
fn standbys(state: &super::state::DeployState) -> Vec<serde_json::Value> {
    let now = unix_now();
    state
        .standby_reports()
        .unwrap_or_default()
        .iter()
        .filter_map(|b| serde_json::from_slice::<super::standby::StandbyReport>(b).ok())
        .map(|r| {
            let mut v = serde_json::to_value(&r).unwrap_or_default();
            v["summary"] = r.summary(now).into();
            v
        })
        .collect()
}

pub fn rollout_json(state: &super::state::DeployState, trains: &Trains) -> serde_json::Value {
    let Ok(Some(r)) = super::record::RolloutRecord::load(state) else {
        return serde_json::Value::Null;
    };
    let stages: Vec<String> = r.stages.iter().map(|s| s.to_string()).collect();
    serde_json::json!({
        "id": r.id,
        "version": r.version,
        "label": label_of(trains, &r.version),
        "name": trains.name(&r.version),
        "stages": stages,
        "completed": r.completed,
        "next": r.next_stage().map(|s| s.to_string()),
        "next_due": r.next_due,
        "state": r.state,
        "resumable": r.resumable(),
        "by": r.by,
        "started": r.started,
        "updated": r.updated,
        "note": r.note,
        "gates": r.settings.probes.len() + r.settings.commands.len(),
    })
}

/// The fleet at a glance. `ages` gives, per reading, the seconds since the
/// host last answered (the dashboard's cached polls); empty for a fresh poll.
pub fn fleet_status(
    members: &[Member],
    readings: &[Reading],
    trains: &Trains,
    state: &super::state::DeployState,
    ages: &[Option<u64>],
) -> serde_json::Value {
    let total: u64 = members.iter().map(|m| m.weight).sum();
    let desired = super::desired::Desired::load(state).unwrap_or_default();
    let mut behind: Vec<serde_json::Value> = Vec::new();
    let mut versions: std::collections::BTreeMap<String, (VersionId, u64, Vec<String>)> =
        Default::default();
    let mut stables: std::collections::BTreeSet<String> = Default::default();
    for r in readings {
        if let Ok(v) = &r.view {
            if let Some(c) = v.current {
                let e = versions.entry(c.to_hex()).or_insert((c, 0, Vec::new()));
                e.1 += r.member.weight;
                e.2.push(r.member.host.to_string());
            }
            if let Some(s) = v.stable {
                stables.insert(s.to_hex());
            }
        }
    }
    // Shares per cluster: a canary share is taken of each cluster's traffic.
    let mut cluster_total: std::collections::BTreeMap<&str, u64> = Default::default();
    for m in members {
        *cluster_total.entry(m.cluster.as_str()).or_default() += m.weight;
    }
    let per_cluster = |v: &VersionId| -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (c, t) in &cluster_total {
            let w: u64 = readings
                .iter()
                .filter(|r| r.member.cluster == *c && r.on(v))
                .map(|r| r.member.weight)
                .sum();
            out.insert(c.to_string(), share(w, *t).into());
        }
        out.into()
    };
    let mut vs: Vec<serde_json::Value> = versions
        .into_values()
        .map(|(v, w, hosts)| {
            serde_json::json!({
                "version": v, "label": label_of(trains, &v), "name": trains.name(&v),
                "weight": w, "share": share(w, total),
                "hosts": hosts, "stable": stables.contains(&v.to_hex()),
                "clusters": per_cluster(&v),
            })
        })
        .collect();
    let clusters: Vec<serde_json::Value> = cluster_total
        .iter()
        .map(|(c, t)| {
            let of = |want: Option<super::pools::Pooled>| {
                members
                    .iter()
                    .filter(|m| m.cluster == *c && m.pooled == want)
                    .count()
            };
            serde_json::json!({
                "cluster": c, "weight": t,
                "pooled": of(Some(super::pools::Pooled::Yes)),
                "depooled": of(Some(super::pools::Pooled::No)),
                "inactive": of(Some(super::pools::Pooled::Inactive)),
            })
        })
        .collect();
    vs.sort_by(|a, b| b["weight"].as_u64().cmp(&a["weight"].as_u64()));
    let down: Vec<serde_json::Value> = readings
        .iter()
        .filter_map(|r| r.view.as_ref().err().map(|e| serde_json::json!({"host": r.member.host.to_string(), "error": e.to_string(), "weight": r.member.weight})))
        .collect();
    let down_weight: u64 = readings
        .iter()
        .filter(|r| r.view.is_err())
        .map(|r| r.member.weight)
        .sum();
    let hosts: Vec<serde_json::Value> = readings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut h = serde_json::json!({
                "reading_age_seconds": ages.get(i).copied().flatten(),
                "host": r.member.host.to_string(), "weight": r.member.weight, "dc": r.member.dc,
                "cluster": r.member.cluster, "canary": r.member.canary,
                "pooled": r.member.pooled,
            });
            let target = desired.get(&r.name());
            h["target"] = serde_json::to_value(target.map(|t| t.version)).unwrap_or_default();
            h["target_name"] = target.map(|t| label_of(trains, &t.version)).into();
            h["target_why"] = target.map(|t| t.why.clone()).into();
            match &r.view {
                Ok(v) => {
                    let is_behind = target.is_some_and(|t| v.current != Some(t.version));
                    h["behind"] = is_behind.into();
                    if is_behind {
                        behind.push(serde_json::json!({
                            "host": r.member.host.to_string(),
                            "current": v.current,
                            "current_name": v.current.map(|c| label_of(trains, &c)),
                            "target": target.map(|t| t.version),
                            "target_name": target.map(|t| label_of(trains, &t.version)),
                        }));
                    }
                    h["reachable"] = true.into();
                    h["current"] = serde_json::to_value(v.current).unwrap_or_default();
                    h["previous"] = serde_json::to_value(v.previous).unwrap_or_default();
                    h["stable"] = serde_json::to_value(v.stable).unwrap_or_default();
                    h["current_name"] = v.current.map(|c| label_of(trains, &c)).into();
                    h["previous_name"] = v.previous.map(|c| label_of(trains, &c)).into();
                    h["stable_name"] = v.stable.map(|c| label_of(trains, &c)).into();
                    h["since"] = v.since.into();
                    h["busy"] = v.busy.into();
                    h["last_error"] = v.last_error.clone().into();
                    h["last_sync_seconds"] = v.last_sync.map(|s| s.0).into();
                    h["last_sync_time"] = v.last_sync.map(|s| s.1).into();
                    h["drift"] = v.drift.into();
                }
                Err(e) => {
                    h["reachable"] = false.into();
                    h["error"] = e.to_string().into();
                }
            }
            h
        })
        .collect();
    // Hosts with each version prepared but not live (staged).
    let mut staged: std::collections::BTreeMap<String, u64> = Default::default();
    for r in readings {
        if let Ok(v) = &r.view {
            for s in &v.staged {
                *staged.entry(s.to_hex()).or_default() += 1;
            }
        }
    }
    // Bytes each source served in the last rollout (its steps in history).
    // The newest entries: a rollout's steps are a few of them.
    let history = history::recent(state, 200).unwrap_or_default();
    let mut sources: std::collections::BTreeMap<String, u64> = Default::default();
    if let Some(last) = history
        .iter()
        .rev()
        .find(|e| e.action == "sync" || e.action == "change")
    {
        for e in history.iter().filter(|e| {
            (e.action == "sync" || e.action == "change")
                && e.version == last.version
                && e.change == last.change
        }) {
            for (s, n) in &e.sources {
                *sources.entry(s.clone()).or_default() += n;
            }
        }
    }
    serde_json::json!({
        "staged": staged,
        "sources_last_rollout": sources,
        "time": unix_now(),
        "total_weight": total,
        "versions": vs,
        "clusters": clusters,
        "unreachable": { "hosts": down, "weight": down_weight, "share": share(down_weight, total) },
        "hosts": hosts,
        "lock": lock::holder(state).ok().flatten(),
        "state": state.describe(),
        "standbys": standbys(state),
        "held": lock::Locks::new(state, None).held().unwrap_or_default(),
        "behind": behind,
        "rollout": rollout_json(state, trains),
        "trains": trains.heads().iter().map(|(t, h)| serde_json::json!({
            "train": t, "head": h, "name": label_of(trains, h),
            "moves": trains.recent_moves(t).iter().map(|m| serde_json::json!({
                "time": m.time, "user": m.user, "action": m.action, "from": m.from,
                "to": m.to, "to_name": label_of(trains, &m.to), "message": m.message,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "last_deploy": history.last().cloned(),
    })
}
