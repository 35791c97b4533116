//! Production truth at fleet size: 100 agents (SCAP_BENCH_HOSTS) in two
//! clusters of conftool pools in a real etcd, a backport rolled out
//! 10% -> 50% -> 100% with batched restarts (depool, restart, check,
//! repool; drain 0 s), against the same rollout without restarts. Wall
//! time, and the lowest pooled share of each cluster during it, from an
//! etcd watch (not from scap's own account).
//!
//! Run: `cargo bench --bench restarts`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

struct Etcd {
    child: Child,
    url: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn etcd(dir: &std::path::Path) -> Etcd {
    assert!(
        have("etcd"),
        "etcd is not installed (apt-get install etcd-server)"
    );
    let (c, p) = (port(), port());
    let url = format!("http://127.0.0.1:{c}");
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
        .args([
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{p}"),
        ])
        .args(["--initial-cluster", &format!("bench=http://127.0.0.1:{p}")])
        .args(["--enable-v2=true", "--log-level", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let e = Etcd { child, url };
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::blocking::get(format!("{}/v2/keys/", e.url)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    e
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let n: usize = std::env::var("SCAP_BENCH_HOSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let dir = fresh("restarts");
    println!("machine: {}", machine());
    let tree = dir.join("tree");
    generate(&tree, 300);
    let staging = tree.join("mediawiki-staging");
    let store = dir.join("store");
    let (pki, base_config) = lab(&dir);
    let etcd = etcd(&dir);
    let http = reqwest::blocking::Client::new();
    // Two clusters: 70% appserver (weights 10 and 20), 30% api_appserver.
    let cluster = |i: usize| {
        if i % 10 < 7 {
            "appserver"
        } else {
            "api_appserver"
        }
    };
    let key = |i: usize| {
        format!(
            "/conftool/v1/pools/eqiad/{}/apache2/mw{}",
            cluster(i),
            1000 + i
        )
    };
    for i in 0..n {
        let w = if i.is_multiple_of(3) { 20 } else { 10 };
        let r = http
            .put(format!("{}/v2/keys{}", etcd.url, key(i)))
            .form(&[("value", format!("{{\"pooled\": \"yes\", \"weight\": {w}}}"))])
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }
    let scap_cfg = |config: &std::path::Path| {
        let mut c = scap(&store);
        c.arg("--config").arg(config);
        c
    };
    let build = || build_version(&mut scap_cfg(&base_config), "mediawiki", &staging).1;
    let v1 = build();
    let (mut server, url) = start_listening(
        scap_cfg(&base_config)
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK),
    );
    println!("starting {n} agents ...");
    let mut agents: Vec<Child> = Vec::new();
    let mut inventory = String::new();
    for i in 0..n {
        let (child, agent_url) = start_listening(
            Command::new(SCAP)
                .args(["agent", "--listen", "127.0.0.1:0", "--host"])
                .arg(format!("mw{}", 1000 + i))
                .args(["--restart-command", "true", "--trusted-key"])
                .arg(pki.join("deploy.pub"))
                .args(tls_flags(&pki, "agent"))
                .arg("--dir")
                .arg(dir.join(format!("hosts/mw{}", 1000 + i))),
        );
        inventory.push_str(&format!(
            "[[host]]\nname = \"mw{}\"\naddress = \"{}\"\n\n",
            1000 + i,
            agent_url.split("://").nth(1).unwrap()
        ));
        agents.push(child);
    }
    let inv = dir.join("inventory.toml");
    std::fs::write(&inv, inventory).unwrap();
    let config = dir.join("scap-pools.toml");
    std::fs::write(
        &config,
        format!(
            "inventory = \"{}\"\nsources = [\"{url}\"]\n{}\n[pools]\netcd = [\"{}\"]\n\n[restarts]\nbatch = \"10%\"\ndrain = \"0\"\nmin_pooled = \"80%\"\n",
            inv.display(),
            std::fs::read_to_string(&base_config).unwrap(),
            etcd.url
        ),
    )
    .unwrap();
    let sync = |v: &str, extra: &[&str]| {
        let started = Instant::now();
        let (_, out) = timed(
            scap_cfg(&config)
                .args(["sync", "--version", v, "--yes", "--wait", "0", "--force"])
                .args(extra),
        );
        (started.elapsed().as_secs_f64(), out)
    };
    sync(&v1, &["--canary", "100%", "--no-restart"]);
    std::thread::sleep(Duration::from_secs(2));

    let mut table = Table::new(&[
        "rollout 10% -> 50% -> 100%",
        "wall time",
        "lowest pooled share (appserver)",
        "lowest pooled share (api_appserver)",
    ]);
    let total: BTreeMap<&str, u64> = {
        let mut t = BTreeMap::new();
        for i in 0..n {
            *t.entry(cluster(i)).or_default() += if i.is_multiple_of(3) { 20 } else { 10 };
        }
        t
    };
    // A B B A: without restarts, with, with, without.
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut lows: Vec<BTreeMap<String, f64>> = Vec::new();
    for (round, restarts) in [false, true, true, false].into_iter().enumerate() {
        mutate(&tree, "backport", 20 + round as u64);
        let v = build();
        // Watch etcd: every pooled change, to find the lowest share.
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let url = etcd.url.clone();
            let stop = stop.clone();
            let index: u64 = http
                .get(format!("{url}/v2/keys/conftool"))
                .send()
                .unwrap()
                .headers()["x-etcd-index"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::new();
                let mut next = index + 1;
                let mut events: Vec<(String, bool)> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let Ok(r) = http
                        .get(format!(
                            "{url}/v2/keys/conftool/v1/pools?wait=true&recursive=true&waitIndex={next}"
                        ))
                        .timeout(Duration::from_millis(300))
                        .send()
                    else {
                        continue;
                    };
                    let Ok(v) = r.json::<serde_json::Value>() else {
                        continue;
                    };
                    next = v["node"]["modifiedIndex"].as_u64().unwrap() + 1;
                    let key = v["node"]["key"].as_str().unwrap().to_string();
                    let pooled = v["node"]["value"]
                        .as_str()
                        .unwrap_or("")
                        .contains("\"yes\"");
                    events.push((key, pooled));
                }
                events
            })
        };
        let extra: Vec<&str> = if restarts {
            vec!["--stages", "10,50,100"]
        } else {
            vec!["--stages", "10,50,100", "--no-restart"]
        };
        let (secs, out) = sync(&v, &extra);
        assert!(out.contains("100.0% of production traffic"), "{out}");
        stop.store(true, Ordering::SeqCst);
        let events = watcher.join().unwrap();
        let mut down: BTreeSet<String> = BTreeSet::new();
        let mut low: BTreeMap<String, f64> = total.keys().map(|c| (c.to_string(), 100.0)).collect();
        for (k, pooled) in &events {
            if *pooled {
                down.remove(k);
            } else {
                down.insert(k.clone());
            }
            for (c, t) in &total {
                let off: u64 = down
                    .iter()
                    .filter(|d| d.contains(&format!("/{c}/")))
                    .map(|d| {
                        let i: usize =
                            d.rsplit("/mw").next().unwrap().parse::<usize>().unwrap() - 1000;
                        if i.is_multiple_of(3) { 20 } else { 10 }
                    })
                    .sum();
                let s = 100.0 * (t - off) as f64 / *t as f64;
                let l = low.get_mut(*c).unwrap();
                if s < *l {
                    *l = s;
                }
            }
        }
        println!(
            "round {round} (restarts {restarts}): {secs:.2} s, {} pool changes, lowest {low:?}",
            events.len()
        );
        if restarts {
            assert!(!events.is_empty(), "restarts depool and repool");
            with.push(secs);
            lows.push(low);
        } else {
            assert!(events.is_empty(), "no restarts, no pool change");
            without.push(secs);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
    let lowest = |c: &str| lows.iter().map(|l| l[c]).fold(100.0_f64, f64::min);
    table.row(vec![
        format!("{n} hosts, batched restarts (10% batches, 0 s drain), best of 2"),
        ms(best(&with)),
        format!("{:.1}%", lowest("appserver")),
        format!("{:.1}%", lowest("api_appserver")),
    ]);
    table.row(vec![
        format!("{n} hosts, no restarts (for scale), best of 2"),
        ms(best(&without)),
        "100.0%".into(),
        "100.0%".into(),
    ]);
    table.save("restarts", &format!("machine: {}\nhosts: {n}", machine()));
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    let _ = server.kill();
    let _ = server.wait();
    done(&dir);
}
