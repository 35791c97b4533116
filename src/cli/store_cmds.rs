//! Commands over the store: build-manifest, diff, ls, cat, log, resolve,
//! label, pin, verify, gc.

use std::io::{self, IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use super::ctx::{Ctx, DEFAULT_AGENT_DIR};
use super::fleet_args::{FleetArgs, fleet_state};
use super::output::{NotFound, exit, print_json, runtime};
use crate::config::components;
use crate::manifest::{BuildOptions, build};
use crate::store::diff::{Change, DiffStat, fetch_cost};
use crate::store::disk::VersionRecord;
use crate::store::{
    Content, Store, VersionId, diff as store_diff, gc as store_gc, verify as store_verify,
};
use crate::time::{fmt_bytes, fmt_utc};

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// A component to deploy, as NAME=PATH (repeatable), e.g. mediawiki=/srv/mediawiki-staging
    #[arg(long = "component", short = 'c', value_name = "NAME=PATH")]
    components: Vec<String>,
    /// Leave out paths matching this glob, relative to each component (repeatable), e.g. '**/.git'
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Label for the version, e.g. 1.46.0-wmf.6 (kept by gc; `scap resolve` finds it)
    #[arg(long)]
    label: Option<String>,
    /// Move --label to this version if it names another one
    #[arg(long, requires = "label")]
    move_label: bool,
    /// Why this version exists (e.g. the SAL message)
    #[arg(long, short = 'm')]
    message: Option<String>,
    /// Who built it [default: $SUDO_USER, else this process's user from the password database]
    #[arg(long)]
    author: Option<String>,
    /// The version this one derives from [default: the newest recorded version]
    #[arg(long)]
    parent: Option<String>,
    /// The deploy key that signs the version [default: scap.toml's sign_key]
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    /// Print a JSON report instead of text
    #[arg(long)]
    json: bool,
}

pub fn build_manifest(ctx: &Ctx, a: BuildArgs) -> anyhow::Result<i32> {
    let comps = components(&ctx.config, &a.components, &a.exclude)?;
    let store = ctx.open_for_build()?;
    let parent = a.parent.as_deref().map(|p| store.resolve(p)).transpose()?;
    let author = a.author.unwrap_or_else(crate::sys::user);
    let opts = BuildOptions {
        components: comps,
        label: a.label,
        move_label: a.move_label,
        message: a.message,
        author,
        parent,
        signer: ctx.signer(a.sign_key.as_deref())?,
    };
    let report = if a.json {
        build(&store, &opts, &crate::progress::Silent)?
    } else {
        build(&store, &opts, &super::bar::Bar::default())?
    };
    if a.json {
        print_json(&report)?;
        return Ok(exit::OK);
    }
    let mut out = io::stdout().lock();
    for c in &report.record.components {
        writeln!(
            out,
            "component {:<20} {} {:>7} files {:>10}",
            c.name,
            c.tree.short(),
            c.files,
            fmt_bytes(c.bytes)
        )?;
    }
    writeln!(
        out,
        "{} files, {}; read {} files ({}), stored {} new objects ({}) in {:.2}s{}",
        report.files,
        fmt_bytes(report.bytes),
        report.hashed_files,
        fmt_bytes(report.hashed_bytes),
        report.new_objects,
        fmt_bytes(report.new_object_bytes),
        report.seconds,
        if report.new_version {
            ""
        } else {
            "; this version was already in the store"
        }
    )?;
    writeln!(out, "{}", report.version)?;
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// Old version (label, ID or ID prefix)
    a: String,
    /// New version
    b: String,
    /// Print totals instead of the file list: files and bytes changed, bytes a host on A would fetch
    #[arg(long)]
    stat: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
    /// Exit with 1 when the versions differ (like git diff --exit-code)
    #[arg(long)]
    exit_code: bool,
}

