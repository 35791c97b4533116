//! Restarts that never drop capacity: after a step's hosts switch, their
//! new code runs only once php-fpm restarts (or their opcache is reset:
//! the host's restart command is the site's choice). The controller
//! restarts them in batches per cluster. With pools: depool (in etcd,
//! compare-and-swap), wait for connections to drain, run the host's
//! restart command through its agent (`POST /v1/restart`), check the host
//! serves the version, pool it again. Without pools: the same batches by
//! host count, with no depool.
//!
//! **Invariants:** without pools, at most `batch` of a cluster's hosts
//! (rounded down, at least one) restart at once, and a batch starts only
//! when the one before has finished and been checked. With pools: at most a batch (a share of each cluster's pooled
//! weight, at least one host) is depooled by scap at once; a cluster's
//! pooled weight never goes under `--min-pooled` of what was pooled when
//! the restarts began (a batch shrinks, and the restarts stop, naming the
//! host and the floor, rather than cross it); a host whose restart or
//! health check fails stays depooled and is reported by name; a host that
//! was not pooled before is restarted without touching its pool state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::agents::{Agents, fan_out};
use super::inventory::{Host, Member};
use super::operator::Operator;
use super::pools::{PoolEntry, Pooled, Pools};
use super::rollout::{Percent, share};
use crate::store::VersionId;

/// `[restarts]` in scap.toml, and the matching flags.
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    /// A batch: this share of each cluster's pooled weight (at least one host).
    pub batch: Percent,
    /// How long to wait after a depool for connections to drain.
    pub drain: Duration,
    /// Never leave less than this share of a cluster's pooled weight pooled.
    pub min_pooled: Percent,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            batch: Percent(1000),
            drain: Duration::from_secs(5),
            min_pooled: Percent(7500),
        }
    }
}

/// What the restarts did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RestartReport {
    pub restarted: Vec<String>,
    /// (host, why): left depooled if it was pooled.
    pub failed: Vec<(String, String)>,
    /// Hosts not restarted because the floor or an error stopped the
    /// restarts (their new code does not run yet).
    pub not_restarted: Vec<String>,
    /// Without pools: the most hosts of each cluster restarting at once.
    pub most_at_once: BTreeMap<String, usize>,
    /// The lowest share of each cluster's starting pooled weight that was
    /// pooled at any moment.
    pub lowest_pooled: BTreeMap<String, f64>,
    /// Why the restarts stopped early, if they did.
    pub stopped: Option<String>,
}

pub struct Restarter<'a> {
    pub agents: &'a Agents,
    /// The load balancer's pools (none: batches by host count, no depool).
    pub pools: Option<&'a Pools>,
    /// Hosts of each cluster in the whole fleet (what a batch is a share
    /// of, without pools).
    pub cluster_hosts: BTreeMap<String, usize>,
    pub policy: RestartPolicy,
    pub by: String,
    pub interrupted: &'a AtomicBool,
}

/// One host to restart.
struct Job {
    member: Member,
    version: VersionId,
    entry: Option<PoolEntry>,
}

