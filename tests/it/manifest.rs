//! build-manifest: determinism, what a version records, the stat cache, bad input.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;

use crate::support::*;

#[test]
fn same_content_same_version_anywhere() {
    let env = Env::new();
    let a = env.path("a/staging");
    sample_tree(&a);
    let b = env.path("b/elsewhere");
    fs::create_dir_all(b.parent().unwrap()).unwrap();
    copy_tree(&a, &b);
    let va = env.build(&[("mediawiki", &a)], &[]);
    let vb = env.build(&[("mediawiki", &b)], &[]);
    assert_eq!(va, vb, "same content at two paths");
    assert_eq!(env.build(&[("mediawiki", &a)], &[]), va, "rebuild");

    // mtimes, owners and non-exec mode bits are not part of a version.
    let f = b.join("index.php");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    let status = std::process::Command::new("touch")
        .args(["-d", "2001-01-01"])
        .arg(&f)
        .status()
        .unwrap();
    assert!(status.success());
    let other = Env::new();
    assert_eq!(
        other.build(&[("mediawiki", &b)], &[]),
        va,
        "a fresh store, changed mtime and mode"
    );

    // The exec bit and the component name are.
    fs::set_permissions(&f, fs::Permissions::from_mode(0o700)).unwrap();
    assert_ne!(env.build(&[("mediawiki", &b)], &[]), va, "exec bit");
    assert_ne!(env.build(&[("mw", &a)], &[]), va, "component name");
}

#[test]
fn several_components_make_one_root() {
    let env = Env::new();
    let mw = env.path("mw");
    let portals = env.path("portals");
    sample_tree(&mw);
    write(
        &portals,
        "prod/wikipedia.org/index.html",
        b"<html></html>\n",
    );
    let v = env.build(&[("mediawiki", &mw), ("portals", &portals)], &[]);
    let ls = env.ok(&["ls", &v]);
    assert_eq!(
        ls.lines()
            .map(|l| l.split_whitespace().last().unwrap())
            .collect::<Vec<_>>(),
        ["mediawiki/", "portals/"]
    );
    // A change in one component leaves the other's tree ID alone.
    let log1: serde_json::Value = serde_json::from_str(&env.ok(&["log", "--json"])).unwrap();
    write(
        &portals,
        "prod/wikipedia.org/index.html",
        b"<html>new</html>\n",
    );
    let v2 = env.build(&[("mediawiki", &mw), ("portals", &portals)], &[]);
    assert_ne!(v, v2);
    let log2: serde_json::Value = serde_json::from_str(&env.ok(&["log", "--json"])).unwrap();
    let tree = |log: &serde_json::Value, i: usize| log[0]["components"][i]["tree"].clone();
    assert_eq!(tree(&log1, 0), tree(&log2, 0), "mediawiki unchanged");
    assert_ne!(tree(&log1, 1), tree(&log2, 1), "portals changed");
    assert_eq!(
        log2[0]["parent"],
        serde_json::Value::String(v.clone()),
        "parent defaults to the previous build"
    );
}

#[test]
fn excludes_from_flags_and_config() {
    let env = Env::new();
    let mw = env.path("mw");
    sample_tree(&mw);
    write(&mw, ".git/HEAD", b"ref: refs/heads/master\n");
    write(&mw, "php-1.46/.git/config", b"[core]\n");
    write(
        &mw,
        "php-1.46/cache/l10n/l10n_cache-en.cdb",
        &noise(1000, 1),
    );
    write(&mw, "php-1.46/index.php", b"<?php\n");
    let base = env.build(
        &[("mediawiki", &mw)],
        &["--exclude", "**/.git", "--exclude", "**/cache/l10n/*.cdb"],
    );
    let listing = env.ok(&["ls", "-r", &base]);
    assert!(!listing.contains(".git"), "{listing}");
    assert!(!listing.contains(".cdb"), "{listing}");
    assert!(listing.contains("php-1.46/index.php"));

    fs::write(
        env.path("scap.toml"),
        format!(
            "store = \"{}\"\nexclude = [\"**/.git\"]\n[[component]]\nname = \"mediawiki\"\npath = \"mw\"\nexclude = [\"**/cache/l10n/*.cdb\"]\n",
            env.store.display()
        ),
    )
    .unwrap();
    // No --store, no --component: scap.toml in the working directory says it all.
    let out = std::process::Command::new(SCAP)
        .arg("build-manifest")
        .current_dir(env.dir.path())
        .env_remove("SCAP_STORE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().last().unwrap(),
        base
    );
}

