//! `scap diff` against a brute-force comparison of the two directories.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::support::*;

/// What git-style --name-status must say, as sorted "X\tpath" lines.
fn expected(
    a: &BTreeMap<Vec<u8>, Node>,
    b: &BTreeMap<Vec<u8>, Node>,
    prefix: &str,
) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    let line = |s: char, p: &[u8]| {
        let mut l = format!("{s}\t{prefix}").into_bytes();
        l.extend_from_slice(p);
        l
    };
    for (p, na) in a {
        match (na, b.get(p)) {
            (Node::Dir, _) => {}
            (_, None) | (_, Some(Node::Dir)) => lines.push(line('D', p)),
            (Node::Link(_), Some(Node::File { .. })) | (Node::File { .. }, Some(Node::Link(_))) => {
                lines.push(line('T', p))
            }
            (x, Some(y)) if x != y => lines.push(line('M', p)),
            _ => {}
        }
    }
    for (p, nb) in b {
        match (nb, a.get(p)) {
            (Node::Dir, _) => {}
            (_, None) | (_, Some(Node::Dir)) => lines.push(line('A', p)),
            _ => {}
        }
    }
    lines.sort();
    lines
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn files_in(root: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = snapshot(root)
        .into_iter()
        .filter(|(_, n)| !matches!(n, Node::Dir))
        .map(|(p, _)| root.join(std::ffi::OsStr::from_bytes(&p)))
        .collect();
    v.sort();
    v
}

/// One random edit of the kinds deploys make (and a few they rarely do).
fn mutate(root: &Path, rng: &mut Rng) {
    let files = files_in(root);
    let pick = files[rng.below(files.len())].clone();
    match rng.below(9) {
        0 => fs::write(&pick, format!("changed {}\n", rng.next())).unwrap_or(()),
        1 => fs::remove_file(&pick).unwrap(),
        2 => write(
            root,
            &format!("new/dir{}/f{}.php", rng.below(3), rng.next() % 1000),
            b"<?php\n",
        ),
        3 => {
            if fs::symlink_metadata(&pick).unwrap().is_file() {
                let mode = fs::metadata(&pick).unwrap().permissions().mode() ^ 0o111;
                fs::set_permissions(&pick, fs::Permissions::from_mode(mode)).unwrap();
            }
        }
        4 => {
            fs::remove_file(&pick).unwrap();
            std::os::unix::fs::symlink("target-of-a-new-link", &pick).unwrap();
        }
        5 => {
            let dir = pick.parent().unwrap();
            if dir != root {
                fs::remove_dir_all(dir).unwrap();
                fs::write(dir, b"a file where a directory was\n").unwrap();
            }
        }
        6 => {
            fs::remove_file(&pick).unwrap();
            write(
                root,
                &format!("{}/inner.txt", pick.strip_prefix(root).unwrap().display()),
                b"dir where a file was\n",
            );
        }
        7 => {
            let mut data = noise(300_000, rng.next());
            data[rng.below(300_000)] ^= 1;
            fs::write(&pick, data).unwrap_or(());
        }
        _ => fs::create_dir_all(root.join(format!("empty{}", rng.below(5)))).unwrap(),
    }
}

fn diff_lines(env: &Env, a: &str, b: &str) -> Vec<Vec<u8>> {
    let out = env.raw(&["diff", a, b]);
    assert!(out.status.success());
    let mut lines: Vec<Vec<u8>> = out
        .stdout
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    lines.sort();
    lines
}

#[test]
fn diff_matches_brute_force() {
    for seed in 1..=6u64 {
        let env = Env::new();
        let a = env.path("a");
        sample_tree(&a);
        for i in 0..60 {
            write(
                &a,
                &format!("extensions/Ext{}/includes/F{i}.php", i % 7),
                format!("<?php // {i}\n").as_bytes(),
            );
        }
        let va = env.build(&[("mediawiki", &a)], &[]);
        let before = snapshot(&a);
        let mut rng = Rng(seed * 0x2545_f491_4f6c_dd1d);
        for _ in 0..(1 + seed as usize * 3) {
            mutate(&a, &mut rng);
        }
        let vb = env.build(&[("mediawiki", &a)], &[]);
        let after = snapshot(&a);
        let want = expected(&before, &after, "mediawiki/");
        assert_eq!(diff_lines(&env, &va, &vb), want, "seed {seed}");
        // And backwards.
        let back = expected(&after, &before, "mediawiki/");
        assert_eq!(diff_lines(&env, &vb, &va), back, "seed {seed}, reversed");
        assert!(diff_lines(&env, &va, &va).is_empty());
    }
}

#[test]
fn diff_stat_counts_what_a_host_fetches() {
    let env = Env::new();
    let a = env.path("staging");
    write(&a, "php-1/big.cdb", &noise(2 << 20, 1));
    for i in 0..20 {
        write(
            &a,
            &format!("php-1/includes/F{i}.php"),
            format!("<?php // {i}\n").as_bytes(),
        );
    }
    let v1 = env.build(&[("mediawiki", &a)], &[]);
    // A "train": a copy of the branch with one file changed. The copy's
    // content is already on every host: only the change is fetched.
    copy_tree(&a.join("php-1"), &a.join("php-2"));
    write(&a, "php-2/includes/F3.php", b"<?php // the one change\n");
    let v2 = env.build(&[("mediawiki", &a)], &[]);
    let stat: serde_json::Value =
        serde_json::from_str(&env.ok(&["diff", "--stat", "--json", &v1, &v2])).unwrap();
    assert_eq!(stat["stat"]["added"], 21);
    assert_eq!(stat["stat"]["fetch_chunks"], 1);
    assert_eq!(
        stat["stat"]["fetch_bytes"],
        "<?php // the one change\n".len()
    );
    let text = env.ok(&["diff", "--stat", &v1, &v2]);
    assert!(text.contains("21 files changed: 21 added"), "{text}");

    // An l10n-style edit in the middle of a large file re-sends a few chunks.
    let mut big = noise(2 << 20, 1);
    big[1_000_000..1_000_100].fill(b'x');
    write(&a, "php-2/big.cdb", &big);
    let v3 = env.build(&[("mediawiki", &a)], &[]);
    let stat: serde_json::Value =
        serde_json::from_str(&env.ok(&["diff", "--stat", "--json", &v2, &v3])).unwrap();
    assert_eq!(stat["stat"]["modified"], 1);
    let fetched = stat["stat"]["fetch_bytes"].as_u64().unwrap();
    assert!(
        fetched > 0 && fetched <= 2 * 256 * 1024,
        "fetches {fetched} of 2 MiB"
    );
    // --exit-code says whether they differ.
    assert_eq!(
        env.raw(&["diff", "--exit-code", &v2, &v3]).status.code(),
        Some(1)
    );
    assert_eq!(
        env.raw(&["diff", "--exit-code", &v3, &v3]).status.code(),
        Some(0)
    );
}
