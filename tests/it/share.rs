//! One copy on disk: release slots share unchanged files as hardlinks, and
//! a hand edit of the live tree (which, through a shared inode, shows in
//! other slots too) never reaches what a deploy writes or a rollback
//! restores.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::support::*;

/// Release slots of the agent in `dir`: name -> (version, clean).
fn slots(dir: &Path) -> BTreeMap<String, (Option<String>, bool)> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir.join("releases")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let m: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
            out.insert(
                p.file_stem().unwrap().to_string_lossy().into_owned(),
                (
                    m["version"].as_str().map(str::to_string),
                    m["clean"].as_bool().unwrap(),
                ),
            );
        }
    }
    out
}

fn live_slot(dir: &Path) -> String {
    fs::read_link(dir.join("current"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Waits until a clean slot other than the live one holds the live version
/// (the agent's background work after a switch).
fn wait_for_spare(dir: &Path, version: &str) {
    wait_for(60, "the spare slot to reach the live version", || {
        let live = live_slot(dir);
        slots(dir)
            .iter()
            .any(|(n, (v, clean))| *n != live && *clean && v.as_deref() == Some(version))
    });
}

/// Bytes of the regular files below `roots`, each inode counted once
/// (what `du` counts), and how many files have more than one link.
fn unique_bytes(roots: &[PathBuf]) -> (u64, u64) {
    fn go(p: &Path, seen: &mut HashSet<(u64, u64)>, bytes: &mut u64, shared: &mut u64) {
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                go(&e.path(), seen, bytes, shared);
            } else if m.is_file() {
                if m.nlink() > 1 {
                    *shared += 1;
                }
                if seen.insert((m.dev(), m.ino())) {
                    *bytes += m.len();
                }
            }
        }
    }
    let (mut seen, mut bytes, mut shared) = (HashSet::new(), 0, 0);
    for root in roots {
        go(root, &mut seen, &mut bytes, &mut shared);
    }
    (bytes, shared)
}

/// The release slots of the agent in `dir` (their records left out).
fn slot_dirs(dir: &Path) -> Vec<PathBuf> {
    slots(dir)
        .keys()
        .map(|s| dir.join("releases").join(s))
        .filter(|p| p.is_dir())
        .collect()
}

/// A tree of 60 files of 4 KiB, one per version-specific line.
fn tree(root: &Path, tag: &str) {
    let _ = fs::remove_dir_all(root);
    sample_tree(root);
    for i in 0..60 {
        let mut data = noise(4096, i);
        data.extend_from_slice(format!("\n// {tag}\n").as_bytes());
        write(
            root,
            &format!("includes/libs/f{i:02}.php"),
            if i < 3 { &data } else { &data[..4096] },
        );
    }
}

/// Writes `content` into the existing file at `path`, in place (the inode
/// stays: what vim does to a file with several links, and `>`).
fn edit_in_place(path: &Path, content: &[u8]) {
    let ino = fs::metadata(path).unwrap().ino();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(content).unwrap();
    drop(f);
    assert_eq!(fs::metadata(path).unwrap().ino(), ino, "edited in place");
}

struct Versions {
    staging: PathBuf,
    /// A copy of the staging tree of each version.
    trees: BTreeMap<String, PathBuf>,
}

impl Versions {
    fn new(fleet: &Fleet) -> Versions {
        Versions {
            staging: fleet.env.path("staging"),
            trees: BTreeMap::new(),
        }
    }

    fn build(&mut self, fleet: &Fleet, tag: &str) -> String {
        self.build_with(fleet, tag, |_| {})
    }

    /// [`Versions::build`], with `extra` adding to the tree.
    fn build_with(&mut self, fleet: &Fleet, tag: &str, extra: impl Fn(&Path)) -> String {
        tree(&self.staging, tag);
        extra(&self.staging);
        let v = fleet.env.build(&[("mediawiki", &self.staging)], &[]);
        let copy = fleet.env.path(&format!("copy-{tag}"));
        copy_tree(&self.staging, &copy);
        self.trees.insert(v.clone(), copy);
        v
    }

    /// Every clean slot of host `dir` but `except` holds exactly its
    /// version.
    fn check_slots(&self, dir: &Path, except: &[&str], when: &str) {
        for (name, (v, clean)) in slots(dir) {
            let (Some(v), true) = (v, clean) else {
                continue;
            };
            if except.contains(&name.as_str()) {
                continue;
            }
            same(
                &dir.join("releases").join(&name).join("mediawiki"),
                &self.trees[&v],
                &format!("{when}: slot {name} holds version {v}"),
            );
        }
    }
}

/// Fails naming the paths where trees `a` and `b` differ.
fn same(a: &Path, b: &Path, what: &str) {
    let (a, b) = (snapshot(a), snapshot(b));
    let differ: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert!(differ.is_empty(), "{what}: differs at {differ:?}");
}

#[test]
fn slots_share_files_and_a_hand_edit_reaches_no_deploy_or_rollback() {
    let mut fleet = Fleet::start(1);
    let mut vs = Versions::new(&fleet);
    let dir = fleet.hosts[0].dir.clone();
    let v1 = vs.build(&fleet, "v1");
    let v2 = vs.build(&fleet, "v2");
    let v3 = vs.build(&fleet, "v3");
    fleet.serve();

    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["how"], "full");
    wait_for_spare(&dir, &v1);
    // The spare slot is the live one, linked: one copy on disk.
    let (tree_bytes, _) = unique_bytes(&[vs.trees[&v1].clone()]);
    let (bytes, shared) = unique_bytes(&slot_dirs(&dir));
    assert!(shared > 60, "files are shared between slots: {shared}");
    assert_eq!(bytes, tree_bytes, "two slots of v1 take one tree's bytes");

    // A backport (three files change) writes only those files.
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["how"], "diff", "{r}");
    assert_eq!(r["files_written"], 3, "{r}");
    assert_eq!(r["repaired"], 0, "{r}");
    wait_for_spare(&dir, &v2);
    let (bytes, _) = unique_bytes(&slot_dirs(&dir));
    assert!(
        bytes < tree_bytes + 4 * 4200,
        "three slots after a backport hold the tree once plus the changed files: {bytes} for a {tree_bytes}-byte tree"
    );
    vs.check_slots(&dir, &[], "after the backport");

    // A hand edit of a live file that v1, v2 and v3 share: through the
    // shared inode it shows in the previous and spare slots too.
    let live = fleet.live(0, "mediawiki");
    let hacked = live.join("includes/libs/f30.php");
    let true_content = fs::read(&hacked).unwrap();
    assert!(fs::metadata(&hacked).unwrap().nlink() >= 2);
    edit_in_place(&hacked, b"<?php die('live hack');\n");
    let previous = live_slot(&dir);
    let elsewhere: Vec<String> = slots(&dir)
        .keys()
        .filter(|s| **s != previous)
        .filter(|s| {
            fs::read(
                dir.join("releases")
                    .join(s)
                    .join("mediawiki/includes/libs/f30.php"),
            )
            .ok()
                == Some(b"<?php die('live hack');\n".to_vec())
        })
        .cloned()
        .collect();
    assert!(
        !elsewhere.is_empty(),
        "the edit shows in another slot through the shared inode"
    );
    // Drift reports it.
    let out = fleet
        .env
        .raw(&["verify", "--live", "--dir", dir.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("M\tmediawiki/includes/libs/f30.php\t(content differs)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The next deploy goes to the spare slot, which shares the edited
    // inode: the new release has the true content.
    let (code, r) = fleet.sync_to(0, &v3);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["repaired"], 1, "the check found the edited file: {r}");
    assert_eq!(
        fs::read(live.join("includes/libs/f30.php")).unwrap(),
        true_content
    );
    same(&live, &vs.trees[&v3], "v3 is live, true");
    // The slot that was live keeps the hack (drift's to report) ...
    assert_eq!(
        fs::read(
            dir.join("releases")
                .join(&previous)
                .join("mediawiki/includes/libs/f30.php")
        )
        .unwrap(),
        b"<?php die('live hack');\n"
    );
    // ... and a rollback to it restores the true content.
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous", "by": "test"}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["how"], "reused", "{r}");
    assert_eq!(r["repaired"], 1, "the check found the edited file: {r}");
    assert_eq!(fleet.current(0).as_deref(), Some(v2.as_str()));
    same(&live, &vs.trees[&v2], "rolled back to true v2");
    let out = fleet
        .env
        .raw(&["verify", "--live", "--dir", dir.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A mode changed by hand on a shared inode is the same case; and the
    // agent never changes a shared inode itself (a version whose only
    // change is an exec bit gets a new file).
    let edited = live_slot(&dir);
    let run = live.join("maintenance/run.php");
    fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": v3, "by": "test"}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["repaired"], 1, "the mode changed by hand: {r}");
    same(&live, &vs.trees[&v3], "rolled forward to true v3");
    wait_for_spare(&dir, &v3);
    // Every slot but the one edited while live holds its true version.
    vs.check_slots(&dir, &[&edited], "after the rollbacks");
}

#[test]
fn without_hardlinks_slots_get_copies_and_it_is_said_once() {
    // EPERM: a filesystem without hardlinks (the agent stops trying);
    // EMLINK: every inode at the filesystem's link limit (tried per file).
    for (errno, why) in [(1, "Operation not permitted"), (31, "Too many links")] {
        let mut fleet = Fleet::start(1);
        let mut vs = Versions::new(&fleet);
        let dir = fleet.hosts[0].dir.clone();
        let v1 = vs.build(&fleet, "v1");
        let v2 = vs.build(&fleet, "v2");
        fleet.serve();
        let log = fleet.env.path("agent.log");
        let failpoint = format!("agent:link:errno={errno}");
        fleet.restart_logged(0, &[("SCAP_FAILPOINT", &failpoint)], &log);
        for v in [&v1, &v2] {
            let (code, r) = fleet.sync_to(0, v);
            assert_eq!(code, 200, "errno {errno}: {r}");
            wait_for_spare(&dir, v);
        }
        vs.check_slots(&dir, &[], &format!("copies (errno {errno})"));
        let (_, shared) = unique_bytes(&slot_dirs(&dir));
        assert_eq!(shared, 0, "errno {errno}: no file is shared");
        let text = fs::read_to_string(&log).unwrap();
        assert_eq!(
            text.matches("cannot hardlink").count(),
            1,
            "errno {errno}: said once: {text}"
        );
        assert!(
            text.contains("writing a copy instead") && text.contains(why),
            "errno {errno}: {text}"
        );
    }
}

/// Waits until host 0's agent has no work running (the work after a
/// switch: the spare slot, the watch on the slots, gc, drift).
fn settle(fleet: &Fleet) {
    wait_for(60, "the agent's background work to end", || {
        fleet.get(0, "/v1/state").1["busy"] == false
    });
}

/// Files of a release of [`tree`] (what a check of every file stats).
fn files_in(root: &Path) -> u64 {
    snapshot(root)
        .values()
        .filter(|n| matches!(n, Node::File { .. }))
        .count() as u64
}

#[test]
fn watched_slots_are_checked_only_where_they_changed() {
    let mut fleet = Fleet::start(1);
    let mut vs = Versions::new(&fleet);
    let dir = fleet.hosts[0].dir.clone();
    let v1 = vs.build(&fleet, "v1");
    let v2 = vs.build(&fleet, "v2");
    let v3 = vs.build(&fleet, "v3");
    let v4 = vs.build(&fleet, "v4");
    fleet.serve();
    let all = files_in(&vs.trees[&v1]);
    assert!(all > 60, "{all}");

    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    settle(&fleet);
    // Nothing changed in the watched spare: nothing to stat.
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        (&r["how"], &r["files_checked"]),
        (&json!("diff"), &json!(0)),
        "{r}"
    );
    settle(&fleet);

    // Edits in place through the live tree, to inodes every slot shares:
    // reported by the watch, and only those are checked.
    let live = fleet.live(0, "mediawiki");
    edit_in_place(&live.join("includes/libs/f30.php"), b"<?php die('hack');\n");
    fs::set_permissions(
        live.join("includes/libs/f31.php"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let previous = live_slot(&dir);
    let (code, r) = fleet.sync_to(0, &v3);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["repaired"], 2, "{r}");
    assert_eq!(r["files_checked"], 2, "only the edited files: {r}");
    same(&live, &vs.trees[&v3], "v3 is live, true");
    settle(&fleet);
    // The slot that was live kept the edits (drift's to report); a
    // rollback to it finds them through the watch too.
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous", "by": "test"}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(live_slot(&dir), previous);
    assert_eq!(
        (&r["repaired"], &r["files_checked"]),
        (&json!(2), &json!(2)),
        "{r}"
    );
    same(&live, &vs.trees[&v2], "rolled back to true v2");
    settle(&fleet);

    // An edit while the agent is down is not seen by a watch: the agent
    // checks every file at start, and the next deploy rewrites it.
    fleet.hosts[0].proc.kill();
    edit_in_place(
        &live.join("includes/libs/f40.php"),
        b"<?php die('offline');\n",
    );
    fleet.restart(0);
    settle(&fleet);
    let (code, r) = fleet.sync_to(0, &v4);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["repaired"], 1, "{r}");
    assert!(r["files_checked"].as_u64().unwrap() < 5, "{r}");
    same(&live, &vs.trees[&v4], "v4 is live, true");
    settle(&fleet);
    vs.check_slots(&dir, &[&previous], "after the watched deploys");
}

#[test]
fn without_inotify_every_file_is_checked_and_it_is_said() {
    let mut fleet = Fleet::start(1);
    let mut vs = Versions::new(&fleet);
    let v1 = vs.build(&fleet, "v1");
    let v2 = vs.build(&fleet, "v2");
    fleet.serve();
    let log = fleet.env.path("agent.log");
    fleet.restart_logged(0, &[("SCAP_FAILPOINT", "agent:inotify:errno=24")], &log);
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    settle(&fleet);
    let live = fleet.live(0, "mediawiki");
    edit_in_place(&live.join("includes/libs/f30.php"), b"<?php die('hack');\n");
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["repaired"], 1, "{r}");
    assert_eq!(
        r["files_checked"],
        files_in(&vs.trees[&v1]),
        "every file: {r}"
    );
    same(&live, &vs.trees[&v2], "v2 is live, true");
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("inotify is not available") && text.contains("Too many open files"),
        "{text}"
    );
}