#[test]
fn odd_names_round_trip() {
    let env = Env::new();
    let mw = env.path("mw");
    sample_tree(&mw);
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9-latin1.txt");
    fs::write(mw.join(name), b"not utf-8 name\n").unwrap();
    write(&mw, "resources/Übersetzung.json", b"{}\n");
    write(&mw, "with space/and\ttab", b"x\n");
    let v = env.build(&[("mediawiki", &mw)], &[]);
    let ls = env.raw(&["ls", "-r", &v, "mediawiki"]);
    assert!(ls.status.success());
    let odd = b"caf\xe9-latin1.txt";
    assert!(
        ls.stdout.windows(odd.len()).any(|w| w == odd),
        "raw bytes are printed as they are"
    );
    let cat = env.raw(&["cat", &v, "mediawiki/with space/and\ttab"]);
    assert_eq!(cat.stdout, b"x\n");
}

#[test]
fn stat_cache_rehashes_only_what_changed() {
    let env = Env::new();
    let mw = env.path("mw");
    for i in 0..200 {
        write(
            &mw,
            &format!("includes/f{i:03}.php"),
            format!("<?php // {i}\n").as_bytes(),
        );
    }
    // A file changed less than a second before a build is never trusted
    // from the cache ("racily clean"); let these age first.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let first = env.build_json(&[("mediawiki", &mw)]);
    assert_eq!(first["hashed_files"], 200);
    let again = env.build_json(&[("mediawiki", &mw)]);
    assert_eq!(again["hashed_files"], 0, "nothing changed, nothing read");
    assert_eq!(again["version"], first["version"]);

    write(&mw, "includes/f007.php", b"<?php // backport\n");
    let third = env.build_json(&[("mediawiki", &mw)]);
    assert_eq!(third["hashed_files"], 1, "only the backported file is read");
    assert_ne!(third["version"], first["version"]);

    // The backported file was racily clean for that build (changed within
    // the filesystem's timestamp tick before it): let it age, and one more
    // build caches it.
    std::thread::sleep(std::time::Duration::from_millis(200));
    env.build_json(&[("mediawiki", &mw)]);

    // Same size, same mtime, new content: ctime still gives it away.
    let f = mw.join("includes/f008.php");
    let before = fs::metadata(&f).unwrap().modified().unwrap();
    fs::write(&f, b"<?php // 9\n").unwrap();
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(before)
        .unwrap();
    let fourth = env.build_json(&[("mediawiki", &mw)]);
    assert_eq!(fourth["hashed_files"], 1, "f008, by its ctime");
    assert_eq!(
        env.ok(&[
            "cat",
            fourth["version"].as_str().unwrap(),
            "mediawiki/includes/f008.php"
        ]),
        "<?php // 9\n"
    );
}

