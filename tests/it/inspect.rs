//! ls, cat, resolve: reading versions back.

use std::fs;

use crate::support::*;

#[test]
fn ls_and_cat_round_trip_every_kind() {
    let env = Env::new();
    let mw = env.path("mw");
    sample_tree(&mw);
    let v = env.build(&[("mediawiki", &mw)], &[]);
    let ls = env.ok(&["ls", &v, "mediawiki"]);
    let expect = [
        "d            0  docroot/",
        "d            0  images/",
        "d          975  includes/",
        "f           50  index.php",
        "f       700000  large.bin",
        "d           25  maintenance/",
        "l            0  static-current -> /srv/mediawiki/php-1.46.0-wmf.1/resources",
        "l            0  w -> php-1.46.0-wmf.1",
        "d            0  wmf-config/",
    ];
    assert_eq!(ls.lines().collect::<Vec<_>>(), expect, "{ls}");
    let rec = env.ok(&["ls", "-r", &v, "mediawiki"]);
    assert!(rec.contains("l            0  docroot/w -> ../w"), "{rec}");
    assert!(rec.contains("l            0  wmf-config/PrivateSettings.php -> /etc/mediawiki/private/PrivateSettings.php"), "dangling: {rec}");
    assert!(
        rec.contains("x           25  maintenance/run.php"),
        "exec bit: {rec}"
    );
    assert!(
        rec.contains("d            0  images/empty/"),
        "empty dir: {rec}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["ls", "--json", &v, "mediawiki/w"])).unwrap();
    assert_eq!(json[0]["kind"], "symlink");
    assert_eq!(json[0]["target"], "php-1.46.0-wmf.1");

    assert_eq!(
        env.raw(&["cat", &v, "mediawiki/large.bin"]).stdout,
        fs::read(mw.join("large.bin")).unwrap()
    );
    assert_eq!(
        env.ok(&["cat", &v, "mediawiki/maintenance/run.php"]),
        "#!/usr/bin/env php\n<?php\n"
    );
    let (_, err) = env.fails(&["cat", &v, "mediawiki/w"]);
    assert!(
        err.contains("is a symlink to \"php-1.46.0-wmf.1\""),
        "{err}"
    );
    let (_, err) = env.fails(&["cat", &v, "mediawiki/includes"]);
    assert!(err.contains("is a directory"), "{err}");
    let (code, err) = env.fails(&["cat", &v, "mediawiki/nope.php"]);
    assert_eq!(code, 4);
    assert!(err.contains("no \"mediawiki/nope.php\""), "{err}");
}

#[test]
fn version_names_resolve_or_say_why_not() {
    let env = Env::new();
    let mw = env.path("mw");
    sample_tree(&mw);
    let v = env.build(&[("mediawiki", &mw)], &[]);
    assert_eq!(env.ok(&["resolve", &v[..8]]).trim(), v);
    assert_eq!(env.ok(&["resolve", &v[..8].to_uppercase()]).trim(), v);
    let (code, err) = env.fails(&["resolve", "0000000000"]);
    assert_eq!(code, 4);
    assert!(
        err.contains("no version or label \"0000000000\"") && err.contains("scap log"),
        "{err}"
    );
    let (code, err) = env.fails(&["resolve", &v[..5]]);
    assert_eq!(code, 4);
    assert!(err.contains("at least 8 hex digits"), "{err}");
    let (code, err) = env.fails(&["ls", "not/a/label"]);
    assert_eq!(code, 4);
    assert!(err.contains("not/a/label"), "{err}");
    let (code, err) = env.fails(&["resolve", "1.46.0-wmf.9"]);
    assert_eq!(code, 4);
    assert!(err.contains("1.46.0-wmf.9"), "{err}");

    // Two versions sharing a prefix: a crafted record makes it happen.
    let twin = format!("{}{}", &v[..10], "f".repeat(54));
    let record = fs::read_to_string(env.store.join(format!("versions/{v}.json")))
        .unwrap()
        .replace(&v, &twin);
    fs::write(env.store.join(format!("versions/{twin}.json")), record).unwrap();
    let (code, err) = env.fails(&["resolve", &v[..10]]);
    assert_eq!(code, 4);
    assert!(
        err.contains("names 2 versions") && err.contains("type more digits"),
        "{err}"
    );
    assert_eq!(env.ok(&["resolve", &v[..11]]).trim(), v);
}

#[test]
fn broken_pipe_is_not_an_error() {
    let env = Env::new();
    let mw = env.path("mw");
    for i in 0..3000 {
        write(&mw, &format!("d{}/f{i}.php", i % 10), b"<?php\n");
    }
    let v = env.build(&[("mediawiki", &mw)], &[]);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{SCAP}' --store '{}' ls -r {v} | head -n 1; echo \"status=${{PIPESTATUS[0]:-$?}}\"",
            env.store.display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
