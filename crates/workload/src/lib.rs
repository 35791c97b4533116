//! Deterministic, seeded generator of a MediaWiki-like deploy staging tree.
//!
//! Tests, benchmarks and the demo use it for a tree that looks and compresses like a real
//! deploy. The same [`Spec`] (seed included) always gives a byte-identical tree: names,
//! contents, symlinks and modes. Randomness comes from a `SplitMix64` written out below, so no
//! dependency update can change a tree.
//!
//! ```text
//! root/
//! ├── mediawiki-staging/
//! │   ├── php-1.46.0-wmf.1/              the train branch
//! │   │   ├── .git/                      a few small files, for `**/.git` excludes
//! │   │   ├── includes/                  core PHP, up to 4 levels deep (libs/rdbms/database/...)
//! │   │   ├── extensions/<Name>/         extension.json, includes/, i18n/, resources/, tests/
//! │   │   ├── skins/<Name>/              the same shape, with skin.json
//! │   │   ├── resources/{lib,src}/       JS, CSS, LESS; lib/jquery.i18n/Übersetzung.txt
//! │   │   ├── languages/{i18n,messages}/ i18n JSON and Messages*.php
//! │   │   ├── maintenance/               every third top-level script is mode 0755
//! │   │   ├── vendor/<org>/<package>/
//! │   │   ├── tests/{phpunit,qunit}/
//! │   │   ├── cache/l10n/l10n_cache-<lang>.cdb  the large files, which compress only partly
//! │   │   └── cache/tmp/, images/        empty directories
//! │   ├── w -> php-1.46.0-wmf.1
//! │   ├── wmf-config/                    PrivateSettings.php is a dangling absolute symlink
//! │   ├── dblists/*.dblist
//! │   └── docroot/                       wikipedia.org/w -> ../../w, an absolute symlink
//! └── portals/prod/<domain>/             index.html and small assets
//! ```
//!
//! Text files are PHP, JS, JSON or CSS of 1–28 KB (11–12 KB on average) expanded from templates
//! over a fixed vocabulary; zstd shrinks them 3–4x. Each names its own path, so the only
//! whole-file duplicates are the deliberate `COPYING` files. Files go 10–120 to a directory,
//! so no directory has more than a few hundred entries, even at 263k files.
//! [`mutate`] then applies to such a tree the change one kind of deploy makes.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::fs::{self, File, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::LazyLock;

const STAGING: &str = "mediawiki-staging";
const BRANCH_PREFIX: &str = "php-1.46.0-wmf.";

/// The shape of a generated tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Regular files in the whole tree, large ones included (a few dozen are always made).
    pub files: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Number of `cache/l10n/*.cdb` files.
    pub large_files: usize,
    /// Size in bytes of each of those.
    pub large_file_size: usize,
}

impl Spec {
    /// ~30k files, ~400 MB in all: the benchmark's default shape.
    pub fn mediawiki() -> Spec {
        Spec {
            files: 30_000,
            seed: 1,
            large_files: 8,
            large_file_size: 8 << 20,
        }
    }

    /// A small tree (a few hundred files, ~4 MB at 300) for tests and the demo; `files` scales it.
    pub fn small(files: usize) -> Spec {
        Spec {
            files,
            seed: 1,
            large_files: 2,
            large_file_size: 300 << 10,
        }
    }
}

/// What [`generate`] made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// `root/mediawiki-staging`.
    pub staging: PathBuf,
    /// `root/portals`.
    pub portals: PathBuf,
    /// Regular files written (symlinks and directories not counted).
    pub files: u64,
    /// Bytes in those files.
    pub bytes: u64,
    /// The train branch, `php-1.46.0-wmf.1`.
    pub branch: String,
}

/// One kind of deploy's change to a tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Small edits to 1–3 PHP files of the newest branch.
    Backport,
    /// The newest branch copied to the next, ~2% of its files edited, up to 150 files added,
    /// and `w` repointed to it.
    Train,
    /// Regions of 2–4 l10n cache files rewritten, and one of them grown in the middle.
    L10n,
    /// 1–2 wmf-config files edited and a wiki added to one dblist.
    Config,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 4] = [Self::Backport, Self::Train, Self::L10n, Self::Config];

    /// The lower-case name that [`FromStr`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::Backport => "backport",
            Mutation::Train => "train",
            Mutation::L10n => "l10n",
            Mutation::Config => "config",
        }
    }
}

impl fmt::Display for Mutation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mutation {
    type Err = String;

    fn from_str(s: &str) -> Result<Mutation, String> {
        let found = Mutation::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s));
        found.ok_or_else(|| {
            format!("unknown mutation {s:?}: expected backport, train, l10n or config")
        })
    }
}

/// What [`mutate`] did: sorted paths relative to the root, compared with the tree before.
///
/// Entries are files and symlinks, never directories. A train's whole new branch (its edited
/// files too) is in `added`, and `changed` is `mediawiki-staging/w`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mutated {
    /// Existed before, with other contents (or another symlink target).
    pub changed: Vec<PathBuf>,
    /// Did not exist before.
    pub added: Vec<PathBuf>,
    /// Existed before and are gone (no mutation removes anything yet).
    pub removed: Vec<PathBuf>,
}

/// Creates `root/mediawiki-staging` and `root/portals`. `root` must not exist or be empty.
///
/// # Errors
///
/// `AlreadyExists` if `root` has entries; otherwise any I/O error, prefixed with its path.
pub fn generate(root: &Path, spec: &Spec) -> io::Result<Generated> {
    match fs::read_dir(root) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                let msg = format!("{}: not empty", root.display());
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, msg));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(root).map_err(at(root))?
        }
        Err(e) => return Err(at(root)(e)),
    }
    let branch = format!("{BRANCH_PREFIX}1");
    let b = &format!("{STAGING}/{branch}");
    let mut t = Tree::new(root, spec.seed);
    // The fixed parts first; what is left of `spec.files` makes up the bulk of the branch.
    t.fixed(b, spec)?;
    let bulk = spec.files.saturating_sub(t.files as usize);
    let mut parts = [28, 38, 11, 8, 9, 3, 2, 1].map(|percent| bulk * percent / 100);
    parts[1] += bulk - parts.iter().sum::<usize>();
    let [
        includes,
        extensions,
        vendor,
        resources,
        tests,
        languages,
        maintenance,
        skins,
    ] = parts;
    let [php, js, css, json] = [Kind::Php, Kind::Js, Kind::Css, Kind::Json];
    t.includes(b, includes)?;
    let names = &VOCAB.extensions;
    t.components(
        &format!("{b}/extensions"),
        names,
        extensions,
        250,
        "extension.json",
    )?;
    t.components(&format!("{b}/skins"), &VOCAB.skins, skins, 150, "skin.json")?;
    t.vendor(b, vendor)?;
    let lib = resources * 3 / 10;
    t.spread(b, "resources/lib", Style::Lower, lib, &[js, js, css])?;
    t.spread(
        b,
        "resources/src",
        Style::Module,
        resources - lib,
        &[js, js, css, json],
    )?;
    t.spread(b, "tests/qunit", Style::Lower, tests / 5, &[js])?;
    t.spread(b, "tests/phpunit", Style::Camel, tests - tests / 5, &[php])?;
    t.languages(b, languages)?;
    t.maintenance(b, maintenance)?;
    let (files, bytes) = (t.files, t.bytes);
    Ok(Generated {
        staging: root.join(STAGING),
        portals: root.join("portals"),
        files,
        bytes,
        branch,
    })
}

