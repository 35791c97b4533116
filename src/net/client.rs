//! The verified batch client: fetches objects from one or more sources
//! (`scap serve`, or any HTTP server or cache in front of a store).
//!
//! Objects are asked for in batches (`POST /batch`, a few thousand IDs, a
//! few MB each), several batches at once. Every object is decoded and
//! hashed before the sink stores it; an object a source lacks, or sends
//! corrupt or truncated, is asked of the next source. A source without
//! `/batch` (a plain static server) is read object by object.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use rayon::prelude::*;

use super::pack::SegmentReader;
use super::tls::{TlsError, Transport};
use super::{BatchDecoder, BatchError, MAX_BATCH_IDS};
use crate::store::disk::pack::Arriving;
use crate::store::id::{ObjectId, ObjectKind};
use crate::store::signature::{MAX_SIG_FILE, SignedVersion};
use crate::store::{StoreError, VersionId};

/// Bytes of uncompressed content asked for in one batch (a hint: objects
/// are counted at the size the caller expects).
const BATCH_BYTES: u64 = 4 << 20;
/// Batches in flight at once.
const PARALLEL_BATCHES: usize = 4;
/// Fewer chunks than this in a pack's segment are stored one by one on the
/// fetching thread rather than in parallel on the pool.
const PARALLEL_CHUNKS_MIN: usize = 16;
/// How long a pack's source may go without delivering a new object.
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);
/// How long a source has to send a small answer whole (a signature, a
/// desired state): one that stalls is passed over for the next.
pub const SMALL_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{kind} {id}: no source has it (asked {tried})")]
    NotFound {
        id: ObjectId,
        kind: ObjectKind,
        tried: String,
    },
    #[error("every source failed; last: {0}")]
    AllFailed(String),
    #[error(transparent)]
    Store(StoreError),
}

/// What went wrong with one source for one batch.
#[derive(Debug)]
enum SourceError {
    /// Retry the rest of the batch elsewhere.
    Source(String),
    /// The batch endpoint does not exist there: fall back to single GETs.
    NoBatch,
    /// Local trouble (a full disk): stop.
    Fatal(StoreError),
}

/// Transfer counters (bodies only; HTTP headers are not counted).
#[derive(Default, Debug)]
pub struct FetchStats {
    pub requests: AtomicU64,
    pub objects: AtomicU64,
    pub bytes: AtomicU64,
}

pub struct Client {
    http: reqwest::Client,
    sources: Vec<String>,
    pub stats: FetchStats,
    /// Why a source was dropped for the rest of this client's fetches.
    dropped: std::sync::Mutex<Vec<Option<String>>>,
    /// Body bytes received from each source.
    per_source: Vec<AtomicU64>,
    /// `--max-fetch-rate`: every body received is paced by it.
    limit: Option<std::sync::Arc<super::ratelimit::RateLimit>>,
    /// Requests in flight to the sources at once.
    parallel: usize,
    /// How long a pack's source may go without delivering an object the
    /// receiver lacked before it is skipped ([`Client::with_stall`]).
    stall: Duration,
    /// When the receiver last got an object it lacked (ms since `born`).
    progress: AtomicU64,
    born: std::time::Instant,
}

/// Called with each object as it arrives: (ID, kind, the most content
/// bytes it may have, object file). The sink decodes and verifies;
/// `StoreError::Object` or `BadTree` means "this source sent a bad
/// object", any other error is local and fatal.
pub type Sink<'a> = dyn Fn(ObjectId, ObjectKind, u64, &[u8]) -> Result<(), StoreError> + Sync + 'a;

/// One object to fetch: its ID, kind, and the most bytes of content it may
/// have (a chunk's length from its tree; a bound for a tree).
pub type Wanted = (ObjectId, ObjectKind, u64);

/// Called with each object of a pack. The sink verifies; `StoreError::
/// Object` or `BadTree` means "the source sent a bad object".
pub type PackSink<'a> = dyn Fn(ObjectId, PackItem<'_>) -> Result<(), StoreError> + Sync + 'a;

/// One object of a pack as it arrived.
pub enum PackItem<'a> {
    /// An object file, `kind` from its header; `at`: the segment it came
    /// in and where in that segment's content it is (for a receiver that
    /// stores segments as they came).
    Object {
        kind: ObjectKind,
        file: &'a [u8],
        at: Option<(&'a Arriving, usize)>,
    },
    /// A delta against `base` (which the receiver may lack: then it skips
    /// it, and the object is fetched whole later).
    Delta {
        base: ObjectId,
        kind: ObjectKind,
        zstd: &'a [u8],
    },
}