/// How `b` relates to `a` in the version records, for people: the chain
/// of builds and changes from one to the other, or the change they share.
fn descent(store: &Store, a: &VersionId, b: &VersionId) -> Option<String> {
    let records = store.records().ok()?;
    let lineage = crate::fleet::lineage::Lineage::new(&records);
    let message = |v: &VersionId| {
        records
            .iter()
            .find(|r| r.version == *v)
            .and_then(|r| r.message.clone())
            .unwrap_or_default()
    };
    let step = |v: &VersionId| match lineage.change(v) {
        Some(c) => format!(
            "{} (change {c}: {})",
            v.short(),
            crate::text::clip(&message(v), 60)
        ),
        None => format!("{} (build)", v.short()),
    };
    let chain = |path: Vec<VersionId>| {
        let mut s = path[0].short();
        for v in &path[1..] {
            s.push_str(" -> ");
            s.push_str(&step(v));
        }
        s
    };
    if a == b {
        return None;
    }
    if let Some(p) = lineage.path(a, b) {
        return Some(format!(
            "{} descends from {}: {}",
            b.short(),
            a.short(),
            chain(p)
        ));
    }
    if let Some(p) = lineage.path(b, a) {
        return Some(format!(
            "{} descends from {}: {}",
            a.short(),
            b.short(),
            chain(p)
        ));
    }
    match (lineage.change(a), lineage.change(b)) {
        (Some(ca), Some(cb)) if ca == cb => Some(format!(
            "{} and {} were made by one change, {ca} ({}), from {} and {}",
            a.short(),
            b.short(),
            crate::text::clip(&message(a), 60),
            lineage.parent(a).map_or_else(|| "?".into(), |p| p.short()),
            lineage.parent(b).map_or_else(|| "?".into(), |p| p.short()),
        )),
        _ => None,
    }
}

pub fn diff(ctx: &Ctx, a: DiffArgs) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    let va = store.resolve(&a.a)?;
    let vb = store.resolve(&a.b)?;
    let descent = descent(&store, &va, &vb);
    let mut stat = DiffStat::default();
    let differs;
    if a.stat || a.json {
        let mut changes: Vec<Change> = Vec::new();
        store_diff::diff(&store, &va.root(), &vb.root(), &mut |c| {
            stat.add(&c);
            changes.push(c);
            Ok(())
        })?;
        differs = !changes.is_empty();
        if a.stat {
            (stat.fetch_chunks, stat.fetch_bytes) = fetch_cost(&store, &va.root(), &changes)?;
        }
        if a.json {
            let files: Vec<_> = changes
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "status": c.status.letter().to_string(),
                        "path": String::from_utf8_lossy(&c.path),
                        "old_size": c.old.as_ref().map(Content::size),
                        "new_size": c.new.as_ref().map(Content::size),
                    })
                })
                .collect();
            print_json(&serde_json::json!({
                "from": va, "to": vb, "descent": descent,
                "stat": if a.stat { Some(&stat) } else { None },
                "changes": files,
            }))?;
        } else {
            let mut out = io::stdout().lock();
            if let Some(d) = &descent {
                writeln!(out, "{d}")?;
            }
            writeln!(
                out,
                "{} files changed: {} added, {} modified, {} deleted, {} type changed",
                stat.added + stat.modified + stat.deleted + stat.type_changed,
                stat.added,
                stat.modified,
                stat.deleted,
                stat.type_changed
            )?;
            writeln!(
                out,
                "{} in added/modified files, {} in deleted files",
                fmt_bytes(stat.bytes_changed),
                fmt_bytes(stat.bytes_deleted)
            )?;
            writeln!(
                out,
                "a host on {} fetches {} chunks, {} (uncompressed)",
                va.short(),
                stat.fetch_chunks,
                fmt_bytes(stat.fetch_bytes)
            )?;
        }
    } else {
        // The file list stays parseable: the descent goes to a person's
        // terminal only.
        if let Some(d) = &descent
            && io::stderr().is_terminal()
        {
            eprintln!("{d}");
        }
        let mut out = io::BufWriter::new(io::stdout().lock());
        let mut any = false;
        store_diff::diff(&store, &va.root(), &vb.root(), &mut |c| {
            any = true;
            let r = (|| {
                write!(out, "{}\t", c.status.letter())?;
                out.write_all(&c.path)?;
                writeln!(out)
            })();
            r.map_err(|source| crate::store::StoreError::Io {
                path: "<stdout>".into(),
                source,
            })
        })?;
        out.flush()?;
        differs = any;
    }
    Ok(if a.exit_code && differs { 1 } else { exit::OK })
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Version (label, ID or ID prefix)
    version: String,
    /// Directory or file inside the version [default: its root]
    path: Option<String>,
    /// List everything below, recursively
    #[arg(long, short = 'r')]
    recursive: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub fn ls(ctx: &Ctx, a: LsArgs) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    let v = store.resolve(&a.version)?;
    let path = a.path.unwrap_or_default();
    let content = store
        .lookup(&v.root(), path.as_bytes())?
        .ok_or_else(|| NotFound {
            what: format!(
                "version {}: no {path:?}: see `scap ls {}`",
                v.short(),
                v.short()
            ),
        })?;
    let mut rows: Vec<(Vec<u8>, Content)> = Vec::new();
    match &content {
        Content::Dir { tree, .. } if a.recursive => {
            store.walk(tree, &mut |p, e| {
                rows.push((p.to_vec(), e.content.clone()));
                Ok(())
            })?;
        }
        Content::Dir { tree, .. } => {
            for e in store.tree(tree)?.entries() {
                rows.push((e.name.as_bytes().to_vec(), e.content.clone()));
            }
        }
        other => rows.push((path.clone().into_bytes(), other.clone())),
    }
    if a.json {
        let list: Vec<_> = rows
            .iter()
            .map(|(p, c)| {
                let mut v = serde_json::json!({
                    "path": String::from_utf8_lossy(p),
                    "kind": c.kind_name(),
                    "size": c.size(),
                });
                match c {
                    Content::Symlink { target } => {
                        v["target"] = String::from_utf8_lossy(target).into()
                    }
                    Content::Dir { tree, files, .. } => {
                        v["tree"] = tree.to_hex().into();
                        v["files"] = (*files).into();
                    }
                    Content::File { chunks, .. } => v["chunks"] = chunks.len().into(),
                }
                v
            })
            .collect();
        print_json(&list)?;
        return Ok(exit::OK);
    }
    let mut out = io::BufWriter::new(io::stdout().lock());
    for (p, c) in &rows {
        write!(out, "{} {:>12}  ", c.kind_char(), c.size())?;
        out.write_all(p)?;
        match c {
            Content::Symlink { target } => {
                out.write_all(b" -> ")?;
                out.write_all(target)?;
            }
            Content::Dir { .. } => out.write_all(b"/")?,
            Content::File { .. } => {}
        }
        writeln!(out)?;
    }
    out.flush()?;
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct CatArgs {
    /// Version (label, ID or ID prefix)
    version: String,
    /// File inside the version
    path: String,
}