/// Applies one kind of deploy's change to a tree made by `generate`, deterministically from `seed`.
///
/// The result also depends on the tree, which is deterministic too: the same tree, mutation and
/// seed always give the same change.
///
/// # Errors
///
/// `NotFound` if there is no `php-1.46.0-wmf.N` branch (or, for [`Mutation::L10n`], no l10n
/// cache file); `AlreadyExists` if a train's new branch exists; any other I/O error, prefixed
/// with its path.
pub fn mutate(root: &Path, mutation: Mutation, seed: u64) -> io::Result<Mutated> {
    let newest = newest_branch(&root.join(STAGING))?;
    let branch = Path::new(STAGING).join(format!("{BRANCH_PREFIX}{newest}"));
    let rng = &mut Rng(seed ^ (mutation as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let mut m = Mutated::default();
    match mutation {
        Mutation::Backport => {
            let mut php = sources(root, &branch)?;
            php.retain(|p| Kind::of(p) == Some(Kind::Php));
            let count = rng.range(1, 3);
            m.changed = edit_some(root, php, count, rng)?;
        }
        Mutation::Train => train(root, &branch, newest, rng, &mut m)?,
        Mutation::L10n => l10n(root, &branch, rng, &mut m)?,
        Mutation::Config => {
            let mut settings = Vec::new();
            walk(
                root,
                &root.join(STAGING).join("wmf-config"),
                &mut settings,
                false,
            )?;
            settings.retain(|p| Kind::of(p) == Some(Kind::Php));
            let count = rng.range(1, 2);
            m.changed = edit_some(root, settings, count, rng)?;
            let mut lists = Vec::new();
            walk(root, &root.join(STAGING).join("dblists"), &mut lists, false)?;
            if !lists.is_empty() {
                let list = lists.swap_remove(rng.below(lists.len()));
                let path = root.join(&list);
                let line = format!("{}{}wiki\n", rng.word(), rng.range(2, 99_999));
                let mut file = fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(at(&path))?;
                file.write_all(line.as_bytes()).map_err(at(&path))?;
                m.changed.push(list);
            }
        }
    }
    m.changed.sort();
    m.added.sort();
    Ok(m)
}

fn train(root: &Path, old: &Path, newest: u32, rng: &mut Rng, m: &mut Mutated) -> io::Result<()> {
    let name = format!("{BRANCH_PREFIX}{}", newest + 1);
    let new = Path::new(STAGING).join(&name);
    copy_tree(&root.join(old), &root.join(&new))?;
    let files = sources(root, &new)?;
    let adds = if files.is_empty() {
        0
    } else {
        (files.len() / 200).clamp(10, 150)
    };
    let models: Vec<PathBuf> = (0..adds)
        .map(|_| files[rng.below(files.len())].clone())
        .collect();
    let edits = (files.len() / 50).max(1);
    edit_some(root, files, edits, rng)?;
    let mut text = String::new();
    for model in models {
        let (Some(kind), Some(ext)) = (Kind::of(&model), model.extension()) else {
            continue;
        };
        let rel = loop {
            let mut stem = String::new();
            ident(rng, &mut stem, true);
            stem.push_str(rng.pick(&VOCAB.suffixes));
            let rel = model.with_file_name(stem).with_extension(ext);
            if fs::symlink_metadata(root.join(&rel)).is_err() {
                break rel;
            }
        };
        text.clear();
        let size = text_size(rng);
        Render::new(rng, &mut text, kind.syntax(), &rel.to_string_lossy()).file(size);
        write_file(&root.join(&rel), text.as_bytes(), 0o644)?;
    }
    walk(root, &root.join(&new), &mut m.added, true)?;
    // Repoint `w` as scap does: a new link renamed over the old one.
    let (tmp, w) = (
        root.join(STAGING).join(".w.tmp"),
        root.join(STAGING).join("w"),
    );
    if fs::symlink_metadata(&tmp).is_ok() {
        fs::remove_file(&tmp).map_err(at(&tmp))?;
    }
    symlink(&name, &tmp).map_err(at(&tmp))?;
    fs::rename(&tmp, &w).map_err(at(&w))?;
    m.changed.push(Path::new(STAGING).join("w"));
    Ok(())
}

fn l10n(root: &Path, branch: &Path, rng: &mut Rng, m: &mut Mutated) -> io::Result<()> {
    let dir = root.join(branch).join("cache/l10n");
    let mut files = Vec::new();
    walk(root, &dir, &mut files, false)?;
    files.retain(|p| p.extension() == Some(OsStr::new("cdb")));
    if files.is_empty() {
        let msg = format!("{}: no l10n cache files to change", dir.display());
        return Err(io::Error::new(io::ErrorKind::NotFound, msg));
    }
    let mut patch = Vec::new();
    let count = rng.range(2, 4);
    for (nth, i) in choose(rng, files.len(), count).into_iter().enumerate() {
        let path = root.join(&files[i]);
        let mut data = fs::read(&path).map_err(at(&path))?;
        let rewrites = if data.is_empty() { 0 } else { rng.range(1, 3) };
        for _ in 0..rewrites {
            let len = rng.range(4 << 10, 64 << 10).min(data.len() / 4).max(1);
            let room = (data.len() * 3 / 4).saturating_sub(data.len() / 4 + len);
            let start = data.len() / 4 + rng.below(room + 1);
            cdb(rng, &mut patch, "en", len);
            let region = &mut data[start..start + len];
            if *region == patch[..] {
                patch[0] ^= 0xff;
            }
            region.copy_from_slice(&patch);
        }
        if nth == 0 {
            // Grow one file in the middle: only content-defined chunking finds the rest again.
            let len = rng.range(4 << 10, 64 << 10);
            cdb(rng, &mut patch, "en", len);
            let mid = data.len() / 2;
            data.splice(mid..mid, patch.iter().copied());
        }
        if rewrites > 0 || nth == 0 {
            fs::write(&path, &data).map_err(at(&path))?;
            m.changed.push(files[i].clone());
        }
    }
    Ok(())
}

/// Edits `count` of `files` (relative to `root`) and returns the ones edited.
fn edit_some(
    root: &Path,
    files: Vec<PathBuf>,
    count: usize,
    rng: &mut Rng,
) -> io::Result<Vec<PathBuf>> {
    let chosen = choose(rng, files.len(), count);
    let mut files: Vec<Option<PathBuf>> = files.into_iter().map(Some).collect();
    let mut edited = Vec::with_capacity(chosen.len());
    for i in chosen {
        let Some(rel) = files[i].take() else { continue };
        let path = root.join(&rel);
        let old = fs::read(&path).map_err(at(&path))?;
        let line_after = |from: usize| {
            old[from..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(old.len(), |p| from + p + 1)
        };
        let start = line_after(old.len() / 2);
        let mut end = start;
        for _ in 0..rng.below(3) {
            end = line_after(end);
        }
        let mut patch = String::new();
        let syntax = Kind::of(&rel).unwrap_or(Kind::Text).syntax();
        let mut render = Render::new(rng, &mut patch, syntax, "");
        for _ in 0..render.rng.range(1, 3) {
            render.expand(syntax.patch, 1);
        }
        let mut new = [&old[..start], patch.as_bytes(), &old[end..]].concat();
        if new == old {
            new.push(b'\n');
        }
        fs::write(&path, &new).map_err(at(&path))?;
        edited.push(rel);
    }
    Ok(edited)
}

fn newest_branch(staging: &Path) -> io::Result<u32> {
    let mut newest = None;
    for entry in fs::read_dir(staging).map_err(at(staging))? {
        let name = entry.map_err(at(staging))?.file_name();
        let n = name
            .to_str()
            .and_then(|s| s.strip_prefix(BRANCH_PREFIX)?.parse().ok());
        newest = newest.max(n);
    }
    newest.ok_or_else(|| {
        let msg = format!("{}: no {BRANCH_PREFIX}N branch", staging.display());
        io::Error::new(io::ErrorKind::NotFound, msg)
    })
}

/// The text files (PHP, JS, JSON, CSS) below `dir`, outside `.git`, relative to `root`.
fn sources(root: &Path, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    walk(root, &root.join(dir), &mut files, false)?;
    files.retain(|p| Kind::of(p).is_some() && !p.components().any(|c| c.as_os_str() == ".git"));
    Ok(files)
}

/// Appends the files (and symlinks, if `links`) below `dir`, relative to `root`, in sorted order.
fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>, links: bool) -> io::Result<()> {
    for entry in read_sorted(dir)? {
        let path = entry.path();
        let kind = entry.file_type().map_err(at(&path))?;
        if kind.is_dir() {
            walk(root, &path, out, links)?;
        } else if links || kind.is_file() {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
    }
    Ok(())
}

fn read_sorted(dir: &Path) -> io::Result<Vec<fs::DirEntry>> {
    let entries = fs::read_dir(dir).map_err(at(dir))?;
    let mut entries = entries.collect::<io::Result<Vec<_>>>().map_err(at(dir))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    Ok(entries)
}

/// Copies a tree, keeping modes and symlinks as they are.
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir(to).map_err(at(to))?;
    for entry in read_sorted(from)? {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(at(&src))?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(&src).map_err(at(&src))?, &dst).map_err(at(&dst))?;
        } else {
            fs::copy(&src, &dst).map_err(at(&dst))?; // sets the source's mode exactly
        }
    }
    let mode = fs::metadata(from).map_err(at(from))?.permissions();
    fs::set_permissions(to, mode).map_err(at(to))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut file = File::create(path).map_err(at(path))?;
    file.write_all(data).map_err(at(path))?;
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(at(path))
}

