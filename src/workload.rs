//! Deterministic, seeded generator of a MediaWiki-like deploy staging tree.
//!
//! Tests, benchmarks and the demo use it to get a tree that looks and compresses like a real
//! MediaWiki deploy without shipping one. The same [`Spec`] (seed included) always gives a
//! byte-identical tree: names, contents, symlinks and modes. Randomness comes from a SplitMix64
//! written out below, so no dependency update can change a tree.
//!
//! ```text
//! root/
//! ├── mediawiki-staging/
//! │   ├── php-1.46.0-wmf.1/                  the train branch
//! │   │   ├── .git/                          a few small files, for `**/.git` excludes
//! │   │   ├── includes/                      core PHP up to four levels deep (libs/rdbms/database, ...)
//! │   │   ├── extensions/<Name>/             extension.json, includes/, i18n/*.json, resources/, tests/
//! │   │   ├── skins/<Name>/                  shaped like an extension, with skin.json
//! │   │   ├── resources/{lib,src}/           JS, CSS and LESS; resources/lib/jquery.i18n/Übersetzung.txt
//! │   │   ├── languages/{i18n,messages}/     i18n JSON and Messages*.php
//! │   │   ├── maintenance/                   every third top-level script is mode 0755
//! │   │   ├── vendor/<org>/<package>/        composer packages
//! │   │   ├── tests/{phpunit,qunit}/
//! │   │   ├── cache/l10n/l10n_cache-<lang>.cdb   the large files; they compress only partly
//! │   │   └── cache/tmp/, images/            empty directories
//! │   ├── w -> php-1.46.0-wmf.1
//! │   ├── wmf-config/                        PrivateSettings.php is a dangling absolute symlink
//! │   ├── dblists/*.dblist
//! │   └── docroot/                           wikipedia.org/w -> ../../w, bits/static-current -> /srv/...
//! └── portals/prod/<domain>/                 index.html and small assets
//! ```
//!
//! Text files are 1–30 KB (about 11.5 KB on average, headers included) of PHP, JS, JSON or CSS built from a fixed
//! vocabulary; each names its own path, so the only whole-file duplicates are the deliberate
//! `COPYING` files. No directory holds more than a few hundred entries, even at 263k files.
//! [`mutate`] then applies the change one kind of deploy makes to such a tree.

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
    /// Regular files in the whole tree, large files included (a few dozen are always made).
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
        Spec { files: 30_000, seed: 1, large_files: 8, large_file_size: 8 << 20 }
    }

    /// A small tree (a few hundred files, ~2 MB) for tests and the demo; `files` scales it.
    pub fn small(files: usize) -> Spec {
        Spec { files, seed: 1, large_files: 2, large_file_size: 300 << 10 }
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
    /// Name of the train branch, `php-1.46.0-wmf.1`.
    pub branch: String,
}

/// One kind of deploy's change to a tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Small edits to 1–3 PHP files of the newest branch.
    Backport,
    /// A new branch copied from the newest, ~2% of its files edited, up to 150 added, `w` repointed.
    Train,
    /// Regions of a few l10n cache files rewritten, and one of them grown in the middle.
    L10n,
    /// 1–2 wmf-config files edited and a wiki appended to one dblist.
    Config,
}

impl Mutation {
    /// Every mutation.
    pub const ALL: [Mutation; 4] = [Mutation::Backport, Mutation::Train, Mutation::L10n, Mutation::Config];

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
        Mutation::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown mutation {s:?}: expected one of backport, train, l10n, config"))
    }
}

/// What [`mutate`] did, as sorted paths relative to the root, compared with the tree before it.
///
/// `changed` existed before and differ now, `added` did not exist before, `removed` are gone.
/// Entries are regular files and symlinks, never directories. A train's new branch is all in
/// `added` (its edited files too) and `changed` is `mediawiki-staging/w`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mutated {
    /// Files and symlinks whose contents or targets differ.
    pub changed: Vec<PathBuf>,
    /// Files and symlinks that are new.
    pub added: Vec<PathBuf>,
    /// Files and symlinks that are gone (no mutation removes any yet).
    pub removed: Vec<PathBuf>,
}

/// Creates `root/mediawiki-staging` and `root/portals`. `root` must not exist or be empty.
pub fn generate(root: &Path, spec: &Spec) -> io::Result<Generated> {
    match fs::read_dir(root) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                let msg = format!("{}: not empty", root.display());
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, msg));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(root).map_err(at(root))?,
        Err(e) => return Err(at(root)(e)),
    }
    let branch = format!("{BRANCH_PREFIX}1");
    let b = format!("{STAGING}/{branch}");
    let mut t = Tree::new(root, spec.seed);
    // The fixed parts first; what is left of `spec.files` is the bulk of the branch.
    t.large(&b, spec.large_files, spec.large_file_size)?;
    t.fixed(&b)?;
    t.portals((spec.files / 100).clamp(10, 300))?;
    let bulk = spec.files.saturating_sub(t.files as usize);
    let mut parts = [28, 38, 11, 8, 9, 3, 2, 1].map(|percent| bulk * percent / 100);
    parts[1] += bulk - parts.iter().sum::<usize>();
    let [includes, extensions, vendor, resources, tests, languages, maintenance, skins] = parts;
    t.includes(&b, includes)?;
    t.components(&format!("{b}/extensions"), &VOCAB.extensions, extensions, 250, "extension.json")?;
    t.components(&format!("{b}/skins"), &VOCAB.skins, skins, 150, "skin.json")?;
    t.vendor(&b, vendor)?;
    let lib = resources * 3 / 10;
    t.spread(&format!("{b}/resources/lib"), Style::Lower, lib, &[Kind::Js, Kind::Js, Kind::Css])?;
    let src_kinds = [Kind::Js, Kind::Js, Kind::Css, Kind::Json];
    t.spread(&format!("{b}/resources/src"), Style::Module, resources - lib, &src_kinds)?;
    t.spread(&format!("{b}/tests/qunit"), Style::Lower, tests / 5, &[Kind::Js])?;
    t.spread(&format!("{b}/tests/phpunit"), Style::Camel, tests - tests / 5, &[Kind::Php])?;
    t.languages(&b, languages)?;
    t.maintenance(&b, maintenance)?;
    Ok(Generated {
        staging: root.join(STAGING),
        portals: root.join("portals"),
        files: t.files,
        bytes: t.bytes,
        branch,
    })
}