impl Restarter<'_> {
    /// Restarts `hosts` (each now on the version given), batch by batch.
    pub async fn run(&self, op: &mut dyn Operator, hosts: &[(Member, VersionId)]) -> RestartReport {
        if hosts.is_empty() {
            return RestartReport::default();
        }
        match self.pools {
            Some(pools) => self.run_pooled(op, hosts, pools).await,
            None => self.run_batched(op, hosts).await,
        }
    }

    /// Without pools: batches of at most `batch` of each cluster's hosts
    /// (at least one), one batch after the other.
    async fn run_batched(
        &self,
        op: &mut dyn Operator,
        hosts: &[(Member, VersionId)],
    ) -> RestartReport {
        let mut report = RestartReport::default();
        let mut queues: BTreeMap<String, Vec<Job>> = BTreeMap::new();
        for (m, v) in hosts {
            queues.entry(m.cluster.clone()).or_default().push(Job {
                member: m.clone(),
                version: *v,
                entry: None,
            });
        }
        let limit = |cluster: &str| {
            let n = self.cluster_hosts.get(cluster).copied().unwrap_or(0) as u64;
            ((u64::from(self.policy.batch.0) * n / 10_000) as usize).max(1)
        };
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                report.stopped = Some("interrupted (Ctrl-C) between restart batches".into());
                break;
            }
            let mut batch: Vec<Job> = Vec::new();
            for (cluster, queue) in queues.iter_mut() {
                let n = limit(cluster).min(queue.len());
                if n > 0 {
                    let most = report.most_at_once.entry(cluster.clone()).or_default();
                    *most = (*most).max(n);
                }
                batch.extend(queue.drain(..n));
            }
            if batch.is_empty() {
                break;
            }
            op.say(&format!(
                "restarting {} host(s): {}",
                batch.len(),
                crate::text::clip(
                    &batch
                        .iter()
                        .map(|j| j.member.host.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                    200
                )
            ));
            let results = self.restart_all(&batch).await;
            for (job, r) in batch.iter().zip(results) {
                let name = job.member.host.to_string();
                match r {
                    Ok(()) => report.restarted.push(name),
                    Err(why) => {
                        op.say(&format!("RESTART FAILED {name}: {why}"));
                        report.failed.push((name, why));
                    }
                }
            }
        }
        let most = report
            .most_at_once
            .iter()
            .map(|(c, n)| {
                let all = self.cluster_hosts.get(c).copied().unwrap_or(0);
                (c.clone(), format!("{n} of {all}"))
            })
            .collect::<Vec<_>>();
        finish(op, report, &queues, "most at once", most)
    }

    /// With pools: depool, drain, restart, check, repool, batch by batch.
    async fn run_pooled(
        &self,
        op: &mut dyn Operator,
        hosts: &[(Member, VersionId)],
        pools: &Pools,
    ) -> RestartReport {
        let mut report = RestartReport::default();
        let entries = match pools.read().await {
            Ok(e) => e,
            Err(e) => {
                report.stopped = Some(format!("cannot read the pools before restarting: {e}"));
                report.not_restarted = hosts.iter().map(|(m, _)| m.host.to_string()).collect();
                return report;
            }
        };
        // Each cluster's pooled weight now, and its floor.
        let mut pooled: BTreeMap<String, u64> = BTreeMap::new();
        for e in &entries {
            *pooled.entry(e.cluster.clone()).or_default() += e.traffic();
        }
        let start = pooled.clone();
        let floor: BTreeMap<String, u64> = start
            .iter()
            .map(|(c, w)| (c.clone(), self.policy.min_pooled.of(*w)))
            .collect();
        for c in start.keys() {
            report.lowest_pooled.insert(c.clone(), 100.0);
        }
        let mut queues: BTreeMap<String, Vec<Job>> = BTreeMap::new();
        let mut unpooled = Vec::new();
        for (m, v) in hosts {
            let entry = entries.iter().find(|e| e.host == m.host.name).cloned();
            let job = Job {
                member: m.clone(),
                version: *v,
                entry: entry.clone(),
            };
            match entry {
                Some(e) if e.pooled == Pooled::Yes => {
                    queues.entry(e.cluster.clone()).or_default().push(job)
                }
                _ => unpooled.push(job),
            }
        }
        // Hosts that take no traffic: restarted at once, pools untouched.
        if !unpooled.is_empty() {
            op.say(&format!(
                "restarting {} host(s) that take no traffic (left as they are in the pools)",
                unpooled.len()
            ));
            let results = self.restart_all(&unpooled).await;
            for (job, r) in unpooled.iter().zip(results) {
                match r {
                    Ok(()) => report.restarted.push(job.member.host.to_string()),
                    Err(why) => report.failed.push((job.member.host.to_string(), why)),
                }
            }
        }
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                report.stopped = Some("interrupted (Ctrl-C) between restart batches".into());
                break;
            }
            // The next batch: from each cluster, hosts up to the batch
            // weight, never under the floor.
            let mut batch: Vec<Job> = Vec::new();
            for (cluster, queue) in queues.iter_mut() {
                let now = pooled.get(cluster).copied().unwrap_or(0);
                let base = start.get(cluster).copied().unwrap_or(0);
                let limit = self.policy.batch.of(base);
                let mut taken = 0u64;
                while let Some(job) = queue.first() {
                    let w = job.entry.as_ref().map_or(0, |e| e.weight);
                    let first = taken == 0;
                    if !first && taken + w > limit {
                        break;
                    }
                    if now - taken < w || now - taken - w < floor[cluster] {
                        if first {
                            report.stopped = Some(format!(
                                "cluster {cluster}: depooling {} (weight {w}) would leave {} pooled, under the --min-pooled floor of {}; {} host(s) not restarted",
                                job.member.host,
                                super::rollout::pct(share(now.saturating_sub(w), base)),
                                self.policy.min_pooled,
                                queue.len()
                            ));
                        }
                        break;
                    }
                    taken += w;
                    batch.push(queue.remove(0));
                }
            }
            if batch.is_empty() {
                break;
            }
            // Depool the batch.
            let mut depooled: Vec<(Job, PoolEntry)> = Vec::new();
            for job in batch {
                let entry = job.entry.clone().expect("pooled jobs have an entry");
                match pools.set_pooled(&entry, Pooled::No).await {
                    Ok(e) => {
                        *pooled.get_mut(&e.cluster).expect("known cluster") -= e.weight;
                        depooled.push((job, e));
                    }
                    Err(e) => {
                        op.say(&format!(
                            "RESTART SKIPPED {}: cannot depool it: {e}",
                            job.member.host
                        ));
                        report
                            .failed
                            .push((job.member.host.to_string(), format!("cannot depool: {e}")));
                    }
                }
            }
            for (c, w) in &pooled {
                let s = share(*w, start[c]);
                let low = report.lowest_pooled.entry(c.clone()).or_insert(100.0);
                if s < *low {
                    *low = s;
                }
            }
            op.say(&format!(
                "depooled {} host(s) ({}); draining {}s",
                depooled.len(),
                depooled
                    .iter()
                    .map(|(j, _)| j.member.host.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                self.policy.drain.as_secs()
            ));
            tokio::time::sleep(self.policy.drain).await;
            let jobs: Vec<Job> = depooled
                .iter()
                .map(|(j, _)| Job {
                    member: j.member.clone(),
                    version: j.version,
                    entry: j.entry.clone(),
                })
                .collect();
            let results = self.restart_all(&jobs).await;
            for ((job, entry), r) in depooled.into_iter().zip(results) {
                let name = job.member.host.to_string();
                match r {
                    Ok(()) => match pools.set_pooled(&entry, Pooled::Yes).await {
                        Ok(e) => {
                            *pooled.get_mut(&e.cluster).expect("known cluster") += e.weight;
                            report.restarted.push(name);
                        }
                        Err(e) => {
                            op.say(&format!("REPOOL FAILED {name}: {e}"));
                            report
                                .failed
                                .push((name, format!("restarted, but cannot repool: {e}")));
                        }
                    },
                    Err(why) => {
                        op.say(&format!("RESTART FAILED {name}: {why}; left depooled"));
                        report.failed.push((name, why));
                    }
                }
            }
        }
        let lows = report
            .lowest_pooled
            .iter()
            .map(|(c, s)| (c.clone(), super::rollout::pct(*s)))
            .collect::<Vec<_>>();
        finish(op, report, &queues, "lowest pooled share", lows)
    }

    /// Restarts each host and checks it serves its version.
    async fn restart_all(&self, jobs: &[Job]) -> Vec<Result<(), String>> {
        let hosts: Vec<Host> = jobs.iter().map(|j| j.member.host.clone()).collect();
        let results = fan_out(
            &hosts,
            50,
            None,
            |h| {
                let job = jobs.iter().find(|j| j.member.host == *h).expect("a job");
                let version = job.version;
                Box::pin(async move {
                    let r = self.agents.restart(h, &self.by).await?;
                    if !r.ok {
                        return Ok(Err(format!(
                            "restart command failed ({}): {}",
                            r.status,
                            crate::text::clip(&r.output, 300)
                        )));
                    }
                    match self.agents.health(h).await {
                        Ok(hr) if hr.ok && hr.version == version => Ok(Ok(())),
                        Ok(hr) => Ok(Err(format!(
                            "after the restart it serves {}, not {}",
                            hr.version.short(),
                            version.short()
                        ))),
                        Err(e) => Ok(Err(format!("health check after the restart failed: {e}"))),
                    }
                })
            },
            &|_| {},
        )
        .await;
        results
            .into_iter()
            .map(|r| match r.result {
                Ok(inner) => inner,
                Err(e) => Err(e.to_string()),
            })
            .collect()
    }
}

/// The end of a run of restarts: the hosts left in `queues` are not
/// restarted; says the totals and, per cluster, `what` (`per_cluster`).
fn finish(
    op: &mut dyn Operator,
    mut report: RestartReport,
    queues: &BTreeMap<String, Vec<Job>>,
    what: &str,
    per_cluster: Vec<(String, String)>,
) -> RestartReport {
    for queue in queues.values() {
        report
            .not_restarted
            .extend(queue.iter().map(|j| j.member.host.to_string()));
    }
    let per_cluster: Vec<String> = per_cluster
        .into_iter()
        .map(|(c, v)| format!("{} {v}", if c.is_empty() { "(no cluster)" } else { &c }))
        .collect();
    op.say(&format!(
        "restarted {} host(s), {} failed; {what}: {}",
        report.restarted.len(),
        report.failed.len(),
        per_cluster.join(", ")
    ));
    report
}