/// Puts `path` in front of an error's message.
fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// `k` distinct indices below `n` (all of them if `n <= k`), in random order.
fn choose(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..n).collect();
    let k = k.min(n);
    for i in 0..k {
        indices.swap(i, i + rng.below(n - i));
    }
    indices.truncate(k);
    indices
}

/// `SplitMix64`: tiny, fast and fixed forever.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`; 0 when `n` is 0.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick(&mut self, items: &[&'static str]) -> &'static str {
        items[self.below(items.len())]
    }

    fn word(&mut self) -> &'static str {
        self.pick(&VOCAB.words)
    }
}

struct Vocab {
    words: Vec<&'static str>,
    prose: Vec<&'static str>,
    suffixes: Vec<&'static str>,
    types: Vec<&'static str>,
    langs: Vec<&'static str>,
    extensions: Vec<&'static str>,
    skins: Vec<&'static str>,
    vendors: Vec<&'static str>,
    presets: Vec<&'static str>,
    domains: Vec<&'static str>,
    projects: Vec<&'static str>,
    wmf_config: Vec<&'static str>,
    dblists: Vec<&'static str>,
}

static VOCAB: LazyLock<Vocab> = LazyLock::new(|| {
    let list = |s: &'static str| s.split_whitespace().collect();
    Vocab {
        words: list(
            "page title revision user parser cache options context request config service database \
             row query result status message language content handler factory store lookup manager \
             hook runner text html link target namespace id timestamp batch key value params \
             module output skin logger stats job queue lock file repo thumb media image section \
             comment actor block permission authority identity session token edit summary diff \
             slot role model format serializer schema table field index conds join limit offset \
             order group prefix suffix domain wiki site interwiki redirect category template tag \
             flag state mode level count size length name path url host server client response \
             header body stream buffer entry item list map callback event listener watch \
             notification preference default locale fallback variant converter magic special \
             action route spec validator error warning debug trace profile metric timer clock \
             replica primary connection transaction ticket shard cluster pool backend frontend \
             storage object blob chunk hash digest signature version branch deploy canary rollout \
             revert patch update insert delete select upsert purge refresh render parse expand \
             preprocess sanitize escape encode decode normalize validate resolve fetch load save \
             commit",
        ),
        prose: list(
            "the of to a is for when this not be if and or with from that it on by as are will \
             should can must only all any new no some",
        ),
        suffixes: list(
            "Handler Factory Service Store Lookup Manager Builder Formatter Provider Hooks Module \
             Page Job Exception Utils Renderer Helper Query Updater Registry Validator Serializer",
        ),
        types: list(
            "string int bool array ?string ?int UserIdentity PageReference Title Config Status",
        ),
        langs: list(
            "en qqq de fr es ja ru it zh pt pl nl sv ar fa uk he ko cs fi hu id tr vi ro no da ca \
             el bg sr sr-ec sr-el hr sl sk lt lv et hi bn ta te ml mr ur th ms tl eo eu gl is ga \
             cy br oc lb als nds be be-tarask mk sq hy ka az kk uz ky tg mn ne si km lo my am sw \
             yo ig ha zu af pt-br zh-hans zh-hant yue",
        ),
        extensions: list(
            "AbuseFilter CentralAuth CirrusSearch Cite CodeEditor ConfirmEdit Echo EventLogging \
             FlaggedRevs GlobalBlocking GrowthExperiments Kartographer Linter Math MobileFrontend \
             OAuth ORES PageImages ParserFunctions Popups ProofreadPage Scribunto SpamBlacklist \
             SyntaxHighlight_GeSHi TemplateData TimedMediaHandler TitleBlacklist Translate \
             UniversalLanguageSelector UploadWizard VisualEditor WikiEditor Wikibase \
             WikimediaEvents WikimediaMessages Thanks TextExtracts DiscussionTools Disambiguator \
             Gadgets GeoData ImageMap InputBox Interwiki Babel CategoryTree CheckUser Collection \
             ContentTranslation CommonsMetadata Elastica EntitySchema IPInfo MassMessage \
             MultimediaViewer NavigationTiming PageTriage PdfHandler Poem QuickSurveys \
             ReadingLists RevisionSlider SecurePoll TemplateStyles TwoColConflict WikiLove",
        ),
        skins: list("Vector MinervaNeue Timeless MonoBook"),
        vendors: list(
            "wikimedia/at-ease wikimedia/cdb wikimedia/css-sanitizer wikimedia/parsoid \
             wikimedia/remex-html wikimedia/services wikimedia/less.php guzzlehttp/guzzle \
             guzzlehttp/psr7 symfony/yaml symfony/polyfill-php80 psr/log psr/container \
             monolog/monolog pear/mail composer/semver oojs/oojs-ui firebase/php-jwt pimple/pimple",
        ),
        presets: list(
            "libs/rdbms/database libs/rdbms/loadbalancer libs/rdbms/lbfactory \
             libs/objectcache/wancache Rest/Handler/Helper api/Query parser/Parsoid/Config \
             specials/pagers",
        ),
        domains: list(
            "wikipedia.org wiktionary.org wikibooks.org wikinews.org wikiquote.org wikisource.org \
             wikiversity.org wikivoyage.org wikidata.org wikimedia.org mediawiki.org \
             wikispecies.org",
        ),
        projects: list(
            "wiki wiktionary wikibooks wikinews wikiquote wikisource wikiversity wikivoyage",
        ),
        wmf_config: list(
            "InitialiseSettings.php CommonSettings.php ProductionServices.php LabsServices.php \
             db-production.php db-labs.php logging.php filebackend.php jobqueue.php mc.php \
             interwiki.php FeaturedFeedsWMF.php",
        ),
        dblists: list(
            "all closed private fishbowl special wikipedia wiktionary wikisource group0 group1 \
             group2 large medium small s1 s2",
        ),
    }
});