pub fn cat(ctx: &Ctx, a: CatArgs) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    let v = store.resolve(&a.version)?;
    let content = store
        .lookup(&v.root(), a.path.as_bytes())?
        .ok_or_else(|| NotFound {
            what: format!(
                "version {}: no {:?}: see `scap ls {} {}`",
                v.short(),
                a.path,
                v.short(),
                parent_of(&a.path)
            ),
        })?;
    match &content {
        Content::File { .. } => {
            let mut out = io::stdout().lock();
            store.write_file(&content, &mut out, std::path::Path::new("<stdout>"))?;
            out.flush()?;
            Ok(exit::OK)
        }
        Content::Symlink { target } => bail!(
            "version {}: {:?} is a symlink to {:?}: cat the target instead",
            v.short(),
            a.path,
            std::ffi::OsStr::from_bytes(target)
        ),
        Content::Dir { .. } => bail!(
            "version {}: {:?} is a directory: use `scap ls`",
            v.short(),
            a.path
        ),
    }
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

#[derive(Args, Debug)]
pub struct LogArgs {
    /// A train (label): show its history, every move of its head (from, to, what,
    /// who, when, why) [default: every version record]
    train: Option<String>,
    /// Show at most this many versions
    #[arg(long, short = 'n')]
    max_count: Option<usize>,
    /// Only the versions one change (sync-file, sync-dir) made, one per train
    #[arg(long, value_name = "CHANGE-ID")]
    change: Option<String>,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub fn log(ctx: &Ctx, a: LogArgs) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    if let Some(train) = &a.train {
        return train_log(&store, train, &a);
    }
    let mut records = store.records()?;
    if let Some(c) = &a.change {
        records.retain(|r| r.change.as_deref() == Some(c.as_str()));
        if records.is_empty() {
            return Err(NotFound {
                what: format!("no version was made by change {c:?}: `scap history` lists changes"),
            }
            .into());
        }
    }
    records.truncate(a.max_count.unwrap_or(usize::MAX));
    let labels = store.labels()?;
    if a.json {
        print_json(&records)?;
        return Ok(exit::OK);
    }
    let mut out = io::stdout().lock();
    for r in &records {
        print_record(&mut out, r, &labels)?;
    }
    Ok(exit::OK)
}

