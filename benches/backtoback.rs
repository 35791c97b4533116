//! A train that follows a backport and a no-op within seconds, against
//! the same train to an idle host and against rsync: one real agent (TLS,
//! signed versions) holding a tree of SCAP_BENCH_FILES files (default
//! 30,000), and an rsync copy of the same tree.
//!
//! Each round starts from a host in its steady state and takes the three
//! deploys of a busy morning: a backport (1-3 PHP files), a no-op (the
//! same version again), then a train (a new php-* branch of ~25,000
//! files). The figure is the train's wall time:
//! - A, scap back to back: the three `scap sync` commands one right
//!   after the other, the train's version built before the first (so
//!   nothing but the syncs runs between them);
//! - B, scap idle: the same, with the agent idle again before the train;
//! - C, rsync: `rsync -a --delete` of the staging tree three times.
//!
//! Between rounds the oldest branch is removed and both copies are
//! brought up to date, untimed. The order is A B C C B A A B C C B A; the
//! table gives medians of 4.
//!
//! Run: `cargo bench --bench backtoback` (needs rsync).

mod common;

use common::*;

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let (dir, tree, files, host, v1) = OneHost::bench("backtoback", 30_000, 120_000);
    let (mut agent, group, log) = host.agent("mw1000");
    let pid = agent.id();
    println!("first sync of {files} files ...");
    host.sync(&group, &v1);
    host.after_maintenance(pid, &log);
    let copy = dir.join("rsync-copy");
    rsync_wall(&host.staging, &copy);
    // A backport first: a host's second deploy writes its third release
    // slot whole; the rounds start from the steady state.
    mutate(&tree, "backport", 1);
    let warm = host.build();
    host.sync(&group, &warm);
    settle_cpu(pid);
    rsync_wall(&host.staging, &copy);

    // Removes every php-* branch but the newest, and brings both copies
    // to the tree, untimed.
    let catch_up = || {
        let mut branches: Vec<_> = std::fs::read_dir(&host.staging)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("php-"))
            .collect();
        branches.sort_by_key(|b| {
            b.rsplit('.')
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or(0)
        });
        branches.pop();
        for b in branches {
            std::fs::remove_dir_all(host.staging.join(b)).unwrap();
        }
        let v = host.build();
        host.sync(&group, &v);
        settle_cpu(pid);
        rsync_wall(&host.staging, &copy);
        flush_dirty();
    };

    let (mut b2b, mut idle, mut rsync) = (Vec::new(), Vec::new(), Vec::new());
    let mut seed = 100;
    for tool in "ABCCBAABCCBA".chars() {
        catch_up();
        seed += 2;
        println!("round {tool} ...");
        if tool == 'C' {
            mutate(&tree, "backport", seed);
            rsync_wall(&host.staging, &copy);
            rsync_wall(&host.staging, &copy);
            mutate(&tree, "train", seed + 1);
            flush_dirty();
            rsync.push(rsync_wall(&host.staging, &copy));
            continue;
        }
        mutate(&tree, "backport", seed);
        let backport = host.build();
        mutate(&tree, "train", seed + 1);
        let train = host.build();
        flush_dirty();
        host.sync(&group, &backport);
        host.sync(&group, &backport);
        if tool == 'B' {
            settle_cpu(pid);
        }
        let secs = host.sync(&group, &train);
        settle_cpu(pid);
        if tool == 'A' { &mut b2b } else { &mut idle }.push(secs);
    }
    let (b, i, r) = (median_of(&b2b), median_of(&idle), median_of(&rsync));
    let mut table = Table::new(&["a train (new php-* branch)", "scap", "rsync -a", "ratio"]);
    table.row(vec![
        format!("right after a backport and a no-op ({files} files; median of 4)"),
        ms(b),
        ms(r),
        format!("{:.2}", b / r),
    ]);
    table.row(vec![
        "to an idle host (the same three deploys, the agent idle before the train)".into(),
        ms(i),
        ms(r),
        format!("{:.2}", i / r),
    ]);
    table.save("backtoback", &format!("machine: {}", machine()));
    println!("back to back: {b2b:.3?}\nidle: {idle:.3?}\nrsync: {rsync:.3?}");
    let _ = agent.kill();
    let _ = agent.wait();
    host.stop();
    if std::env::var_os("SCAP_BENCH_VERBOSE").is_some() {
        println!("agent log kept: {}", log.display());
        return;
    }
    done(&dir);
}