/// Applies one kind of deploy's change to a tree made by `generate`, deterministically from `seed`.
pub fn mutate(root: &Path, mutation: Mutation, seed: u64) -> io::Result<Mutated> {
    let newest = newest_branch(&root.join(STAGING))?;
    let branch = Path::new(STAGING).join(format!("{BRANCH_PREFIX}{newest}"));
    let mut rng = Rng(seed ^ (mutation as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    let mut m = Mutated::default();
    match mutation {
        Mutation::Backport => {
            let mut php = sources(root, &branch)?;
            php.retain(|p| Kind::of(p) == Some(Kind::Php));
            let count = rng.range(1, 3);
            for i in choose(&mut rng, php.len(), count) {
                edit(&root.join(&php[i]), &mut rng)?;
                m.changed.push(php[i].clone());
            }
        }
        Mutation::Train => train(root, &branch, newest, &mut rng, &mut m)?,
        Mutation::L10n => l10n(root, &branch, &mut rng, &mut m)?,
        Mutation::Config => config(root, &mut rng, &mut m)?,
    }
    m.changed.sort();
    m.added.sort();
    m.removed.sort();
    Ok(m)
}

fn train(root: &Path, old: &Path, newest: u32, rng: &mut Rng, m: &mut Mutated) -> io::Result<()> {
    let name = format!("{BRANCH_PREFIX}{}", newest + 1);
    let new = Path::new(STAGING).join(&name);
    copy_tree(&root.join(old), &root.join(&new))?;
    let files = sources(root, &new)?;
    for i in choose(rng, files.len(), (files.len() / 50).max(1)) {
        edit(&root.join(&files[i]), rng)?;
    }
    let adds = if files.is_empty() { 0 } else { (files.len() / 200).clamp(10, 150) };
    let mut text = String::new();
    for _ in 0..adds {
        let model = &files[rng.below(files.len())];
        let (Some(kind), Some(dir), Some(ext)) = (Kind::of(model), model.parent(), model.extension()) else {
            continue;
        };
        let rel = loop {
            let mut stem = String::new();
            ident(rng, &mut stem, true);
            stem.push_str(rng.pick(&VOCAB.suffixes));
            let rel = dir.join(stem).with_extension(ext);
            if fs::symlink_metadata(root.join(&rel)).is_err() {
                break rel;
            }
        };
        text.clear();
        let size = text_size(rng);
        kind.render(rng, &mut text, &rel.to_string_lossy(), size);
        write_file(&root.join(&rel), text.as_bytes(), 0o644)?;
    }
    walk(root, &root.join(&new), &mut m.added, true)?;
    // Repoint `w` the way scap does: a new link renamed over the old one.
    let staging = root.join(STAGING);
    let (tmp, w) = (staging.join(".w.workload-tmp"), staging.join("w"));
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
        let mut touched = false;
        for _ in 0..if data.is_empty() { 0 } else { rng.range(1, 3) } {
            let len = rng.range(4 << 10, 64 << 10).min(data.len() / 4).max(1);
            let start = data.len() / 4 + rng.below((data.len() * 3 / 4).saturating_sub(data.len() / 4 + len) + 1);
            cdb(rng, &mut patch, "en", len);
            let region = &mut data[start..start + len];
            if *region == patch[..] {
                patch[0] ^= 0xff;
            }
            region.copy_from_slice(&patch);
            touched = true;
        }
        if nth == 0 {
            // Grow one file in the middle, so that only content-defined chunking finds the rest.
            let len = rng.range(4 << 10, 64 << 10);
            cdb(rng, &mut patch, "en", len);
            let mid = data.len() / 2;
            data.splice(mid..mid, patch.iter().copied());
            touched = true;
        }
        if touched {
            fs::write(&path, &data).map_err(at(&path))?;
            m.changed.push(files[i].clone());
        }
    }
    Ok(())
}

fn config(root: &Path, rng: &mut Rng, m: &mut Mutated) -> io::Result<()> {
    let staging = Path::new(STAGING);
    let mut settings = Vec::new();
    walk(root, &root.join(staging).join("wmf-config"), &mut settings, false)?;
    settings.retain(|p| Kind::of(p) == Some(Kind::Php));
    let count = rng.range(1, 2);
    for i in choose(rng, settings.len(), count) {
        edit(&root.join(&settings[i]), rng)?;
        m.changed.push(settings[i].clone());
    }
    let mut lists = Vec::new();
    walk(root, &root.join(staging).join("dblists"), &mut lists, false)?;
    lists.retain(|p| p.extension() == Some(OsStr::new("dblist")));
    if !lists.is_empty() {
        let list = &lists[rng.below(lists.len())];
        let path = root.join(list);
        let line = format!("{}{}wiki\n", rng.word(), rng.range(2, 99_999));
        let mut file = fs::OpenOptions::new().append(true).open(&path).map_err(at(&path))?;
        file.write_all(line.as_bytes()).map_err(at(&path))?;
        m.changed.push(list.clone());
    }
    Ok(())
}

/// Replaces a few lines in the middle of a text file with new ones.
fn edit(path: &Path, rng: &mut Rng) -> io::Result<()> {
    let old = fs::read(path).map_err(at(path))?;
    let next_line = |from: usize| old[from..].iter().position(|&b| b == b'\n').map_or(old.len(), |p| from + p + 1);
    let start = next_line(old.len() / 2);
    let mut end = start;
    for _ in 0..rng.below(3) {
        end = next_line(end);
    }
    let mut patch = String::new();
    let kind = Kind::of(path).unwrap_or(Kind::Php);
    let task = rng.range(100_000, 420_000);
    for i in 0..rng.range(2, 6) {
        match kind {
            Kind::Json | Kind::I18n => {
                let _ = write!(patch, "\t\"{}-{}-t{task}-{i}\": \"", rng.word(), rng.word());
                sentence(rng, &mut patch);
                patch.push_str("\",\n");
            }
            Kind::Css => {
                let _ = writeln!(patch, ".mw-{}-{i} {{ color: #{:06x}; }} /* T{task} */", rng.word(), rng.below(1 << 24));
            }
            _ if i == 0 => {
                patch.push_str("\t\t// T");
                num(&mut patch, task);
                patch.push_str(": ");
                sentence(rng, &mut patch);
                patch.push('\n');
            }
            Kind::Js => js_stmt(rng, &mut patch, 2),
            _ => php_stmt(rng, &mut patch, 2),
        }
    }
    let mut new = [&old[..start], patch.as_bytes(), &old[end..]].concat();
    if new == old {
        new.push(b'\n');
    }
    fs::write(path, &new).map_err(at(path))
}

fn newest_branch(staging: &Path) -> io::Result<u32> {
    let mut newest = None;
    for entry in fs::read_dir(staging).map_err(at(staging))? {
        let name = entry.map_err(at(staging))?.file_name();
        let n = name.to_str().and_then(|s| s.strip_prefix(BRANCH_PREFIX)).and_then(|s| s.parse().ok());
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

/// Appends the files (and the symlinks, if `links`) below `dir` as paths relative to `root`, sorted.
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
    file.set_permissions(Permissions::from_mode(mode)).map_err(at(path))
}

/// Puts `path` in front of an error's message.
fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// `k` distinct indices below `n` (fewer if `n < k`).
fn choose(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..n).collect();
    let k = k.min(n);
    for i in 0..k {
        let j = i + rng.below(n - i);
        indices.swap(i, j);
    }
    indices.truncate(k);
    indices
}

/// SplitMix64: tiny, fast and fixed forever.
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
            "page title revision user parser cache options context request config service database row \
             query result status message language content handler factory store lookup manager hook runner \
             text html link target namespace id timestamp batch key value params module output skin logger \
             stats job queue lock file repo thumb media image section comment actor block permission \
             authority identity session token edit summary diff slot role model format serializer schema \
             table field index conds join limit offset order group prefix suffix domain wiki site interwiki \
             redirect category template tag flag state mode level count size length name path url host \
             server client response header body stream buffer entry item list map callback event listener \
             watch notification preference default locale fallback variant converter magic special action \
             route spec validator error warning debug trace profile metric timer clock replica primary \
             connection transaction ticket shard cluster pool backend frontend storage object blob chunk \
             hash digest signature version branch deploy canary rollout revert patch update insert delete \
             select upsert purge refresh render parse expand preprocess sanitize escape encode decode \
             normalize validate resolve fetch load save commit",
        ),
        prose: list("the of to a is for when this not be if and or with from that it on by as are will should can must only all any new no some"),
        suffixes: list("Handler Factory Service Store Lookup Manager Builder Formatter Provider Hooks Module Page Job Exception Utils Renderer Helper Query Updater Registry Validator Serializer"),
        types: list("string int bool array ?string ?int UserIdentity PageReference Title IDatabase LoggerInterface Config Status"),
        langs: list(
            "en qqq de fr es ja ru it zh pt pl nl sv ar fa uk he ko cs fi hu id tr vi ro no da ca el bg sr \
             sr-ec sr-el hr sl sk lt lv et hi bn ta te ml mr ur th ms tl eo eu gl is ga cy br oc lb als nds \
             be be-tarask mk sq hy ka az kk uz ky tg mn ne si km lo my am sw yo ig ha zu af pt-br zh-hans \
             zh-hant yue",
        ),
        extensions: list(
            "AbuseFilter CentralAuth CirrusSearch Cite CodeEditor ConfirmEdit Echo EventLogging FlaggedRevs \
             GlobalBlocking GrowthExperiments Kartographer Linter Math MobileFrontend OAuth ORES PageImages \
             ParserFunctions Popups ProofreadPage Scribunto SpamBlacklist SyntaxHighlight_GeSHi TemplateData \
             TimedMediaHandler TitleBlacklist Translate UniversalLanguageSelector UploadWizard VisualEditor \
             WikiEditor Wikibase WikimediaEvents WikimediaMessages Thanks TextExtracts DiscussionTools \
             Disambiguator Gadgets GeoData ImageMap InputBox Interwiki Babel CategoryTree CheckUser \
             Collection ContentTranslation CommonsMetadata Elastica EntitySchema IPInfo MassMessage \
             MultimediaViewer NavigationTiming PageTriage PdfHandler Poem QuickSurveys ReadingLists \
             RevisionSlider SecurePoll TemplateStyles TwoColConflict WikiLove",
        ),
        skins: list("Vector MinervaNeue Timeless MonoBook"),
        vendors: list(
            "wikimedia/at-ease wikimedia/cdb wikimedia/css-sanitizer wikimedia/parsoid wikimedia/remex-html \
             wikimedia/services wikimedia/less.php guzzlehttp/guzzle guzzlehttp/psr7 symfony/yaml \
             symfony/polyfill-php80 psr/log psr/container monolog/monolog pear/mail composer/semver \
             oojs/oojs-ui firebase/php-jwt pimple/pimple",
        ),
        presets: list("libs/rdbms/database libs/rdbms/loadbalancer libs/rdbms/lbfactory libs/objectcache/wancache Rest/Handler/Helper api/Query parser/Parsoid/Config specials/pagers"),
        domains: list("wikipedia.org wiktionary.org wikibooks.org wikinews.org wikiquote.org wikisource.org wikiversity.org wikivoyage.org wikidata.org wikimedia.org mediawiki.org wikispecies.org"),
        projects: list("wiki wiktionary wikibooks wikinews wikiquote wikisource wikiversity wikivoyage"),
        wmf_config: list("InitialiseSettings.php CommonSettings.php ProductionServices.php LabsServices.php db-production.php db-labs.php logging.php filebackend.php jobqueue.php mc.php interwiki.php FeaturedFeedsWMF.php"),
        dblists: list("all closed private fishbowl special wikipedia wiktionary wikisource group0 group1 group2 large medium small s1 s2"),
    }
});