/// `scap log TRAIN`: the moves of a train's head, newest first.
fn train_log(store: &Store, train: &str, a: &LogArgs) -> anyhow::Result<i32> {
    if crate::store::disk::check_label(train).is_err() || store.label(train)?.is_none() {
        let names: Vec<String> = store.labels()?.into_iter().map(|(l, _)| l).collect();
        return Err(NotFound {
            what: format!(
                "no train named {train:?}: the trains are {}; `scap log` without a name lists every version",
                if names.is_empty() {
                    "(none yet: `build-manifest --label` makes one)".to_string()
                } else {
                    names.join(", ")
                }
            ),
        }
        .into());
    }
    let trains = crate::fleet::trains::Trains::load(store)?;
    let mut moves = store.label_log(train)?;
    moves.reverse();
    moves.truncate(a.max_count.unwrap_or(usize::MAX));
    if a.json {
        // Oldest first, like the file.
        moves.reverse();
        let named: Vec<serde_json::Value> = moves
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or_default();
                v["to_name"] = trains.name(&m.to).to_string().into();
                v["from_name"] = m.from.map(|f| trains.name(&f).to_string()).into();
                v
            })
            .collect();
        print_json(&named)?;
        return Ok(exit::OK);
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "train {train}: head {}",
        trains.name(&store.label(train)?.expect("checked above"))
    )?;
    for m in &moves {
        writeln!(
            out,
            "{} {:<8} {:<10} {} -> {}: {}",
            fmt_utc(m.time),
            m.action,
            m.user,
            m.from.map_or_else(|| "(new)".to_string(), |f| f.short()),
            trains.name(&m.to),
            m.message
        )?;
    }
    Ok(exit::OK)
}

fn print_record(
    out: &mut impl Write,
    r: &VersionRecord,
    labels: &[(String, VersionId)],
) -> io::Result<()> {
    let names: Vec<&str> = labels
        .iter()
        .filter(|(_, v)| *v == r.version)
        .map(|(l, _)| l.as_str())
        .collect();
    write!(out, "version {}", r.version)?;
    if !names.is_empty() {
        write!(out, " ({})", names.join(", "))?;
    }
    writeln!(out)?;
    writeln!(out, "Author: {}", r.author)?;
    writeln!(out, "Date:   {}", fmt_utc(r.time))?;
    if let Some(p) = r.parent {
        writeln!(out, "Parent: {p}")?;
    }
    if let Some(c) = &r.change {
        writeln!(
            out,
            "Change: {c} (made from its parent by sync-file/sync-dir)"
        )?;
    }
    writeln!(out, "Files:  {} ({})", r.files, fmt_bytes(r.bytes))?;
    if let Some(m) = &r.message {
        writeln!(out, "\n    {m}")?;
    }
    writeln!(out)
}

#[derive(Args, Debug)]
pub struct ResolveArgs {
    /// A label (1.46.0-wmf.6), a full version ID, or a prefix of at least 8 hex digits
    name: String,
}

pub fn resolve(ctx: &Ctx, a: ResolveArgs) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    println!("{}", store.resolve(&a.name)?);
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct LabelArgs {
    /// The label, e.g. 1.46.0-wmf.6
    label: String,
    /// The version it names
    version: String,
    /// Move the label if it names another version
    #[arg(long)]
    force: bool,
}