#[test]
fn a_directory_removed_by_hand_from_the_previous_slot_is_rewritten_on_rollback() {
    let mut fleet = Fleet::start(1);
    let mut vs = Versions::new(&fleet);
    let dir = fleet.hosts[0].dir.clone();
    let v1 = vs.build(&fleet, "v1");
    let v2 = vs.build(&fleet, "v2");
    fleet.serve();
    for v in [&v1, &v2] {
        let (code, r) = fleet.sync_to(0, v);
        assert_eq!(code, 200, "{r}");
        settle(&fleet);
    }
    let live = live_slot(&dir);
    let previous = slots(&dir)
        .into_iter()
        .find(|(n, (v, _))| *n != live && v.as_deref() == Some(v1.as_str()))
        .map(|(n, _)| n)
        .expect("a slot holds v1");
    // The watch loses that directory: the rollback's check is of every
    // file, finds the slot is not what its record says, and rewrites it.
    fs::remove_dir_all(
        dir.join("releases")
            .join(&previous)
            .join("mediawiki/includes/libs"),
    )
    .unwrap();
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous", "by": "test"}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(fleet.current(0).as_deref(), Some(v1.as_str()));
    same(
        &fleet.live(0, "mediawiki"),
        &vs.trees[&v1],
        "rolled back to a whole v1",
    );
    settle(&fleet);
    let (_, st) = fleet.get(0, "/v1/state");
    assert_eq!(
        st["drift"]["version"],
        v1.as_str(),
        "the work after the switch ran: {st}"
    );
    assert_eq!(st["drift"]["changed"], 0, "{st}");
}