/// Size of a generated text file: 1–28 KB, about 11 KB on average.
fn text_size(rng: &mut Rng) -> usize {
    let tail = if rng.chance(5) { rng.below(8 << 10) } else { 0 };
    1024 + rng.below(9_728) + rng.below(9_728) + tail
}

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
    /// The kind of an existing source file, by extension.
    fn of(path: &Path) -> Option<Kind> {
        match path.extension()?.to_str()? {
            "php" => Some(Kind::Php),
            "js" => Some(Kind::Js),
            "css" | "less" => Some(Kind::Css),
            "json" => Some(Kind::Json),
            _ => None,
        }
    }

    /// Appends a file of this kind, about `size` bytes long, naming `rel` in it.
    fn render(self, rng: &mut Rng, out: &mut String, rel: &str, size: usize) {
        let size = out.len() + size;
        match self {
            Kind::Php => {
                out.push_str("<?php\n/**\n * ");
                sentence(rng, out);
                let _ = write!(out, "\n *\n * @file {rel}\n * @license GPL-2.0-or-later\n */\n\nnamespace MediaWiki");
                for _ in 0..rng.range(1, 3) {
                    out.push('\\');
                    ident(rng, out, true);
                }
                out.push_str(";\n\n");
                for _ in 0..rng.range(2, 8) {
                    out.push_str("use MediaWiki\\");
                    ident(rng, out, true);
                    out.push('\\');
                    ident(rng, out, true);
                    out.push_str(";\n");
                }
                out.push_str("\nclass ");
                ident(rng, out, true);
                out.push_str(" extends ");
                ident(rng, out, true);
                out.push_str(" {\n");
                while out.len() < size {
                    out.push_str("\n\t/**\n\t * ");
                    sentence(rng, out);
                    let mut signature = String::new();
                    for i in 0..rng.range(0, 3) {
                        let ty = rng.pick(&VOCAB.types);
                        let _ = write!(out, "\n\t * @param {ty} $");
                        let name = out.len();
                        ident(rng, out, false);
                        let _ = write!(signature, "{}{ty} ${}", if i > 0 { ", " } else { "" }, &out[name..]);
                    }
                    out.push_str("\n\t */\n\tpublic function ");
                    ident(rng, out, false);
                    let _ = writeln!(out, "( {signature} ) {{");
                    for _ in 0..rng.range(2, 10) {
                        php_stmt(rng, out, 2);
                    }
                    out.push_str("\t}\n");
                }
                out.push_str("}\n");
            }
            Kind::Js => {
                let _ = write!(out, "/*!\n * {rel}\n * ");
                sentence(rng, out);
                out.push_str("\n */\n( function () {\n\t'use strict';\n\n");
                for _ in 0..rng.range(1, 4) {
                    out.push_str("\tvar ");
                    ident(rng, out, false);
                    let _ = writeln!(out, " = require( './{}.{}.js' );", rng.word(), rng.word());
                }
                while out.len() < size {
                    out.push_str("\n\t/**\n\t * ");
                    sentence(rng, out);
                    out.push_str("\n\t */\n\tfunction ");
                    ident(rng, out, false);
                    let _ = writeln!(out, "( {}, {} ) {{", rng.word(), rng.word());
                    for _ in 0..rng.range(2, 10) {
                        js_stmt(rng, out, 2);
                    }
                    out.push_str("\t}\n");
                }
                out.push_str("\n\tmodule.exports = {};\n}() );\n");
            }
            Kind::Css => {
                let _ = write!(out, "/**\n * {rel}\n */\n@import 'mediawiki.skin.variables.less';\n");
                while out.len() < size {
                    let _ = write!(out, "\n.mw-{}-{}", rng.word(), rng.word());
                    if rng.chance(40) {
                        let _ = write!(out, " .{}-{}", rng.word(), rng.word());
                    }
                    out.push_str(" {\n");
                    for _ in 0..rng.range(2, 7) {
                        let prop = ["color", "margin", "padding", "border", "font-size", "width", "z-index"][rng.below(7)];
                        let _ = match rng.below(4) {
                            0 => writeln!(out, "\t{prop}: #{:06x};", rng.below(1 << 24)),
                            1 => writeln!(out, "\t{prop}: {}px;", rng.below(400)),
                            2 => writeln!(out, "\t{prop}: 0 {}.{}em;", rng.below(4), rng.below(10)),
                            _ => writeln!(out, "\t{prop}: @{}-{};", rng.word(), rng.word()),
                        };
                    }
                    out.push_str("}\n");
                }
            }
            Kind::Json => {
                let name = rel.rsplit('/').nth(1).unwrap_or(rel);
                let _ = write!(
                    out,
                    "{{\n\t\"name\": \"{name}\",\n\t\"version\": \"{}.{}.{}\",\n\t\"url\": \"https://gerrit.wikimedia.org/g/{rel}\",\n\t\"description\": \"",
                    rng.below(5),
                    rng.below(40),
                    rng.below(20)
                );
                sentence(rng, out);
                out.push_str("\",\n\t\"license-name\": \"GPL-2.0-or-later\",\n\t\"config\": {");
                let mut first = true;
                while out.len() < size {
                    out.push_str(if first { "\n\t\t\"wg" } else { ",\n\t\t\"wg" });
                    first = false;
                    ident(rng, out, true);
                    let _ = write!(out, "\": {{\n\t\t\t\"value\": {},\n\t\t\t\"description\": \"", rng.below(10_000));
                    sentence(rng, out);
                    out.push_str("\"\n\t\t}");
                }
                out.push_str("\n\t}\n}\n");
            }
            Kind::I18n => {
                out.push_str("{\n\t\"@metadata\": {\n\t\t\"authors\": [");
                for i in 0..rng.range(1, 5) {
                    out.push_str(if i > 0 { ", \"" } else { " \"" });
                    camel(out, rng.word());
                    num(out, rng.below(2000));
                    out.push('"');
                }
                let _ = write!(out, " ],\n\t\t\"source\": \"{rel}\"\n\t}}");
                let prefix = rng.word();
                while out.len() < size {
                    let _ = write!(out, ",\n\t\"{prefix}-{}-{}\": \"", rng.word(), rng.word());
                    sentence(rng, out);
                    out.push_str(if rng.chance(20) { " $1\"" } else { "\"" });
                }
                out.push_str("\n}\n");
            }
            Kind::Text => {
                let _ = write!(out, "= {rel} =\n\n");
                while out.len() < size {
                    match rng.below(4) {
                        0 => {
                            out.push_str("== ");
                            camel(out, rng.word());
                            out.push_str(" ==\n");
                        }
                        1 => {
                            out.push_str("* ");
                            sentence(rng, out);
                            let _ = writeln!(out, " (T{})", rng.range(1000, 420_000));
                        }
                        _ => {
                            for _ in 0..rng.range(2, 5) {
                                sentence(rng, out);
                                out.push(' ');
                            }
                            out.push_str("\n\n");
                        }
                    }
                }
            }
            Kind::Html => {
                let _ = write!(
                    out,
                    "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{rel}</title>\n</head>\n<body>\n"
                );
                while out.len() < size {
                    let lang = rng.pick(&VOCAB.langs);
                    let _ = write!(out, "<div class=\"central-featured-lang lang{}\" lang=\"{lang}\">", rng.below(10));
                    let _ = write!(out, "<a href=\"//{lang}.wikipedia.org/\" title=\"");
                    sentence(rng, out);
                    out.push_str("\"><strong>");
                    camel(out, rng.word());
                    let _ = writeln!(out, "</strong><small>{} articles</small></a></div>", rng.below(7_000_000));
                }
                out.push_str("</body>\n</html>\n");
            }
        }
    }
}

