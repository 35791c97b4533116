//! How fleet procedures (rollouts, rollbacks, restarts, catch-ups) talk
//! to the person or program running them: progress lines, questions, the
//! choice after a failed gate. The CLI answers on a terminal (or `--yes`);
//! tests and the demo answer in code. Keeps prompts out of the library.

use super::agents::HostResult;
use crate::proto::Outcome as HostOutcome;

/// What the operator decides when a gate fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateChoice {
    Retry,
    Ignore,
    Rollback,
    Exit,
}

/// How fleet procedures talk to their operator.
pub trait Operator {
    /// A line of progress (the caller adds the clock).
    fn say(&mut self, line: &str);
    /// Continue to the next stage?
    fn confirm(&mut self, question: &str) -> bool;
    fn gate_failed(&mut self, failures: &[String]) -> GateChoice;
    /// A step starts changing `hosts` hosts.
    fn step_started(&mut self, stage: &str, hosts: usize);
    /// Called after each host of the step finishes.
    fn host_done(&mut self, result: &HostResult<HostOutcome>);
    /// The step's hosts are all done.
    fn step_done(&mut self, stage: &str, ok: usize, failed: usize);
}