/// Bytes of the agent's pack files and whether any is flagged raw (its
/// objects stored uncompressed as they arrived, for gc to compress).
fn packs(dir: &Path) -> (u64, bool) {
    let packs = host_packs(dir);
    (
        packs.iter().map(|p| p.len() as u64).sum(),
        packs.iter().any(|p| pack_flagged_raw(p)),
    )
}

/// A fresh host stores what it fetches uncompressed (no zstd on the
/// deploy's path) and compresses it in its work after the switch: the
/// store ends compressed, and every slot and a rollback still read true
/// content from it.
#[test]
fn a_fresh_hosts_store_is_compressed_after_its_switch() {
    let mut fleet = Fleet::start(1);
    let dir = fleet.hosts[0].dir.clone();
    let staging = fleet.env.path("staging");
    sample_tree(&staging);
    // More objects than a small session keeps loose, and text that
    // compresses as PHP does.
    let mut text_bytes = 0;
    for i in 0..400 {
        let body = format!(
            "<?php\n// file {i}\n{}",
            "$wgConf['x'] = [ 'a' => 1 ];\n".repeat(40 + i % 13)
        );
        text_bytes += body.len() as u64;
        write(
            &staging,
            &format!("includes/gen/f{i:03}.php"),
            body.as_bytes(),
        );
    }
    let v1 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    let copy1 = fleet.env.path("copy-v1");
    copy_tree(&staging, &copy1);
    write(&staging, "includes/gen/f007.php", b"<?php\n// changed\n");
    let v2 = fleet.env.build(&[("mediawiki", &staging)], &[]);
    fleet.serve();

    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["how"], "full", "{r}");
    wait_for(60, "the agent to compress its store", || {
        let (bytes, raw) = packs(&dir);
        bytes > 0 && !raw
    });
    // Stored raw, the packs would hold at least the tree's bytes.
    let (bytes, _) = packs(&dir);
    let (tree_bytes, _) = unique_bytes(std::slice::from_ref(&copy1));
    assert!(
        bytes + text_bytes / 2 < tree_bytes,
        "the store's packs ({bytes} bytes) are compressed: the tree has {tree_bytes} bytes, {text_bytes} of them text"
    );
    wait_for_spare(&dir, &v1);
    same(
        &dir.join("current/mediawiki"),
        &copy1,
        "the live slot after the fresh sync",
    );

    // Every object of the version reads back from the compressed packs.
    verify_store(&dir.join("store"), &v1);

    // A backport (a small session: its objects are compressed as it
    // commits), then back.
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["how"], "diff", "{r}");
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous", "by": "test"}));
    assert_eq!(code, 200, "{r}");
    same(
        &dir.join("current/mediawiki"),
        &copy1,
        "the live slot after the rollback",
    );
}

