//! Reading the fleet: every host's state, all at once, each with a short
//! timeout. A host that does not answer is unreachable, never "on"
//! anything.
//!
//! `scap status` asks `scap serve` first ([`poll_fleet`]): the server
//! keeps its connections (and TLS sessions) to the agents from one poll to
//! the next, where a command of its own would open 375 of them. The answer
//! is a poll the server starts after the request arrives, never its
//! dashboard's cached one.

use serde::{Deserialize, Serialize};

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
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
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

/// `GET /v1/fleet/poll`'s answer (store-format.md, "Fleet poll").
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetPoll {
    pub format: u32,
    /// When the poll started (unix seconds).
    pub polled_at: u64,
    pub hosts: Vec<PolledHost>,
}

/// One host of a [`FleetPoll`]: its view, or why there is none.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolledHost {
    /// The host as the server's inventory writes it (`name` or
    /// `name:port`).
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<HostView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub const FLEET_POLL_FORMAT: u32 = 1;

/// Most bytes of a [`FleetPoll`] read: 4,000 hosts of 16 KiB (a host's
/// error is clipped to 500 characters; a view is well under 4 KiB).
pub const MAX_FLEET_POLL_BYTES: usize = 64 << 20;

impl FleetPoll {
    pub fn of(readings: &[Reading], polled_at: u64) -> FleetPoll {
        FleetPoll {
            format: FLEET_POLL_FORMAT,
            polled_at,
            hosts: readings
                .iter()
                .map(|r| PolledHost {
                    host: r.member.host.to_string(),
                    view: r.view.as_ref().ok().cloned(),
                    error: r
                        .view
                        .as_ref()
                        .err()
                        .map(|e| crate::text::clip(&e.to_string(), 500)),
                })
                .collect(),
        }
    }

    /// The readings of `members` in it, in their order; why not, when it is
    /// not a poll of exactly those hosts.
    pub fn readings(self, members: &[Member]) -> Result<Vec<Reading>, String> {
        if self.format != FLEET_POLL_FORMAT {
            return Err(format!(
                "its answer is format {}, this scap reads {FLEET_POLL_FORMAT}",
                self.format
            ));
        }
        let mut by_host: std::collections::HashMap<String, PolledHost> = self
            .hosts
            .into_iter()
            .map(|h| (h.host.clone(), h))
            .collect();
        if by_host.len() != members.len() {
            return Err(format!(
                "it polls {} host(s), this command's fleet has {}",
                by_host.len(),
                members.len()
            ));
        }
        members
            .iter()
            .map(|m| {
                let name = m.host.to_string();
                let h = by_host
                    .remove(&name)
                    .ok_or_else(|| format!("it does not poll {name}"))?;
                let view = match (h.view, h.error) {
                    (Some(v), None) => Ok(v),
                    (None, Some(e)) => Err(CallError::Relayed {
                        host: name,
                        message: e,
                    }),
                    _ => return Err(format!("its entry for {name} has no view and no error")),
                };
                Ok(Reading {
                    member: m.clone(),
                    view,
                })
            })
            .collect()
    }
}

/// Who polled the fleet for a command.
#[derive(Debug, Clone, PartialEq)]
pub enum PolledBy {
    /// `scap serve` at this address, over the connections it keeps.
    Serve(String),
    /// This command, each host itself; why not through `scap serve`, if
    /// one was asked.
    Direct(Option<String>),
}

/// Every host's state: through `scap serve` at `serve` if given and it
/// answers for exactly `members`, else each host directly (and why, unless
/// the server polls no fleet at all).
pub async fn poll_fleet(
    agents: &Agents,
    serve: Option<&Host>,
    members: &[Member],
    concurrency: usize,
) -> (Vec<Reading>, PolledBy) {
    let why = match serve {
        None => None,
        Some(s) => match agents.fleet_poll(s).await {
            Ok(answer) => match answer.readings(members) {
                Ok(readings) => return (readings, PolledBy::Serve(s.to_string())),
                Err(why) => Some(format!("scap serve at {s}: {why}")),
            },
            // A server started without the fleet (`--hosts`, `--inventory`):
            // not set up for this, nothing to say.
            Err(CallError::Http { status: 404, .. }) => None,
            Err(e) => Some(format!("scap serve: {e}")),
        },
    };
    (
        poll(agents, members, concurrency).await,
        PolledBy::Direct(why),
    )
}