/// Size of a generated text file: 1–28 KB, 11 KB on average.
fn text_size(rng: &mut Rng) -> usize {
    let tail = if rng.chance(5) { rng.below(8 << 10) } else { 0 };
    1024 + rng.below(9_728) + rng.below(9_728) + tail
}

/// How one kind of text file is put together from templates (see [`Render::expand`]).
struct Syntax {
    head: &'static str,
    /// Picked at random and expanded at `depth` until the file is big enough.
    items: &'static [&'static str],
    depth: usize,
    tail: &'static str,
    /// Statements for `%b` and `%B` blocks.
    stmts: &'static [&'static str],
    /// A small edit, inserted at the start of a line.
    patch: &'static str,
}

const PHP: Syntax = Syntax {
    head: "<?php\n/**\n * %s\n *\n * @file %f\n * @license GPL-2.0-or-later\n */\n\n\
           namespace MediaWiki\\%I\\%I;\n\nuse MediaWiki\\%I\\%I;\nuse MediaWiki\\%I\\%I;\n\
           use Wikimedia\\%I\\%I;\n\nclass %I extends %I {\n\n\tprivate %t %v;\n",
    items: &[
        "\n\t/**\n\t * %s\n\t * @param %t %v\n\t * @return %t\n\t */\n\
         \tpublic function %i( %t %v, %t %v ) {%B}\n",
    ],
    depth: 1,
    tail: "}\n",
    stmts: &[
        "%v = $this->%i->%i( %v, '%w-%w' );",
        "%v = [ '%w' => %v, '%w' => %n ];",
        "// %s",
        "$this->%i[] = new %I( %v );",
        "return $this->%i( %v );",
        "wfDebugLog( '%w', __METHOD__ . \": %s\" );",
        "%v = %v ?? self::%W_%W;",
        "$res = $dbr->newSelectQueryBuilder()%>->select( [ '%w_%w', '%w_%w' ] )%>->from( '%w' )\
         %>->where( [ '%w_id' => %v ] )%>->caller( __METHOD__ )->fetchResultSet();",
        "if ( %v === null ) {%b}",
        "foreach ( %v as %v => %v ) {%b}",
    ],
    patch: "\t\t// T%n: %s\n\t\t%v = $this->%i( %v, %n );\n",
};

const JS: Syntax = Syntax {
    head: "/*!\n * %f\n * %s\n */\n( function () {\n\t'use strict';\n\n\
           \tvar %i = require( './%w.%w.js' );\n",
    items: &["\n\t/**\n\t * %s\n\t * @param {%t} %w\n\t */\n\tfunction %i( %w, %w ) {%B}\n"],
    depth: 1,
    tail: "\n\tmodule.exports = {};\n}() );\n",
    stmts: &[
        "var %i = %w.%i( %w, '%w' );",
        "// %s",
        "mw.hook( '%w.%w' ).fire( %w );",
        "%i = mw.config.get( 'wg%I' );",
        "mw.log.warn( '%s' );",
        "return %w.%i( %n );",
        "if ( !%i ) {%b}",
        "$( '.mw-%w-%w' ).on( 'click', function () {%b} );",
    ],
    patch: "\t\t// T%n: %s\n\t\tvar %i = %w.%i( %n );\n",
};

const CSS: Syntax = Syntax {
    head: "/**\n * %f\n */\n@import 'mediawiki.skin.variables.less';\n",
    items: &["\n.mw-%w-%w {%B}\n", "\n.mw-%w-%w .%w-%w {%b}\n"],
    depth: 0,
    tail: "",
    stmts: &[
        "color: #%x;",
        "background-color: @%w-%w;",
        "margin: 0 %d.%dem;",
        "padding: %dpx %dpx;",
        "border: 1px solid #%x;",
        "font-size: %dpx;",
        "z-index: %d;",
    ],
    patch: ".mw-%w-%n { color: #%x; }\n",
};

const JSON: Syntax = Syntax {
    head: "{\n\t\"name\": \"%I\",\n\t\"url\": \"https://gerrit.wikimedia.org/g/%f\",\n\
           \t\"version\": \"%d.%d.%d\",\n\t\"description\": \"%s\",\n\
           \t\"license-name\": \"GPL-2.0-or-later\",\n\
           \t\"config\": {\n\t\t\"wg%I\": { \"value\": %n }",
    items: &[",\n\t\t\"wg%I\": {\n\t\t\t\"value\": %n,\n\t\t\t\"description\": \"%s\"\n\t\t}"],
    depth: 0,
    tail: "\n\t}\n}\n",
    stmts: &[],
    patch: "\t\t\"wg%I\": { \"value\": %n },\n",
};

const I18N: Syntax = Syntax {
    head: "{\n\t\"@metadata\": {\n\t\t\"authors\": [ \"%I%d\", \"%I%n\" ],\n\
           \t\t\"source\": \"%f\"\n\t},\n\t\"%w-%w\": \"%s\"",
    items: &[",\n\t\"%w-%w-%w\": \"%s\"", ",\n\t\"%w-%w\": \"%s $1\""],
    depth: 0,
    tail: "\n}\n",
    stmts: &[],
    patch: "\t\"%w-%w-%n\": \"%s\",\n",
};

const TEXT: Syntax = Syntax {
    head: "= %f =\n\n",
    items: &["== %I ==\n", "* %s (T%n)\n", "%s %s %s\n\n"],
    depth: 0,
    tail: "",
    stmts: &[],
    patch: "* %s (T%n)\n",
};

const HTML: Syntax = Syntax {
    head: "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
           <title>%f</title>\n</head>\n<body>\n",
    items: &[
        "<div class=\"central-featured-lang lang%d\" lang=\"%l\"><a href=\"//%l.wikipedia.org/\" \
         title=\"%s\"><strong>%I</strong><small>%n+ articles</small></a></div>\n",
    ],
    depth: 0,
    tail: "</body>\n</html>\n",
    stmts: &[],
    patch: "<p>%s</p>\n",
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Php,
    Js,
    Css,
    Json,
    I18n,
    Text,
    Html,
}

impl Kind {
    /// The kind of an existing text file, by extension.
    fn of(path: &Path) -> Option<Kind> {
        match path.extension()?.to_str()? {
            "php" => Some(Kind::Php),
            "js" => Some(Kind::Js),
            "css" | "less" => Some(Kind::Css),
            "json" => Some(Kind::Json),
            _ => None,
        }
    }

    fn syntax(self) -> &'static Syntax {
        match self {
            Kind::Php => &PHP,
            Kind::Js => &JS,
            Kind::Css => &CSS,
            Kind::Json => &JSON,
            Kind::I18n => &I18N,
            Kind::Text => &TEXT,
            Kind::Html => &HTML,
        }
    }
}

