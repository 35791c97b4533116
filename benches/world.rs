//! `scap sync-world` (issue "sync-world") on the ~30k-file tree, as
//! deployed (TLS, signed versions), to SCAP_BENCH_HOSTS (default 10)
//! agents, beside a plain `scap build-manifest` + `scap sync` of the same
//! change (no checks, no build steps):
//!
//! 1. A config-only change (one line in each of the big wmf-config
//!    files): sync-world with its build steps cached (their inputs did not
//!    change), and with the step cache emptied first (every step runs:
//!    the wikiversions compile and the l10n rebuild of each branch).
//!    Order A B C C B A; best of each.
//! 2. A new train: a new branch (a copy of the last one, its i18n files
//!    changed) with half the wikis sent to it in wikiversions.json. The
//!    cached sync-world rebuilds the l10n of the new branch only; the cold
//!    one, of every branch. Same order.
//!
//! The l10n step is real work: a PHP script (php-cli) that merges every
//! i18n JSON file of a branch (core, extensions, skins) into one cache
//! file per language, as rebuildLocalisationCache does.
//!
//! Run: `cargo bench --bench world` (needs php-cli).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Instant;

use common::*;

const COMPILE: &str = include_str!("../tests/fixtures/compile-wikiversions.php");

const L10N: &str = r#"<?php
$branch = getcwd();
$out = "$branch/cache/l10n-php";
if (!is_dir($out)) { mkdir($out, 0755, true); }
$byLang = [];
$files = array_merge(
    glob("$branch/languages/i18n/*.json") ?: [],
    glob("$branch/extensions/*/i18n/*.json") ?: [],
    glob("$branch/skins/*/i18n/*.json") ?: []
);
foreach ($files as $f) {
    $msgs = json_decode(file_get_contents($f), true);
    if (!is_array($msgs)) { continue; }
    $lang = basename($f, '.json');
    $byLang[$lang] = array_merge($byLang[$lang] ?? [], $msgs);
}
foreach ($byLang as $lang => $msgs) {
    file_put_contents("$out/l10n_cache-$lang.php", '<?php return ' . var_export($msgs, true) . ";\n");
}
"#;