impl<'a> PackItem<'a> {
    /// The kind of object it gives.
    pub fn kind(&self) -> ObjectKind {
        match self {
            PackItem::Object { kind, .. } | PackItem::Delta { kind, .. } => *kind,
        }
    }

    /// Parses a delta frame's payload: base ID, kind, zstd frame.
    pub fn delta(payload: &'a [u8]) -> Option<PackItem<'a>> {
        let base = ObjectId::from_bytes(payload.get(..32)?.try_into().ok()?);
        let kind = match *payload.get(32)? {
            0 => ObjectKind::Chunk,
            1 => ObjectKind::Tree,
            _ => return None,
        };
        Some(PackItem::Delta {
            base,
            kind,
            zstd: payload.get(33..)?,
        })
    }
}

/// How a pack request ended.
enum PackEnd {
    Done,
    /// The source has no such pack (404): ask the next.
    NotHere,
}

/// The HTTP client a host fetches with: kept for the agent's life, so
/// connections (and TLS sessions) are reused from one sync to the next.
pub fn http_client(transport: &Transport) -> Result<reqwest::Client, TlsError> {
    super::tls::http_client(
        transport,
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(PARALLEL_BATCHES),
    )
}

impl Client {
    /// A client for `sources` over `http` (see [`http_client`]).
    pub fn new(http: reqwest::Client, sources: &[String]) -> Client {
        Client {
            http,
            sources: sources
                .iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect(),
            stats: FetchStats::default(),
            dropped: std::sync::Mutex::new(vec![None; sources.len()]),
            per_source: sources.iter().map(|_| AtomicU64::new(0)).collect(),
            limit: None,
            parallel: PARALLEL_BATCHES,
            stall: DEFAULT_STALL,
            progress: AtomicU64::new(0),
            born: std::time::Instant::now(),
        }
    }

    /// Skips a pack's source that has delivered no object the receiver
    /// lacked for `stall` (one that stopped sending, or that streams the
    /// same valid segments forever).
    pub fn with_stall(mut self, stall: Duration) -> Client {
        self.stall = stall.max(Duration::from_millis(100));
        self
    }

