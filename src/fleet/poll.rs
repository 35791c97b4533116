//! Reading the fleet: every host's state, all at once, each with a short
//! timeout. A host that does not answer is unreachable, never "on"
//! anything.

use serde::Serialize;

use super::agents::{Agents, CallError, fan_out};
use super::inventory::{Host, Member};
use crate::proto::StateResponse;
use crate::proto::state::Action;
use crate::store::VersionId;

/// What one host said when polled.
#[derive(Clone, Debug)]
pub struct Reading {
    pub member: Member,
    /// The host's state, or why there is none.
    pub view: Result<HostView, CallError>,
}

/// The part of a host's state the controller uses.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct HostView {
    /// The name the host's agent goes by (`--host`): the key of its
    /// desired state.
    pub name: String,
    pub current: Option<VersionId>,
    pub previous: Option<VersionId>,
    pub stable: Option<VersionId>,
    pub since: Option<u64>,
    pub busy: bool,
    /// A sync, rollback or pull runs there now.
    pub changing: bool,
    /// Versions prepared in a release slot, not live (staged, or kept for
    /// a rollback).
    pub staged: Vec<VersionId>,
    pub last_error: Option<String>,
    /// Seconds the last sync took, and when it happened.
    pub last_sync: Option<(f64, u64)>,
    /// Files the host's last drift check found edited by hand (`None`: not
    /// checked since the host switched).
    pub drift: Option<u64>,
}

impl HostView {
    pub fn of(r: &StateResponse) -> HostView {
        let st = &r.state;
        HostView {
            name: st.host.clone(),
            current: st.current.as_ref().map(|d| d.version),
            previous: st.previous.as_ref().map(|d| d.version),
            stable: st.stable.as_ref().map(|d| d.version),
            since: st.current.as_ref().map(|d| d.since),
            busy: r.busy,
            changing: r.changing,
            staged: r
                .slots
                .iter()
                .filter(|s| s.meta.clean)
                .filter_map(|s| s.meta.version)
                .filter(|v| Some(*v) != st.current.as_ref().map(|d| d.version))
                .collect(),
            last_error: st
                .last_error
                .as_ref()
                .map(|e| crate::text::clip(&e.message, 500)),
            last_sync: st
                .history
                .iter()
                .find(|e| e.action == Action::Sync && e.ok)
                .map(|e| (e.seconds, e.time)),
            drift: r.drift.as_ref().map(|d| d.changed),
        }
    }
}

impl Reading {
    pub fn current(&self) -> Option<VersionId> {
        self.view.as_ref().ok().and_then(|v| v.current)
    }

    pub fn on(&self, v: &VersionId) -> bool {
        self.current().as_ref() == Some(v)
    }

    /// The host's name for the desired state: what its agent calls itself,
    /// or (not answering) the inventory's name for it.
    pub fn name(&self) -> String {
        match &self.view {
            Ok(v) if !v.name.is_empty() => v.name.clone(),
            _ => self.member.host.name.clone(),
        }
    }

    /// Every version this host runs or holds for a rollback.
    pub fn held(&self) -> Vec<VersionId> {
        match &self.view {
            Ok(v) => [v.current, v.previous, v.stable]
                .into_iter()
                .flatten()
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Reads every host's state, `concurrency` at a time.
pub async fn poll(agents: &Agents, members: &[Member], concurrency: usize) -> Vec<Reading> {
    let hosts: Vec<Host> = members.iter().map(|m| m.host.clone()).collect();
    let results = fan_out(
        &hosts,
        concurrency,
        None,
        |h| Box::pin(async move { agents.state(h).await.map(|r| HostView::of(&r)) }),
        &|_| {},
    )
    .await;
    members
        .iter()
        .zip(results)
        .map(|(m, r)| Reading {
            member: m.clone(),
            view: r.result,
        })
        .collect()
}