struct Fleet {
    dir: PathBuf,
    store: PathBuf,
    config: PathBuf,
    staging: PathBuf,
    group: PathBuf,
    source: String,
    server: Child,
    agents: Vec<Child>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Every wmf-config PHP file `php -l` refuses (the generator writes
/// PHP-like text) becomes valid PHP of the same size.
fn valid_php(staging: &Path) {
    for e in std::fs::read_dir(staging.join("wmf-config")).unwrap() {
        let p = e.unwrap().path();
        let is_file = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file());
        if !is_file || p.extension().and_then(|x| x.to_str()) != Some("php") {
            continue;
        }
        let ok = Command::new("php")
            .arg("-l")
            .arg(&p)
            .output()
            .expect("php (apt-get install php-cli)")
            .status
            .success();
        if !ok {
            let len = std::fs::metadata(&p).unwrap().len() as usize;
            let mut body = String::from("<?php\n");
            let mut i = 0;
            while body.len() < len {
                body.push_str(&format!("$wmgSetting{i} = 'value {i}';\n"));
                i += 1;
            }
            std::fs::write(&p, body).unwrap();
        }
    }
}

/// wikiversions.json: 900 wikis, the first `newer` of them on `branch`,
/// the rest on php-1.46.0-wmf.1.
fn wikiversions(staging: &Path, branch: &str, newer: usize) {
    let mut text = String::from("{\n");
    for i in 0..900 {
        let b = if i < newer {
            branch
        } else {
            "php-1.46.0-wmf.1"
        };
        text.push_str(&format!(
            "  \"wiki{i:03}\": \"{b}\"{}\n",
            if i < 899 { "," } else { "" }
        ));
    }
    text.push('}');
    std::fs::write(staging.join("wikiversions.json"), text).unwrap();
}

fn start_fleet(n: usize) -> Fleet {
    let dir = fresh("world");
    let tree = dir.join("tree");
    generate(&tree, 30_000);
    big_configs(&tree);
    let staging = tree.join("mediawiki-staging");
    valid_php(&staging);
    std::fs::create_dir_all(staging.join("multiversion")).unwrap();
    std::fs::write(staging.join("multiversion/compile.php"), COMPILE).unwrap();
    std::fs::write(staging.join("multiversion/l10n.php"), L10N).unwrap();
    wikiversions(&staging, "php-1.46.0-wmf.1", 0);
    let store = dir.join("store");
    let (pki, config) = lab(&dir);
    let mut cfg = std::fs::read_to_string(&config).unwrap();
    cfg.push_str(&format!(
        r#"
[[component]]
name = "mediawiki"
path = "{staging}"
exclude = ["**/.git"]

[[build]]
name = "wikiversions"
command = "php multiversion/compile.php"
inputs = ["wikiversions.json", "multiversion/compile.php"]
outputs = ["wikiversions.php"]

[[build]]
name = "l10n"
per_branch = "php-*"
dir = "{{branch}}"
command = "php ../multiversion/l10n.php"
inputs = ["{{branch}}/languages/i18n/*.json", "{{branch}}/extensions/*/i18n/*.json", "{{branch}}/skins/*/i18n/*.json", "multiversion/l10n.php"]
outputs = ["{{branch}}/cache/l10n-php"]
timeout = "30m"
"#,
        staging = staging.display()
    ));
    std::fs::write(&config, cfg).unwrap();
    let scap_cfg = || {
        let mut c = scap(&store);
        c.arg("--config").arg(&config);
        c
    };
    timed(scap_cfg().arg("build-manifest"));
    let (server, source) = start_listening(
        scap_cfg()
            .args(tls_flags(&pki, "server"))
            .args(SERVE_ON_LOOPBACK),
    );
    let group_file = dir.join("group");
    let agents = start_agents(n, &pki, &dir, &group_file);
    let fleet = Fleet {
        dir,
        store,
        config,
        staging,
        group: group_file,
        source,
        server,
        agents,
    };
    // Every host on the first version, every step's outputs made once.
    fleet.world("first", false);
    fleet
}

impl Fleet {
    fn scap(&self) -> Command {
        let mut c = scap(&self.store);
        c.arg("--config").arg(&self.config);
        c
    }