    /// The receiver got an object it lacked: the source is making progress.
    pub fn progressed(&self) {
        self.progress
            .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn since_progress(&self) -> Duration {
        let at = self.progress.load(Ordering::Relaxed);
        Duration::from_millis((self.born.elapsed().as_millis() as u64).saturating_sub(at))
    }

    /// Paces every body received by `limit`, and keeps at most `parallel`
    /// requests in flight.
    pub fn with_limits(
        mut self,
        limit: Option<std::sync::Arc<super::ratelimit::RateLimit>>,
        parallel: usize,
    ) -> Client {
        self.limit = limit;
        self.parallel = parallel.max(1);
        self
    }

    /// The sources to try, in order: those not dropped (all of them when
    /// every one was dropped: a last try is better than none).
    fn usable(&self) -> Vec<usize> {
        let d = self.dropped.lock().expect("not poisoned");
        let ok: Vec<usize> = (0..self.sources.len())
            .filter(|&i| d[i].is_none())
            .collect();
        if ok.is_empty() {
            (0..self.sources.len()).collect()
        } else {
            ok
        }
    }

    /// Skips source `i` for the rest of this fetch (it failed).
    fn drop_source(&self, i: usize, why: &str) {
        let mut d = self.dropped.lock().expect("not poisoned");
        if d[i].is_none() {
            tracing::warn!(
                "{}: {why}; skipping it for the rest of this sync",
                self.sources[i]
            );
            d[i] = Some(crate::text::clip(why, 300));
        }
    }

    /// Sources dropped during this fetch, with why: for the host's result.
    pub fn dropped(&self) -> Vec<String> {
        let d = self.dropped.lock().expect("not poisoned");
        d.iter()
            .enumerate()
            .filter_map(|(i, w)| w.as_ref().map(|w| format!("{}: {w}", self.sources[i])))
            .collect()
    }

    /// Body bytes received from each source (those that sent any).
    pub fn per_source(&self) -> std::collections::BTreeMap<String, u64> {
        self.sources
            .iter()
            .zip(&self.per_source)
            .map(|(s, n)| (s.clone(), n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Counts `n` body bytes from source `i`, waiting for the rate limit.
    async fn received(&self, i: usize, n: usize) {
        self.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.per_source[i].fetch_add(n as u64, Ordering::Relaxed);
        if let Some(l) = &self.limit {
            l.take(n).await;
        }
    }

    /// Fetches the delta pack `from` -> `to` (`from` `None`: a fresh host)
    /// from the first source that has it, handing each object to `sink`
    /// (which verifies it) as it arrives. An interrupted pack is resumed
    /// where it stopped, from the same source or the next (packs are the
    /// same bytes everywhere). `Ok(false)`: no source has the pack (the
    /// caller fetches objects instead); an error is local (a full disk).
    pub async fn pack(
        &self,
        from: Option<&VersionId>,
        to: &VersionId,
        sink: &PackSink<'_>,
    ) -> Result<bool, FetchError> {
        let path = super::pack::url_path(from, to);
        let mut consumed: u64 = 0;
        let mut resent: u64 = 0;
        for i in self.usable() {
            let source = &self.sources[i];
            let url = format!("{source}{path}");
            // A few tries per source: a dropped connection resumes.
            for _attempt in 0..3 {
                match self.pack_from(i, &url, &mut consumed, resent, sink).await {
                    Ok(PackEnd::Done) => return Ok(true),
                    Ok(PackEnd::NotHere) => break,
                    Err(SourceError::Fatal(e)) => return Err(FetchError::Store(e)),
                    Err(SourceError::Source(e)) if e.starts_with("retry: ") => {
                        tracing::info!("{}", &e[7..]);
                        continue;
                    }
                    Err(SourceError::Source(e)) => {
                        self.drop_source(i, &e);
                        // What it sent is verified and kept, but the next
                        // source's pack starts from its beginning: the
                        // bytes counted were this source's. Until the next
                        // one passes them, what it sends is not new to
                        // this host, and is no sign of a looping source.
                        resent = resent.max(consumed);
                        consumed = 0;
                        break;
                    }
                    Err(SourceError::NoBatch) => break,
                }
            }
        }
        Ok(false)
    }

    async fn pack_from(
        &self,
        i: usize,
        url: &str,
        consumed: &mut u64,
        resent: u64,
        sink: &PackSink<'_>,
    ) -> Result<PackEnd, SourceError> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        // A source that ignores the range sends the whole pack again.
        let resent = resent.max(*consumed);
        let mut req = self.http.get(url);
        if *consumed > 0 {
            req = req.header("range", format!("bytes={consumed}-"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| SourceError::Source(format!("{url}: {}", why(&e))))?;
        let status = resp.status().as_u16();
        if status == 404 {
            return Ok(PackEnd::NotHere);
        }
        // The source will not build it now (its budget for this client,
        // a cache's too): objects instead, from the same sources.
        if status == 429 || status == 503 {
            tracing::info!("{url}: HTTP {status}: fetching objects instead");
            return Ok(PackEnd::NotHere);
        }
        // Segments, each a piece of one batch body (net::pack).
        let (mut segments, mut decoder) = match status {
            206 if *consumed > 0 => (
                SegmentReader::resumed(*consumed),
                BatchDecoder::resumed(*consumed),
            ),
            // The whole pack (a source that ignores ranges): what was
            // stored already is stored again, harmlessly.
            200 => (SegmentReader::default(), BatchDecoder::default()),
            _ => {
                return Err(SourceError::Source(format!("{url}: HTTP {status}")));
            }
        };
        let limit = |_: &ObjectId| super::max_file_len(crate::store::tree::MAX_TREE_LEN);
        // Stores one segment's objects (its raw bytes).
        let mut store_segment = |seg: &Arriving| -> Result<(), SourceError> {
            // Where the segment starts in the batch body: each frame's
            // object file is at its end, so its place in the segment
            // follows (checked again where it is used).
            let start = decoder.consumed;
            decoder.push(&seg.content);
            let mut arrived = Vec::new();
            while let Some(frame) = decoder.next_frame_within(&limit).map_err(|e| bad(url, e))? {
                if let Some(file) = frame.file {
                    let at = (decoder.consumed - start)
                        .checked_sub(file.len() as u64)
                        .map(|o| o as usize);
                    arrived.push((frame.id, frame.delta, file, at));
                }
            }
            let mut items = Vec::with_capacity(arrived.len());
            for (id, delta, file, at) in &arrived {
                let item = if *delta {
                    PackItem::delta(file).ok_or_else(|| {
                        SourceError::Source(format!(
                            "{url}: delta frame of {id} in the pack: malformed"
                        ))
                    })?
                } else {
                    let head = &file[..file.len().min(crate::store::object::HEADER_LEN)];
                    match crate::store::object::peek(*id, head) {
                        Ok((kind, _)) => PackItem::Object {
                            kind,
                            file,
                            at: at.map(|o| (seg, o)),
                        },
                        Err(e) => {
                            return Err(SourceError::Source(format!(
                                "{url}: object {id} in the pack: {e}"
                            )));
                        }
                    }
                };
                items.push((*id, item));
            }
            let store_one = |(id, item): (ObjectId, PackItem<'_>)| {
                sink(id, item).map_err(|e| match e {
                    StoreError::Object { .. } | StoreError::BadTree { .. } => SourceError::Source(
                        format!("{url}: served a corrupt object in the pack: {e}"),
                    ),
                    other => SourceError::Fatal(other),
                })
            };
            // Chunks in parallel; trees one by one in the pack's order
            // (children before parents), so each finds what it lists
            // already stored.
            let (chunks, trees): (Vec<_>, Vec<_>) = items
                .into_iter()
                .partition(|(_, item)| item.kind() == ObjectKind::Chunk);
            let n = chunks.len() + trees.len();
            // A few (a backport's) are stored on this thread: waking the
            // pool for them costs more than it saves.
            let stored: Vec<Result<(), SourceError>> = if chunks.len() < PARALLEL_CHUNKS_MIN {
                chunks.into_iter().map(store_one).collect()
            } else {
                chunks.into_par_iter().map(store_one).collect()
            };
            for r in stored {
                r?;
            }
            for t in trees {
                store_one(t)?;
            }
            self.stats.objects.fetch_add(n as u64, Ordering::Relaxed);
            Ok(())
        };
        // A segment, decompressed, waits while the next one arrives; then
        // its objects are stored while the next decompresses (one zstd
        // stream cannot be decompressed in parallel, so this takes it off
        // the path of the rest). With the pack's bytes consumed up to its
        // end.
        let mut waiting: Option<(Arriving, u64)> = None;
        // Contents of segments stored before, for the next to reuse once
        // nothing else holds them (the store keeps its last few).
        let mut spare: VecDeque<Arc<Vec<u8>>> = VecDeque::new();
        let mut stream = resp.bytes_stream();
        // Each request gets a whole window before it must show progress.
        self.progressed();
        let stalled = |what: &str| {
            SourceError::Source(format!(
                "{url}: {what} for {} s: a stalled or looping source",
                self.stall.as_secs_f64()
            ))
        };
        loop {
            let piece = match tokio::time::timeout(self.stall, stream.next()).await {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => return Err(stalled("sent nothing")),
            };
            // Bytes that never make a whole segment (a trickle).
            if self.since_progress() > self.stall * 4 {
                return Err(stalled("delivered no object this host lacked"));
            }
            let piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    // What arrived whole is kept: the resumed request
                    // starts after it.
                    if let Some((seg, end)) = waiting.take() {
                        store_segment(&seg)?;
                        *consumed = end;
                    }
                    return Err(SourceError::Source(format!(
                        "retry: {url}: cut off after {} bytes ({e}); resuming",
                        *consumed
                    )));
                }
            };
            self.received(i, piece.len()).await;
            segments.push(&piece);
            while let Some((z, end)) = segments
                .next_compressed()
                .map_err(|e| SourceError::Source(format!("{url}: {e}")))?
            {
                let mut next = spare
                    .iter()
                    .position(|c| Arc::strong_count(c) == 1)
                    .and_then(|i| spare.remove(i))
                    .and_then(|c| Arc::try_unwrap(c).ok())
                    .unwrap_or_default();
                // The pack's first segment (a backport's only one) is
                // decompressed on this thread: with nothing to store beside
                // it, handing it to the pool would only cost wakeups.
                let (decompressed, stored) = match waiting.take() {
                    None => (
                        super::pack::decompress_segment_into(&z, &mut next),
                        Ok(None),
                    ),
                    Some((seg, end)) => rayon::join(
                        || super::pack::decompress_segment_into(&z, &mut next),
                        || store_segment(&seg).map(|()| Some((seg, end))),
                    ),
                };
                // Everything in the segments stored so far is in the
                // store: a resumed request starts after them. (A segment
                // ends at a frame boundary, so the batch decoder has
                // nothing pending then.)
                if let Some((seg, end)) = stored? {
                    // Bytes this host was sent before (by a source
                    // skipped since, or before a restart from 0): the
                    // source is catching up, not looping.
                    if end <= resent {
                        self.progressed();
                    }
                    // A whole segment with nothing new, after a whole
                    // window of them: the same segments again and again.
                    if self.since_progress() > self.stall {
                        return Err(stalled("delivered no object this host lacked"));
                    }
                    *consumed = end;
                    spare.push_back(seg.content);
                    // More than the store keeps: the oldest are free.
                    if spare.len() > crate::store::disk::pack::SEGMENTS_KEPT + 2 {
                        spare.pop_front();
                    }
                }
                decompressed.map_err(|e| SourceError::Source(format!("{url}: {e}")))?;
                waiting = Some((Arriving::new(z, Arc::new(next)), end));
            }
            // A source that always has more ready would otherwise never
            // let this future be interrupted (the fetch deadline, a
            // rollback's cancel): give way between pieces.
            tokio::task::yield_now().await;
        }
        if let Some((seg, end)) = waiting.take() {
            store_segment(&seg)?;
            *consumed = end;
        }
        match decoder.finish().ok().filter(|()| segments.is_empty()) {
            Some(()) => Ok(PackEnd::Done),
            None => Err(SourceError::Source(format!(
                "retry: {url}: ended after {} bytes, before the end of the pack; resuming",
                segments.consumed
            ))),
        }
    }

    /// A version's signatures from the first source whose copy passes
    /// `check` (a key trusted now vouches for it), with what `check` made
    /// of it. A source whose copy does not pass (a cache that kept an old
    /// signature after a key rotation, or a forged one) is skipped for the
    /// rest of this client's fetches and named; a source without one (404)
    /// is passed over. `Ok(None)`: every source answered 404. The error
    /// names every source and why it gave nothing usable.
    pub async fn signature<T>(
        &self,
        v: &VersionId,
        check: impl Fn(&SignedVersion) -> Result<T, String>,
    ) -> Result<Option<(SignedVersion, T)>, FetchError> {
        let mut failed = Vec::new();
        let mut not_found = 0;
        for (i, source) in self.sources.iter().enumerate() {
            let url = format!("{source}/versions/{}.sig", v.to_hex());
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let resp = match self
                .http
                .get(&url)
                .timeout(SMALL_ANSWER_TIMEOUT)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    failed.push(format!("{url}: {}", why(&e)));
                    continue;
                }
            };
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                not_found += 1;
                failed.push(format!("{url}: has no signature (404)"));
                continue;
            }
            if !resp.status().is_success() {
                failed.push(format!("{url}: HTTP {}", resp.status()));
                continue;
            }
            let doc = match read_capped(resp, MAX_SIG_FILE as u64, &url).await {
                Ok(bytes) => SignedVersion::parse(&bytes),
                Err(SourceError::Source(e)) => Err(e),
                Err(SourceError::Fatal(e)) => return Err(FetchError::Store(e)),
                Err(_) => Err(format!("{url}: unreadable answer")),
            };
            match doc.and_then(|doc| check(&doc).map(|t| (doc, t))) {
                Ok(found) => return Ok(Some(found)),
                Err(e) => {
                    let why = format!("its signature of {} is refused: {e}", v.short());
                    self.drop_source(i, &why);
                    failed.push(format!("{url}: {why}"));
                }
            }
        }
        if not_found == self.sources.len() {
            return Ok(None);
        }
        Err(FetchError::AllFailed(format!(
            "no source has a signature of {} this host accepts: {}",
            v.short(),
            failed.join("; ")
        )))
    }

