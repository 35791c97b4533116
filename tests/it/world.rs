//! The MediaWiki work around a deploy, with the real `php` (Debian's
//! php-cli) on a small MediaWiki-shaped tree: `scap sync-world` (checks,
//! build steps cached by content, announcements), sync-file's checks,
//! restarts without pools, locks and who is recorded.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::*;

const PHP: &str = "/usr/bin/php";

/// Compiles wikiversions.json into wikiversions.php (as multiversion's
/// updateWikiversions does).
const COMPILE: &str = include_str!("../fixtures/compile-wikiversions.php");

/// A localisation cache rebuild: every language's messages as PHP.
const L10N: &str = r#"<?php
$out = $argv[1];
if (!is_dir($out)) { mkdir($out, 0755, true); }
foreach (glob(__DIR__ . '/../languages/i18n/*.json') as $f) {
    $code = basename($f, '.json');
    $msgs = json_decode(file_get_contents($f), true);
    file_put_contents("$out/l10n_cache-$code.php", '<?php return ' . var_export($msgs, true) . ";\n");
}
"#;

const BRANCHES: [&str; 2] = ["php-1.46.0-wmf.5", "php-1.46.0-wmf.6"];

/// A MediaWiki-shaped staging tree: two branches, wmf-config,
/// multiversion, wikiversions.json.
fn mediawiki(root: &Path) {
    for b in BRANCHES {
        write(
            root,
            &format!("{b}/includes/Setup.php"),
            format!("<?php // {b}\n").as_bytes(),
        );
        write(
            root,
            &format!("{b}/languages/i18n/en.json"),
            br#"{"mainpage": "Main Page"}"#,
        );
        write(
            root,
            &format!("{b}/languages/i18n/fr.json"),
            br#"{"mainpage": "Accueil"}"#,
        );
        write(
            root,
            &format!("{b}/maintenance/rebuildLocalisationCache.php"),
            L10N.as_bytes(),
        );
    }
    write(
        root,
        "multiversion/MWMultiVersion.php",
        b"<?php\nclass MWMultiVersion {\n}\n",
    );
    write(root, "multiversion/compile.php", COMPILE.as_bytes());
    write(
        root,
        "wmf-config/InitialiseSettings.php",
        b"<?php\n$wgConf = [ 'wgSitename' => [ 'default' => 'Wikipedia' ] ];\n",
    );
    write(
        root,
        "wmf-config/CommonSettings.php",
        b"<?php\n$wgDebug = false;\n",
    );
    write(root, "wmf-config/extension-list.json", b"[\"Cite\"]\n");
    write(
        root,
        "wikiversions.json",
        b"{\n  \"enwiki\": \"php-1.46.0-wmf.5\",\n  \"testwiki\": \"php-1.46.0-wmf.6\"\n}\n",
    );
}

/// scap.toml: the env's TLS and key, the component, the announce relay
/// (logging to `announce.log`), the MediaWiki build steps (the l10n step
/// logs each run to `l10n-runs.log`), and `extra`.
fn config(fleet: &Fleet, top: &str, extra: &str) {
    let path = fleet.env.path("scap.toml");
    let base = fs::read_to_string(&path).unwrap();
    let base = base.split("\n[[component]]").next().unwrap().to_string();
    let (head, tables) = base.split_once("\n[tls]").unwrap();
    let head = head
        .lines()
        .filter(|l| !l.starts_with("global_lock"))
        .collect::<Vec<_>>()
        .join("\n");
    let runs = fleet.env.path("l10n-runs.log");
    let announce = fleet.env.path("announce.log");
    fs::write(
        &path,
        format!(
            r#"{head}
{top}

[tls]{tables}
[[component]]
name = "mediawiki"
path = "staging"

[announce]
command = 'echo "$SCAP_ANNOUNCE_EVENT|$SCAP_ANNOUNCE_OUTCOME|$SCAP_ANNOUNCE" >> {announce}'

[[build]]
name = "wikiversions"
command = "php multiversion/compile.php"
inputs = ["wikiversions.json", "multiversion/compile.php"]
outputs = ["wikiversions.php"]

[[build]]
name = "l10n"
per_branch = "php-*"
dir = "{{branch}}"
command = 'php maintenance/rebuildLocalisationCache.php cache/l10n && echo "$SCAP_BRANCH" >> {runs}'
inputs = ["{{branch}}/languages/i18n/*.json", "{{branch}}/maintenance/rebuildLocalisationCache.php"]
outputs = ["{{branch}}/cache/l10n"]
{extra}
"#,
            announce = announce.display(),
            runs = runs.display(),
        ),
    )
    .unwrap();
}

