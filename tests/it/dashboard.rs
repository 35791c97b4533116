//! The dashboard in a real headless Chromium (Debian's chromium and
//! chromedriver, driven over the WebDriver protocol), and both /metrics
//! endpoints parsed as Prometheus text.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

/// A minimal WebDriver client: enough to load a page, run JS in it, click,
/// and take a screenshot.
struct Browser {
    http: reqwest::blocking::Client,
    base: String,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver + headless Chromium; fails, naming the packages,
    /// if they are not installed (./scripts/test installs them).
    fn start() -> Browser {
        let driver_bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| {
                panic!(
                    "no chromedriver: install the Debian packages chromium and chromium-driver (./scripts/test does)"
                )
            });
        require_program("/usr/bin/chromium", "chromium");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {driver_bin}: {e}"));
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-quic", "--no-first-run", "--window-size=1280,1100",
                     format!("--user-data-dir={}", profile.path().display())]
        }}}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {r}"))
            .to_string();
        Browser {
            http,
            base,
            session,
            driver,
            _profile: profile,
        }
    }

    fn cmd(&self, path: &str, body: Value) -> Value {
        let r: Value = self
            .http
            .post(format!("{}/session/{}/{path}", self.base, self.session))
            .json(&body)
            .send()
            .unwrap()
            .json()
            .unwrap();
        r["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("url", json!({ "url": url }));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd("execute/sync", json!({ "script": script, "args": [] }))
    }

    /// Waits until `script` returns true in the page.
    fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.js(script) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}: {}",
                self.js("return document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self, path: &std::path::Path) {
        let r: Value = self
            .http
            .get(format!("{}/session/{}/screenshot", self.base, self.session))
            .send()
            .unwrap()
            .json()
            .unwrap();
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["value"].as_str().unwrap())
            .unwrap();
        fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn share_of(b: &Browser, v: &str) -> Value {
    b.js(&format!("const e = document.querySelector('.share[data-version=\"{v}\"]'); return e ? Number(e.dataset.share) : null;"))
}

fn fleet_and_server(n: usize) -> (Fleet, String, String, String) {
    let mut fleet = Fleet::start(n);
    let staging = fleet.env.path("staging");
    write(&staging, "index.php", b"<?php // old\n");
    write(&staging, "includes/a.php", b"<?php // a\n");
    let old = fleet
        .env
        .build(&[("mediawiki", &staging)], &["--label", "1.46.0-wmf.1"]);
    write(&staging, "index.php", b"<?php // new\n");
    write(&staging, "includes/b.php", b"<?php // b\n");
    let new = fleet
        .env
        .build(&[("mediawiki", &staging)], &["--label", "1.46.0-wmf.2"]);
    let group = fleet.group("all-hosts", &(0..n).collect::<Vec<_>>());
    let store = fleet.env.store.clone();
    let p = fleet.serve_store(
        &store,
        &["--poll-interval", "1", "--hosts", group.to_str().unwrap()],
    );
    // The read-only dashboard has a listener of its own (plain HTTP, on
    // loopback); the object service is TLS.
    let url = p.dashboard();
    fleet.server = Some(p);
    (fleet, old, new, url)
}

