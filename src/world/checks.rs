//! What is checked before anything is built or sent: PHP syntax (`php -l`,
//! in parallel), JSON validity, and wikiversions.json's branches.
//!
//! Each failure names the file, the line and (for wikiversions) the wiki
//! and the branch; the caller stops before it builds a version.
//!
//! `php -l` is remembered by content: a file whose bytes passed with this
//! PHP binary before is not linted again ([`LintCache`], in the store's
//! cache directory, keyed by the BLAKE3 hash of the file and of `php -v`),
//! so a sync-world lints only what changed since the last one, however
//! many files wmf-config/ holds.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::cancel::Cancel;

/// One thing wrong, for people: `wmf-config/Foo.php:12: syntax error, ...`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    /// Relative to the component.
    pub path: String,
    pub line: Option<u64>,
    pub what: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.path, self.what),
            None => write!(f, "{}: {}", self.path, self.what),
        }
    }
}

/// The checks failed: every failure, and what was checked.
#[derive(Debug, thiserror::Error)]
#[error("{} check(s) failed, nothing was built or deployed:\n  {}", .failures.len(), .failures.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("\n  "))]
pub struct CheckError {
    pub failures: Vec<Failure>,
}

/// How long one `php -l` may take.
const LINT_TIMEOUT: Duration = Duration::from_secs(60);

/// Files at most this big are linted and parsed; a bigger one is a
/// failure (nobody writes config that size by hand).
const MAX_CHECKED_FILE: u64 = 64 << 20;

/// The PHP files that passed `php -l` with one PHP binary, by content.
pub struct LintCache {
    path: Option<PathBuf>,
    passed: Mutex<HashSet<[u8; 32]>>,
    new: Mutex<Vec<[u8; 32]>>,
}

/// Entries past which the cache file starts again (each is 65 bytes).
const LINT_CACHE_MAX: usize = 1_000_000;

impl LintCache {
    /// The cache for `php` in `cache_dir` (none: lint everything).
    pub fn open(cache_dir: Option<&Path>, php: &str) -> LintCache {
        let path = cache_dir.and_then(|d| {
            let out = std::process::Command::new(php)
                .arg("-v")
                .stdin(std::process::Stdio::null())
                .output()
                .ok()?;
            let mut id = blake3::Hasher::new();
            id.update(php.as_bytes());
            id.update(&out.stdout);
            Some(d.join(format!("lint-{}", &id.finalize().to_hex()[..32])))
        });
        let mut passed = HashSet::new();
        if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            for l in text.lines() {
                if let Ok(h) = blake3::Hash::from_hex(l.trim()) {
                    passed.insert(*h.as_bytes());
                }
            }
        }
        LintCache {
            path,
            passed: Mutex::new(passed),
            new: Mutex::new(Vec::new()),
        }
    }

    fn knows(&self, h: &[u8; 32]) -> bool {
        self.passed.lock().expect("not poisoned").contains(h)
    }

    fn add(&self, h: [u8; 32]) {
        self.new.lock().expect("not poisoned").push(h);
    }

    /// Appends what passed this time (a lost write only means linting
    /// those files again).
    pub fn save(&self) {
        let Some(path) = &self.path else { return };
        let new = std::mem::take(&mut *self.new.lock().expect("not poisoned"));
        if new.is_empty() {
            return;
        }
        let total = self.passed.lock().expect("not poisoned").len() + new.len();
        let mut f = match std::fs::OpenOptions::new()
            .create(true)
            .append(total <= LINT_CACHE_MAX)
            .write(true)
            .truncate(total > LINT_CACHE_MAX)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("{}: {e}", path.display());
                return;
            }
        };
        let mut text = String::with_capacity(new.len() * 65);
        for h in new {
            text.push_str(&blake3::Hash::from(h).to_hex());
            text.push('\n');
        }
        let _ = f.write_all(text.as_bytes());
    }
}