    /// What every source says `host` should run, asked at once, each
    /// within [`SMALL_ANSWER_TIMEOUT`]: an answer or why there is none, by
    /// source. The caller decides which answer stands (a signed one, the
    /// newest): a source can withhold an answer, not substitute one.
    pub async fn desired_all(
        &self,
        host: &str,
    ) -> Vec<(String, Result<crate::proto::DesiredResponse, String>)> {
        let asks = self.sources.iter().map(|source| async move {
            let url = format!("{source}/v1/desired/{host}");
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            (source.clone(), self.desired_from(&url, host).await)
        });
        futures_util::future::join_all(asks).await
    }

    async fn desired_from(
        &self,
        url: &str,
        host: &str,
    ) -> Result<crate::proto::DesiredResponse, String> {
        use crate::proto::{DesiredResponse, MAX_DESIRED_BYTES};
        let resp = self
            .http
            .get(url)
            .timeout(SMALL_ANSWER_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("{url}: {}", why(&e)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = read_capped(resp, 1024, url).await.unwrap_or_default();
            return Err(format!(
                "{url}: HTTP {status}: {}",
                crate::text::clip(String::from_utf8_lossy(&body).trim(), 300)
            ));
        }
        let bytes = match read_capped(resp, MAX_DESIRED_BYTES as u64, url).await {
            Ok(b) => b,
            Err(SourceError::Source(e)) => return Err(e),
            Err(SourceError::Fatal(e)) => return Err(format!("{url}: {e}")),
            Err(SourceError::NoBatch) => return Err(format!("{url}: unreadable answer")),
        };
        match serde_json::from_slice::<DesiredResponse>(&bytes) {
            Ok(d) if d.host == host => Ok(d),
            Ok(d) => Err(format!(
                "{url}: answered for host {:?}, not {host:?}",
                crate::text::clip(&d.host, 100)
            )),
            Err(e) => Err(format!("{url}: not a desired-state answer: {e}")),
        }
    }

    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// `path` (JSON, at most `max` bytes) from the first source that
    /// answers it; the error names every source and why.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        max: u64,
    ) -> Result<T, FetchError> {
        let mut failed = Vec::new();
        for source in &self.sources {
            let url = format!("{source}{path}");
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let resp = match self
                .http
                .get(&url)
                .timeout(SMALL_ANSWER_TIMEOUT)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    failed.push(format!("{url}: HTTP {}", r.status()));
                    continue;
                }
                Err(e) => {
                    failed.push(format!("{url}: {}", why(&e)));
                    continue;
                }
            };
            match read_capped(resp, max, &url).await {
                Ok(b) => match serde_json::from_slice(&b) {
                    Ok(t) => return Ok(t),
                    Err(e) => failed.push(format!("{url}: not the answer expected: {e}")),
                },
                Err(SourceError::Fatal(e)) => return Err(FetchError::Store(e)),
                Err(SourceError::Source(e)) => failed.push(e),
                Err(SourceError::NoBatch) => failed.push(format!("{url}: unreadable answer")),
            }
        }
        Err(FetchError::AllFailed(failed.join("; ")))
    }

    /// Fetches every object in `wanted` into `sink`.
    pub async fn fetch(&self, wanted: &[Wanted], sink: &Sink<'_>) -> Result<(), FetchError> {
        let mut batches: Vec<Vec<Wanted>> = Vec::new();
        let mut current = Vec::new();
        let mut bytes = 0;
        for &(id, kind, size) in wanted {
            if !current.is_empty()
                && (current.len() >= MAX_BATCH_IDS / 4 || bytes + size > BATCH_BYTES)
            {
                batches.push(std::mem::take(&mut current));
                bytes = 0;
            }
            current.push((id, kind, size));
            bytes += size.min(BATCH_BYTES);
        }
        if !current.is_empty() {
            batches.push(current);
        }
        let mut results = futures_util::stream::iter(batches.into_iter().enumerate())
            .map(|(i, batch)| self.fetch_batch(batch, i, sink))
            .buffer_unordered(self.parallel);
        while let Some(r) = results.next().await {
            r?;
        }
        Ok(())
    }

    /// One batch, trying the sources in the order given (the host's own
    /// datacenter's caches first, the deploy host last), skipping those
    /// that failed earlier in this fetch, until every object has arrived.
    async fn fetch_batch(
        &self,
        mut batch: Vec<Wanted>,
        _n: usize,
        sink: &Sink<'_>,
    ) -> Result<(), FetchError> {
        if self.sources.is_empty() {
            return Err(FetchError::AllFailed("no sources given".into()));
        }
        let mut last_error: Option<String> = None;
        let mut tried = Vec::new();
        for k in self.usable() {
            let source = &self.sources[k];
            tried.push(source.as_str());
            let outcome = match self.batch_from(k, &mut batch, sink).await {
                Err(SourceError::NoBatch) => self.singles_from(k, &mut batch, sink).await,
                other => other,
            };
            match outcome {
                Ok(()) if batch.is_empty() => return Ok(()),
                Ok(()) => {} // this source lacks some: ask the next
                Err(SourceError::Fatal(e)) => return Err(FetchError::Store(e)),
                Err(SourceError::Source(e)) => {
                    self.drop_source(k, &e);
                    last_error = Some(e);
                }
                Err(SourceError::NoBatch) => unreachable!("singles never answer NoBatch"),
            }
        }
        match (batch.first(), last_error) {
            (None, _) => Ok(()),
            (Some(_), Some(e)) => Err(FetchError::AllFailed(e)),
            (Some(&(id, kind, _)), None) => Err(FetchError::NotFound {
                id,
                kind,
                tried: tried.join(", "),
            }),
        }
    }

    /// Asks source `si` for `batch`; removes from it each object stored.
    async fn batch_from(
        &self,
        si: usize,
        batch: &mut Vec<Wanted>,
        sink: &Sink<'_>,
    ) -> Result<(), SourceError> {
        let source = &self.sources[si];
        let url = format!("{source}/batch");
        let mut body = Vec::with_capacity(batch.len() * 32);
        for (id, ..) in batch.iter() {
            body.extend_from_slice(id.as_bytes());
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let resp = self
            .http
            .post(&url)
            .header("content-type", "application/octet-stream")
            .header("accept-encoding", "zstd")
            .body(body)
            .send()
            .await
            .map_err(|e| SourceError::Source(format!("{url}: {}", why(&e))))?;
        let status = resp.status();
        // Not found, method not allowed, not implemented: a static server.
        if matches!(status.as_u16(), 404 | 405 | 501) {
            return Err(SourceError::NoBatch);
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(SourceError::Source(format!(
                "{url}: HTTP {status}: {}",
                text.trim()
            )));
        }
        let compressed = resp
            .headers()
            .get("content-encoding")
            .is_some_and(|v| v.as_bytes() == b"zstd");
        let mut unzstd = if compressed {
            Some(
                zstd::stream::write::Decoder::new(Vec::new())
                    .map_err(|e| SourceError::Source(format!("{url}: {e}")))?,
            )
        } else {
            None
        };
        let kinds: std::collections::HashMap<ObjectId, (ObjectKind, u64)> = batch
            .iter()
            .map(|&(id, kind, len)| (id, (kind, len)))
            .collect();
        let limit = |id: &ObjectId| {
            kinds
                .get(id)
                .map_or(0, |&(_, len)| super::max_file_len(len))
        };
        let mut done: std::collections::HashSet<ObjectId> = Default::default();
        let mut decoder = BatchDecoder::default();
        let mut stream = resp.bytes_stream();
        let result = async {
            while let Some(piece) = stream.next().await {
                let piece = piece.map_err(|e| SourceError::Source(format!("{url}: {e}")))?;
                self.received(si, piece.len()).await;
                // Frames are taken out after every small step of input, so
                // memory is bounded by the objects asked for, whatever a
                // hostile (compressed) stream expands to.
                let mut arrived = Vec::new();
                let mut seen_here = std::collections::HashSet::new();
                for step in piece.chunks(1024) {
                    match &mut unzstd {
                        Some(z) => {
                            use std::io::Write;
                            z.write_all(step).and_then(|()| z.flush()).map_err(|e| {
                                SourceError::Source(format!("{url}: bad zstd stream: {e}"))
                            })?;
                            decoder.push(z.get_ref());
                            z.get_mut().clear();
                        }
                        None => decoder.push(step),
                    }
                    while let Some(frame) = decoder
                        .next_frame_within(&limit)
                        .map_err(|e| bad(&url, e))?
                    {
                        let Some(&(kind, max_len)) = kinds.get(&frame.id) else {
                            return Err(SourceError::Source(format!(
                                "{url}: sent object {} that was not asked for",
                                frame.id
                            )));
                        };
                        if done.contains(&frame.id) || !seen_here.insert(frame.id) {
                            return Err(SourceError::Source(format!(
                                "{url}: sent object {} twice",
                                frame.id
                            )));
                        }
                        if frame.delta {
                            return Err(SourceError::Source(format!(
                                "{url}: sent a delta frame in a batch (only packs have them)"
                            )));
                        }
                        if let Some(file) = frame.file {
                            arrived.push((frame.id, kind, max_len, file));
                        }
                    }
                }
                // Verifying and storing is the CPU-heavy part: use every core.
                let stored: Vec<Result<ObjectId, SourceError>> = arrived
                    .par_iter()
                    .map(|(id, kind, max_len, file)| {
                        store(sink, *id, *kind, *max_len, file, &url).map(|()| *id)
                    })
                    .collect();
                for r in stored {
                    let id = r?;
                    self.stats.objects.fetch_add(1, Ordering::Relaxed);
                    done.insert(id);
                }
            }
            decoder.finish().map_err(|e| bad(&url, e))
        }
        .await;
        batch.retain(|(id, ..)| !done.contains(id));
        result
    }

    /// Object-by-object GETs, for sources that are plain static servers
    /// (or caches, which store `/objects/` but not `/batch`).
    async fn singles_from(
        &self,
        si: usize,
        batch: &mut Vec<Wanted>,
        sink: &Sink<'_>,
    ) -> Result<(), SourceError> {
        let source = self.sources[si].as_str();
        let fetched = futures_util::stream::iter(batch.iter().copied())
            .map(|(id, kind, max_len)| async move {
                let hex = id.to_hex();
                let url = format!("{source}/objects/{}/{}", &hex[..2], &hex[2..]);
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let resp = self
                    .http
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| SourceError::Source(format!("{url}: {}", why(&e))))?;
                if resp.status() == reqwest::StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if !resp.status().is_success() {
                    return Err(SourceError::Source(format!(
                        "{url}: HTTP {}",
                        resp.status()
                    )));
                }
                let file = read_capped(resp, super::max_file_len(max_len), &url).await?;
                self.received(si, file.len()).await;
                store(sink, id, kind, max_len, &file, &url)?;
                self.stats.objects.fetch_add(1, Ordering::Relaxed);
                Ok(Some(id))
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        let mut result = Ok(());
        let mut done = std::collections::HashSet::new();
        for r in fetched {
            match r {
                Ok(Some(id)) => {
                    done.insert(id);
                }
                Ok(None) => {}
                Err(e @ SourceError::Fatal(_)) => result = Err(e),
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        batch.retain(|(id, ..)| !done.contains(id));
        result
    }
}

/// Reads a response body, failing as soon as it passes `max` bytes (a
/// source cannot make the agent hold more than one object's worth).
async fn read_capped(
    mut resp: reqwest::Response,
    max: u64,
    url: &str,
) -> Result<Vec<u8>, SourceError> {
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(SourceError::Source(format!(
            "{url}: answers {} bytes, more than the object can be ({max})",
            resp.content_length().unwrap_or(0)
        )));
    }
    let mut out = Vec::new();
    while let Some(piece) = resp
        .chunk()
        .await
        .map_err(|e| SourceError::Source(format!("{url}: {e}")))?
    {
        if (out.len() + piece.len()) as u64 > max {
            return Err(SourceError::Source(format!(
                "{url}: sent more than the object can be ({max} bytes)"
            )));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// A request error for a person: what TLS refused, if that was it.
fn why(e: &reqwest::Error) -> String {
    super::tls::explain(e).map_or_else(|| e.to_string(), |w| format!("TLS: {w}"))
}

fn bad(url: &str, e: BatchError) -> SourceError {
    SourceError::Source(format!("{url}: {e}"))
}

fn store(
    sink: &Sink<'_>,
    id: ObjectId,
    kind: ObjectKind,
    max_len: u64,
    file: &[u8],
    url: &str,
) -> Result<(), SourceError> {
    match sink(id, kind, max_len, file) {
        Ok(()) => Ok(()),
        Err(StoreError::Object { source, .. }) => {
            Err(SourceError::Source(format!("{url}: {source}")))
        }
        // Hashes right but is no tree scap accepts (hostile names, say).
        Err(e @ StoreError::BadTree { .. }) => Err(SourceError::Source(format!("{url}: {e}"))),
        Err(e) => Err(SourceError::Fatal(e)),
    }
}