/// One agent with `n` versions built (tags v1, v2, ...) and served, and
/// restarted with `env` added, its log in the returned file.
fn logged_host(n: usize, env: &[(&str, &str)]) -> (Fleet, Versions, PathBuf, Vec<String>, PathBuf) {
    let mut fleet = Fleet::start(1);
    let mut vs = Versions::new(&fleet);
    let dir = fleet.hosts[0].dir.clone();
    let versions = (1..=n)
        .map(|i| vs.build(&fleet, &format!("v{i}")))
        .collect();
    fleet.serve();
    let log = fleet.env.path("agent.log");
    fleet.restart_logged(0, env, &log);
    (fleet, vs, dir, versions, log)
}

/// How many times the agent log `log` says it watched a slot by a full
/// check, and how many times from a diff and what its watch saw.
fn watch_counts(log: &Path) -> (usize, usize) {
    let text = fs::read_to_string(log).unwrap();
    (
        text.matches(" watched in ").count(),
        text.matches(" watched again in ").count(),
    )
}

#[test]
fn after_a_switch_the_changed_slots_are_watched_from_their_diffs() {
    // Each switch pauses 2 s before the work after it: the new live slot
    // is then muted (changed by the agent, not watched).
    let (fleet, vs, dir, v, log) = logged_host(
        4,
        &[
            ("SCAP_LOG", "scap=debug"),
            ("SCAP_FAILPOINT", "agent:switched:pause=2000"),
        ],
    );
    let [v1, v2, v3, v4] = [0, 1, 2, 3].map(|i| v[i].clone());
    // Two deploys: every slot exists (the first write of each is whole,
    // and so is its first watch).
    for v in [&v1, &v2] {
        assert_eq!(fleet.sync_to(0, v).0, 200);
        settle(&fleet);
    }
    let (full, _) = watch_counts(&log);
    assert_eq!(full, 3, "each slot, written whole, watched by a full check");

    // A hand edit in place of a file the diff wrote (one link: the live
    // slot's own), made while the slot is muted right after the switch.
    let before = live_slot(&dir);
    std::thread::scope(|s| {
        let sync = s.spawn(|| fleet.sync_to(0, &v3));
        wait_for(30, "the switch to v3", || live_slot(&dir) != before);
        let f = fleet.live(0, "mediawiki").join("includes/libs/f00.php");
        assert_eq!(fs::metadata(&f).unwrap().nlink(), 1, "written by the diff");
        edit_in_place(&f, b"<?php die('edited while muted');\n");
        assert_eq!(sync.join().unwrap().0, 200);
    });
    let v3_slot = live_slot(&dir);
    settle(&fleet);
    let (full2, again) = watch_counts(&log);
    assert_eq!(
        full2,
        full,
        "no full check after the backport: {}",
        fs::read_to_string(&log).unwrap()
    );
    assert!(
        again >= 2,
        "the live and spare slots watched from their diffs"
    );

    // The next deploy checks only what changed in the spare.
    let (code, r) = fleet.sync_to(0, &v4);
    assert_eq!(code, 200, "{r}");
    assert!(r["files_checked"].as_u64().unwrap() < 5, "{r}");
    same(
        &fleet.live(0, "mediawiki"),
        &vs.trees[&v4],
        "v4 is live, true",
    );
    settle(&fleet);
    // The edit made while muted was seen: a rollback to that slot finds
    // it through the watch, not by a full check, and rewrites it.
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": "previous", "by": "test"}));
    assert_eq!(code, 200, "{r}");
    assert_eq!(live_slot(&dir), v3_slot);
    assert_eq!(r["repaired"], 1, "{r}");
    assert!(r["files_checked"].as_u64().unwrap() < 5, "{r}");
    same(
        &fleet.live(0, "mediawiki"),
        &vs.trees[&v3],
        "rolled back to true v3",
    );
    assert_eq!(watch_counts(&log).0, full, "still no full check");
}