#[test]
fn the_dashboard_follows_a_rollout_live() {
    let browser = Browser::start();
    let (mut fleet, old, new, url) = fleet_and_server(10);
    ok(&fleet.rollout(&old, &["--canary=100%"]));
    browser.goto(&url);
    browser.wait_for("the old version on 100%", &format!("return document.querySelector('.share[data-version=\"{old}\"]')?.dataset.share === '100'"));
    // A marker that a reload would erase.
    browser.js("window.__no_reload = 42; return true;");

    ok(&fleet.rollout(&new, &["--canary=10%"]));
    browser.wait_for("10% on the new version", &format!("return document.querySelector('.share[data-version=\"{new}\"]')?.dataset.share === '10'"));
    assert_eq!(share_of(&browser, &old), json!(90));
    ok(&fleet.rollout(&new, &["--canary=50%"]));
    browser.wait_for("50% on the new version", &format!("return document.querySelector('.share[data-version=\"{new}\"]')?.dataset.share === '50'"));
    assert_eq!(
        browser.js("return window.__no_reload"),
        json!(42),
        "updated without a reload"
    );
    // The rollout panel shows both steps; the host table the versions.
    let steps = browser.js(
        "return [...document.querySelectorAll('.step[data-target]')].map(s => s.dataset.target)",
    );
    assert_eq!(steps, json!(["10%", "50%"]));
    // And the recorded rollout: its stage, done.
    assert_eq!(
        browser.js("return document.querySelector('#rollout-record')?.dataset.state"),
        json!("done")
    );
    assert_eq!(
        browser.js(
            "return [...document.querySelectorAll('.step[data-stage]')].map(s => s.dataset.stage)"
        ),
        json!(["50%"])
    );
    // Each train with its head, named, and its history's last moves.
    assert_eq!(
        browser.js(
            "return [...document.querySelectorAll('#trains .train')].map(t => [t.dataset.train, t.textContent])"
        ),
        json!([
            ["1.46.0-wmf.1", format!("1.46.0-wmf.1 ({})", &old[..12])],
            ["1.46.0-wmf.2", format!("1.46.0-wmf.2 ({})", &new[..12])]
        ])
    );
    assert_eq!(
        browser.js(
            "return [...document.querySelectorAll('#trains .move')].map(m => m.dataset.action)"
        ),
        json!(["build", "build"])
    );
    let on_new = browser.js(&format!(
        "return document.querySelectorAll('tr[data-version=\"{new}\"]').length"
    ));
    assert_eq!(on_new, json!(5));
    fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
    browser.screenshot(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/dashboard.png"
    )));

    // A host goes down: shown as unreachable, never as on a version.
    fleet.hosts[3].proc.kill();
    let down = format!("127.0.0.1:{}", fleet.hosts[3].proc.port());
    browser.wait_for("the down host", &format!("return document.querySelector('tr[data-host=\"{down}\"]')?.dataset.state === 'unreachable'"));
    browser.wait_for("an unreachable share", "return document.querySelector('.share[data-version=\"unreachable\"]')?.dataset.share === '10'");
    assert_eq!(
        browser.js(&format!(
            "return document.querySelector('tr[data-host=\"{down}\"]').dataset.version"
        )),
        json!("")
    );

    // The diff view lists the changed files.
    browser.wait_for(
        "the version list",
        "return document.querySelectorAll('#diff-to option').length === 2",
    );
    browser.js(&format!("document.querySelector('#diff-from').value = '{old}'; document.querySelector('#diff-to').value = '{new}'; document.querySelector('#diff-go').click(); return true;"));
    browser.wait_for("the diff", "return (document.querySelector('#diff-list')?.textContent || '').includes('includes/b.php')");
    let list = browser.js("return document.querySelector('#diff-list').textContent");
    assert_eq!(
        list,
        json!("A\tmediawiki/includes/b.php\nM\tmediawiki/index.php")
    );
    let _ = fleet.server.take();
}

#[test]
fn api_rejects_bad_parameters() {
    let (fleet, old, new, url) = fleet_and_server(2);
    let http = fleet.http.clone();
    let get = |path: &str| {
        let r = http.get(format!("{url}{path}")).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    assert_eq!(get("/api/v1/history?limit=abc").0, 400);
    assert_eq!(get("/api/v1/history?limit=0").0, 400);
    assert_eq!(get("/api/v1/history?limit=5&x=1").0, 400);
    assert_eq!(get("/api/v1/history?limit=5").0, 200);
    let (code, e) = get("/api/v1/diff?from=abc");
    assert_eq!(code, 400);
    assert!(e["error"].as_str().unwrap().contains("to="));
    let (code, e) = get("/api/v1/diff?from=1.46.0-wmf.1&to=1.46.0-wmf.9");
    assert_eq!(code, 404, "{e}");
    let (code, d) = get("/api/v1/diff?from=1.46.0-wmf.1&to=1.46.0-wmf.2");
    assert_eq!(code, 200);
    assert_eq!(d["stat"]["added"], 1);
    assert_eq!(d["from"], old.as_str());
    assert_eq!(d["to"], new.as_str());
    // The fleet answer is `scap status --json` plus reading ages.
    std::thread::sleep(Duration::from_millis(1500));
    let (_, f) = get("/api/v1/fleet");
    assert_eq!(f["hosts"].as_array().unwrap().len(), 2);
    assert!(f["hosts"][0]["reading_age_seconds"].is_u64(), "{f}");
    let _ = fleet;
}

#[test]
fn both_metrics_endpoints_parse_as_prometheus_text() {
    let (fleet, old, _new, url) = fleet_and_server(2);
    ok(&fleet.rollout(&old, &["--canary=100%"]));
    std::thread::sleep(Duration::from_millis(1500)); // one dashboard poll
    let http = fleet.http.clone();
    let scrape = |u: &str| {
        let text = http.get(u).send().unwrap().text().unwrap();
        let lines = text.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("{u}: {e}\n{text}"))
    };
    let agent = scrape(&format!("{}/metrics", fleet.hosts[0].proc.url));
    let find = |s: &prometheus_parse::Scrape, name: &str| -> Vec<prometheus_parse::Sample> {
        s.samples
            .iter()
            .filter(|x| x.metric == name)
            .cloned()
            .collect()
    };
    let info = find(&agent, "scap_agent_version_info");
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].labels.get("version"), Some(old.as_str()));
    assert_eq!(info[0].labels.get("host"), Some("mw1001"));
    let value = |s: &prometheus_parse::Sample| match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => panic!("not a number"),
    };
    assert_eq!(value(&find(&agent, "scap_agent_syncs_total")[0]), 1.0);
    assert!(value(&find(&agent, "scap_agent_fetched_bytes_total")[0]) > 0.0);
    assert!(value(&find(&agent, "scap_agent_last_success_timestamp_seconds")[0]) > 1.7e9);
    assert_eq!(
        agent
            .docs
            .get("scap_agent_syncs_total")
            .map(|d| !d.is_empty()),
        Some(true)
    );

    let server = scrape(&format!("{url}/metrics"));
    let hosts = find(&server, "scap_fleet_hosts");
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].labels.get("version"), Some(old.as_str()));
    assert_eq!(value(&hosts[0]), 2.0);
    assert_eq!(
        value(&find(&server, "scap_fleet_traffic_share_ratio")[0]),
        1.0
    );
    assert!(
        value(&find(&server, "scap_objects_served_total")[0])
            + value(&find(&server, "scap_packs_served_total")[0])
            > 0.0
    );
    assert!(value(&find(&server, "scap_http_requests_total")[0]) > 0.0);
}