/// The cache is read front to back beside the walk, so its order must be
/// the walk's for every name: a directory whose name another name extends
/// (`a/` beside `a-c`, `a.php`, `a0`), bytes below and above `/`, non-ASCII.
#[test]
fn stat_cache_is_used_whole_whatever_the_names() {
    let env = Env::new();
    let mw = env.path("mw");
    let names = [
        "a/b.php",
        "a/b/c.php",
        "a-c.php",
        "a.php",
        "a0",
        "a!",
        "A/z",
        "foo/x.php",
        "foo.php",
        "foo bar/baz",
        "foo+/q",
        "\u{e9}t\u{e9}/x",
        "~tilde",
        "z",
    ];
    for (i, n) in names.iter().enumerate() {
        write(&mw, n, format!("<?php // {i}\n").as_bytes());
    }
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let first = env.build_json(&[("mediawiki", &mw)]);
    assert_eq!(first["hashed_files"], names.len());
    let again = env.build_json(&[("mediawiki", &mw)]);
    assert_eq!(again["hashed_files"], 0, "every entry found in walk order");
    // New files and a gone one, where a byte order that ranks `/` as itself
    // would pass over the entries of `a!`, `a-c.php` and `a.php` for good.
    write(&mw, "a/zz.php", b"<?php // new\n");
    write(&mw, "foo/y.php", b"<?php // new too\n");
    fs::remove_file(mw.join("a/b/c.php")).unwrap();
    let third = env.build_json(&[("mediawiki", &mw)]);
    assert_eq!(third["hashed_files"], 2, "only the new files are read");
    // Past the timestamp tick, one more build caches the new files.
    std::thread::sleep(std::time::Duration::from_millis(200));
    env.build_json(&[("mediawiki", &mw)]);
    write(&mw, "a-c.php", b"<?php // changed\n");
    let fourth = env.build_json(&[("mediawiki", &mw)]);
    assert_eq!(fourth["hashed_files"], 1, "only the changed file is read");
}