/// A deploy that removes a directory (an old php-* branch) moves it out
/// of the slot into the agent's trash at once: the slots stay watched from
/// their diffs (no full check), the trash is emptied after the switch, and
/// a deploy arriving while it is emptied stops that instead of waiting.
#[test]
fn a_removed_branch_goes_by_the_trash_and_a_deploy_does_not_wait_to_empty_it() {
    let mut fleet = Fleet::start(1);
    let mut vs = Versions::new(&fleet);
    let dir = fleet.hosts[0].dir.clone();
    let branch = |root: &Path| {
        for d in 0..20 {
            for f in 0..50 {
                write(root, &format!("php-old/d{d:02}/f{f:02}.php"), b"<?php\n");
            }
        }
    };
    let v1 = vs.build_with(&fleet, "v1", branch);
    let v2 = vs.build_with(&fleet, "v2", branch);
    let v3 = vs.build(&fleet, "v3");
    let v4 = vs.build(&fleet, "v4");
    fleet.serve();
    let log = fleet.env.path("agent.log");
    // Emptying the trash pauses 20 s (unless stopped).
    fleet.restart_logged(
        0,
        &[
            ("SCAP_LOG", "scap=debug"),
            ("SCAP_FAILPOINT", "agent:trash:pause=20000"),
        ],
        &log,
    );
    for v in [&v1, &v2] {
        assert_eq!(fleet.sync_to(0, v).0, 200);
        settle(&fleet);
    }
    let (full, _) = watch_counts(&log);
    let trash = dir.join("trash");
    assert_eq!(fs::read_dir(&trash).unwrap().count(), 0);

    // v3 removes the branch: from the slot it is written into, then from
    // the spare brought to it; then the trash is emptied (paused).
    let (code, r) = fleet.sync_to(0, &v3);
    assert_eq!(code, 200, "{r}");
    wait_for(30, "the trash to be emptied after the switch", || {
        fs::read_to_string(&log)
            .unwrap()
            .contains("emptying the trash")
    });
    assert!(
        fs::read_dir(&trash).unwrap().count() >= 1,
        "the removed branch is in the trash"
    );
    // The tail of the work after the switch (paused in it now) runs on a
    // thread of its own at the lowest CPU priority short of idle: never in
    // PHP's way.
    assert_eq!(background_nices(&fleet), [19]);
    same(
        &fleet.live(0, "mediawiki"),
        &vs.trees[&v3],
        "v3 is live, true",
    );
    // A deploy now stops the emptying rather than wait 20 s for it.
    let started = std::time::Instant::now();
    let (code, r) = fleet.sync_to(0, &v4);
    assert_eq!(code, 200, "{r}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "the deploy waited for the trash: {:?}",
        started.elapsed()
    );
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("stopped: cancelled: a deploy arrived"),
        "{text}"
    );
    same(
        &fleet.live(0, "mediawiki"),
        &vs.trees[&v4],
        "v4 is live, true",
    );
    // Then the trash is emptied after all, and no slot was checked in
    // full for the directories that went.
    wait_for(60, "the trash to be empty", || {
        fs::read_dir(&trash).unwrap().count() == 0
    });
    settle(&fleet);
    assert_eq!(
        watch_counts(&log).0,
        full,
        "no full check: {}",
        fs::read_to_string(&log).unwrap()
    );
    vs.check_slots(&dir, &[], "after the trash is emptied");
    assert!(
        !fleet.live(0, "mediawiki").join("php-old").exists(),
        "the branch is gone"
    );
}

