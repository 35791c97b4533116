//! What gc on the deploy host must keep for the fleet: every version in the
//! desired state, every version the rollout in progress names, and every
//! version any host reports as current, previous or stable, from a poll
//! made now. A host that does not answer could hold anything: gc refuses
//! to run, naming it, rather than delete what production would roll back
//! to.

use std::collections::BTreeSet;

use super::agents::Agents;
use super::desired::Desired;
use super::inventory::Member;
use super::poll::poll;
use super::record::RolloutRecord;
use crate::store::VersionId;

/// The versions to keep, with why, for people.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FleetRoots {
    pub versions: BTreeSet<VersionId>,
    pub hosts_read: usize,
    pub desired: usize,
}

/// Polls every host and reads the desired state and the rollout record.
/// `Err` names the hosts that did not answer, or says why the fleet
/// cannot be read.
pub async fn fleet_roots(
    agents: Option<&Agents>,
    members: &[Member],
    state: &super::state::DeployState,
) -> Result<FleetRoots, String> {
    let desired = Desired::load(state).map_err(|e| e.to_string())?;
    let mut out = FleetRoots::default();
    out.versions.extend(desired.versions());
    out.desired = desired.hosts.len();
    if let Some(r) = RolloutRecord::load(state).map_err(|e| e.to_string())? {
        out.versions.insert(r.version);
        out.versions.extend(r.from.values().copied());
    }
    let Some(agents) = agents.filter(|_| !members.is_empty()) else {
        if !desired.hosts.is_empty() {
            return Err(format!(
                "the desired state names {} host(s) but no fleet is configured, so gc cannot read what they hold: pass --hosts or --inventory (or set them in scap.toml)",
                desired.hosts.len()
            ));
        }
        return Ok(out);
    };
    let readings = poll(agents, members, 64).await;
    let down: Vec<String> = readings
        .iter()
        .filter(|r| r.view.is_err())
        .map(|r| r.member.host.to_string())
        .collect();
    if !down.is_empty() {
        return Err(format!(
            "{} host(s) did not answer, so gc cannot know what they hold: {}; bring them back (or take them out of the inventory if they are gone), then run gc again",
            down.len(),
            crate::text::clip(&down.join(", "), 500)
        ));
    }
    for r in &readings {
        out.versions.extend(r.held());
    }
    out.hosts_read = readings.len();
    Ok(out)
}
