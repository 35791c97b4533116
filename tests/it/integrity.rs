//! verify, gc, crashes and a full disk: the store stays valid.

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::*;

fn object_path(store: &Path, hex: &str) -> PathBuf {
    store.join("objects").join(&hex[..2]).join(&hex[2..])
}

/// The chunk ID of a file of a version, via `ls --json`... which does not
/// show chunk IDs; so take it from `diff --json` against nothing: instead
/// hash it the way scap does (derive-key BLAKE3, chunk context).
fn chunk_id(data: &[u8]) -> String {
    blake3::Hasher::new_derive_key("scap 2026-11-26 object chunk v1")
        .update(data)
        .finalize()
        .to_hex()
        .to_string()
}

#[test]
fn verify_names_corrupt_and_missing_objects() {
    let env = Env::new();
    let mw = env.path("mw");
    sample_tree(&mw);
    let v = env.build(&[("mediawiki", &mw)], &[]);
    let ok = env.ok(&["verify"]);
    assert!(ok.contains("0 problems"), "{ok}");

    // Flip one byte of a compressed object's payload.
    let id = chunk_id(&fs::read(mw.join("includes/libs/rdbms/database/Database.php")).unwrap());
    let p = object_path(&env.store, &id);
    let mut bytes = fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&p, bytes).unwrap();
    // And remove another.
    let gone = chunk_id(b"<?php\n// start\n");
    fs::remove_file(object_path(&env.store, &gone)).unwrap();

    let out = env.raw(&["verify", &v]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "BAD chunk {id} mediawiki/includes/libs/rdbms/database/Database.php"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "BAD chunk {gone} mediawiki/includes/WebStart.php: missing"
        )),
        "{text}"
    );
    assert!(text.contains("2 problems"), "{text}");
    let (_, err) = env.fails(&[
        "cat",
        &v,
        "mediawiki/includes/libs/rdbms/database/Database.php",
    ]);
    assert!(
        err.contains(&id),
        "a corrupt object is never served as content: {err}"
    );

    // A rebuild restores what staging still has.
    fs::remove_file(&p).unwrap();
    let stat = mw.join("includes/WebStart.php");
    fs::write(&stat, b"<?php\n// start\n").unwrap();
    fs::write(
        mw.join("includes/libs/rdbms/database/Database.php"),
        b"<?php class Database {}\n".repeat(40),
    )
    .unwrap();
    fs::remove_dir_all(env.store.join("cache")).unwrap();
    fs::create_dir(env.store.join("cache")).unwrap();
    assert_eq!(env.build(&[("mediawiki", &mw)], &[]), v);
    assert!(env.ok(&["verify"]).contains("0 problems"));
}

#[test]
fn truncated_tree_is_reported_by_path() {
    let env = Env::new();
    let mw = env.path("mw");
    sample_tree(&mw);
    let v = env.build(&[("mediawiki", &mw)], &[]);
    let ls: serde_json::Value =
        serde_json::from_str(&env.ok(&["ls", "--json", &v, "mediawiki"])).unwrap();
    let includes = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "includes")
        .unwrap();
    let tree = includes["tree"].as_str().unwrap();
    let p = object_path(&env.store, tree);
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let out = env.raw(&["verify", "--json", &v]);
    assert_eq!(out.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["problems"][0]["id"], tree);
    assert_eq!(report["problems"][0]["path"], "mediawiki/includes");
    // gc refuses to guess what a broken tree reaches.
    let (_, err) = env.fails(&["gc", "--keep", "1"]);
    assert!(
        err.contains("gc removed nothing") && err.contains(tree),
        "{err}"
    );
}

#[test]
fn gc_keeps_what_it_must() {
    let env = Env::new();
    let mw = env.path("mw");
    sample_tree(&mw);
    let mut versions = Vec::new();
    for i in 0..4 {
        write(&mw, "version.php", format!("<?php // v{i}\n").as_bytes());
        write(
            &mw,
            &format!("only-in-v{i}.php"),
            format!("<?php // only {i}\n").as_bytes(),
        );
        let label = if i == 0 {
            vec!["--label", "1.46.0-wmf.1"]
        } else {
            vec![]
        };
        versions.push(env.build(&[("mediawiki", &mw)], &label));
        fs::remove_file(mw.join(format!("only-in-v{i}.php"))).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100)); // distinct record times
    }
    env.ok(&["pin", &versions[1]]);
    let dry: serde_json::Value =
        serde_json::from_str(&env.ok(&["gc", "--keep", "1", "--dry-run", "--json"])).unwrap();
    assert_eq!(dry["removed_versions"].as_array().unwrap().len(), 1);
    assert!(
        object_path(&env.store, &chunk_id(b"<?php // only 2\n")).exists(),
        "dry run removes nothing"
    );

    let report: serde_json::Value =
        serde_json::from_str(&env.ok(&["gc", "--keep", "1", "--json"])).unwrap();
    assert_eq!(report["removed_versions"], serde_json::json!([versions[2]]));
    assert!(report["removed_objects"].as_u64().unwrap() >= 2, "{report}");
    // Kept: newest, labelled, pinned; each fully readable.
    for v in [&versions[0], &versions[1], &versions[3]] {
        let out = env.raw(&["verify", v]);
        assert!(
            out.status.success(),
            "{v}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(!object_path(&env.store, &chunk_id(b"<?php // only 2\n")).exists());
    assert!(object_path(&env.store, &chunk_id(b"<?php // only 1\n")).exists());
    let (code, _) = env.fails(&["ls", &versions[2]]);
    assert_eq!(code, 4, "a collected version is gone, by name too");
    // Unpinned, v1 goes on the next gc.
    env.ok(&["unpin", &versions[1]]);
    env.ok(&["gc", "--keep", "1"]);
    assert!(!object_path(&env.store, &chunk_id(b"<?php // only 1\n")).exists());
    assert!(env.ok(&["verify"]).contains("0 problems"));
    let (code, _) = env.fails(&["gc", "--keep", "0"]);
    assert_eq!(code, 2);
}

#[test]
fn full_disk_leaves_the_store_valid() {
    let env = Env::new();
    let mw = env.path("mw");
    for i in 0..50 {
        write(&mw, &format!("f{i}.php"), &noise(2000, i));
    }
    let small = Tmpfs::mount(&env.path("small"), "2m");
    let mnt = small.path().to_path_buf();
    let store = mnt.join("store");
    let run = |args: &[&str]| {
        std::process::Command::new(SCAP)
            .arg("--store")
            .arg(&store)
            .args(args)
            .output()
            .unwrap()
    };
    let comp = format!("mediawiki={}", mw.display());
    let out = run(&["build-manifest", "--component", &comp]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let small = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();

    // 4 MB of noise does not fit in what is left of 2 MB.
    write(&mw, "cache/l10n/huge.cdb", &noise(4 << 20, 5));
    let out = run(&["build-manifest", "--component", &comp]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(&store.display().to_string()),
        "names the path: {err}"
    );

    // Nothing half-written is referenced: the old version is intact, no
    // new version was recorded, and the store accepts the next build.
    let log = String::from_utf8_lossy(&run(&["log", "--json"]).stdout).into_owned();
    let records: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(records.as_array().unwrap().len(), 1);
    assert!(run(&["verify"]).status.success());
    fs::remove_file(mw.join("cache/l10n/huge.cdb")).unwrap();
    write(&mw, "f1.php", b"<?php // after the disk filled up\n");
    let out = run(&["build-manifest", "--component", &comp]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    assert_ne!(v, small);
    assert!(run(&["verify"]).status.success());
}