fn staging(fleet: &Fleet) -> PathBuf {
    fleet.env.path("staging")
}

fn runs(fleet: &Fleet) -> Vec<String> {
    fs::read_to_string(fleet.env.path("l10n-runs.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn announced(fleet: &Fleet) -> Vec<String> {
    fs::read_to_string(fleet.env.path("announce.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `scap sync-world MESSAGE` to every host, batch mode, no gates.
fn sync_world(fleet: &Fleet, message: &str, extra: &[&str]) -> Output {
    batch(fleet, &[&["sync-world", message], extra].concat())
}

/// A fleet command over every host, batch mode, no gates: `args`, then
/// the source, no wait, `--yes`.
fn batch(fleet: &Fleet, args: &[&str]) -> Output {
    let source = fleet.source();
    let mut all = args.to_vec();
    all.extend(["--source", &source, "--wait", "0", "--yes"]);
    let all = ungated(&all);
    fleet.run(&all.iter().map(String::as_str).collect::<Vec<_>>())
}

/// An inventory naming every host as its agent calls itself (mw1001,
/// ...), all in cluster appserver.
fn inventory(fleet: &Fleet) -> PathBuf {
    let text: String = fleet
        .hosts
        .iter()
        .map(|h| {
            format!(
                "[[host]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\ncluster = \"appserver\"\n\n",
                h.name,
                h.proc.port()
            )
        })
        .collect();
    let p = fleet.env.path("inventory.toml");
    fs::write(&p, text).unwrap();
    p
}

/// `scap sync` of `version` over the inventory's hosts, batch mode, no
/// gates; `extra` flags.
fn sync_inv(fleet: &Fleet, inv: &Path, version: &str, extra: &[&str]) -> Output {
    let source = fleet.source();
    let mut args = vec![
        "sync",
        "--version",
        version,
        "--source",
        &source,
        "--wait",
        "0",
        "--yes",
    ];
    args.extend(extra);
    fleet
        .env
        .cmd()
        .args(ungated(&args))
        .arg("--inventory")
        .arg(inv)
        .args(fleet.transport("deployer"))
        .output()
        .unwrap()
}

fn records(fleet: &Fleet) -> usize {
    let out = fleet.env.ok(&["log", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

fn versions(fleet: &Fleet) -> Vec<Option<String>> {
    (0..fleet.hosts.len()).map(|i| fleet.current(i)).collect()
}

#[test]
fn sync_world_checks_runs_build_steps_once_per_content_and_announces() {
    require_program(PHP, "php-cli");
    let mut fleet = Fleet::start(2);
    mediawiki(&staging(&fleet));
    // A first version to serve (and a store to serve it from).
    fleet.env.build(&[("mediawiki", &staging(&fleet))], &[]);
    fleet.serve();
    config(&fleet, "", "");

    // The train: every step runs, the version is the train's.
    let out = sync_world(&fleet, "group0 to 1.46.0-wmf.6", &[]);
    let text = ok(&out);
    let mut l10n = runs(&fleet);
    l10n.sort();
    assert_eq!(l10n, BRANCHES, "the l10n step ran once per branch");
    let v1 = fleet
        .env
        .ok(&["resolve", "1.46.0-wmf.6"])
        .trim()
        .to_string();
    assert_eq!(versions(&fleet), vec![Some(v1.clone()); 2], "{text}");
    let compiled = fleet.env.ok(&["cat", &v1, "mediawiki/wikiversions.php"]);
    assert!(
        compiled.contains("'testwiki' => 'php-1.46.0-wmf.6'"),
        "{compiled}"
    );
    let cache = fleet.env.ok(&[
        "cat",
        &v1,
        "mediawiki/php-1.46.0-wmf.6/cache/l10n/l10n_cache-fr.php",
    ]);
    assert!(cache.contains("Accueil"), "{cache}");
    let lines = announced(&fleet);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("start||")
            && lines[0].ends_with("Started scap sync-world: group0 to 1.46.0-wmf.6"),
        "{lines:?}"
    );
    assert!(lines[1].starts_with("end|ok|"), "{lines:?}");
    assert!(
        lines[1].contains("Finished scap sync-world: group0 to 1.46.0-wmf.6 (duration: 0m ")
            && lines[1].contains("on 100.0% of production traffic"),
        "{lines:?}"
    );
    assert!(!lines[0].contains("unknown:"), "{lines:?}");

    // A config-only change: no l10n run, only the config in the new version.
    write(
        &staging(&fleet),
        "wmf-config/InitialiseSettings.php",
        b"<?php\n$wgConf = [ 'wgSitename' => [ 'default' => 'Wikipedia!' ] ];\n",
    );
    let out = sync_world(&fleet, "config only", &[]);
    let text = ok(&out);
    assert_eq!(
        runs(&fleet).len(),
        2,
        "no l10n run for a config change: {text}"
    );
    let err = stderr(&out);
    assert!(
        err.contains("build step l10n (php-1.46.0-wmf.5): inputs unchanged"),
        "{err}"
    );
    let v2 = fleet
        .env
        .ok(&["resolve", "1.46.0-wmf.6"])
        .trim()
        .to_string();
    assert_ne!(v2, v1);
    let diff = fleet.env.ok(&["diff", &v1, &v2]);
    assert_eq!(
        diff.trim(),
        "M\tmediawiki/wmf-config/InitialiseSettings.php",
        "{diff}"
    );
    assert_eq!(versions(&fleet), vec![Some(v2.clone()); 2]);

    // One branch's messages change: its l10n runs, the other's does not.
    write(
        &staging(&fleet),
        "php-1.46.0-wmf.6/languages/i18n/fr.json",
        br#"{"mainpage": "Page d'accueil"}"#,
    );
    ok(&sync_world(&fleet, "i18n fix", &[]));
    assert_eq!(runs(&fleet).len(), 3);
    assert_eq!(runs(&fleet)[2], "php-1.46.0-wmf.6");
    let v3 = fleet
        .env
        .ok(&["resolve", "1.46.0-wmf.6"])
        .trim()
        .to_string();
    let cache = fleet.env.ok(&[
        "cat",
        &v3,
        "mediawiki/php-1.46.0-wmf.6/cache/l10n/l10n_cache-fr.php",
    ]);
    assert!(cache.contains("Page d"), "{cache}");

    // Outputs lost from staging come back from the store, the step not run.
    fs::remove_dir_all(staging(&fleet).join("php-1.46.0-wmf.5/cache")).unwrap();
    let out = sync_world(&fleet, "after a cleanup", &[]);
    let err = stderr(&out);
    ok(&out);
    assert_eq!(runs(&fleet).len(), 3, "{err}");
    assert!(err.contains("written back from the store"), "{err}");
    assert!(
        staging(&fleet)
            .join("php-1.46.0-wmf.5/cache/l10n/l10n_cache-en.php")
            .exists()
    );
    assert_eq!(
        fleet.env.ok(&["resolve", "1.46.0-wmf.6"]).trim(),
        v3,
        "the same tree: the same version"
    );

    // A syntax error: nothing built, nothing deployed, the file and line named.
    let before = records(&fleet);
    let announced_before = announced(&fleet).len();
    write(
        &staging(&fleet),
        "wmf-config/CommonSettings.php",
        b"<?php\n$wgDebug = false;\nif ( {\n",
    );
    let out = sync_world(&fleet, "broken", &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("wmf-config/CommonSettings.php:3:"), "{err}");
    assert!(err.contains("nothing was built or deployed"), "{err}");
    assert_eq!(records(&fleet), before, "no version was built");
    assert_eq!(versions(&fleet), vec![Some(v3.clone()); 2]);
    let lines = announced(&fleet);
    assert_eq!(lines.len(), announced_before + 2, "{lines:?}");
    assert!(
        lines.last().unwrap().starts_with("end|failed|"),
        "{lines:?}"
    );
    assert!(
        lines
            .last()
            .unwrap()
            .contains("FAILED scap sync-world: broken"),
        "{lines:?}"
    );
    write(
        &staging(&fleet),
        "wmf-config/CommonSettings.php",
        b"<?php\n$wgDebug = false;\n",
    );

    // Invalid JSON, named with its line.
    write(
        &staging(&fleet),
        "wmf-config/extension-list.json",
        b"[\n\"Cite\",\n]\n",
    );
    let err = stderr(&sync_world(&fleet, "bad json", &[]));
    assert!(
        err.contains("wmf-config/extension-list.json:3: invalid JSON"),
        "{err}"
    );
    write(
        &staging(&fleet),
        "wmf-config/extension-list.json",
        b"[\"Cite\"]\n",
    );

    // wikiversions.json sending a wiki to a branch staging does not have.
    write(
        &staging(&fleet),
        "wikiversions.json",
        b"{\n  \"enwiki\": \"php-1.46.0-wmf.5\",\n  \"testwiki\": \"php-1.46.0-wmf.7\"\n}\n",
    );
    let out = sync_world(&fleet, "group0 to wmf.7", &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("wikiversions.json:3: wiki testwiki points to branch \"php-1.46.0-wmf.7\""),
        "{err}"
    );
    assert_eq!(records(&fleet), before);
    assert_eq!(
        runs(&fleet).len(),
        3,
        "no step ran before the checks passed"
    );

    // sync-file checks the same way, against staging and every train.
    let out = batch(
        &fleet,
        &["sync-file", "wikiversions.json", "group0 to wmf.7"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("wiki testwiki points to branch \"php-1.46.0-wmf.7\""),
        "{}",
        stderr(&out)
    );
    write(
        &staging(&fleet),
        "wikiversions.json",
        b"{\n  \"enwiki\": \"php-1.46.0-wmf.5\",\n  \"testwiki\": \"php-1.46.0-wmf.6\"\n}\n",
    );
    write(
        &staging(&fleet),
        "wmf-config/InitialiseSettings.php",
        b"<?php\n$wgConf = [\n",
    );
    let out = batch(
        &fleet,
        &[
            "sync-file",
            "wmf-config/InitialiseSettings.php",
            "SWAT: broken",
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("wmf-config/InitialiseSettings.php:") && err.contains("Parse error"),
        "{err}"
    );
    assert_eq!(records(&fleet), before);
    assert_eq!(versions(&fleet), vec![Some(v3.clone()); 2]);
}

#[test]
fn a_build_step_that_fails_hangs_or_writes_elsewhere_stops_the_deploy() {
    require_program(PHP, "php-cli");
    let mut fleet = Fleet::start(1);
    mediawiki(&staging(&fleet));
    let v0 = fleet.env.build(&[("mediawiki", &staging(&fleet))], &[]);
    fleet.serve();
    ok(&fleet.rollout(&v0, &[]));
    let before = records(&fleet);
    let cases = [
        (
            "[[build]]\nname = \"fails\"\ncommand = \"echo rebuild failed: out of memory >&2; exit 3\"\n",
            "build step fails failed (exit status: 3)",
            "rebuild failed: out of memory",
        ),
        (
            "[[build]]\nname = \"hangs\"\ncommand = \"sleep 60\"\ntimeout = \"1s\"\n",
            "build step hangs failed (killed after 1 s (timeout))",
            "nothing was built",
        ),
        (
            "[[build]]\nname = \"stray\"\ncommand = \"echo x > wmf-config/stray.php && mkdir -p out && echo y > out/y\"\noutputs = [\"out\"]\n",
            "build step stray wrote outside its declared outputs (out): wmf-config/stray.php (new)",
            "declare them",
        ),
        (
            "[[build]]\nname = \"lazy\"\ncommand = \"true\"\noutputs = [\"never\"]\n",
            "build step lazy did not write its output never",
            "",
        ),
        (
            "[[build]]\nname = \"linked\"\ncommand = \"mkdir -p linkdir/out && echo y > linkdir/out/y\"\noutputs = [\"linkdir/out\"]\n",
            "linkdir is a symlink, on the way to its output linkdir/out",
            "only through real directories",
        ),
    ];
    // A directory of staging replaced by a link to somewhere else.
    let elsewhere = fleet.env.path("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, staging(&fleet).join("linkdir")).unwrap();
    for (step, says, also) in cases {
        config(&fleet, "", step);
        let out = sync_world(&fleet, "steps", &[]);
        assert!(!out.status.success(), "{step}");
        let err = stderr(&out);
        assert!(err.contains(says), "{step}: {err}");
        assert!(err.contains(also), "{step}: {err}");
        assert_eq!(records(&fleet), before, "{step}: nothing built");
        assert_eq!(fleet.current(0).as_deref(), Some(v0.as_str()));
        let _ = fs::remove_file(staging(&fleet).join("wmf-config/stray.php"));
        let _ = fs::remove_dir_all(staging(&fleet).join("out"));
    }
    fs::remove_file(staging(&fleet).join("linkdir")).unwrap();
    // The announce relay failing or hanging never stops a deploy.
    for relay in ["exit 7", "sleep 60"] {
        config(&fleet, "", "");
        let cfg2 = fs::read_to_string(fleet.env.path("scap.toml")).unwrap();
        let start = cfg2.find("[announce]").unwrap();
        let end = cfg2[start..].find("\n\n").unwrap() + start;
        fs::write(
            fleet.env.path("scap.toml"),
            format!(
                "{}[announce]\ncommand = \"{relay}\"\ntimeout = \"1s\"{}",
                &cfg2[..start],
                &cfg2[end..]
            ),
        )
        .unwrap();
        write(
            &staging(&fleet),
            "wmf-config/CommonSettings.php",
            format!("<?php // {relay}\n").as_bytes(),
        );
        let out = sync_world(&fleet, "relay down", &[]);
        let err = stderr(&out);
        ok(&out);
        assert!(err.contains("was not sent") && err.contains(relay), "{err}");
    }
}

#[test]
fn restarts_without_pools_keep_to_the_batch_and_hosts_that_catch_up_restart_themselves() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let log_path = log.path().display().to_string();
    // Logs its start and end (and the changed files it was given), takes
    // a moment; mw1006 fails when $FAIL_HOST says so.
    let restart = format!(
        "echo \"start {{host}} $(date +%s.%N)\" >> {log_path}; \
         if [ -n \"$SCAP_CHANGED_FILES\" ]; then sed 's/^/changed {{host}} /' \"$SCAP_CHANGED_FILES\" >> {log_path}; fi; \
         sleep 0.3; echo \"end {{host}} $(date +%s.%N)\" >> {log_path}; \
         [ -e {log_path}.fail-{{host}} ] && exit 3; true"
    );
    let mut fleet = Fleet::start_with(6, &["--restart-command", &restart]);
    let mw = fleet.env.path("mw");
    write(&mw, "index.php", b"<?php // v1\n");
    write(&mw, "wmf-config/a.php", b"<?php // a1\n");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    write(&mw, "wmf-config/a.php", b"<?php // a2\n");
    let v2 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    fleet.serve();
    let cfg = fleet.env.path("scap.toml");
    let mut text = fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[restarts]\nbatch = \"34%\"\n");
    fs::write(&cfg, text).unwrap();

    let inv = inventory(&fleet);
    let out = sync_inv(&fleet, &inv, &v1, &[]);
    let text = ok_out(&out);
    assert!(text.contains("6 host(s) restarted"), "{text}");
    let check_overlap = |what: &str| {
        let log = fs::read_to_string(&log_path).unwrap();
        let mut events: Vec<(f64, i32)> = log
            .lines()
            .filter_map(|l| {
                let mut p = l.split_whitespace();
                let kind = p.next()?;
                let _host = p.next()?;
                let t: f64 = p.next()?.parse().ok()?;
                match kind {
                    "start" => Some((t, 1)),
                    "end" => Some((t, -1)),
                    _ => None,
                }
            })
            .collect();
        events.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (mut now, mut most) = (0, 0);
        for (_, d) in events {
            now += d;
            most = most.max(now);
        }
        // 34% of 6 hosts, rounded down: 2 at once, never 3.
        assert!(
            (1..=2).contains(&most),
            "{what}: {most} restarts at once:\n{log}"
        );
        log
    };
    let log1 = check_overlap("first rollout");
    assert_eq!(log1.matches("start ").count(), 6, "{log1}");
    for i in 0..6 {
        let (_, st) = fleet.get(i, "/v1/state");
        let history = st["state"]["history"].as_array().unwrap();
        assert!(
            history
                .iter()
                .any(|e| e["action"] == "restart" && e["ok"] == true),
            "host {i}: {st}"
        );
    }

    // The next restart is told what changed since the last one.
    fs::write(format!("{log_path}.fail-mw1006"), "").unwrap();
    let out = sync_inv(&fleet, &inv, &v2, &[]);
    assert!(!out.status.success(), "mw1006's restart failed");
    let err = stderr(&out);
    assert!(
        err.contains("RESTART FAILED mw1006: restart command failed (exit status: 3)"),
        "{err}"
    );
    let log2 = check_overlap("second rollout");
    assert!(
        log2.lines()
            .any(|l| l.starts_with("changed mw1001 ") && l.ends_with("/wmf-config/a.php")),
        "{log2}"
    );
    assert!(
        !log2
            .lines()
            .any(|l| l.starts_with("changed mw1001 ") && l.ends_with("index.php"))
    );
    fs::remove_file(format!("{log_path}.fail-mw1006")).unwrap();

    // A host that was down catches up by itself at start, and restarts.
    write(&mw, "wmf-config/a.php", b"<?php // a3\n");
    let v3 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    fleet.hosts[5].proc.kill();
    let out = sync_inv(&fleet, &inv, &v3, &["--max-failures", "1"]);
    assert!(
        stderr(&out).contains("mw1006: unreachable"),
        "{}",
        stderr(&out)
    );
    let source = fleet.source();
    fleet.hosts[5]
        .extra
        .extend(["--source".to_string(), source]);
    fleet.restart_same_port(5);
    wait_for(60, "mw1006 to catch up and restart", || {
        fleet.current(5).as_deref() == Some(v3.as_str())
            && fs::read_to_string(&log_path)
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("end mw1006"))
                .count()
                == 3
    });
    let (_, st) = fleet.get(5, "/v1/state");
    let newest = st["state"]["history"]
        .as_array()
        .unwrap()
        .first()
        .unwrap()
        .clone();
    assert_eq!(newest["action"], "restart", "{st}");
    assert!(
        newest["by"].as_str().unwrap().contains("after catching up"),
        "{newest}"
    );
}

#[test]
fn locks_name_their_holder_and_authors_are_real_users() {
    let mut fleet = Fleet::start(1);
    let mw = fleet.env.path("mw");
    write(&mw, "index.php", b"<?php // v1\n");
    let v1 = fleet.env.build(&[("mediawiki", &mw)], &[]);
    fleet.serve();
    let global = fleet.env.path("global.lock");
    let cfg = fleet.env.path("scap.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    let announce = fleet.env.path("announce.log");
    fs::write(
        &cfg,
        format!(
            "global_lock = \"{}\"\n{text}\n[announce]\ncommand = 'echo \"$SCAP_ANNOUNCE\" >> {}'\n",
            global.display(),
            announce.display()
        ),
    )
    .unwrap();
    let as_user = |user: &str, args: &[&str]| {
        let group = fleet.group("all-hosts", &[0]);
        fleet
            .env
            .cmd()
            .env("SUDO_USER", user)
            .args(args)
            .arg("--hosts")
            .arg(&group)
            .args(fleet.transport("deployer"))
            .output()
            .unwrap()
    };
    let lock = |user: &str, args: &[&str]| {
        fleet
            .env
            .cmd()
            .env("SUDO_USER", user)
            .arg("lock")
            .args(args)
            .output()
            .unwrap()
    };
    let sync = |user: &str| {
        let source = fleet.source();
        let args = ungated(&[
            "sync",
            "--version",
            &v1,
            "--source",
            &source,
            "--yes",
            "--wait",
            "0",
        ]);
        as_user(user, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    ok(&lock("alice", &["investigating T12345"]));
    let out = sync("bob");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("locked by alice on")
            && err.contains("investigating T12345")
            && err.contains("scap lock --release"),
        "{err}"
    );
    assert_eq!(fleet.current(0), None, "bob's deploy did not start");
    // Alice's own deploys go through her lock.
    let out = sync("alice");
    ok(&out);
    assert!(stderr(&out).contains("going ahead through your own lock"));
    // Only alice releases it (or someone with --force).
    let out = lock("bob", &["--release"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not yours"), "{}", stderr(&out));
    ok(&lock("alice", &["--release"]));
    ok(&sync("bob"));
    // The global lock stops deploys of any store on this host.
    ok(&lock("carol", &["--all", "datacenter switchover"]));
    let held = fleet.status()["held"].clone();
    assert_eq!(held[0]["user"], "carol", "{held}");
    assert_eq!(held[0]["global"], true, "{held}");
    let shown = ok_out(&lock("bob", &[]));
    assert!(
        shown.contains("carol") && shown.contains("datacenter switchover"),
        "{shown}"
    );
    let other = fleet.env.path("other-store");
    let out = std::process::Command::new(SCAP)
        .current_dir(fleet.env.dir.path())
        .env_remove("SCAP_STORE")
        .env_remove("SCAP_CONFIG")
        .env("SUDO_USER", "bob")
        .arg("--store")
        .arg(&other)
        .args(["rollback", "--yes", "--hosts"])
        .arg(fleet.group("g", &[0]))
        .args(fleet.transport("deployer"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("datacenter switchover"),
        "{}",
        stderr(&out)
    );
    ok(&lock("carol", &["--all", "--release"]));
    let lines = fs::read_to_string(&announce).unwrap();
    for l in [
        "alice: Locked scap (this fleet's deploys): investigating T12345",
        "alice: Released the scap lock on this fleet's deploys: investigating T12345",
        "carol: Locked scap (every deploy on this host): datacenter switchover",
        "bob: Started scap sync: sync ",
    ] {
        assert!(lines.contains(l), "{l:?} in:\n{lines}");
    }

    // With neither $SUDO_USER nor $USER, history names the real user.
    let group = fleet.group("all-hosts", &[0]);
    let out = fleet
        .env
        .cmd()
        .env_remove("SUDO_USER")
        .env_remove("USER")
        .args(ungated(&[
            "sync",
            "--version",
            &v1,
            "--source",
            &fleet.source(),
            "--yes",
            "--wait",
            "0",
        ]))
        .arg("--hosts")
        .arg(&group)
        .args(fleet.transport("deployer"))
        .output()
        .unwrap();
    ok(&out);
    let history = fleet.env.ok(&["history", "--json"]);
    let h: serde_json::Value = serde_json::from_str(&history).unwrap();
    let user = h[0]["user"].as_str().unwrap();
    assert!(
        !user.is_empty() && user != "unknown" && !user.starts_with("uid "),
        "{history}"
    );
}