fn php_stmt(rng: &mut Rng, out: &mut String, depth: usize) {
    out.extend(std::iter::repeat_n('\t', depth));
    let var = |rng: &mut Rng, out: &mut String| {
        out.push('$');
        ident(rng, out, false);
    };
    match rng.below(if depth < 4 { 10 } else { 7 }) {
        0 => {
            var(rng, out);
            out.push_str(" = $this->");
            ident(rng, out, false);
            out.push_str("->");
            ident(rng, out, false);
            out.push_str("( ");
            var(rng, out);
            let _ = writeln!(out, ", '{}-{}' );", rng.word(), rng.word());
        }
        1 => {
            var(rng, out);
            let _ = write!(out, " = [ '{}' => ", rng.word());
            var(rng, out);
            let _ = writeln!(out, ", '{}' => {} ];", rng.word(), rng.below(100_000));
        }
        2 => {
            out.push_str("// ");
            sentence(rng, out);
            out.push('\n');
        }
        3 => {
            out.push_str("$this->");
            ident(rng, out, false);
            out.push_str("[] = new ");
            ident(rng, out, true);
            out.push_str("( ");
            var(rng, out);
            out.push_str(" );\n");
        }
        4 => {
            out.push_str("return $this->");
            ident(rng, out, false);
            out.push_str("( ");
            var(rng, out);
            out.push_str(" );\n");
        }
        5 => {
            let _ = write!(out, "wfDebugLog( '{}', __METHOD__ . \": ", rng.word());
            sentence(rng, out);
            out.push_str("\" );\n");
        }
        6 => {
            var(rng, out);
            out.push_str(" = ");
            var(rng, out);
            out.push_str(" ?? self::");
            out.extend(rng.word().chars().map(|c| c.to_ascii_uppercase()));
            out.push('_');
            out.extend(rng.word().chars().map(|c| c.to_ascii_uppercase()));
            out.push_str(";\n");
        }
        7 => {
            out.push_str("if ( ");
            var(rng, out);
            out.push_str(" === null ) {\n");
            php_block(rng, out, depth);
        }
        8 => {
            out.push_str("foreach ( ");
            var(rng, out);
            out.push_str(" as ");
            var(rng, out);
            out.push_str(" ) {\n");
            php_block(rng, out, depth);
        }
        _ => {
            let tabs = "\t".repeat(depth + 1);
            let (a, b, c) = (rng.word(), rng.word(), rng.word());
            let _ = write!(out, "$res = $dbr->newSelectQueryBuilder()\n{tabs}->select( [ '{a}_{b}', '{a}_{c}' ] )\n");
            let _ = write!(out, "{tabs}->from( '{a}' )\n{tabs}->where( [ '{a}_{}' => ", rng.word());
            var(rng, out);
            let _ = write!(out, " ] )\n{tabs}->caller( __METHOD__ )->fetchResultSet();\n");
        }
    }
}

