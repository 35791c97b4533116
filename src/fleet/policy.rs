//! How a rollout goes when the command line does not say: the site's
//! policy from scap.toml (`[policy]`, `[[gate]]`), else the built-in
//! default, which is today's scap: the canary hosts first, the wait, the
//! health gates, then every host, asking in between unless `--yes`.
//!
//! Two rules hold whatever the source of the settings: stages rise (a share
//! goes down only by a rollback), and a rollout that reaches every host
//! with no health gate at all is refused unless forced (and says so).

use std::time::Duration;

use super::gates::Gates;
use super::inventory::Member;
use super::rollout::{Budget, Percent, Stage};
use crate::config::ConfigFile;

/// The built-in default stages: the canary hosts, then every host.
pub const DEFAULT_STAGES: [Stage; 2] = [Stage::Canary, Stage::Share(Percent::ALL)];
/// scap's `canary_wait_time`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);
pub const DEFAULT_CONCURRENCY: usize = 20;

/// A rollout's settings, from scap.toml and the built-in defaults.
#[derive(Clone, Debug)]
pub struct Policy {
    pub stages: Vec<Stage>,
    pub wait: Duration,
    pub budget: Budget,
    /// As written, for the rollout record.
    pub max_failures: String,
    pub concurrency: usize,
    pub gates: Gates,
    /// Whether the stages came from scap.toml (for messages).
    pub configured: bool,
}