#[test]
fn an_inotify_queue_overflow_falls_back_to_a_full_check_and_says_so() {
    // A queue of one event: any burst of writes overflows it.
    let (fleet, vs, dir, v, log) = logged_host(
        3,
        &[
            ("SCAP_LOG", "scap=debug"),
            ("SCAP_FAILPOINT", "agent:inotify-queue:value=1"),
        ],
    );
    let [v1, v2, v3] = [0, 1, 2].map(|i| v[i].clone());
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    settle(&fleet);
    let (full, _) = watch_counts(&log);
    // A burst of edits in place through the live slot (inodes every slot
    // shares): far more events than the queue holds. The agent is stopped
    // meanwhile, as a busy host's would be descheduled: its watch thread
    // would otherwise read the events as they come, one at a time.
    let live = fleet.live(0, "mediawiki");
    fleet.hosts[0].proc.signal("STOP");
    for i in 10..50 {
        edit_in_place(
            &live.join(format!("includes/libs/f{i:02}.php")),
            b"<?php die('hack');\n",
        );
    }
    fleet.hosts[0].proc.signal("CONT");
    let (code, r) = fleet.sync_to(0, &v2);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["repaired"], 40, "{r}");
    assert_eq!(
        r["files_checked"],
        files_in(&vs.trees[&v1]),
        "every file of the spare: {r}"
    );
    same(&live, &vs.trees[&v2], "v2 is live, true");
    settle(&fleet);
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("inotify queue overflowed"), "{text}");
    assert!(
        watch_counts(&log).0 > full,
        "the slots were watched again in full"
    );
    let (code, r) = fleet.sync_to(0, &v3);
    assert_eq!(code, 200, "{r}");
    same(&live, &vs.trees[&v3], "v3 is live, true");
    settle(&fleet);
    vs.check_slots(&dir, &[&live_slot(&dir)], "after the overflow");
}