/// 1–3 statements one level deeper than `depth`, and the closing brace.
fn php_block(rng: &mut Rng, out: &mut String, depth: usize) {
    for _ in 0..rng.range(1, 3) {
        php_stmt(rng, out, depth + 1);
    }
    out.extend(std::iter::repeat_n('\t', depth));
    out.push_str("}\n");
}

fn js_stmt(rng: &mut Rng, out: &mut String, depth: usize) {
    out.extend(std::iter::repeat_n('\t', depth));
    match rng.below(if depth < 4 { 8 } else { 6 }) {
        0 => {
            out.push_str("var ");
            ident(rng, out, false);
            let _ = writeln!(out, " = {}.{}( {}, '{}' );", rng.word(), rng.word(), rng.word(), rng.word());
        }
        1 => {
            out.push_str("// ");
            sentence(rng, out);
            out.push('\n');
        }
        2 => {
            let _ = writeln!(out, "mw.hook( '{}.{}' ).fire( {} );", rng.word(), rng.word(), rng.word());
        }
        3 => {
            ident(rng, out, false);
            out.push_str(" = mw.config.get( 'wg");
            ident(rng, out, true);
            out.push_str("' );\n");
        }
        4 => {
            out.push_str("mw.log.warn( '");
            sentence(rng, out);
            out.push_str("' );\n");
        }
        5 => {
            let _ = writeln!(out, "return {}.{}( {} );", rng.word(), rng.word(), rng.below(1000));
        }
        _ => {
            let _ = writeln!(out, "$( '.mw-{}-{}' ).on( 'click', function () {{", rng.word(), rng.word());
            for _ in 0..rng.range(1, 3) {
                js_stmt(rng, out, depth + 1);
            }
            out.extend(std::iter::repeat_n('\t', depth));
            out.push_str("} );\n");
        }
    }
}

fn camel(out: &mut String, word: &str) {
    let mut chars = word.chars();
    if let Some(first) = chars.next() {
        out.push(first.to_ascii_uppercase());
        out.push_str(chars.as_str());
    }
}

/// A camelCase identifier of 1–3 vocabulary words.
fn ident(rng: &mut Rng, out: &mut String, upper: bool) {
    for i in 0..rng.range(1, 3) {
        let word = rng.word();
        if i == 0 && !upper { out.push_str(word) } else { camel(out, word) }
    }
}

fn sentence(rng: &mut Rng, out: &mut String) {
    for i in 0..rng.range(4, 14) {
        let word = if rng.chance(40) { rng.pick(&VOCAB.prose) } else { rng.word() };
        if i == 0 {
            camel(out, word);
        } else {
            out.push(' ');
            out.push_str(word);
        }
    }
    out.push('.');
}

fn num(out: &mut String, n: usize) {
    let _ = write!(out, "{n}");
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
    /// `mediawiki.foo.bar` (or `ext.foo.bar` in extensions and skins), one level.
    Module,
}