/// Expands templates of one [`Syntax`] into `out`.
struct Render<'a> {
    rng: &'a mut Rng,
    out: &'a mut String,
    syntax: &'static Syntax,
    /// The file's path, for `%f`.
    rel: &'a str,
}

impl<'a> Render<'a> {
    fn new(rng: &'a mut Rng, out: &'a mut String, syntax: &'static Syntax, rel: &'a str) -> Self {
        Render {
            rng,
            out,
            syntax,
            rel,
        }
    }

    /// Appends a whole file of about `size` bytes.
    fn file(&mut self, size: usize) {
        let end = self.out.len() + size;
        self.expand(self.syntax.head, 0);
        while self.out.len() < end {
            let item = self.rng.pick(self.syntax.items);
            self.expand(item, self.syntax.depth);
        }
        self.expand(self.syntax.tail, 0);
    }

    /// Appends `template`, in which `%` and one character stand for a random piece.
    ///
    /// `%w` is a word, `%W` an upper-case one, `%i`/`%I` a camelCase/CamelCase identifier,
    /// `%v` a PHP variable, `%t` a type, `%l` a language code, `%s` a sentence, `%d` a number
    /// below 100, `%n` one below 100000, `%x` 6 hex digits, `%h` 40, `%f` the file's path,
    /// `%>` a line break into the next indentation level, and `%b`/`%B` a block of 1–3/2–10
    /// statements one level below `depth`.
    fn expand(&mut self, template: &str, depth: usize) {
        let mut parts = template.split('%');
        self.out.push_str(parts.next().unwrap_or_default());
        for part in parts {
            let (rng, out) = (&mut *self.rng, &mut *self.out);
            let mut chars = part.chars();
            match chars.next() {
                Some('w') => out.push_str(rng.word()),
                Some('W') => out.extend(rng.word().chars().map(|c| c.to_ascii_uppercase())),
                Some('i') => ident(rng, out, false),
                Some('I') => ident(rng, out, true),
                Some('v') => {
                    out.push('$');
                    ident(rng, out, false);
                }
                Some('t') => out.push_str(rng.pick(&VOCAB.types)),
                Some('l') => out.push_str(rng.pick(&VOCAB.langs)),
                Some('s') => sentence(rng, out),
                Some('d') => num(out, rng.below(100)),
                Some('n') => num(out, rng.below(100_000)),
                Some('x') => {
                    let _ = write!(out, "{:06x}", rng.below(1 << 24));
                }
                Some('h') => {
                    let (a, b, c) = (rng.next_u64(), rng.next_u64(), rng.next_u64() >> 32);
                    let _ = write!(out, "{a:016x}{b:016x}{c:08x}");
                }
                Some('f') => out.push_str(self.rel),
                Some('>') => {
                    out.push('\n');
                    indent(out, depth + 1);
                }
                Some(block @ ('b' | 'B')) => {
                    let count = if block == 'b' {
                        rng.range(1, 3)
                    } else {
                        rng.range(2, 10)
                    };
                    out.push('\n');
                    for _ in 0..count {
                        self.statement(depth + 1);
                    }
                    indent(self.out, depth);
                }
                _ => {}
            }
            self.out.push_str(chars.as_str());
        }
    }

    /// One line (or nested block) of code at `depth`; nesting stops at depth 4.
    fn statement(&mut self, depth: usize) {
        let stmt = loop {
            let stmt = self.rng.pick(self.syntax.stmts);
            if depth < 4 || !stmt.contains("%b") {
                break stmt;
            }
        };
        indent(self.out, depth);
        self.expand(stmt, depth);
        self.out.push('\n');
    }
}

fn indent(out: &mut String, depth: usize) {
    out.extend(std::iter::repeat_n('\t', depth));
}

fn num(out: &mut String, n: usize) {
    let _ = write!(out, "{n}");
}

fn camel(out: &mut String, word: &str) {
    let mut chars = word.chars();
    if let Some(first) = chars.next() {
        out.push(first.to_ascii_uppercase());
        out.push_str(chars.as_str());
    }
}

/// A camelCase (or CamelCase) identifier of 1–3 words.
fn ident(rng: &mut Rng, out: &mut String, upper: bool) {
    for i in 0..rng.range(1, 3) {
        let word = rng.word();
        if i == 0 && !upper {
            out.push_str(word)
        } else {
            camel(out, word)
        }
    }
}

fn sentence(rng: &mut Rng, out: &mut String) {
    for i in 0..rng.range(4, 14) {
        let word = if rng.chance(40) {
            rng.pick(&VOCAB.prose)
        } else {
            rng.word()
        };
        if i == 0 {
            camel(out, word);
        } else {
            out.push(' ');
            out.push_str(word);
        }
    }
    out.push('.');
}

/// Binary l10n cache: length-prefixed message records between random hash-table pages.
fn cdb(rng: &mut Rng, out: &mut Vec<u8>, lang: &str, size: usize) {
    out.clear();
    let mut record = String::new();
    while out.len() < size {
        if rng.chance(20) {
            for _ in 0..rng.range(8, 64) {
                out.extend_from_slice(&rng.next_u64().to_le_bytes());
            }
        } else {
            record.clear();
            let _ = write!(record, "{lang}:messages:{}-{}", rng.word(), rng.word());
            let key = record.len();
            sentence(rng, &mut record);
            out.extend_from_slice(&(key as u32).to_le_bytes());
            out.extend_from_slice(&((record.len() - key) as u32).to_le_bytes());
            out.extend_from_slice(record.as_bytes());
        }
    }
    out.truncate(size);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    /// `Foo/BarBaz`, 0–3 levels.
    Camel,
    /// `foo/bar`, 1–2 levels.
    Lower,
    /// `mediawiki.foo.bar` (`ext.foo.bar` in extensions and skins), 1 level.
    Module,
}

/// The tree being generated, with reusable buffers and the counts so far.
struct Tree {
    root: PathBuf,
    rng: Rng,
    text: String,
    bin: Vec<u8>,
    licence: String,
    made_dirs: HashSet<PathBuf>,
    used_dirs: HashSet<String>,
    taken: HashSet<String>,
    files: u64,
    bytes: u64,
}

impl Tree {
    fn new(root: &Path, seed: u64) -> Tree {
        let mut licence = String::new();
        Render::new(&mut Rng(0x4750_4C32), &mut licence, &TEXT, "COPYING").file(17 << 10);
        Tree {
            root: root.to_path_buf(),
            rng: Rng(seed),
            text: String::with_capacity(64 << 10),
            bin: Vec::new(),
            licence,
            made_dirs: HashSet::new(),
            used_dirs: HashSet::new(),
            taken: HashSet::new(),
            files: 0,
            bytes: 0,
        }
    }

    /// Creates a directory and its missing parents, each mode 0755.
    fn mkdirs(&mut self, rel: &Path) -> io::Result<()> {
        if rel.as_os_str().is_empty() || self.made_dirs.contains(rel) {
            return Ok(());
        }
        if let Some(parent) = rel.parent() {
            self.mkdirs(parent)?;
        }
        let path = self.root.join(rel);
        match fs::create_dir(&path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(at(&path)(e)),
            _ => fs::set_permissions(&path, Permissions::from_mode(0o755)).map_err(at(&path))?,
        }
        self.made_dirs.insert(rel.to_path_buf());
        Ok(())
    }