/// What `php -l` found wrong with `rel` (relative to `root`), if
/// anything, and whether it ran (a file that passed before as it is is not
/// linted again).
fn lint_one(php: &str, root: &Path, rel: &str, cache: &LintCache) -> (Option<Failure>, bool) {
    let path = root.join(rel);
    let bytes = match read_bounded(&path) {
        Ok(b) => b,
        Err(what) => {
            let f = Failure {
                path: rel.to_string(),
                line: None,
                what,
            };
            return (Some(f), false);
        }
    };
    let hash = *blake3::hash(&bytes).as_bytes();
    if cache.knows(&hash) {
        return (None, false);
    }
    let cmd = format!(
        "exec {} -d display_errors=stderr -d error_reporting=-1 -l \"$SCAP_LINT_FILE\"",
        shell_word(php)
    );
    let env = [("SCAP_LINT_FILE", path.display().to_string())];
    let failure = match crate::hooks::run(&cmd, &env, LINT_TIMEOUT, &Cancel::new()) {
        Ok(()) => {
            cache.add(hash);
            None
        }
        Err(f) if f.status == "not started" => Some(Failure {
            path: rel.to_string(),
            line: None,
            what: format!(
                "cannot run {php:?}: {}: install php-cli, or set [checks] php",
                f.output
            ),
        }),
        Err(f) => {
            let (line, what) = php_error(&f.output, &path.display().to_string());
            Some(Failure {
                path: rel.to_string(),
                line,
                what: if what.is_empty() {
                    format!("php -l: {}", f.status)
                } else {
                    what
                },
            })
        }
    };
    (failure, true)
}

/// The line and message of `php -l`'s complaint: "PHP Parse error:
/// syntax error, unexpected ... in /x/y.php on line 3".
fn php_error(output: &str, path: &str) -> (Option<u64>, String) {
    let first = output
        .lines()
        .map(str::trim)
        .find(|l| l.contains("error") && !l.starts_with("Errors parsing"))
        .unwrap_or("");
    let line = first
        .rsplit_once(" on line ")
        .and_then(|(_, n)| n.trim().parse().ok());
    let mut what = first
        .strip_prefix("PHP ")
        .unwrap_or(first)
        .replace(&format!(" in {path}"), "");
    if let Some((w, _)) = what.rsplit_once(" on line ") {
        what = w.to_string();
    }
    (line, what.trim().to_string())
}

fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_CHECKED_FILE {
        return Err(format!(
            "{} bytes: bigger than the {} MiB scap checks",
            meta.len(),
            MAX_CHECKED_FILE >> 20
        ));
    }
    std::fs::read(path).map_err(|e| e.to_string())
}

/// `php -l` of every file of `files` (relative to `root`) that did not
/// pass before as it is, `jobs` at once. The failures, in the order of
/// `files`, and how many files were linted.
pub fn lint_php(
    php: &str,
    root: &Path,
    files: &[String],
    cache: &LintCache,
    jobs: usize,
) -> (Vec<Failure>, usize) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let linted = std::sync::atomic::AtomicUsize::new(0);
    let found: Mutex<Vec<(usize, Failure)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, 64).min(files.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(rel) = files.get(i) else { break };
                    let (failure, ran) = lint_one(php, root, rel, cache);
                    if ran {
                        linted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if let Some(f) = failure {
                        found.lock().expect("not poisoned").push((i, f));
                    }
                }
            });
        }
    });
    let mut found = found.into_inner().expect("not poisoned");
    found.sort_by_key(|(i, _)| *i);
    let linted = linted.into_inner();
    (found.into_iter().map(|(_, f)| f).collect(), linted)
}

/// Whether each of `files` (relative to `root`) is valid JSON.
pub fn check_json(root: &Path, files: &[String]) -> Vec<Failure> {
    files
        .iter()
        .filter_map(|rel| {
            let bytes = match read_bounded(&root.join(rel)) {
                Ok(b) => b,
                Err(what) => {
                    return Some(Failure {
                        path: rel.clone(),
                        line: None,
                        what,
                    });
                }
            };
            serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
                .err()
                .map(|e| Failure {
                    path: rel.clone(),
                    line: Some(e.line() as u64),
                    what: format!("invalid JSON: {e}"),
                })
        })
        .collect()
}

/// The branches wikiversions.json sends wikis to: branch directory ->
/// its wikis (sorted).
pub fn wiki_branches(bytes: &[u8]) -> Result<BTreeMap<String, Vec<String>>, String> {
    let map: BTreeMap<String, String> = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "line {}: not an object of wiki: branch directory strings: {e}",
            e.line()
        )
    })?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (wiki, branch) in map {
        out.entry(branch).or_default().push(wiki);
    }
    Ok(out)
}