/// The tree being generated, with the reusable buffers and the counts so far.
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
        Kind::Text.render(&mut Rng(0x4750_4C32), &mut licence, "COPYING", 17 << 10);
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

    fn source(&mut self, rel: &str, kind: Kind, size: usize, mode: u32) -> io::Result<()> {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        kind.render(&mut self.rng, &mut text, rel, size);
        let result = self.put(rel, text.as_bytes(), mode);
        self.text = text;
        result
    }

    fn binary(&mut self, rel: &str, magic: &[u8], size: usize) -> io::Result<()> {
        let mut bin = std::mem::take(&mut self.bin);
        bin.clear();
        bin.extend_from_slice(magic);
        while bin.len() < size {
            bin.extend_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        bin.truncate(size.max(magic.len()));
        let result = self.put(rel, &bin, 0o644);
        self.bin = bin;
        result
    }

    fn link(&mut self, target: &str, rel: &str) -> io::Result<()> {
        if let Some(parent) = Path::new(rel).parent() {
            self.mkdirs(parent)?;
        }
        let path = self.root.join(rel);
        symlink(target, &path).map_err(at(&path))
    }

    /// `dir/stem.ext`, or `dir/stemN.ext` if that is taken.
    fn unique(&self, dir: &str, stem: &str, ext: &str) -> String {
        let mut rel = format!("{dir}/{stem}.{ext}");
        let mut n = 2;
        while self.taken.contains(&rel) {
            rel = format!("{dir}/{stem}{n}.{ext}");
            n += 1;
        }
        rel
    }

    /// A new file name in `dir` for the `i`-th file of `kind` there.
    fn name(&mut self, dir: &str, kind: Kind, i: usize) -> String {
        let rng = &mut self.rng;
        let mut stem = String::new();
        let ext = match kind {
            Kind::Php => {
                ident(rng, &mut stem, true);
                stem.push_str(if dir.contains("tests/") { "Test" } else { rng.pick(&VOCAB.suffixes) });
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
            self.source(&rel, kind, size, 0o644)?;
        }
        Ok(())
    }

    /// Spreads `n` text files over new directories below `base`, 10–120 to a directory.
    fn spread(&mut self, base: &str, style: Style, n: usize, kinds: &[Kind]) -> io::Result<()> {
        let most = if kinds == [Kind::I18n] { VOCAB.langs.len() } else { 120 };
        let mut left = n;
        while left > 0 {
            let dir = self.fresh_dir(base, style);
            let count = self.rng.range(10, most).min(left);
            self.fill(&dir, count, kinds)?;
            left -= count;
        }
        Ok(())
    }

    fn fresh_dir(&mut self, base: &str, style: Style) -> String {
        let rng = &mut self.rng;
        for attempt in 0usize.. {
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
                        let _ = write!(dir, "{}.{}.{}", if ext { "ext" } else { "mediawiki" }, rng.word(), rng.word());
                    }
                }
            }
            if attempt >= 8 {
                num(&mut dir, attempt);
            }
            if self.used_dirs.insert(dir.clone()) {
                return dir;
            }
        }
        unreachable!("an unbounded range ends")
    }

    fn large(&mut self, b: &str, count: usize, size: usize) -> io::Result<()> {
        let langs = &VOCAB.langs;
        for i in 0..count {
            let lang = langs[i % langs.len()];
            let rel = match i / langs.len() {
                0 => format!("{b}/cache/l10n/l10n_cache-{lang}.cdb"),
                n => format!("{b}/cache/l10n/l10n_cache-{lang}-{n}.cdb"),
            };
            let mut bin = std::mem::take(&mut self.bin);
            cdb(&mut self.rng, &mut bin, lang, size);
            let result = self.put(&rel, &bin, 0o644);
            self.bin = bin;
            result?;
        }
        self.mkdirs(Path::new(&format!("{b}/cache/tmp")))?;
        self.mkdirs(Path::new(&format!("{b}/images")))
    }

    /// `.git`, the branch's top-level files, wmf-config, dblists, docroot and the symlinks.
    fn fixed(&mut self, b: &str) -> io::Result<()> {
        let head = "wmf/1.46.0-wmf.1";
        let mut sha = || format!("{:016x}{:016x}{:08x}", self.rng.next_u64(), self.rng.next_u64(), self.rng.next_u64() >> 32);
        let (tip, base) = (sha(), sha());
        let mut packed = String::from("# pack-refs with: peeled fully-peeled sorted\n");
        for i in 0..40 {
            let _ = writeln!(packed, "{} refs/tags/1.{}.{i}", sha(), 20 + i / 4);
        }
        let git = format!("{b}/.git");
        self.put(&format!("{git}/HEAD"), format!("ref: refs/heads/{head}\n").as_bytes(), 0o644)?;
        let config = format!(
            "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n[remote \"origin\"]\n\turl = https://gerrit.wikimedia.org/r/mediawiki/core\n[branch \"{head}\"]\n\tremote = origin\n"
        );
        self.put(&format!("{git}/config"), config.as_bytes(), 0o644)?;
        self.put(&format!("{git}/description"), b"Unnamed repository.\n", 0o644)?;
        self.put(&format!("{git}/packed-refs"), packed.as_bytes(), 0o644)?;
        self.put(&format!("{git}/refs/heads/{head}"), format!("{tip}\n").as_bytes(), 0o644)?;
        let log = format!("{base} {tip} scap <scap@wikimedia.org> 1767225600 +0000\tcheckout: moving to {head}\n");
        self.put(&format!("{git}/logs/HEAD"), log.as_bytes(), 0o644)?;
        let size = self.rng.range(4 << 10, 16 << 10);
        self.binary(&format!("{git}/index"), b"DIRC\0\0\0\x02", size)?;

        for name in ["index.php", "api.php", "load.php", "rest.php", "thumb.php"] {
            let size = self.rng.range(1 << 10, 4 << 10);
            self.source(&format!("{b}/{name}"), Kind::Php, size, 0o644)?;
        }
        self.source(&format!("{b}/composer.json"), Kind::Json, 3 << 10, 0o644)?;
        self.source(&format!("{b}/README.md"), Kind::Text, 2 << 10, 0o644)?;
        self.source(&format!("{b}/RELEASE-NOTES-1.46"), Kind::Text, 24 << 10, 0o644)?;
        self.source(&format!("{b}/resources/lib/jquery.i18n/Übersetzung.txt"), Kind::Text, 2 << 10, 0o644)?;
        let licence = self.licence.clone();
        self.put(&format!("{b}/COPYING"), licence.as_bytes(), 0o644)?;

        for name in VOCAB.wmf_config.iter() {
            let size = text_size(&mut self.rng);
            self.source(&format!("{STAGING}/wmf-config/{name}"), Kind::Php, size, 0o644)?;
        }
        let private = format!("{STAGING}/wmf-config/PrivateSettings.php");
        self.link("/etc/mediawiki/private/PrivateSettings.php", &private)?;
        for name in VOCAB.dblists.iter() {
            let mut list = format!("# Automatically generated by scap: {name}.dblist\n");
            let percent = if *name == "all" { 100 } else { self.rng.range(3, 40) };
            for lang in VOCAB.langs.iter().filter(|l| **l != "qqq") {
                for project in VOCAB.projects.iter() {
                    if self.rng.chance(percent) {
                        let _ = writeln!(list, "{}{project}", lang.replace('-', "_"));
                    }
                }
            }
            self.put(&format!("{STAGING}/dblists/{name}.dblist"), list.as_bytes(), 0o644)?;
        }
        let docroot = format!("{STAGING}/docroot");
        self.source(&format!("{docroot}/wikipedia.org/robots.txt"), Kind::Text, 3 << 10, 0o644)?;
        self.source(&format!("{docroot}/wikimedia.org/index.html"), Kind::Html, 6 << 10, 0o644)?;
        self.source(&format!("{docroot}/noc/index.html"), Kind::Html, 4 << 10, 0o644)?;
        self.binary(&format!("{docroot}/bits/favicon/wikipedia.ico"), b"\0\0\x01\0", 2 << 10)?;
        self.link("php-1.46.0-wmf.1", &format!("{STAGING}/w"))?;
        self.link("../../w", &format!("{docroot}/wikipedia.org/w"))?;
        self.link("/srv/mediawiki/php-1.46.0-wmf.1/resources", &format!("{docroot}/bits/static-current"))
    }

    fn portals(&mut self, n: usize) -> io::Result<()> {
        let domains = &VOCAB.domains;
        let pages = (n / 4).clamp(1, domains.len()).min(n);
        for domain in &domains[..pages] {
            let size = self.rng.range(4 << 10, 16 << 10);
            self.source(&format!("portals/prod/{domain}/index.html"), Kind::Html, size, 0o644)?;
        }
        let assets = "portals/prod/wikipedia.org/assets";
        let rest = n - pages;
        for i in 0..rest {
            let size = self.rng.range(512, 8 << 10);
            if i < rest / 2 {
                let stem = format!("{}-{}", self.rng.word(), self.rng.word());
                let rel = self.unique(&format!("{assets}/img"), &stem, "png");
                self.binary(&rel, b"\x89PNG\r\n\x1a\n", size)?;
            } else {
                let (dir, kind) = if i % 3 == 0 { ("css", Kind::Css) } else { ("js", Kind::Js) };
                let rel = self.name(&format!("{assets}/{dir}"), kind, i);
                self.source(&rel, kind, size, 0o644)?;
            }
        }
        Ok(())
    }

    fn includes(&mut self, b: &str, n: usize) -> io::Result<()> {
        let base = format!("{b}/includes");
        let per_preset = (n / 16).clamp(1, 15);
        let mut left = n;
        for preset in VOCAB.presets.iter() {
            let dir = format!("{base}/{preset}");
            let count = per_preset.min(left);
            self.fill(&dir, count, &[Kind::Php])?;
            self.used_dirs.insert(dir);
            left -= count;
        }
        self.spread(&base, Style::Camel, left, &[Kind::Php])
    }

    /// `n` files over extensions (or skins), about `per` files to each.
    fn components(&mut self, base: &str, names: &[&str], n: usize, per: usize, manifest: &str) -> io::Result<()> {
        let count = (n / per).max((n / 25).min(names.len()).min(8)).max(1);
        let mut all: Vec<String> = names.iter().take(count).map(|s| (*s).to_owned()).collect();
        while all.len() < count {
            let mut name = String::new();
            camel(&mut name, self.rng.word());
            camel(&mut name, self.rng.word());
            if !all.contains(&name) {
                all.push(name);
            }
        }
        for (i, name) in all.iter().enumerate() {
            let dir = format!("{base}/{name}");
            let mut left = share(n, count, i);
            if left == 0 {
                continue;
            }
            let size = self.rng.range(1 << 10, 6 << 10);
            self.source(&format!("{dir}/{manifest}"), Kind::Json, size, 0o644)?;
            left -= 1;
            if manifest == "extension.json" && i % 3 == 0 && left > 0 {
                let licence = self.licence.clone();
                self.put(&format!("{dir}/COPYING"), licence.as_bytes(), 0o644)?;
                left -= 1;
            }
            if manifest == "extension.json" && i < 3 && left > 0 {
                let gitdir = format!("gitdir: ../../.git/modules/extensions/{name}\n");
                self.put(&format!("{dir}/.git"), gitdir.as_bytes(), 0o644)?;
                left -= 1;
            }
            let i18n = (left / 4).min(VOCAB.langs.len());
            self.fill(&format!("{dir}/i18n"), i18n, &[Kind::I18n])?;
            left -= i18n;
            let resources = left / 3;
            self.spread(&format!("{dir}/resources"), Style::Module, resources, &[Kind::Js, Kind::Js, Kind::Css])?;
            left -= resources;
            self.spread(&format!("{dir}/tests/phpunit"), Style::Camel, left / 5, &[Kind::Php])?;
            self.spread(&format!("{dir}/includes"), Style::Camel, left - left / 5, &[Kind::Php])?;
        }
        Ok(())
    }

    fn vendor(&mut self, b: &str, n: usize) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let size = text_size(&mut self.rng);
        self.source(&format!("{b}/vendor/autoload.php"), Kind::Php, size, 0o644)?;
        let n = n - 1;
        let count = (n / 100).max(1);
        for i in 0..count {
            let package = match VOCAB.vendors.get(i) {
                Some(name) => (*name).to_owned(),
                None => format!("wikimedia/{}-{}{i}", self.rng.word(), self.rng.word()),
            };
            let files = share(n, count, i);
            if files > 0 {
                self.source(&format!("{b}/vendor/{package}/composer.json"), Kind::Json, 2 << 10, 0o644)?;
                self.spread(&format!("{b}/vendor/{package}/src"), Style::Camel, files - 1, &[Kind::Php])?;
            }
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
            self.source(&rel, Kind::Php, size, 0o644)?;
        }
        self.spread(&format!("{b}/languages/i18n"), Style::Lower, n - core - messages, &[Kind::I18n])
    }

    fn maintenance(&mut self, b: &str, n: usize) -> io::Result<()> {
        let dir = format!("{b}/maintenance");
        let top = n.min(150);
        for i in 0..top {
            let mut stem = String::new();
            ident(&mut self.rng, &mut stem, false);
            let rel = self.unique(&dir, &stem, "php");
            let size = text_size(&mut self.rng);
            self.source(&rel, Kind::Php, size, if i % 3 == 0 { 0o755 } else { 0o644 })?;
        }
        self.spread(&dir, Style::Lower, n - top, &[Kind::Php])
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
            let path = std::env::temp_dir().join(format!("scap-workload-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Every file and symlink: (is a symlink, mode, hash of the contents or the target).
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, (bool, u32, u64)> {
        let mut paths = Vec::new();
        walk(root, root, &mut paths, true).expect("walk");
        paths
            .into_iter()
            .map(|rel| {
                let path = root.join(&rel);
                let meta = fs::symlink_metadata(&path).expect("stat");
                let mut hasher = DefaultHasher::new();
                let link = meta.file_type().is_symlink();
                if link {
                    fs::read_link(&path).expect("read_link").hash(&mut hasher);
                } else {
                    fs::read(&path).expect("read").hash(&mut hasher);
                }
                (rel, (link, meta.permissions().mode() & 0o7777, hasher.finish()))
            })
            .collect()
    }

    #[test]
    fn same_seed_same_tree_and_other_seed_another() {
        let (a, b, c) = (Scratch::new("seed-a"), Scratch::new("seed-b"), Scratch::new("seed-c"));
        let spec = Spec::small(300);
        let (one, two) = (generate(&a.0, &spec).expect("a"), generate(&b.0, &spec).expect("b"));
        assert_eq!((one.files, one.bytes, one.branch), (two.files, two.bytes, two.branch));
        assert_eq!(snapshot(&a.0), snapshot(&b.0));
        generate(&c.0, &Spec { seed: 2, ..spec }).expect("c");
        let (one, two) = (snapshot(&a.0), snapshot(&c.0));
        let same = one.iter().filter(|(path, entry)| two.get(*path) == Some(*entry)).count();
        assert!(same < one.len() / 5, "{same} of {} entries identical", one.len());
    }

    #[test]
    fn small_tree_has_the_promised_shape() {
        let dir = Scratch::new("shape");
        let generated = generate(&dir.0, &Spec::small(300)).expect("generate");
        assert!(generate(&dir.0, &Spec::small(300)).is_err(), "a non-empty root is refused");
        let snap = snapshot(&dir.0);
        let files: Vec<_> = snap.iter().filter(|(_, (link, _, _))| !link).collect();
        assert_eq!(files.len() as u64, generated.files);
        assert!(generated.files.abs_diff(300) <= 6, "{} files", generated.files);
        let bytes: u64 = files.iter().map(|(p, _)| fs::metadata(dir.0.join(p)).expect("stat").len()).sum();
        assert_eq!(bytes, generated.bytes);
        assert!(files.iter().any(|(_, (_, mode, _))| *mode == 0o755));
        assert!(files.iter().all(|(_, (_, mode, _))| *mode == 0o755 || *mode == 0o644));
        let mut seen = BTreeMap::new();
        for (path, (_, _, hash)) in &files {
            if let Some(other) = seen.insert(*hash, *path) {
                assert!(path.ends_with("COPYING") && other.ends_with("COPYING"), "{path:?} = {other:?}");
            }
        }
        let b = generated.staging.join(&generated.branch);
        assert!(b.join("resources/lib/jquery.i18n/Übersetzung.txt").is_file());
        assert!(b.join("includes/libs/rdbms/database").is_dir());
        assert!(b.join(".git/HEAD").is_file());
        assert_eq!(fs::read_dir(b.join("cache/tmp")).expect("cache/tmp").count(), 0);
        assert_eq!(fs::metadata(b.join("cache/l10n/l10n_cache-en.cdb")).expect("cdb").len(), 300 << 10);
        assert!(generated.staging.join("docroot/wikipedia.org/w/index.php").is_file());
        assert!(fs::symlink_metadata(generated.staging.join("wmf-config/PrivateSettings.php")).is_ok());
        assert!(!generated.staging.join("wmf-config/PrivateSettings.php").exists());
        assert!(generated.portals.join("prod/wikipedia.org/index.html").is_file());
    }

    #[test]
    fn mutations_report_exactly_what_they_change() {
        let (a, b) = (Scratch::new("mutate-a"), Scratch::new("mutate-b"));
        generate(&a.0, &Spec::small(300)).expect("a");
        generate(&b.0, &Spec::small(300)).expect("b");
        for (i, mutation) in Mutation::ALL.into_iter().chain([Mutation::Train, Mutation::Backport]).enumerate() {
            let before = snapshot(&a.0);
            let m = mutate(&a.0, mutation, i as u64).expect("mutate");
            let after = snapshot(&a.0);
            let mut expected = Mutated::default();
            for (path, entry) in &after {
                match before.get(path) {
                    None => expected.added.push(path.clone()),
                    Some(old) if old != entry => expected.changed.push(path.clone()),
                    Some(_) => {}
                }
            }
            expected.removed = before.keys().filter(|p| !after.contains_key(*p)).cloned().collect();
            assert_eq!(m, expected, "{mutation}");
            assert!(!m.changed.is_empty(), "{mutation} changed nothing");
            assert_eq!(mutate(&b.0, mutation, i as u64).expect("mutate b"), m, "{mutation} is deterministic");
        }
        assert_eq!(fs::read_link(a.0.join(STAGING).join("w")).expect("w"), Path::new("php-1.46.0-wmf.3"));
        assert_eq!(snapshot(&a.0), snapshot(&b.0));
    }

    #[test]
    fn mutation_names_parse() {
        for mutation in Mutation::ALL {
            assert_eq!(mutation.to_string().parse::<Mutation>(), Ok(mutation));
        }
        assert_eq!("L10N".parse::<Mutation>(), Ok(Mutation::L10n));
        let err = "deploy".parse::<Mutation>().expect_err("unknown");
        assert!(err.contains("backport, train, l10n, config"), "{err}");
    }
}