/// `scap status` asks `scap serve` (scap.toml's first source) for a fresh
/// poll over the connections it keeps: right after a rollout, with the
/// dashboard's own poll an hour apart, it shows where every host is now,
/// and says who polled. Anyone else falls back to polling every host
/// directly, saying why: a certificate that is not a deployer's, a fleet
/// other than the server's, a server that is down.
#[test]
fn scap_status_reads_the_fleet_through_scap_serve() {
    let mut fleet = Fleet::start(3);
    let staging = fleet.env.path("staging");
    write(&staging, "index.php", b"<?php // v1\n");
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    let group = fleet.group("all-hosts", &[0, 1, 2]);
    let store = fleet.env.store.clone();
    let p = fleet.serve_store(
        &store,
        &[
            "--poll-interval",
            "3600",
            "--hosts",
            group.to_str().unwrap(),
        ],
    );
    let serve_url = p.url.clone();
    fleet.server = Some(p);
    let config = fleet.env.path("scap.toml");
    fs::write(&config, format!("sources = [\"{serve_url}\"]\n")).unwrap();
    // `scap status --json` with that scap.toml: (JSON, stderr).
    let status = |fleet: &Fleet, group: &std::path::Path, role: &str, extra: &[&str]| {
        let out = fleet
            .env
            .cmd()
            .arg("--config")
            .arg(&config)
            .args(fleet.transport(role))
            .args(["status", "--json", "--hosts"])
            .arg(group)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        (serde_json::from_slice::<Value>(&out.stdout).unwrap(), err)
    };
    let on_v1 = |st: &Value| {
        st["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == v1.as_str())
            .map_or(0, |v| v["hosts"].as_array().unwrap().len())
    };
    let authority = serve_url.trim_start_matches("https://").to_string();
    let (st, err) = status(&fleet, &group, "deployer", &[]);
    assert_eq!(
        st["polled_by"],
        format!("scap serve at {authority}"),
        "{err}"
    );
    assert_eq!(on_v1(&st), 0);

    let out = fleet.rollout(&v1, &["--canary", "100%", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (st, err) = status(&fleet, &group, "deployer", &[]);
    assert_eq!(
        st["polled_by"],
        format!("scap serve at {authority}"),
        "{err}"
    );
    assert_eq!(on_v1(&st), 3, "a fresh poll, not the dashboard's: {st}");
    assert!(err.is_empty(), "{err}");
    let (direct, _) = status(&fleet, &group, "deployer", &["--direct"]);
    assert_eq!(direct["polled_by"], "this command");
    assert_eq!(direct["versions"], st["versions"]);

    // An agent's certificate may read agents, not make the server poll
    // the fleet.
    let (st, err) = status(&fleet, &group, "agent", &[]);
    assert!(
        err.contains("HTTP 403") && err.contains("deployer"),
        "{err}"
    );
    assert_eq!(st["polled_by"], "this command");
    assert_eq!(on_v1(&st), 3);
    // A fleet other than the server's.
    let one = fleet.group("one-host", &[1]);
    let (st, err) = status(&fleet, &one, "deployer", &[]);
    assert!(
        err.contains("it polls 3 host(s), this command's fleet has 1"),
        "{err}"
    );
    assert_eq!(on_v1(&st), 1);
    // A server that polls no fleet (no --hosts): not set up for this, so
    // nothing is said.
    let mut bare = fleet.serve_store(&store, &[]);
    fs::write(&config, format!("sources = [\"{}\"]\n", bare.url)).unwrap();
    let (st, err) = status(&fleet, &group, "deployer", &[]);
    assert!(err.is_empty(), "{err}");
    assert_eq!(st["polled_by"], "this command");
    assert_eq!(on_v1(&st), 3);
    bare.kill();
    fs::write(&config, format!("sources = [\"{serve_url}\"]\n")).unwrap();
    // The server down.
    fleet.server.as_mut().unwrap().kill();
    let (st, err) = status(&fleet, &group, "deployer", &[]);
    assert!(
        err.contains("scap serve") && err.contains(&authority),
        "{err}"
    );
    assert_eq!(st["polled_by"], "this command");
    assert_eq!(on_v1(&st), 3);
}