    fn deploy_flags(&self) -> Vec<String> {
        [
            "--hosts",
            &self.group.display().to_string(),
            "--source",
            &self.source,
            "--wait",
            "0",
            "--yes",
            "--force",
            "--canary",
            "100%",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// build-manifest, then sync: wall seconds, and of the build.
    fn plain(&self) -> (f64, f64) {
        std::thread::sleep(std::time::Duration::from_secs(2)); // agents settle
        let started = Instant::now();
        let (_, out) = timed(self.scap().arg("build-manifest"));
        let built = started.elapsed().as_secs_f64();
        let v = version_id(&out);
        let (_, out) = timed(
            self.scap()
                .args(["sync", "plain sync", "--version", &v])
                .args(self.deploy_flags()),
        );
        assert!(out.contains("100.0% of production traffic"), "{out}");
        (started.elapsed().as_secs_f64(), built)
    }

    /// sync-world (`cold`: with the step and lint caches emptied first):
    /// wall seconds, of the preparation (checks, steps, build), and the
    /// steps that ran.
    fn world(&self, message: &str, cold: bool) -> (f64, f64, usize) {
        if cold {
            let cache = self.store.join("cache");
            let _ = std::fs::remove_dir_all(cache.join("steps"));
            for e in std::fs::read_dir(&cache).unwrap().flatten() {
                if e.file_name().to_string_lossy().starts_with("lint-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        let started = Instant::now();
        let (_, out) = timed(
            self.scap()
                .args(["sync-world", message])
                .args(self.deploy_flags()),
        );
        let secs = started.elapsed().as_secs_f64();
        assert!(out.contains("100.0% of production traffic"), "{out}");
        let ran = out.matches(": ran in ").count();
        let prepared: f64 = out
            .split("prepared in ")
            .nth(1)
            .and_then(|r| r.split('s').next())
            .and_then(|n| n.parse().ok())
            .expect("sync-world says how long it prepared");
        (secs, prepared, ran)
    }

    /// A new branch, a copy of the last with its i18n changed, half the
    /// wikis sent to it.
    fn new_train(&self, n: u64) {
        // The train before goes (staging keeps the last branch and this one).
        for e in std::fs::read_dir(&self.staging).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("php-") && name != "php-1.46.0-wmf.1" {
                std::fs::remove_dir_all(e.path()).unwrap();
            }
        }
        let from = self.staging.join("php-1.46.0-wmf.1");
        let name = format!("php-1.46.0-wmf.{}", 10 + n);
        let to = self.staging.join(&name);
        let st = Command::new("cp")
            .arg("-a")
            .arg(&from)
            .arg(&to)
            .status()
            .unwrap();
        assert!(st.success());
        let en = to.join("languages/i18n/en.json");
        if let Ok(text) = std::fs::read_to_string(&en)
            && let Some(body) = text.trim_end().strip_suffix('}')
        {
            std::fs::write(&en, format!("{body},\n\"train-{n}\": \"Train {n}\"\n}}\n")).unwrap();
        }
        wikiversions(&self.staging, &name, 450);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let n: usize = std::env::var("SCAP_BENCH_HOSTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    println!("machine: {}", machine());
    let fleet = start_fleet(n);
    let mut table = Table::new(&[
        "change",
        "plain build-manifest + sync (build)",
        "sync-world, steps cached (checks + steps + build)",
        "sync-world, steps cold (checks + steps + build)",
        "cached / plain",
        "steps run (cached, cold)",
    ]);
    // Best (wall, preparation) of each, over A B C C B A.
    let best = |x: &mut (f64, f64), y: (f64, f64)| {
        if y.0 < x.0 {
            *x = y;
        }
    };
    let mut seed = 0;
    let tree = fleet.staging.parent().unwrap().to_path_buf();
    for kind in ["config", "train"] {
        let (mut a, mut b, mut c) = ((f64::MAX, 0.0), (f64::MAX, 0.0), (f64::MAX, 0.0));
        let (mut ran_b, mut ran_c) = (0, 0);
        for which in [0u8, 1, 2, 2, 1, 0] {
            seed += 1;
            if kind == "config" {
                mutate(&tree, "bigconfig", seed);
            } else {
                fleet.new_train(seed);
            }
            match which {
                0 => best(&mut a, fleet.plain()),
                1 => {
                    let (s, p, r) = fleet.world(kind, false);
                    best(&mut b, (s, p));
                    ran_b = r;
                }
                _ => {
                    let (s, p, r) = fleet.world(&format!("{kind}, cold"), true);
                    best(&mut c, (s, p));
                    ran_c = r;
                }
            }
        }
        table.row(vec![
            if kind == "config" {
                "config only (one line in each of 3 big wmf-config files)".into()
            } else {
                "new train (a new branch of ~25k files, half the wikis on it)".into()
            },
            format!("{} ({})", ms(a.0), ms(a.1)),
            format!("{} ({})", ms(b.0), ms(b.1)),
            format!("{} ({})", ms(c.0), ms(c.1)),
            format!("{:.2}x", b.0 / a.0),
            format!("{ran_b}, {ran_c}"),
        ]);
    }
    table.save(
        "world",
        &format!(
            "machine: {}\nhosts: {n}\ndir: {}",
            machine(),
            fleet.dir.display()
        ),
    );
    drop(fleet);
}
