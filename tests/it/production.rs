//! Production truth: traffic shares from the load balancer's pools
//! (conftool's layout in a real etcd), batched restarts that never drop
//! capacity (watched on etcd), and gates that read a real Prometheus
//! scraping the agents and a per-host error counter the tests control.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;

/// A real etcd (Debian's etcd-server), v2 API on, on loopback ports, in a
/// temp dir; killed when dropped.
struct Etcd {
    child: Option<Child>,
    url: String,
    _dir: tempfile::TempDir,
    http: reqwest::blocking::Client,
}

impl Etcd {
    fn start() -> Etcd {
        require_program("/usr/bin/etcd", "etcd-server");
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let child = Command::new("/usr/bin/etcd")
            .args(["--name", "scap-test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("scap-test=http://127.0.0.1:{peer}"),
            ])
            .args(["--enable-v2=true", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(70))
            .build()
            .unwrap();
        let e = Etcd {
            child: Some(child),
            url,
            _dir: dir,
            http,
        };
        wait_for(30, "etcd", || {
            e.http
                .get(format!("{}/v2/keys/", e.url))
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
        e
    }

    fn put(&self, key: &str, value: &str) {
        let r = self
            .http
            .put(format!("{}/v2/keys{key}", self.url))
            .form(&[("value", value)])
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().unwrap());
    }

    /// `pooled` of a conftool value at `key`.
    fn pooled(&self, key: &str) -> String {
        let v: serde_json::Value = self
            .http
            .get(format!("{}/v2/keys{key}", self.url))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let value: serde_json::Value =
            serde_json::from_str(v["node"]["value"].as_str().unwrap()).unwrap();
        value["pooled"].as_str().unwrap().to_string()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Records every change under the pools (key, pooled) until `stop` is
    /// set, in order: etcd's v2 watch, the same one conftool users run.
    fn watch(&self, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(String, String)>> {
        let url = self.url.clone();
        let http = self.http.clone();
        let start: u64 = http
            .get(format!("{url}/v2/keys/conftool"))
            .send()
            .unwrap()
            .headers()["x-etcd-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut next = start + 1;
            while !stop.load(Ordering::SeqCst) {
                let r = http
                    .get(format!(
                        "{url}/v2/keys/conftool/v1/pools?wait=true&recursive=true&waitIndex={next}"
                    ))
                    .timeout(Duration::from_millis(500))
                    .send();
                let Ok(r) = r else { continue };
                let Ok(v) = r.json::<serde_json::Value>() else {
                    continue;
                };
                let node = &v["node"];
                next = node["modifiedIndex"].as_u64().unwrap() + 1;
                let value: serde_json::Value =
                    serde_json::from_str(node["value"].as_str().unwrap_or("{}")).unwrap();
                seen.push((
                    node["key"].as_str().unwrap().to_string(),
                    value["pooled"].as_str().unwrap_or("").to_string(),
                ));
            }
            seen
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A pool entry: (cluster, host, pooled, weight).
type Pool<'a> = (&'a str, &'a str, &'a str, u64);

fn key(cluster: &str, host: &str) -> String {
    format!("/conftool/v1/pools/eqiad/{cluster}/apache2/{host}")
}

fn put_pools(etcd: &Etcd, pools: &[Pool]) {
    for (cluster, host, pooled, weight) in pools {
        etcd.put(
            &key(cluster, host),
            &format!("{{\"pooled\": \"{pooled}\", \"weight\": {weight}}}"),
        );
    }
}

/// The agents' addresses, by name (an inventory; the pools give traffic).
fn addresses(fleet: &Fleet) -> PathBuf {
    let mut text = String::new();
    for h in &fleet.hosts {
        text.push_str(&format!(
            "[[host]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\n\n",
            h.name,
            h.proc.port()
        ));
    }
    let p = fleet.env.path("addresses.toml");
    fs::write(&p, text).unwrap();
    p
}

/// scap.toml with the lab's TLS and key, the pools, and `extra`.
fn config(fleet: &Fleet, etcd: &str, extra: &str) {
    let base = fs::read_to_string(fleet.env.path("scap.base.toml")).unwrap_or_else(|_| {
        let b = fs::read_to_string(fleet.env.path("scap.toml")).unwrap();
        fs::write(fleet.env.path("scap.base.toml"), &b).unwrap();
        b
    });
    let inv = addresses(fleet);
    fs::write(
        fleet.env.path("scap.toml"),
        format!(
            "inventory = \"{}\"\nsources = [\"{}\"]\n{base}\n[pools]\netcd = [\"{etcd}\"]\n\n{extra}",
            inv.display(),
            fleet.source()
        ),
    )
    .unwrap();
}

fn scap(fleet: &Fleet, args: &[&str]) -> Output {
    fleet
        .env
        .cmd()
        .args(args)
        .args(fleet.transport("deployer"))
        .output()
        .unwrap()
}

fn status(fleet: &Fleet) -> serde_json::Value {
    serde_json::from_str(&ok_out(&scap(fleet, &["status", "--json"]))).unwrap()
}

fn small_tree(fleet: &Fleet, tag: &str) -> String {
    let mw = fleet.env.path("mw");
    write(&mw, "index.php", format!("<?php // {tag}\n").as_bytes());
    write(&mw, "includes/Setup.php", b"<?php // setup\n");
    fleet.env.build(&[("mediawiki", &mw)], &[])
}

/// Two clusters with unequal weights and depooled hosts.
const POOLS: &[Pool] = &[
    ("appserver", "mw1001", "yes", 10),
    ("appserver", "mw1002", "yes", 10),
    ("appserver", "mw1003", "yes", 10),
    ("appserver", "mw1004", "yes", 10),
    ("appserver", "mw1005", "yes", 20),
    ("appserver", "mw1006", "yes", 20),
    ("appserver", "mw1007", "no", 10),
    ("appserver", "mw1008", "inactive", 10),
    ("api_appserver", "mw1009", "yes", 5),
    ("api_appserver", "mw1010", "yes", 5),
    ("api_appserver", "mw1011", "yes", 15),
    ("api_appserver", "mw1012", "no", 15),
];

/// For each cluster: the pooled weight on `v` against the pooled total.
fn cluster_weights(fleet: &Fleet, v: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (cluster, host, pooled, weight) in POOLS {
        let w = if *pooled == "yes" { *weight } else { 0 };
        let i = fleet.hosts.iter().position(|h| h.name == *host).unwrap();
        let e = out.entry(cluster.to_string()).or_default();
        e.1 += w;
        if fleet.current(i).as_deref() == Some(v) {
            e.0 += w;
        }
    }
    out
}

#[test]
fn per_cluster_shares_come_from_the_pools() {
    let etcd = Etcd::start();
    put_pools(&etcd, POOLS);
    let mut fleet = Fleet::start(13);
    let v1 = small_tree(&fleet, "v1");
    let v2 = small_tree(&fleet, "v2");
    fleet.serve();
    // mw1013 has an agent and is in no pool; mw1099 is pooled and has no agent.
    put_pools(&etcd, &[("appserver", "mw1099", "no", 10)]);
    config(&fleet, &etcd.url, "");
    // Shares only here: no restarts (the agents have no restart command).
    let base = [
        "--yes",
        "--wait",
        "0",
        "--max-failures",
        "1",
        "--no-restart",
    ];
    let sync = |v: &str, extra: &[&str]| {
        let mut a = vec!["sync", "--version", v];
        a.extend(base);
        a.extend(extra);
        scap(&fleet, &a)
    };
    let out = sync(&v1, &["--canary", "100%", "--force"]);
    let e = stderr(&out);
    assert!(e.contains("mw1013: its agent is in no pool"), "{e}");
    assert!(
        e.contains("mw1099"),
        "the pooled host with no agent is named: {e}"
    );
    // Every host with an agent has v1, depooled and inactive ones too.
    for i in 0..13 {
        assert_eq!(
            fleet.current(i).as_deref(),
            Some(v1.as_str()),
            "host {i}: {e}"
        );
    }
    for (share, pct) in [("10%", 10u64), ("50%", 50)] {
        let out = sync(&v2, &["--canary", share]);
        ok(&out);
        let w = cluster_weights(&fleet, &v2);
        for (cluster, (on, total)) in &w {
            let need = (pct * total).div_ceil(100);
            assert!(
                *on >= need,
                "{cluster} at {share}: {on} of {total}: {}",
                stderr(&out)
            );
            // Just enough: hosts are added until the need is met, so the
            // overshoot is less than the heaviest host of the cluster.
            let heaviest = POOLS
                .iter()
                .filter(|(c, ..)| c == cluster)
                .map(|(.., w)| *w)
                .max()
                .unwrap();
            assert!(
                *on < need + heaviest,
                "{cluster} at {share}: more than needed ({on} of {total})"
            );
        }
        // Depooled, inactive and pool-less hosts are never picked below 100%.
        for i in [6, 7, 11, 12] {
            assert_eq!(fleet.current(i).as_deref(), Some(v1.as_str()), "host {i}");
        }
    }
    // Status and JSON show pooled state and per-cluster shares.
    let st = status(&fleet);
    let host = |n: &str| {
        st["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(host("mw1007")["pooled"], "no");
    assert_eq!(host("mw1008")["pooled"], "inactive");
    assert_eq!(host("mw1001")["pooled"], "yes");
    assert_eq!(host("mw1013")["pooled"], serde_json::Value::Null);
    let v2s = st["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == v2.as_str())
        .unwrap()
        .clone();
    assert!(
        v2s["clusters"]["appserver"].as_f64().unwrap() >= 50.0,
        "{v2s}"
    );
    assert!(
        v2s["clusters"]["api_appserver"].as_f64().unwrap() >= 50.0,
        "{v2s}"
    );
    let text = ok_out(&scap(&fleet, &["status"]));
    assert!(
        text.contains("appserver") && text.contains("DEPOOLED (no)"),
        "{text}"
    );
    // --cluster narrows a step to one cluster.
    let v3 = small_tree(&fleet, "v3");
    ok(&sync(
        &v3,
        &["--canary", "50%", "--cluster", "api_appserver"],
    ));
    let w = cluster_weights(&fleet, &v3);
    assert_eq!(w["appserver"].0, 0);
    assert!(w["api_appserver"].0 * 2 >= w["api_appserver"].1);

    // Bad pool values are named.
    etcd.put(
        &key("appserver", "mw1001"),
        r#"{"pooled": "yes", "weight": 0}"#,
    );
    let out = sync(&v3, &["--canary", "10%"]);
    let e = stderr(&out);
    assert!(
        e.contains("appserver/apache2/mw1001") && e.contains("weight 0"),
        "{e}"
    );
    etcd.put(&key("appserver", "mw1001"), "not json");
    let out = sync(&v3, &["--canary", "10%"]);
    assert!(stderr(&out).contains("not conftool's"), "{}", stderr(&out));
    etcd.put(
        &key("appserver", "mw1001"),
        r#"{"pooled": "yes", "weight": 10}"#,
    );
    // etcd down: the rollout refuses to start, and says why.
    let mut etcd = etcd;
    etcd.stop();
    let out = sync(&v3, &["--canary", "10%"]);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("etcd") && e.contains("did not answer") && e.contains("does not guess"),
        "{e}"
    );
}

#[test]
fn restarts_in_batches_never_cross_the_floor() {
    let etcd = Etcd::start();
    // Ten pooled hosts of one cluster, plus one depooled before the rollout.
    let pools: Vec<(String, String, String, u64)> = (0..11)
        .map(|i| {
            (
                "appserver".to_string(),
                format!("mw{}", 1001 + i),
                if i == 10 { "no" } else { "yes" }.to_string(),
                10,
            )
        })
        .collect();
    for (c, h, p, w) in &pools {
        etcd.put(
            &key(c, h),
            &format!("{{\"pooled\": \"{p}\", \"weight\": {w}}}"),
        );
    }
    // mw1004's restart fails; mw1006's hangs past its timeout.
    let restart = "case {host} in mw1004) echo php-fpm failed; exit 1;; mw1006) sleep 60;; esac";
    let mut fleet = Fleet::start_with(11, &["--restart-command", restart, "--hook-timeout", "2s"]);
    let v1 = small_tree(&fleet, "v1");
    fleet.serve();
    config(
        &fleet,
        &etcd.url,
        "[restarts]\nbatch = \"20%\"\ndrain = \"0\"\nmin_pooled = \"60%\"\n",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = etcd.watch(stop.clone());
    let out = scap(
        &fleet,
        &[
            "sync",
            "--version",
            &v1,
            "--canary",
            "100%",
            "--yes",
            "--wait",
            "0",
            "--check-cmd",
            "true",
            "--max-failures",
            "2",
        ],
    );
    let e = stderr(&out);
    stop.store(true, Ordering::SeqCst);
    let events = watcher.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "two restarts failed: {e}");
    assert!(
        e.contains("RESTART FAILED mw1004") && e.contains("php-fpm failed"),
        "{e}"
    );
    assert!(e.contains("RESTART FAILED mw1006"), "{e}");
    assert!(e.contains("lowest pooled share"), "{e}");
    // Replay the watch: never more than a batch (2 hosts) depooled by
    // scap at once, never under 60% pooled.
    let mut depooled: std::collections::BTreeSet<String> = Default::default();
    let mut most = 0;
    for (k, pooled) in &events {
        let host = k.rsplit('/').next().unwrap().to_string();
        if host == "mw1011" {
            panic!("the host depooled before the rollout was touched: {events:?}");
        }
        if pooled == "no" {
            depooled.insert(host);
        } else {
            depooled.remove(&host);
        }
        // The two that failed stay depooled, and count against the floor.
        most = most.max(depooled.len());
        assert!(
            (10 - depooled.len()) * 10 >= 60,
            "pooled fell under 60%: {depooled:?} in {events:?}"
        );
    }
    assert!(
        most <= 4,
        "at most a batch (2) beyond the failed ones: {events:?}"
    );
    assert!(!events.is_empty());
    // Every host ends pooled, but the two whose restart failed.
    for (c, h, p, _) in &pools {
        let want = match h.as_str() {
            "mw1004" | "mw1006" => "no",
            _ => p.as_str(),
        };
        assert_eq!(etcd.pooled(&key(c, h)), want, "{h}: {events:?}");
    }
    // The restarts happened on the agents.
    let (_, s) = fleet.get(0, "/v1/state");
    assert!(
        s["state"]["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "restart" && e["ok"] == true),
        "{s}"
    );
}

#[test]
fn a_floor_stops_the_restarts_and_etcd_down_stops_the_rollout() {
    let mut etcd = Etcd::start();
    put_pools(
        &etcd,
        &[
            ("appserver", "mw1001", "yes", 10),
            ("appserver", "mw1002", "yes", 10),
            ("appserver", "mw1003", "yes", 10),
            ("appserver", "mw1004", "yes", 10),
        ],
    );
    let mut fleet = Fleet::start_with(4, &["--restart-command", "true"]);
    let v1 = small_tree(&fleet, "v1");
    let v2 = small_tree(&fleet, "v2");
    fleet.serve();
    // A floor of 80% on four hosts of equal weight: one host can never be
    // depooled (75% would be left).
    config(
        &fleet,
        &etcd.url,
        "[restarts]\nbatch = \"25%\"\ndrain = \"0\"\nmin_pooled = \"80%\"\n",
    );
    let out = scap(
        &fleet,
        &[
            "sync",
            "--version",
            &v1,
            "--canary",
            "100%",
            "--yes",
            "--wait",
            "0",
            "--force",
        ],
    );
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("under the --min-pooled floor of 80%"), "{e}");
    for h in ["mw1001", "mw1002", "mw1003", "mw1004"] {
        assert_eq!(
            etcd.pooled(&key("appserver", h)),
            "yes",
            "nothing was depooled"
        );
    }
    // etcd stopped mid-rollout: the next step does not start.
    config(
        &fleet,
        &etcd.url,
        "[restarts]\nbatch = \"25%\"\ndrain = \"0\"\nmin_pooled = \"50%\"\n",
    );
    let child = fleet
        .env
        .cmd()
        .args([
            "sync",
            "--version",
            &v2,
            "--stages",
            "25%,100%",
            "--yes",
            "--wait",
            "3s",
        ])
        .args(["--check-cmd", "true"])
        .args(fleet.transport("deployer"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let record = fleet.env.store.join("fleet/rollout.json");
    wait_for(30, "the first step's wait", || {
        fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|r| r["version"] == v2.as_str() && r["next_due"].is_u64())
    });
    etcd.stop();
    let out = child.wait_with_output().unwrap();
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("cannot read the pools") && e.contains("stopping before 100%"),
        "{e}"
    );
    let on: Vec<usize> = fleet.on(&v2);
    assert_eq!(on.len(), 1, "only the first step's host: {e}");
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&record).unwrap()).unwrap();
    assert_eq!(r["state"], "stopped");
}

/// A per-host error counter the test controls: `app_errors_total{host}`
/// climbing at a rate per host, served as Prometheus text.
struct Errors {
    port: u16,
    rates: Arc<Mutex<BTreeMap<String, f64>>>,
    stop: Arc<AtomicBool>,
}

impl Errors {
    fn start(hosts: &[String]) -> Errors {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let rates: Arc<Mutex<BTreeMap<String, f64>>> =
            Arc::new(Mutex::new(hosts.iter().map(|h| (h.clone(), 0.0)).collect()));
        let counts: Arc<Mutex<BTreeMap<String, f64>>> =
            Arc::new(Mutex::new(hosts.iter().map(|h| (h.clone(), 0.0)).collect()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (rates, counts, stop) = (rates.clone(), counts.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                    let r = rates.lock().unwrap().clone();
                    let mut c = counts.lock().unwrap();
                    for (h, rate) in r {
                        *c.entry(h).or_default() += rate / 10.0;
                    }
                }
            });
        }
        listener.set_nonblocking(true).unwrap();
        {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((mut s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    s.set_nonblocking(false).unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let mut body = String::from("# TYPE app_errors_total counter\n");
                    for (h, n) in counts.lock().unwrap().iter() {
                        body.push_str(&format!("app_errors_total{{host=\"{h}\"}} {}\n", n.floor()));
                    }
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
            });
        }
        Errors { port, rates, stop }
    }

    fn set(&self, host: &str, rate: f64) {
        self.rates.lock().unwrap().insert(host.to_string(), rate);
    }
}

impl Drop for Errors {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A real Prometheus (Debian's), scraping the error counter and the
/// agents' `/metrics` (TLS, the lab CA) every second.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(errors_port: u16, agents: &[String], ca: &Path) -> Prometheus {
        require_program("/usr/bin/prometheus", "prometheus");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let targets = agents
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let cfg = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: app\n    static_configs:\n      - targets: [\"127.0.0.1:{errors_port}\"]\n  - job_name: scap-agents\n    scheme: https\n    tls_config:\n      ca_file: {}\n    static_configs:\n      - targets: [{targets}]\n",
            ca.display()
        );
        fs::write(dir.path().join("prometheus.yml"), cfg).unwrap();
        let child = Command::new("/usr/bin/prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        wait_for(60, "prometheus", || {
            reqwest::blocking::get(format!("{url}/-/ready")).is_ok_and(|r| r.status().is_success())
        });
        Prometheus {
            child,
            url,
            _dir: dir,
        }
    }

    fn query(&self, q: &str) -> serde_json::Value {
        reqwest::blocking::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", q)])
            .send()
            .unwrap()
            .json()
            .unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_gates_compare_the_canary_with_the_rest() {
    let mut fleet = Fleet::start(6);
    let v1 = small_tree(&fleet, "v1");
    let v2 = small_tree(&fleet, "v2");
    let v3 = small_tree(&fleet, "v3");
    let source = fleet.serve();
    let names: Vec<String> = fleet.hosts.iter().map(|h| h.name.clone()).collect();
    let errors = Errors::start(&names);
    let agents: Vec<String> = fleet
        .hosts
        .iter()
        .map(|h| format!("127.0.0.1:{}", h.proc.port()))
        .collect();
    let prom = Prometheus::start(errors.port, &agents, &fleet.env.pki.ca());
    // Names as the agents call themselves, so the gate's $HOSTS match the
    // counters' host label.
    let mut inv = String::new();
    for h in &fleet.hosts {
        inv.push_str(&format!(
            "[[host]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\n\n",
            h.name,
            h.proc.port()
        ));
    }
    let inv_path = fleet.env.path("inventory.toml");
    fs::write(&inv_path, inv).unwrap();
    let base = fs::read_to_string(fleet.env.path("scap.toml")).unwrap();
    let gate = |g: &str| {
        fs::write(
            fleet.env.path("scap.toml"),
            format!(
                "inventory = \"{}\"\nsources = [\"{source}\"]\n{base}\n[[gate]]\n{g}\n",
                inv_path.display()
            ),
        )
        .unwrap();
    };
    let compare = format!(
        "prometheus = \"{}\"\nquery = 'avg(rate(app_errors_total{{host=~\"$HOSTS\"}}[5s]))'\nratio = 1.5\nfloor = 0.5\n",
        prom.url
    );
    gate(&compare);
    let sync = |v: &str, share: &str| {
        scap(
            &fleet,
            &[
                "sync",
                "--version",
                v,
                "--canary",
                share,
                "--yes",
                "--wait",
                "4s",
            ],
        )
    };
    // Everyone on v1; the version of each host is in Prometheus, joinable
    // to the application's metrics.
    ok(&scap(
        &fleet,
        &[
            "sync",
            "--version",
            &v1,
            "--canary",
            "100%",
            "--yes",
            "--wait",
            "0",
            "--force",
        ],
    ));
    wait_for(30, "the agents' version in prometheus", || {
        let r = prom.query(&format!(
            "count(app_errors_total * on (host) group_left (version) scap_agent_version_info{{version=\"{v1}\"}})"
        ));
        r["data"]["result"][0]["value"][1] == "6"
    });
    // The canary's errors climb, the rest's do not: the comparison gate
    // fails, and (batch mode) the canary is rolled back.
    for n in &names {
        errors.set(n, 1.0);
    }
    std::thread::sleep(Duration::from_secs(3));
    let canary: Vec<String> = {
        let out = scap(
            &fleet,
            &["sync", "--version", &v2, "--canary", "34%", "--dry-run"],
        );
        let e = stderr(&out);
        names
            .iter()
            .filter(|n| e.contains(&format!(" {n}")))
            .cloned()
            .collect()
    };
    assert!(!canary.is_empty());
    for n in &canary {
        errors.set(n, 40.0);
    }
    std::thread::sleep(Duration::from_secs(2));
    let out = sync(&v2, "34%");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("GATE FAILED") && e.contains("app_errors_total"),
        "{e}"
    );
    assert!(e.contains("rolled back"), "{e}");
    assert!(fleet.on(&v2).is_empty(), "{e}");
    let h: serde_json::Value = serde_json::from_str(&fleet.env.ok(&["history", "--json"])).unwrap();
    let m = &h[0]["measurements"][0];
    assert_eq!(m["passed"], false, "{h}");
    assert!(
        m["value"].as_f64().unwrap() > m["limit"].as_f64().unwrap(),
        "{m}"
    );
    assert!(m["baseline"].as_f64().is_some(), "{m}");
    // An equal climb everywhere is no regression: the comparison passes.
    for n in &names {
        errors.set(n, 40.0);
    }
    std::thread::sleep(Duration::from_secs(6));
    let out = sync(&v3, "34%");
    let e = stderr(&out);
    ok(&out);
    assert!(e.contains("measured") && e.contains(": ok"), "{e}");
    // The absolute gate (today's "10 errors in 20 s") fails on that climb.
    gate(&format!(
        "prometheus = \"{}\"\nquery = 'sum(increase(app_errors_total{{host=~\"$HOSTS\"}}[5s]))'\nmax = 10\n",
        prom.url
    ));
    let out = sync(&v3, "67%");
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("more than 10"), "{e}");
    // Fail closed: no series, several series, Prometheus down.
    for (g, why) in [
        (
            format!(
                "prometheus = \"{}\"\nquery = 'sum(nope_total{{host=~\"$HOSTS\"}})'\nmax = 1\n",
                prom.url
            ),
            "returned no series",
        ),
        (
            format!(
                "prometheus = \"{}\"\nquery = 'app_errors_total{{host=~\"$HOSTS\"}}'\nmax = 1e9\n",
                prom.url
            ),
            "series where one was expected",
        ),
        (
            format!(
                "prometheus = \"http://127.0.0.1:{}\"\nquery = 'sum(x{{host=~\"$HOSTS\"}})'\nmax = 1\n",
                free_port()
            ),
            "did not answer",
        ),
    ] {
        gate(&g);
        let out = sync(&v3, "100%");
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{e}");
        assert!(e.contains(why) && e.contains("GATE FAILED"), "{why}: {e}");
    }
    // A gate without $HOSTS is refused when scap.toml is read.
    gate(&format!(
        "prometheus = \"{}\"\nquery = 'sum(x)'\nmax = 1\n",
        prom.url
    ));
    let out = scap(&fleet, &["status"]);
    assert!(stderr(&out).contains("$HOSTS"), "{}", stderr(&out));
}