#[test]
fn a_crash_right_after_a_switch_and_an_edit_while_down_mean_a_full_check_at_start() {
    let mut fleet = Fleet::start(1);
    let mut vs = Versions::new(&fleet);
    let dir = fleet.hosts[0].dir.clone();
    let v1 = vs.build(&fleet, "v1");
    let v2 = vs.build(&fleet, "v2");
    let v3 = vs.build(&fleet, "v3");
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    settle(&fleet);
    assert_eq!(fleet.sync_to(0, &v2).0, 200);
    settle(&fleet);
    // Killed between the switch to v3 and anything it keeps in memory of
    // what the deploy changed.
    fleet.restart_with(0, &[("SCAP_FAILPOINT", "agent:switched")]);
    let r = fleet
        .request("POST", 0, "/v1/sync")
        .json(&fleet.sync_body(&v3, &[&fleet.source()]))
        .send();
    assert!(r.is_err() || !r.unwrap().status().is_success());
    let _ = fleet.hosts[0].proc.child.wait();
    // While it is down, the slot a rollback goes to is edited by hand.
    let previous = slots(&dir)
        .into_iter()
        .find(|(n, (v, c))| *c && v.as_deref() == Some(v2.as_str()) && *n != live_slot(&dir))
        .map(|(n, _)| n)
        .expect("a slot holds v2");
    // A file v3 changed: the slot's own inode, not the live one's.
    edit_in_place(
        &dir.join("releases")
            .join(&previous)
            .join("mediawiki/includes/libs/f01.php"),
        b"<?php die('offline');\n",
    );
    let log = fleet.env.path("agent.log");
    fleet.restart_logged(0, &[("SCAP_LOG", "scap=debug")], &log);
    settle(&fleet);
    let (full, again) = watch_counts(&log);
    assert!(
        full >= 2 && again == 0,
        "every slot checked in full at start: {full} {again}"
    );
    assert_eq!(fleet.current(0).as_deref(), Some(v3.as_str()));
    same(
        &fleet.live(0, "mediawiki"),
        &vs.trees[&v3],
        "v3 is live, true",
    );
    let (code, r) = fleet.post(0, "/v1/rollback", json!({"to": v2, "by": "test"}));
    assert_eq!(code, 200, "{r}");
    assert!(r["repaired"].as_u64().unwrap() >= 1, "{r}");
    same(
        &fleet.live(0, "mediawiki"),
        &vs.trees[&v2],
        "rolled back to true v2",
    );
}