pub fn label(ctx: &Ctx, a: LabelArgs) -> anyhow::Result<i32> {
    let store = ctx.open_deploy()?;
    let v = store.resolve(&a.version)?;
    if let Some((_, old)) = store.labels()?.into_iter().find(|(l, _)| *l == a.label)
        && old != v
        && !a.force
    {
        bail!(
            "label {:?} already names version {old}: pass --force to move it",
            a.label
        );
    }
    let mv = crate::store::disk::LabelMove::now(
        &crate::sys::user(),
        v,
        "label",
        &format!("scap label {} {}", a.label, a.version),
    );
    store.move_label(&a.label, None, &mv)?;
    println!("{} {}", a.label, v);
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct PinArgs {
    /// Version (label, ID or ID prefix)
    version: String,
}

pub fn pin(ctx: &Ctx, a: PinArgs, on: bool) -> anyhow::Result<i32> {
    let store = ctx.open_deploy()?;
    let v = store.resolve(&a.version)?;
    if on {
        store.pin(&v)?;
        println!("pinned {v}");
    } else if store.unpin(&v)? {
        println!("unpinned {v}");
    } else {
        println!("{v} was not pinned");
    }
    Ok(exit::OK)
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Versions to check [default: every recorded, labelled and pinned version]
    versions: Vec<String>,
    /// On a host: re-hash the live release against its version and list files edited by hand
    #[arg(long, conflicts_with = "versions")]
    pub(super) live: bool,
    /// With --live: the agent's directory
    #[arg(long, default_value = DEFAULT_AGENT_DIR, requires = "live")]
    pub(super) dir: PathBuf,
    /// Print JSON
    #[arg(long)]
    pub(super) json: bool,
}

pub fn verify(ctx: &Ctx, a: VerifyArgs) -> anyhow::Result<i32> {
    let store = ctx.open()?;
    let mut versions: Vec<VersionId> = a
        .versions
        .iter()
        .map(|v| store.resolve(v))
        .collect::<Result<_, _>>()?;
    if a.versions.is_empty() {
        versions.extend(store.records()?.into_iter().map(|r| r.version));
        versions.extend(store.labels()?.into_iter().map(|(_, v)| v));
        versions.extend(store.pins()?);
        versions.sort();
        versions.dedup();
    }
    let report = if a.json {
        store_verify::verify(&store, &versions, &crate::progress::Silent)?
    } else {
        store_verify::verify(&store, &versions, &super::bar::Bar::default())?
    };
    if a.json {
        print_json(&report)?;
    } else {
        let mut out = io::stdout().lock();
        for p in &report.problems {
            writeln!(
                out,
                "BAD {} {} {}: {} (version {})",
                p.kind,
                p.id,
                p.path,
                p.error,
                p.version.short()
            )?;
        }
        writeln!(
            out,
            "checked {} versions: {} trees, {} chunks ({}); {} problems",
            report.versions,
            report.trees,
            report.chunks,
            fmt_bytes(report.bytes),
            report.problems.len()
        )?;
        if !report.problems.is_empty() {
            writeln!(
                out,
                "re-run build-manifest from staging to restore chunks that are still there; gc will not run on a store with missing trees"
            )?;
        }
    }
    Ok(if report.problems.is_empty() {
        exit::OK
    } else {
        exit::PROBLEMS_FOUND
    })
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Keep the newest N versions (plus every labelled and pinned one, and every
    /// version the fleet runs, holds or should run)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    keep: u64,
    /// Show what would be removed; remove nothing
    #[arg(long)]
    dry_run: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

pub fn gc(ctx: &Ctx, a: GcArgs) -> anyhow::Result<i32> {
    let store = ctx.open_deploy()?;
    // What the fleet runs, holds and should run, read now.
    let members = if a.fleet.configured(ctx) {
        a.fleet.members(ctx)?
    } else {
        Vec::new()
    };
    let agents = if members.is_empty() {
        None
    } else {
        Some(a.fleet.agents(ctx)?)
    };
    let rt = runtime()?;
    let fleet = rt
        .block_on(crate::fleet::keep::fleet_roots(
            agents.as_ref(),
            &members,
            &fleet_state(ctx)?,
        ))
        .map_err(|e| anyhow::anyhow!("gc refused: {e}"))?;
    drop(rt);
    let also: Vec<VersionId> = fleet.versions.iter().copied().collect();
    let report =
        store_gc::gc(&store, a.keep as usize, &also, a.dry_run).context("gc removed nothing")?;
    // Delta packs of versions gc removed go too (and temp files of pack
    // builds a crash left).
    if !a.dry_run {
        let n = crate::net::pack::retain(&store, &report.kept_versions).with_context(|| {
            format!(
                "removing old packs in {}",
                store.root().join("packs").display()
            )
        })?;
        if n > 0 {
            eprintln!("removed {n} delta pack(s) of removed versions (or left by a crashed build)");
        }
    }
    if a.json {
        let mut j = serde_json::to_value(&report)?;
        j["fleet"] = serde_json::to_value(&fleet)?;
        print_json(&j)?;
    } else {
        let verb = if a.dry_run { "would remove" } else { "removed" };
        if fleet.hosts_read > 0 || fleet.desired > 0 {
            println!(
                "the fleet needs {} version(s): read {} host(s) now, {} in the desired state",
                fleet.versions.len(),
                fleet.hosts_read,
                fleet.desired
            );
        }
        println!(
            "kept {} versions ({} live objects); {verb} {} versions, {} objects ({})",
            report.kept_versions.len(),
            report.live_objects,
            report.removed_versions.len(),
            report.removed_objects,
            fmt_bytes(report.removed_bytes)
        );
    }
    Ok(exit::OK)
}