#[test]
fn stat_cache_never_claims_objects_gc_removed() {
    let env = Env::new();
    let (x, y) = (env.path("x"), env.path("y"));
    write(&x, "a.php", b"<?php // only in x\n");
    write(&y, "b.php", b"<?php // only in y\n");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let vx = env.build(&[("mediawiki", &x)], &[]);
    std::thread::sleep(std::time::Duration::from_millis(20));
    env.build(&[("mediawiki", &y)], &[]);
    // x's objects go; x's stat cache still lists them.
    env.ok(&["gc", "--keep", "1"]);
    let report = env.build_json(&[("mediawiki", &x)]);
    assert_eq!(report["version"], vx.as_str());
    assert_eq!(
        report["hashed_files"], 1,
        "the cached chunk is gone, so the file is read again"
    );
    let out = env.raw(&["verify", &vx]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn labels_and_records() {
    let env = Env::new();
    let mw = env.path("mw");
    sample_tree(&mw);
    let v1 = env.build(
        &[("mediawiki", &mw)],
        &["--label", "1.46.0-wmf.1", "-m", "train", "--author", "jdoe"],
    );
    assert_eq!(env.ok(&["resolve", "1.46.0-wmf.1"]).trim(), v1);
    assert_eq!(env.ok(&["resolve", &v1[..8]]).trim(), v1);
    let log = env.ok(&["log"]);
    assert!(
        log.contains(&format!("version {v1} (1.46.0-wmf.1)")),
        "{log}"
    );
    assert!(
        log.contains("Author: jdoe") && log.contains("train"),
        "{log}"
    );

    write(&mw, "index.php", b"<?php // changed\n");
    let (code, err) = env.fails(&[
        "build-manifest",
        "--component",
        &format!("mediawiki={}", mw.display()),
        "--label",
        "1.46.0-wmf.1",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("label \"1.46.0-wmf.1\" already names version"),
        "{err}"
    );
    assert_eq!(
        env.ok(&["resolve", "1.46.0-wmf.1"]).trim(),
        v1,
        "the label did not move"
    );
    let (_, err) = env.fails(&[
        "build-manifest",
        "--component",
        &format!("mediawiki={}", mw.display()),
        "--label",
        "deadbeef",
    ]);
    assert!(err.contains("bad label"), "{err}");
}

#[test]
fn bad_input_is_named() {
    let env = Env::new();
    let mw = env.path("mw");
    sample_tree(&mw);
    let (code, err) = env.fails(&["build-manifest", "--component", "mediawiki"]);
    assert_eq!(code, 1);
    assert!(err.contains("expected NAME=PATH"), "{err}");
    let (_, err) = env.fails(&[
        "build-manifest",
        "--component",
        "mediawiki=/nonexistent/staging",
    ]);
    assert!(err.contains("/nonexistent/staging"), "{err}");
    let (_, err) = env.fails(&[
        "build-manifest",
        "--component",
        "a=/x",
        "--component",
        "a=/y",
    ]);
    assert!(err.contains("named twice"), "{err}");
    let (_, err) = env.fails(&[
        "build-manifest",
        "--component",
        &format!("mediawiki={}", mw.display()),
        "--exclude",
        "a[b",
    ]);
    assert!(err.contains("a[b"), "{err}");

    // A fifo cannot be deployed: say which and what to do.
    let fifo = mw.join("includes/pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let (_, err) = env.fails(&[
        "build-manifest",
        "--component",
        &format!("mediawiki={}", mw.display()),
    ]);
    assert!(
        err.contains("includes/pipe") && err.contains("fifo") && err.contains("exclude"),
        "{err}"
    );
    fs::remove_file(&fifo).unwrap();

    // A store from the future is refused, not misread.
    env.build(&[("mediawiki", &mw)], &[]);
    fs::write(env.store.join("scap-store"), "scap store\nformat 9\n").unwrap();
    let (_, err) = env.fails(&["log"]);
    assert!(
        err.contains("format v9") && err.contains("upgrade scap"),
        "{err}"
    );

    let (code, err) = Env::new().fails(&["log"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a scap store"), "{err}");
}

#[test]
fn a_file_that_keeps_changing_is_never_recorded_wrong() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let env = Env::new();
    let mw = env.path("mw");
    let first = noise(4 << 20, 9);
    write(&mw, "cache/l10n/busy.cdb", &first);
    // Every content the file was given: (seed, length) of `noise`.
    let had = Arc::new(Mutex::new(vec![(9u64, 4usize << 20)]));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, had, path) = (stop.clone(), had.clone(), mw.join("cache/l10n/busy.cdb"));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let len = (4 << 20) + (i as usize % 7) * 1000;
                let content = noise(len, i);
                had.lock().unwrap().push((i, len));
                fs::write(&path, content).unwrap();
            }
        })
    };
    let out = env.raw(&[
        "build-manifest",
        "--component",
        &format!("mediawiki={}", mw.display()),
    ]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    if out.status.success() {
        // Whatever it recorded must be a content the file really had.
        let v = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .to_string();
        let verify = env.raw(&["verify", &v]);
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
        let content = env
            .raw(&["cat", &v, "mediawiki/cache/l10n/busy.cdb"])
            .stdout;
        // One content the file had at some instant: a whole version, or
        // the start of one while its write was in progress (`fs::write`
        // truncates, then writes; a writer paused in between leaves the
        // file that way, stat and all, for as long as it is paused). Never
        // a mix of two versions.
        let real = had.lock().unwrap().iter().any(|&(seed, len)| {
            let head = content.len().min(16);
            content.len() <= len
                && content[..head] == noise(head, seed)[..]
                && content == noise(content.len(), seed)
        });
        assert!(
            real,
            "recorded bytes ({} of them) are one real state of the file",
            content.len()
        );
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("busy.cdb") && err.contains("changed while being hashed"),
            "{err}"
        );
    }
}

#[test]
fn an_unreadable_file_is_named() {
    // Root reads everything: run scap as nobody, as a deploy user would be.
    require_root("run scap as another user");
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mw = env.path("mw");
    write(&mw, "index.php", b"<?php\n");
    write(&mw, "private/secret.php", b"<?php // root only\n");
    fs::set_permissions(
        mw.join("private/secret.php"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let store = env.path("nobody-store");
    fs::create_dir(&store).unwrap();
    assert!(
        std::process::Command::new("chown")
            .args(["65534:65534"])
            .arg(&store)
            .status()
            .unwrap()
            .success()
    );
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            SCAP,
            "--store",
        ])
        .arg(&store)
        .args(["build-manifest", "--component"])
        .arg(format!("mediawiki={}", mw.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("private/secret.php")
            && err.contains("cannot read")
            && err.contains("exclude"),
        "{err}"
    );
    // Nothing was recorded, and the store is still valid.
    assert_eq!(fs::read_dir(store.join("versions")).unwrap().count(), 0);
}