    fn put(&mut self, rel: &str, data: &[u8], mode: u32) -> io::Result<()> {
        if let Some(parent) = Path::new(rel).parent() {
            self.mkdirs(parent)?;
        }
        write_file(&self.root.join(rel), data, mode)?;
        self.taken.insert(rel.to_owned());
        self.files += 1;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Writes a text file rendered by `fill` into the reusable buffer.
    fn put_text(
        &mut self,
        rel: &str,
        mode: u32,
        syntax: &'static Syntax,
        fill: impl FnOnce(&mut Render<'_>),
    ) -> io::Result<()> {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        fill(&mut Render::new(&mut self.rng, &mut text, syntax, rel));
        let result = self.put(rel, text.as_bytes(), mode);
        self.text = text;
        result
    }

    /// Writes a binary file made by `fill` in the reusable buffer.
    fn put_bin(&mut self, rel: &str, fill: impl FnOnce(&mut Rng, &mut Vec<u8>)) -> io::Result<()> {
        let mut bin = std::mem::take(&mut self.bin);
        bin.clear();
        fill(&mut self.rng, &mut bin);
        let result = self.put(rel, &bin, 0o644);
        self.bin = bin;
        result
    }

    fn source(&mut self, rel: &str, kind: Kind, size: usize) -> io::Result<()> {
        self.put_text(rel, 0o644, kind.syntax(), |r| r.file(size))
    }

    /// Random bytes after `magic`, `size` in all.
    fn binary(&mut self, rel: &str, magic: &[u8], size: usize) -> io::Result<()> {
        self.put_bin(rel, |rng, bin| {
            bin.extend_from_slice(magic);
            bin.extend((bin.len()..size).map(|_| rng.next_u64() as u8));
        })
    }

    fn link(&mut self, target: &str, rel: &str) -> io::Result<()> {
        self.mkdirs(Path::new(rel).parent().unwrap_or(Path::new("")))?;
        let path = self.root.join(rel);
        symlink(target, &path).map_err(at(&path))
    }

    /// `dir/stem.ext`, or `dir/stemN.ext` if that is taken.
    fn unique(&self, dir: &str, stem: &str, ext: &str) -> String {
        let mut rel = format!("{dir}/{stem}.{ext}");
        for n in 2.. {
            if !self.taken.contains(&rel) {
                break;
            }
            rel = format!("{dir}/{stem}{n}.{ext}");
        }
        rel
    }

    /// A new name in `dir` for its `i`-th file of `kind`.
    fn name(&mut self, dir: &str, kind: Kind, i: usize) -> String {
        let rng = &mut self.rng;
        let mut stem = String::new();
        let ext = match kind {
            Kind::Php => {
                ident(rng, &mut stem, true);
                stem.push_str(if dir.contains("tests/") {
                    "Test"
                } else {
                    rng.pick(&VOCAB.suffixes)
                });
                "php"
            }
            Kind::Js => {
                stem.push_str(rng.word());
                stem.push('.');
                ident(rng, &mut stem, false);
                "js"
            }
            Kind::I18n => {
                stem.push_str(VOCAB.langs[i % VOCAB.langs.len()]);
                "json"
            }
            _ => {
                let _ = write!(stem, "{}-{}", rng.word(), rng.word());
                match kind {
                    Kind::Css if rng.chance(50) => "less",
                    Kind::Css => "css",
                    Kind::Json => "json",
                    Kind::Html => "html",
                    _ => "txt",
                }
            }
        };
        self.unique(dir, &stem, ext)
    }

    /// `n` text files of the given kinds in `dir`.
    fn fill(&mut self, dir: &str, n: usize, kinds: &[Kind]) -> io::Result<()> {
        for i in 0..n {
            let kind = kinds[self.rng.below(kinds.len())];
            let rel = self.name(dir, kind, i);
            let size = text_size(&mut self.rng);
            self.source(&rel, kind, size)?;
        }
        Ok(())
    }

    /// Spreads `n` text files over new directories below `parent/sub`, 10–120 to a directory.
    fn spread(
        &mut self,
        parent: &str,
        sub: &str,
        style: Style,
        n: usize,
        kinds: &[Kind],
    ) -> io::Result<()> {
        let base = format!("{parent}/{sub}");
        let most = if kinds == [Kind::I18n] {
            VOCAB.langs.len()
        } else {
            120
        };
        let mut left = n;
        while left > 0 {
            let dir = self.fresh_dir(&base, style);
            let count = self.rng.range(10, most).min(left);
            self.fill(&dir, count, kinds)?;
            left -= count;
        }
        Ok(())
    }

    fn fresh_dir(&mut self, base: &str, style: Style) -> String {
        let rng = &mut self.rng;
        let mut attempt = 0;
        loop {
            let depth = match style {
                Style::Camel => rng.range(usize::from(attempt >= 8), 3),
                Style::Lower => rng.range(1, 2),
                Style::Module => 1,
            };
            let mut dir = base.to_owned();
            for _ in 0..depth {
                dir.push('/');
                match style {
                    Style::Camel => camel(&mut dir, rng.word()),
                    Style::Lower => dir.push_str(rng.word()),
                    Style::Module => {
                        let ext = base.contains("extensions/") || base.contains("skins/");
                        let prefix = if ext { "ext" } else { "mediawiki" };
                        let _ = write!(dir, "{prefix}.{}.{}", rng.word(), rng.word());
                    }
                }
            }
            if attempt >= 8 {
                let _ = write!(dir, "{attempt}");
            }
            if self.used_dirs.insert(dir.clone()) {
                return dir;
            }
            attempt += 1;
        }
    }

    /// The l10n cache, `.git`, the branch's top files, wmf-config, dblists, docroot, portals.
    fn fixed(&mut self, b: &str, spec: &Spec) -> io::Result<()> {
        let langs = &VOCAB.langs;
        for i in 0..spec.large_files {
            let (lang, round) = (langs[i % langs.len()], i / langs.len());
            let suffix = if round == 0 {
                String::new()
            } else {
                format!("-{round}")
            };
            let rel = format!("{b}/cache/l10n/l10n_cache-{lang}{suffix}.cdb");
            self.put_bin(&rel, |rng, bin| cdb(rng, bin, lang, spec.large_file_size))?;
        }
        self.mkdirs(Path::new(&format!("{b}/cache/tmp")))?;
        self.mkdirs(Path::new(&format!("{b}/images")))?;
        for (name, template) in [
            ("HEAD", "ref: refs/heads/wmf/1.46.0-wmf.1\n"),
            ("description", "Unnamed repository.\n"),
            ("refs/heads/wmf/1.46.0-wmf.1", "%h\n"),
            (
                "packed-refs",
                "# pack-refs with: peeled\n%h refs/tags/1.45.0\n%h refs/tags/1.45.1\n",
            ),
            (
                "config",
                "[core]\n\tbare = false\n[remote \"origin\"]\n\
                 \turl = https://gerrit.wikimedia.org/r/mediawiki/core\n",
            ),
            (
                "logs/HEAD",
                "%h %h scap <scap@wikimedia.org> 1767225600 +0000\tcheckout: to wmf/1.46.0-wmf.1\n",
            ),
        ] {
            let rel = format!("{b}/.git/{name}");
            self.put_text(&rel, 0o644, &TEXT, |r| r.expand(template, 0))?;
        }
        let size = self.rng.range(4 << 10, 16 << 10);
        self.binary(&format!("{b}/.git/index"), b"DIRC\0\0\0\x02", size)?;
        let licence = self.licence.clone();
        self.put(&format!("{b}/COPYING"), licence.as_bytes(), 0o644)?;
        let docroot = format!("{STAGING}/docroot");
        for (rel, kind, size) in [
            (format!("{b}/index.php"), Kind::Php, 3 << 10),
            (format!("{b}/api.php"), Kind::Php, 2 << 10),
            (format!("{b}/load.php"), Kind::Php, 2 << 10),
            (format!("{b}/composer.json"), Kind::Json, 3 << 10),
            (format!("{b}/README.md"), Kind::Text, 2 << 10),
            (format!("{b}/RELEASE-NOTES-1.46"), Kind::Text, 24 << 10),
            (
                format!("{b}/resources/lib/jquery.i18n/Übersetzung.txt"),
                Kind::Text,
                2 << 10,
            ),
            (
                format!("{docroot}/wikipedia.org/robots.txt"),
                Kind::Text,
                3 << 10,
            ),
            (
                format!("{docroot}/wikimedia.org/index.html"),
                Kind::Html,
                6 << 10,
            ),
            (format!("{docroot}/noc/index.html"), Kind::Html, 4 << 10),
        ] {
            self.source(&rel, kind, size)?;
        }
        self.binary(
            &format!("{docroot}/bits/favicon/wikipedia.ico"),
            b"\0\0\x01\0",
            2 << 10,
        )?;
        for name in &VOCAB.wmf_config {
            let size = text_size(&mut self.rng);
            self.source(&format!("{STAGING}/wmf-config/{name}"), Kind::Php, size)?;
        }
        for name in &VOCAB.dblists {
            let mut list = format!("# Automatically generated by scap: {name}.dblist\n");
            let percent = if *name == "all" {
                100
            } else {
                self.rng.range(3, 40)
            };
            for lang in langs.iter().filter(|l| **l != "qqq") {
                for project in &VOCAB.projects {
                    if self.rng.chance(percent) {
                        let _ = writeln!(list, "{}{project}", lang.replace('-', "_"));
                    }
                }
            }
            let rel = format!("{STAGING}/dblists/{name}.dblist");
            self.put(&rel, list.as_bytes(), 0o644)?;
        }
        for (target, rel) in [
            ("php-1.46.0-wmf.1", "w"),
            ("../../w", "docroot/wikipedia.org/w"),
            (
                "/srv/mediawiki/php-1.46.0-wmf.1/resources",
                "docroot/bits/static-current",
            ),
            (
                "/etc/mediawiki/private/PrivateSettings.php",
                "wmf-config/PrivateSettings.php",
            ),
        ] {
            self.link(target, &format!("{STAGING}/{rel}"))?;
        }
        // Portals: a page per project domain, then small images, styles and scripts.
        let n = (spec.files / 100).clamp(10, 300);
        let pages = (n / 4).min(VOCAB.domains.len());
        for domain in &VOCAB.domains[..pages] {
            let size = self.rng.range(4 << 10, 16 << 10);
            self.source(
                &format!("portals/prod/{domain}/index.html"),
                Kind::Html,
                size,
            )?;
        }
        let assets = "portals/prod/wikipedia.org/assets";
        for i in pages..n {
            let size = self.rng.range(512, 8 << 10);
            if i % 2 == 0 {
                let stem = format!("{}-{}", self.rng.word(), self.rng.word());
                let rel = self.unique(&format!("{assets}/img"), &stem, "png");
                self.binary(&rel, b"\x89PNG\r\n\x1a\n", size)?;
            } else {
                let (dir, kind) = if i % 3 == 0 {
                    ("css", Kind::Css)
                } else {
                    ("js", Kind::Js)
                };
                let rel = self.name(&format!("{assets}/{dir}"), kind, i);
                self.source(&rel, kind, size)?;
            }
        }
        Ok(())
    }

    fn includes(&mut self, b: &str, n: usize) -> io::Result<()> {
        let base = format!("{b}/includes");
        let per_preset = (n / 16).clamp(1, 15);
        let mut left = n;
        for preset in &VOCAB.presets {
            let dir = format!("{base}/{preset}");
            let count = per_preset.min(left);
            self.fill(&dir, count, &[Kind::Php])?;
            self.used_dirs.insert(dir);
            left -= count;
        }
        self.spread(b, "includes", Style::Camel, left, &[Kind::Php])
    }

    /// `n` files over extensions (or skins) of about `per` files each.
    fn components(
        &mut self,
        base: &str,
        names: &[&str],
        n: usize,
        per: usize,
        manifest: &str,
    ) -> io::Result<()> {
        let count = (n / per).max((n / 25).min(names.len()).min(8)).max(1);
        let mut all: Vec<String> = names.iter().take(count).map(|s| (*s).to_owned()).collect();
        while all.len() < count {
            let mut name = String::new();
            ident(&mut self.rng, &mut name, true);
            if !all.contains(&name) {
                all.push(name);
            }
        }
        let extension = manifest == "extension.json";
        for (i, name) in all.iter().enumerate() {
            let Some(mut left) = share(n, count, i).checked_sub(1) else {
                continue;
            };
            let dir = format!("{base}/{name}");
            let size = self.rng.range(1 << 10, 6 << 10);
            self.source(&format!("{dir}/{manifest}"), Kind::Json, size)?;
            if extension && i % 3 == 0 && left > 0 {
                let licence = self.licence.clone();
                self.put(&format!("{dir}/COPYING"), licence.as_bytes(), 0o644)?;
                left -= 1;
            }
            if extension && i < 3 && left > 0 {
                let gitdir = format!("gitdir: ../../.git/modules/extensions/{name}\n");
                self.put(&format!("{dir}/.git"), gitdir.as_bytes(), 0o644)?;
                left -= 1;
            }
            let i18n = (left / 4).min(VOCAB.langs.len());
            self.fill(&format!("{dir}/i18n"), i18n, &[Kind::I18n])?;
            let resources = (left - i18n) / 3;
            let kinds = [Kind::Js, Kind::Js, Kind::Css];
            self.spread(&dir, "resources", Style::Module, resources, &kinds)?;
            let code = left - i18n - resources;
            self.spread(&dir, "tests/phpunit", Style::Camel, code / 5, &[Kind::Php])?;
            self.spread(
                &dir,
                "includes",
                Style::Camel,
                code - code / 5,
                &[Kind::Php],
            )?;
        }
        Ok(())
    }

    fn vendor(&mut self, b: &str, n: usize) -> io::Result<()> {
        let Some(n) = n.checked_sub(1) else {
            return Ok(());
        };
        self.source(&format!("{b}/vendor/autoload.php"), Kind::Php, 2 << 10)?;
        let count = (n / 100).max(1);
        for i in 0..count {
            let Some(files) = share(n, count, i).checked_sub(1) else {
                continue;
            };
            let package = match VOCAB.vendors.get(i) {
                Some(name) => format!("{b}/vendor/{name}"),
                None => format!("{b}/vendor/wikimedia/{}-{i}", self.rng.word()),
            };
            self.source(&format!("{package}/composer.json"), Kind::Json, 2 << 10)?;
            self.spread(&package, "src", Style::Camel, files, &[Kind::Php])?;
        }
        Ok(())
    }

    fn languages(&mut self, b: &str, n: usize) -> io::Result<()> {
        let langs = &VOCAB.langs;
        let core = (n / 2).min(langs.len());
        self.fill(&format!("{b}/languages/i18n"), core, &[Kind::I18n])?;
        let messages = ((n - core) / 2).min(langs.len());
        for lang in &langs[..messages] {
            let mut rel = format!("{b}/languages/messages/Messages");
            camel(&mut rel, &lang.replace('-', "_"));
            rel.push_str(".php");
            let size = text_size(&mut self.rng);
            self.source(&rel, Kind::Php, size)?;
        }
        let rest = n - core - messages;
        self.spread(b, "languages/i18n", Style::Lower, rest, &[Kind::I18n])
    }

    fn maintenance(&mut self, b: &str, n: usize) -> io::Result<()> {
        let dir = format!("{b}/maintenance");
        let top = n.min(150);
        for i in 0..top {
            let mut stem = String::new();
            ident(&mut self.rng, &mut stem, false);
            let rel = self.unique(&dir, &stem, "php");
            let size = text_size(&mut self.rng);
            let mode = if i % 3 == 0 { 0o755 } else { 0o644 };
            self.put_text(&rel, mode, &PHP, |r| r.file(size))?;
        }
        self.spread(b, "maintenance", Style::Lower, n - top, &[Kind::Php])
    }
}

/// The `i`-th of `parts` near-equal shares of `total`.
fn share(total: usize, parts: usize, i: usize) -> usize {
    total / parts + usize::from(i < total % parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::hash::{DefaultHasher, Hash, Hasher};

    /// A scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let path =
                std::env::temp_dir().join(format!("scap-workload-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Every file and symlink: (is a symlink, mode, hash of the contents or target).
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, (bool, u32, u64)> {
        let mut paths = Vec::new();
        walk(root, root, &mut paths, true).expect("walk");
        let entry = |rel: PathBuf| {
            let path = root.join(&rel);
            let meta = fs::symlink_metadata(&path).expect("stat");
            let link = meta.file_type().is_symlink();
            let mut hasher = DefaultHasher::new();
            if link {
                fs::read_link(&path).expect("read_link").hash(&mut hasher);
            } else {
                fs::read(&path).expect("read").hash(&mut hasher);
            }
            (
                rel,
                (link, meta.permissions().mode() & 0o7777, hasher.finish()),
            )
        };
        paths.into_iter().map(entry).collect()
    }

    #[test]
    fn same_seed_same_tree_other_seed_other_tree() {
        let (a, b, c) = (
            Scratch::new("seed-a"),
            Scratch::new("seed-b"),
            Scratch::new("seed-c"),
        );
        let spec = Spec::small(300);
        let (one, two) = (
            generate(&a.0, &spec).expect("a"),
            generate(&b.0, &spec).expect("b"),
        );
        assert_eq!((one.files, one.bytes), (two.files, two.bytes));
        assert_eq!(snapshot(&a.0), snapshot(&b.0));
        generate(&c.0, &Spec { seed: 2, ..spec }).expect("c");
        let (one, other) = (snapshot(&a.0), snapshot(&c.0));
        let same = one
            .iter()
            .filter(|(path, entry)| other.get(*path) == Some(*entry))
            .count();
        assert!(
            same < one.len() / 5,
            "{same} of {} entries identical",
            one.len()
        );
    }

    #[test]
    fn small_tree_has_the_promised_shape() {
        let dir = Scratch::new("shape");
        let made = generate(&dir.0, &Spec::small(300)).expect("generate");
        assert!(
            generate(&dir.0, &Spec::small(300)).is_err(),
            "a non-empty root is refused"
        );
        let snap = snapshot(&dir.0);
        let files: Vec<_> = snap.iter().filter(|(_, (link, _, _))| !link).collect();
        assert_eq!(files.len() as u64, made.files);
        assert!(made.files.abs_diff(300) <= 6, "{} files", made.files);
        let bytes: u64 = files
            .iter()
            .map(|(p, _)| fs::metadata(dir.0.join(p)).expect("stat").len())
            .sum();
        assert_eq!(bytes, made.bytes);
        assert!(files.iter().any(|(_, (_, mode, _))| *mode == 0o755));
        assert!(
            files
                .iter()
                .all(|(_, (_, mode, _))| [0o644, 0o755].contains(mode))
        );
        let mut seen = BTreeMap::new();
        for (path, (_, _, hash)) in &files {
            if let Some(other) = seen.insert(*hash, *path) {
                assert!(
                    path.ends_with("COPYING") && other.ends_with("COPYING"),
                    "{path:?} = {other:?}"
                );
            }
        }
        let branch = made.staging.join(&made.branch);
        assert!(
            branch
                .join("resources/lib/jquery.i18n/Übersetzung.txt")
                .is_file()
        );
        assert!(branch.join("includes/libs/rdbms/database").is_dir());
        assert!(branch.join(".git/HEAD").is_file());
        assert_eq!(
            fs::read_dir(branch.join("cache/tmp"))
                .expect("cache/tmp")
                .count(),
            0
        );
        assert_eq!(
            fs::metadata(branch.join("cache/l10n/l10n_cache-en.cdb"))
                .expect("cdb")
                .len(),
            300 << 10
        );
        assert!(
            made.staging
                .join("docroot/wikipedia.org/w/index.php")
                .is_file()
        );
        let private = made.staging.join("wmf-config/PrivateSettings.php");
        assert!(fs::symlink_metadata(&private).is_ok() && !private.exists());
        assert!(made.portals.join("prod/wikipedia.org/index.html").is_file());
    }

    #[test]
    fn mutations_report_exactly_what_they_change() {
        let (a, b) = (Scratch::new("mutate-a"), Scratch::new("mutate-b"));
        generate(&a.0, &Spec::small(300)).expect("a");
        generate(&b.0, &Spec::small(300)).expect("b");
        let sequence = Mutation::ALL
            .into_iter()
            .chain([Mutation::Train, Mutation::Backport]);
        for (seed, mutation) in (0..).zip(sequence) {
            let before = snapshot(&a.0);
            let m = mutate(&a.0, mutation, seed).expect("mutate");
            let after = snapshot(&a.0);
            let mut expected = Mutated::default();
            for (path, entry) in &after {
                match before.get(path) {
                    None => expected.added.push(path.clone()),
                    Some(old) if old != entry => expected.changed.push(path.clone()),
                    Some(_) => {}
                }
            }
            expected.removed = before
                .keys()
                .filter(|p| !after.contains_key(*p))
                .cloned()
                .collect();
            assert_eq!(m, expected, "{mutation}");
            assert!(!m.changed.is_empty(), "{mutation} changed nothing");
            assert_eq!(
                mutate(&b.0, mutation, seed).expect("mutate b"),
                m,
                "{mutation} is deterministic"
            );
        }
        assert_eq!(
            fs::read_link(a.0.join(STAGING).join("w")).expect("w"),
            Path::new("php-1.46.0-wmf.3")
        );
        assert_eq!(snapshot(&a.0), snapshot(&b.0));
    }

    #[test]
    fn mutation_names_parse() {
        for mutation in Mutation::ALL {
            assert_eq!(mutation.to_string().parse::<Mutation>(), Ok(mutation));
        }
        assert_eq!("L10N".parse::<Mutation>(), Ok(Mutation::L10n));
        let err = "deploy".parse::<Mutation>().expect_err("unknown");
        assert!(err.contains("backport, train, l10n or config"), "{err}");
    }
}