/// The niceness of each of host 0's agent's background threads (named
/// `scap-background`), from `/proc`.
fn background_nices(fleet: &Fleet) -> Vec<i32> {
    let pid = fleet.hosts[0].proc.child.id();
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().path())
        .filter(|t| fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == "scap-background"))
        .map(|t| {
            let stat = fs::read_to_string(t.join("stat")).unwrap();
            // After the name's closing parenthesis: nice is the line's 19th
            // field, the 17th of these.
            stat[stat.rfind(')').unwrap() + 2..]
                .split_whitespace()
                .nth(16)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

#[test]
fn a_deploy_arriving_during_maintenance_stops_it_instead_of_waiting() {
    let mut fleet = Fleet::start_with(1, &["--verify-every", "1s"]);
    let mut vs = Versions::new(&fleet);
    let v1 = vs.build(&fleet, "v1");
    fleet.serve();
    let log = fleet.env.path("agent.log");
    // Maintenance (1 s after start, then every second) pauses 60 s, unless
    // stopped.
    fleet.restart_logged(
        0,
        &[
            ("SCAP_LOG", "scap=info"),
            ("SCAP_FAILPOINT", "agent:maintain:pause=60000"),
        ],
        &log,
    );
    wait_for(30, "maintenance to start", || {
        fleet.get(0, "/v1/state").1["operation"]
            .as_str()
            .is_some_and(|o| o.contains("re-hashing"))
    });
    // It runs at the lowest CPU priority short of idle: nobody waits for it.
    assert_eq!(background_nices(&fleet), [19]);
    let started = std::time::Instant::now();
    let (code, r) = fleet.sync_to(0, &v1);
    assert_eq!(code, 200, "{r}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the deploy waited {:?} for maintenance",
        started.elapsed()
    );
    same(
        &fleet.live(0, "mediawiki"),
        &vs.trees[&v1],
        "v1 is live, true",
    );
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("re-hashing the live release for drift stopped"),
        "{text}"
    );
}

#[test]
fn a_scheduled_rehash_finds_an_edit_that_put_back_its_mtime() {
    let mut fleet = Fleet::start_with(1, &["--verify-every", "1s"]);
    let mut vs = Versions::new(&fleet);
    let v1 = vs.build(&fleet, "v1");
    fleet.serve();
    assert_eq!(fleet.sync_to(0, &v1).0, 200);
    settle(&fleet);
    let (_, st) = fleet.get(0, "/v1/state");
    assert_eq!(st["drift"]["changed"], 0, "{st}");
    // Same size, same mtime: what a `stat` check cannot see.
    let f = fleet.live(0, "mediawiki").join("includes/libs/f50.php");
    let meta = fs::metadata(&f).unwrap();
    let mut data = fs::read(&f).unwrap();
    data[0] ^= 0x20;
    edit_in_place(&f, &data);
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(meta.modified().unwrap())
        .unwrap();
    wait_for(30, "the scheduled re-hash to find the edit", || {
        let (_, st) = fleet.get(0, "/v1/state");
        st["drift"]["changed"] == 1 && st["drift"]["rehashed"] == true
    });
    let (_, st) = fleet.get(0, "/v1/state");
    assert_eq!(
        st["drift"]["paths"],
        json!(["mediawiki/includes/libs/f50.php"]),
        "{st}"
    );
}