/// Every branch wikiversions.json (`rel`, its content `bytes`) sends a
/// wiki to must be a directory of the tree `has_dir` describes (`where_`
/// says which, e.g. "staging" or "train 1.46.0-wmf.6 (3f9a1c2e4b5d)").
pub fn check_wikiversions(
    rel: &str,
    bytes: &[u8],
    where_: &str,
    has_dir: &dyn Fn(&str) -> bool,
) -> Vec<Failure> {
    let branches = match wiki_branches(bytes) {
        Ok(b) => b,
        Err(what) => {
            return vec![Failure {
                path: rel.to_string(),
                line: None,
                what,
            }];
        }
    };
    let text = String::from_utf8_lossy(bytes);
    let line_of = |wiki: &str| {
        let key = format!("\"{wiki}\"");
        text.lines()
            .position(|l| l.contains(&key))
            .map(|i| i as u64 + 1)
    };
    let mut out = Vec::new();
    for (branch, wikis) in branches {
        let valid = !branch.is_empty()
            && !branch.contains('/')
            && branch != "."
            && branch != ".."
            && !branch.bytes().any(|b| b.is_ascii_control());
        if valid && has_dir(&branch) {
            continue;
        }
        let more = if wikis.len() > 1 {
            format!(" (and {} more wikis)", wikis.len() - 1)
        } else {
            String::new()
        };
        out.push(Failure {
            path: rel.to_string(),
            line: line_of(&wikis[0]),
            what: format!(
                "wiki {}{more} points to branch {branch:?}, which is not a directory of {where_}: add the branch, or point the wiki at one that is there",
                wikis[0]
            ),
        });
    }
    out
}

/// The files under `dirs` of `root` whose name ends with `ext`, relative
/// to `root`, sorted (symlinks are not followed: a link is not linted).
pub fn files_under(root: &Path, dirs: &[String], ext: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for d in dirs {
        let top = root.join(d);
        match std::fs::symlink_metadata(&top) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{}: not a directory", top.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", top.display())),
        }
        let mut stack = vec![top];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for e in rd {
                let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
                let ft = e
                    .file_type()
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
                let path = e.path();
                if ft.is_dir() {
                    stack.push(path);
                } else if ft.is_file()
                    && path.extension().and_then(|x| x.to_str()) == Some(ext)
                    && let Ok(rel) = path.strip_prefix(root)
                {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn php_errors_name_the_line_and_json_errors_too() {
        let (line, what) = php_error(
            "PHP Parse error:  syntax error, unexpected end of file in /s/wmf-config/a.php on line 3\nErrors parsing /s/wmf-config/a.php\n",
            "/s/wmf-config/a.php",
        );
        assert_eq!(line, Some(3));
        assert_eq!(what, "Parse error:  syntax error, unexpected end of file");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), "{\n \"x\": 1,\n}").unwrap();
        std::fs::write(dir.path().join("b.json"), "[1]").unwrap();
        let f = check_json(dir.path(), &["a.json".into(), "b.json".into()]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].line, Some(3));
        assert!(f[0].to_string().starts_with("a.json:3: invalid JSON"));
    }

    #[test]
    fn wikiversions_names_the_wiki_and_the_missing_branch() {
        let text = b"{\n  \"aawiki\": \"php-1.46.0-wmf.5\",\n  \"enwiki\": \"php-1.46.0-wmf.9\",\n  \"frwiki\": \"php-1.46.0-wmf.9\"\n}";
        let f = check_wikiversions("wikiversions.json", text, "staging", &|b| {
            b == "php-1.46.0-wmf.5"
        });
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].line, Some(3));
        assert!(
            f[0].what.contains("wiki enwiki (and 1 more wikis)"),
            "{}",
            f[0]
        );
        assert!(f[0].what.contains("php-1.46.0-wmf.9"));
        let bad = check_wikiversions("w.json", b"{\"a\": \"../etc\"}", "staging", &|_| true);
        assert_eq!(bad.len(), 1);
        let not_map = check_wikiversions("w.json", b"[1]", "staging", &|_| true);
        assert!(not_map[0].what.contains("not an object"));
    }
}