impl Policy {
    /// The site's policy (scap.toml), else the built-in default. Every
    /// error names the key.
    pub fn from_config(cfg: &ConfigFile) -> Result<Policy, String> {
        let p = cfg.policy.clone().unwrap_or_default();
        let stages = match &p.stages {
            Some(list) => {
                let stages = list
                    .iter()
                    .map(|s| Stage::parse(s).map_err(|e| format!("scap.toml [policy] stages: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                check_stages(&stages).map_err(|e| format!("scap.toml [policy] stages: {e}"))?;
                stages
            }
            None => DEFAULT_STAGES.to_vec(),
        };
        let wait = match &p.wait {
            Some(w) => crate::time::parse_duration(w)
                .map_err(|e| format!("scap.toml [policy] wait: {e}"))?,
            None => DEFAULT_WAIT,
        };
        let max_failures = p.max_failures.clone().unwrap_or_else(|| "0".into());
        let budget = Budget::parse(&max_failures)
            .map_err(|e| format!("scap.toml [policy] max_failures: {e}"))?;
        let concurrency = p.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if concurrency == 0 {
            return Err("scap.toml [policy] concurrency: give at least 1".into());
        }
        let mut gates = Gates::default();
        for g in &cfg.gates {
            if let Some(url) = &g.url {
                gates.probes.push((url.clone(), g.status.unwrap_or(200)));
            }
            if let Some(cmd) = &g.command {
                gates.commands.push(cmd.clone());
            }
            if let Some(p) = g.prom() {
                gates.prometheus.push(p);
            }
        }
        Ok(Policy {
            stages,
            wait,
            budget,
            max_failures,
            concurrency,
            gates,
            configured: p.stages.is_some(),
        })
    }
}

/// The restart policy from scap.toml's `[restarts]` (errors name the key).
pub fn restart_policy(cfg: &ConfigFile) -> Result<super::restart::RestartPolicy, String> {
    let mut p = super::restart::RestartPolicy::default();
    let Some(r) = &cfg.restarts else {
        return Ok(p);
    };
    if let Some(b) = &r.batch {
        p.batch = Percent::parse(b).map_err(|e| format!("scap.toml [restarts] batch: {e}"))?;
        if p.batch.0 == 0 {
            return Err("scap.toml [restarts] batch: give more than 0%".into());
        }
    }
    if let Some(d) = &r.drain {
        p.drain = crate::time::parse_duration(d)
            .map_err(|e| format!("scap.toml [restarts] drain: {e}"))?;
    }
    if let Some(m) = &r.min_pooled {
        p.min_pooled =
            Percent::parse(m).map_err(|e| format!("scap.toml [restarts] min_pooled: {e}"))?;
    }
    Ok(p)
}

/// Parses `--stages 10,20,50,100` (or `canary,100%`).
pub fn parse_stages(s: &str) -> Result<Vec<Stage>, String> {
    let stages = s
        .split(',')
        .map(Stage::parse)
        .collect::<Result<Vec<_>, _>>()?;
    check_stages(&stages)?;
    Ok(stages)
}

/// Stages rise; the canary group, if there, comes first.
pub fn check_stages(stages: &[Stage]) -> Result<(), String> {
    if stages.is_empty() {
        return Err("no stages: give at least one, e.g. canary,100%".into());
    }
    if stages.iter().skip(1).any(|s| *s == Stage::Canary) {
        return Err("the canary stage can only come first, e.g. canary,10%,100%".into());
    }
    if stages.windows(2).any(|w| w[0] >= w[1]) {
        return Err(
            "stages must rise, e.g. canary,10%,50%,100% (a rollback is how a share goes down)"
                .into(),
        );
    }
    Ok(())
}

/// Refuses what a release engineer would not do by accident: reaching
/// every host with no health gate (unless `force`), or a canary stage on a
/// fleet with no canary hosts.
pub fn check_rollout(
    stages: &[Stage],
    gates: &Gates,
    force: bool,
    members: &[Member],
) -> Result<(), String> {
    if stages.contains(&Stage::Canary) && !members.iter().any(|m| m.canary) {
        return Err(
            "this rollout starts with the canary hosts, but the fleet has none: set canary_groups in scap.toml (or pass --canary-group FILE), mark hosts `canary = true` in the inventory, or give the shares yourself (--canary P% or --stages)"
                .into(),
        );
    }
    if gates.is_empty() && !force && stages.iter().any(|s| s.is_all()) {
        return Err(
            "this rollout reaches every host and no health gate is configured: add [[gate]] tables to scap.toml (or pass --check-url / --check-cmd), or pass --force to deploy with no gate"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_config() {
        let p = Policy::from_config(&ConfigFile::default()).unwrap();
        assert_eq!(p.stages, DEFAULT_STAGES);
        assert_eq!(p.wait, DEFAULT_WAIT);
        assert!(p.gates.is_empty());
        let cfg: ConfigFile = toml::from_str(
            "[policy]\nstages = [\"canary\", \"50%\", \"100%\"]\nwait = \"1m\"\nmax_failures = \"5%\"\n\n[[gate]]\nurl = \"http://{host}/\"\n\n[[gate]]\ncommand = \"true\"\n",
        )
        .unwrap();
        let p = Policy::from_config(&cfg).unwrap();
        assert_eq!(p.stages.len(), 3);
        assert_eq!(p.wait, Duration::from_secs(60));
        assert_eq!(p.gates.probes, vec![("http://{host}/".to_string(), 200)]);
        assert_eq!(p.gates.commands, vec!["true".to_string()]);
        let bad: ConfigFile = toml::from_str("[policy]\nstages = [\"50%\", \"10%\"]\n").unwrap();
        assert!(
            Policy::from_config(&bad)
                .unwrap_err()
                .contains("[policy] stages")
        );
        assert!(toml::from_str::<ConfigFile>("[policy]\nstagez = []\n").is_err());
    }

    #[test]
    fn stage_rules() {
        assert!(parse_stages("canary,10%,100%").is_ok());
        assert!(parse_stages("10,20,50,100").is_ok());
        assert!(parse_stages("10%,canary").is_err());
        assert!(parse_stages("50,50").is_err());
        let all = [Stage::Share(Percent::ALL)];
        let e = check_rollout(&all, &Gates::default(), false, &[]).unwrap_err();
        assert!(e.contains("--force"), "{e}");
        assert!(check_rollout(&all, &Gates::default(), true, &[]).is_ok());
        assert!(
            check_rollout(
                &[Stage::Share(Percent(1000))],
                &Gates::default(),
                false,
                &[]
            )
            .is_ok()
        );
        assert!(
            check_rollout(&DEFAULT_STAGES, &Gates::default(), true, &[])
                .unwrap_err()
                .contains("canary")
        );
    }
}
