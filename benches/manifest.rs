//! build-manifest, rebuilds and diff on a generated MediaWiki-like tree,
//! side by side with casync, b3sum and zstd on the same data.
//!
//! Run: `cargo bench --bench manifest` (release build). Environment:
//! SCAP_BENCH_FILES (default 30000), SCAP_BENCH_LARGE_FILES (263000; 0
//! skips the peak-RSS run at that scale), SCAP_BENCH_DIR (/tmp/scap-bench).
//! The page cache is warm for every tool (each reads the tree once first).
//! Every build signs its version with a deploy key, as on a deploy host.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// A scap.toml naming the deploy key every build signs with, as on a
/// deploy host.
static CONFIG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn build(store: &Path, tree: &Path) -> (Run, String) {
    let mut cmd = scap(store);
    if let Some(config) = CONFIG.get() {
        cmd.arg("--config").arg(config);
    }
    build_version(&mut cmd, "tree", tree)
}

fn casync_make(store: &Path, index: &Path, tree: &Path) -> Run {
    timed(
        Command::new("casync")
            .arg("make")
            .arg("--compression=zstd")
            .arg(format!("--store={}", store.display()))
            .arg(index)
            .arg(tree),
    )
    .0
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` asks; nothing to list
    }
    let files: usize = std::env::var("SCAP_BENCH_FILES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    let large: usize = std::env::var("SCAP_BENCH_LARGE_FILES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(263_000);
    let casync = have("casync");
    let dir = fresh("manifest");
    let key = dir.join("deploy.key");
    let made = Command::new(SCAP)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "scap keygen");
    let config = dir.join("scap.toml");
    std::fs::write(&config, format!("sign_key = \"{}\"\n", key.display())).unwrap();
    CONFIG.set(config).unwrap();
    let tree = dir.join("tree");
    println!("machine: {}", machine());
    println!("generating {files} files ...");
    generate(&tree, files);
    let size = du(&tree);
    // Let the files age past the stat cache's one-second racy window.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let t = tree.display().to_string();
    // Warm the page cache for everyone.
    sh(&format!(
        "find {t} -type f -print0 | xargs -0 cat > /dev/null"
    ));

    let mut table = Table::new(&["step", "scap", "alternative", "alternative / scap"]);
    let (b3, _) = sh(&format!(
        "find {t} -type f -print0 | xargs -0 b3sum > /dev/null"
    ));
    let (zs, _) = sh(&format!(
        "find {t} -type f -print0 | xargs -0 cat | zstd -3 -T0 -c > /dev/null"
    ));

    // Cold builds, A B B A: scap, casync, then casync and scap again into
    // new stores (removed after); the better of each pair.
    let store = dir.join("store");
    let (cold_a, v0) = build(&store, &tree);
    let ca_store = dir.join("castore");
    let ca_a = casync.then(|| casync_make(&ca_store, &dir.join("v0.caidx"), &tree));
    let ca_b = casync.then(|| {
        let again = dir.join("castore-again");
        let r = casync_make(&again, &dir.join("v0-again.caidx"), &tree);
        let _ = std::fs::remove_dir_all(&again);
        r
    });
    let again = dir.join("store-again");
    let (cold_b, _) = build(&again, &tree);
    let _ = std::fs::remove_dir_all(&again);
    println!(
        "cold build: scap {:.2} s / {:.2} s; casync {:?} / {:?}",
        cold_a.secs,
        cold_b.secs,
        ca_a.map(|r| r.secs),
        ca_b.map(|r| r.secs)
    );
    let better = |a: Run, b: Run| if a.secs <= b.secs { a } else { b };
    let cold = better(cold_a, cold_b);
    let ca_cold = ca_a.zip(ca_b).map(|(a, b)| better(a, b));
    table.row(vec![
        format!(
            "cold build-manifest ({files} files, {}; A B B A, better of each)",
            mb(size)
        ),
        ms(cold.secs),
        ca_cold
            .map(|r| format!("casync make: {}", ms(r.secs)))
            .unwrap_or("casync not installed".into()),
        ca_cold
            .map(|r| format!("{:.1}x", r.secs / cold.secs))
            .unwrap_or_default(),
    ]);
    table.row(vec![
        "  (for scale) hash only: b3sum; compress only: zstd -3 -T0".into(),
        "".into(),
        format!("b3sum {}; zstd {}", ms(b3.secs), ms(zs.secs)),
        "".into(),
    ]);
    table.row(vec![
        "cold build-manifest peak RSS".into(),
        format!("{} MB", cold.rss_kib / 1024),
        ca_cold
            .map(|r| format!("casync {} MB", r.rss_kib / 1024))
            .unwrap_or_default(),
        "".into(),
    ]);

    // Incremental after a backport: median of 5 backports.
    let mut incs = Vec::new();
    let mut v_back = v0.clone();
    for seed in 0..5 {
        mutate(&tree, "backport", 100 + seed);
        let (r, v) = build(&store, &tree);
        incs.push(r.secs);
        v_back = v;
    }
    // The first of them comes right after the cold builds of a tree that
    // was just written: what a build after a `git pull` of many files
    // pays for the files the pull touched last (racily clean in the
    // cold build's stat cache, so read again).
    let first_inc = incs[0];
    incs.sort_by(|a, b| a.total_cmp(b));
    let inc = incs[2];
    let ca_inc = if casync {
        Some(casync_make(&ca_store, &dir.join("v1.caidx"), &tree))
    } else {
        None
    };
    table.row(vec![
        "incremental build-manifest after a backport (median of 5)".into(),
        ms(inc),
        ca_inc
            .map(|r| format!("casync make: {}", ms(r.secs)))
            .unwrap_or_default(),
        ca_inc
            .map(|r| format!("{:.0}x", r.secs / inc))
            .unwrap_or_default(),
    ]);

    table.row(vec![
        "  the first of them (right after the cold builds of a just-written tree; target under 0.15 s)"
            .into(),
        ms(first_inc),
        ca_inc
            .map(|r| format!("casync make: {}", ms(r.secs)))
            .unwrap_or_default(),
        ca_inc
            .map(|r| format!("{:.0}x", r.secs / first_inc))
            .unwrap_or_default(),
    ]);

    // A train: a new branch copied from the old one, ~2% changed.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    mutate(&tree, "train", 7);
    let (train_build, v_train) = build(&store, &tree);
    let ca_train = if casync {
        Some(casync_make(&ca_store, &dir.join("v2.caidx"), &tree))
    } else {
        None
    };
    table.row(vec![
        "build-manifest after a train (new php-* branch)".into(),
        ms(train_build.secs),
        ca_train
            .map(|r| format!("casync make: {}", ms(r.secs)))
            .unwrap_or_default(),
        ca_train
            .map(|r| format!("{:.1}x", r.secs / train_build.secs))
            .unwrap_or_default(),
    ]);
    let diff_secs = median(11, || {
        timed(scap(&store).args(["diff", &v_back, &v_train])).0.secs
    });
    let lines = timed(scap(&store).args(["diff", &v_back, &v_train]))
        .1
        .lines()
        .count();
    let stat_secs = median(5, || {
        timed(scap(&store).args(["diff", "--stat", &v_back, &v_train]))
            .0
            .secs
    });
    let stat_out = timed(scap(&store).args(["diff", "--stat", &v_back, &v_train])).1;
    table.row(vec![
        format!("diff between two trains ({lines} changed paths), whole process"),
        ms(diff_secs),
        "".into(),
        "".into(),
    ]);
    table.row(vec![
        "diff --stat between two trains (walks the old version for chunk sharing)".into(),
        ms(stat_secs),
        "".into(),
        "".into(),
    ]);
    let backport_diff = median(11, || {
        timed(scap(&store).args(["diff", &v0, &v_back])).0.secs
    });
    table.row(vec![
        "diff across 5 backports".into(),
        ms(backport_diff),
        "".into(),
        "".into(),
    ]);
    println!("{stat_out}");

    // l10n: large files partially changed.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    mutate(&tree, "l10n", 9);
    let (_, v_l10n) = build(&store, &tree);
    let l10n = timed(scap(&store).args(["diff", "--stat", "--json", &v_train, &v_l10n])).1;
    let l10n: serde_json::Value = serde_json::from_str(&l10n).unwrap();
    table.row(vec![
        format!(
            "l10n change: {} large files modified",
            l10n["stat"]["modified"]
        ),
        format!(
            "fetch {} of {} changed",
            mb(l10n["stat"]["fetch_bytes"].as_u64().unwrap()),
            mb(l10n["stat"]["bytes_changed"].as_u64().unwrap())
        ),
        "".into(),
        "".into(),
    ]);
    table.row(vec![
        "store size after 8 versions".into(),
        mb(du(&store)),
        if casync {
            format!("casync store {}", mb(du(&ca_store)))
        } else {
            String::new()
        },
        format!("tree itself: {}", mb(du(&tree))),
    ]);

    // Peak RSS at the scale of the real staging tree.
    if large > 0 {
        let big = fresh("manifest-large");
        let big_tree = big.join("tree");
        println!("generating {large} files ...");
        generate(&big_tree, large);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let (r, _) = build(&big.join("store"), &big_tree);
        table.row(vec![
            format!("cold build-manifest, {large} files ({})", mb(du(&big_tree))),
            format!("{}, peak RSS {} MB", ms(r.secs), r.rss_kib / 1024),
            "".into(),
            "".into(),
        ]);
        mutate(&big_tree, "backport", 1);
        let (r, _) = build(&big.join("store"), &big_tree);
        table.row(vec![
            format!("incremental after a backport, {large} files"),
            format!("{}, peak RSS {} MB", ms(r.secs), r.rss_kib / 1024),
            "".into(),
            "".into(),
        ]);
        let _ = std::fs::remove_dir_all(&big);
    }
    if let Ok(before) = std::env::var("SCAP_BENCH_BASELINE") {
        before_and_after(&dir, &tree, Path::new(&before), &mut table);
    }
    table.save(
        "manifest",
        &format!("machine: {}\nfiles: {files}", machine()),
    );
    done(&dir);
}

fn build_with(exe: &Path, store: &Path, tree: &Path) -> f64 {
    timed(
        Command::new(exe)
            .arg("--store")
            .arg(store)
            .args(["build-manifest", "--component"])
            .arg(format!("tree={}", tree.display())),
    )
    .0
    .secs
}

/// This scap against an older binary (`SCAP_BENCH_BASELINE`), each into
/// its own store, in the order A B B A: cold builds, then three backports
/// built incrementally. Medians.
fn before_and_after(dir: &Path, tree: &Path, before: &Path, table: &mut Table) {
    let exe = Path::new(SCAP);
    let (mut cold_a, mut cold_b) = (Vec::new(), Vec::new());
    let stores: Vec<_> = (0..4).map(|i| dir.join(format!("ab-store{i}"))).collect();
    for (i, store) in stores.iter().enumerate() {
        let (who, list) = if i == 0 || i == 3 {
            (exe, &mut cold_a)
        } else {
            (before, &mut cold_b)
        };
        list.push(build_with(who, store, tree));
    }
    let (mut inc_a, mut inc_b) = (Vec::new(), Vec::new());
    for seed in 0..3 {
        mutate(tree, "backport", 300 + seed);
        for (i, store) in stores.iter().enumerate() {
            let (who, list) = if i == 0 || i == 3 {
                (exe, &mut inc_a)
            } else {
                (before, &mut inc_b)
            };
            list.push(build_with(who, store, tree));
        }
    }
    println!(
        "cold: this {cold_a:?} before {cold_b:?}; incremental: this {inc_a:?} before {inc_b:?}"
    );
    // The better of each (this disk is noisy; see BENCHMARKS.md).
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[0]
    };
    let (ca, cb, ia, ib) = (
        med(&mut cold_a),
        med(&mut cold_b),
        med(&mut inc_a),
        med(&mut inc_b),
    );
    table.row(vec![
        "cold build-manifest, this scap against the baseline binary (A B B A, better of each)"
            .into(),
        ms(ca),
        format!("before: {}", ms(cb)),
        format!("{:.2}x", cb / ca),
    ]);
    table.row(vec![
        "incremental after a backport, against the baseline (3 backports x 2 stores, best)".into(),
        ms(ia),
        format!("before: {}", ms(ib)),
        format!("{:.2}x", ib / ia),
    ]);
}
