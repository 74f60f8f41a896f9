//! The sender engine: drains one WAL to one receiver, whatever the receiver speaks. What
//! differs per receiver is a [`Protocol`] (how frames become a request, its headers, what a
//! refusal means): Prometheus remote write is the first ([`crate::remote_write::RemoteWrite`]).
//!
//! A reader task reads WAL records in order and routes every frame to a shard by its routing
//! hash (the series, for metrics), so the frames of one series stay in order. Each shard batches up to
//! `max_samples_per_send` frames or `batch_send_deadline`, sends, retries 5xx/429 with
//! exponential backoff (honouring `Retry-After`), drops and counts other 4xx, then acks the
//! frames. The reader commits the WAL position up to the oldest record not fully acked, with the
//! per-shard progress of partly acked records, so a batch the receiver accepted is never sent
//! again after a restart. Resharding drains the shards first, so no series is ever in two
//! shards at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, watch};

use crate::frame;
use crate::http::HttpClient;
use crate::telemetry::Metrics;
use crate::wal::Wal;

/// What differs per receiver. The engine batches frames, sends, retries 5xx and 429 with
/// backoff, follows 307/308, and acks; the protocol makes the request of the frames and says
/// what any other answer means.
pub trait Protocol: Send + Sync + 'static {
    /// Appends one frame's body to a batch being built (a batch is the concatenation of
    /// what this appends for each of its frames, in order).
    fn frame(&self, body: &[u8], batch: &mut Vec<u8>);
    /// Encodes a batch into the request body (envelope, compression).
    fn encode(&self, batch: &[u8], body: &mut Vec<u8>);
    /// Headers of every request (content type and encoding, protocol version, user agent).
    fn headers(&self) -> &HeaderMap;
    /// What a 4xx other than 429 means for the frames of the request.
    fn classify(&self, status: StatusCode, body: &str) -> Rejection;
    /// Every reason [`Protocol::classify`] can give, so counters exist at zero.
    fn rejection_reasons(&self) -> &'static [&'static str];
}

/// Everything the sender needs besides the WAL.
#[derive(Clone)]
pub struct SenderConfig {
    /// The receiver's protocol.
    pub protocol: Arc<dyn Protocol>,
    /// Name in metrics and logs.
    pub name: String,
    /// Receiver URL.
    pub url: http::Uri,
    /// Client (TLS of this endpoint).
    pub client: HttpClient,
    /// Configured `headers`.
    pub headers: HeaderMap,
    /// The `Authorization` header's source (files are re-read per request).
    pub auth: crate::http::Auth,
    /// Request timeout.
    pub timeout: Duration,
    /// Queue tuning.
    pub queue: config::agent::QueueConfig,
    /// `follow_redirects`: 307/308 answers are followed (at most 10 hops) with the same body.
    pub follow_redirects: bool,
    /// Most bytes of framed bodies in one request besides `max_samples_per_send` (0 = no
    /// bound): Loki's `batchsize`.
    pub max_bytes_per_send: usize,
}

/// Consecutive frames of one record and split on their way to a shard (at most
/// `max_samples_per_send`), already framed as `WriteRequest.timeseries` entries, so a shard
/// builds its request body by concatenation. Moving chunks rather than single frames keeps
/// channel and wake-up costs per batch, not per sample.
struct Item {
    seq: u64,
    /// Index of the frames' part when the record was split (hash % split count).
    split: u32,
    /// Number of frames (samples).
    count: u32,
    body: Vec<u8>,
}

/// Ack from a shard: how many frames of each record it finished (sent or dropped).
struct Ack {
    /// (record seq, split index, frames).
    counts: Vec<(u64, u32, u32)>,
    /// The chunks' buffers, emptied, for the reader to cut new chunks into (a chunk of log
    /// entries is up to a megabyte: reusing it saves the allocator fresh pages).
    bodies: Vec<Vec<u8>>,
}

/// Progress of a record that is read but not fully acked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Partial {
    /// Shard count the record was split with.
    nshards: u32,
    /// Frames acked per shard (a prefix of that shard's frames in record order).
    acked: Vec<u32>,
    /// Frames still in flight.
    remaining: u32,
}

/// Partial progress carried over from the previous run (or generation) for records not read
/// again yet: record seq → (shard count it was split with, frames acked per split).
type Carried = BTreeMap<u64, (u32, Vec<u32>)>;

/// Encodes the partial progress of records being sent and of carried records not read again
/// yet (both must survive a crash, or acked frames of the latter would be sent again).
///
/// A trailer `[u64::MAX][0u32][u64 dispatched]` records how far records had been handed to
/// shards, so that after a crash the records sent again that may have reached the receiver
/// are counted (readers of the format before it stop at its zero count).
fn encode_partials(p: &BTreeMap<u64, Partial>, carried: &Carried, dispatched: u64) -> Vec<u8> {
    let mut all: BTreeMap<u64, (u32, &[u32])> = carried.iter().map(|(s, (n, a))| (*s, (*n, a.as_slice()))).collect();
    for (seq, part) in p {
        all.insert(*seq, (part.nshards, part.acked.as_slice()));
    }
    let mut out = Vec::new();
    for (seq, (nshards, acked)) in all {
        if acked.iter().all(|&a| a == 0) {
            continue;
        }
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&nshards.to_le_bytes());
        for a in acked {
            out.extend_from_slice(&a.to_le_bytes());
        }
    }
    out.extend_from_slice(&u64::MAX.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&dispatched.to_le_bytes());
    out
}

/// The partials and the dispatched mark (0 when the commit predates it).
fn decode_partials(mut b: &[u8]) -> (Carried, u64) {
    let mut out = BTreeMap::new();
    let mut dispatched = 0;
    while b.len() >= 12 {
        let seq = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let n = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        b = &b[12..];
        if seq == u64::MAX && n == 0 && b.len() >= 8 {
            dispatched = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
            break;
        }
        if n == 0 || b.len() < 4 * n as usize {
            break;
        }
        let acked = (0..n as usize)
            .map(|i| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap_or_default()))
            .collect();
        b = &b[4 * n as usize..];
        out.insert(seq, (n, acked));
    }
    (out, dispatched)
}

/// Control of a running sender.
pub struct SenderHandle {
    shutdown: watch::Sender<Option<Instant>>,
    task: tokio::task::JoinHandle<()>,
    /// The sender this one waits for ([`SenderHandle::start_after`]): aborted with this one,
    /// so that it never runs on detached.
    previous: Option<tokio::task::AbortHandle>,
}

impl SenderHandle {
    /// Starts the sender for `wal`.
    pub fn start(cfg: SenderConfig, wal: Arc<Wal>, metrics: Arc<Metrics>) -> Self {
        let (shutdown, rx) = watch::channel(None);
        let task = tokio::spawn(run(cfg, wal, metrics, rx));
        Self {
            shutdown,
            task,
            previous: None,
        }
    }

    /// Starts the sender for `wal` once `previous` (a sender of the same WAL, with other
    /// settings) has stopped as at shutdown, within `timeout`: it then begins where that one
    /// committed. Meanwhile the WAL keeps taking appends.
    pub fn start_after(
        previous: SenderHandle,
        timeout: Duration,
        cfg: SenderConfig,
        wal: Arc<Wal>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (shutdown, rx) = watch::channel(None);
        let previous_task = previous.task.abort_handle();
        let task = tokio::spawn(async move {
            previous.shutdown(timeout).await;
            if rx.borrow().is_none() {
                run(cfg, wal, metrics, rx).await;
            }
        });
        Self {
            shutdown,
            task,
            previous: Some(previous_task),
        }
    }

    /// Stops reading, sends what the receiver accepts before `deadline`, keeps the rest in the
    /// WAL, and returns.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.shutdown.send(Some(Instant::now() + timeout));
        // The task itself honours the deadline; this outer bound only guards against bugs,
        // and ends the task for sure (a detached sender could share its WAL with the next).
        let mut task = self.task;
        if tokio::time::timeout(timeout + Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            tracing::error!("A sender did not stop within its deadline; aborted.");
            task.abort();
            if let Some(p) = &self.previous {
                p.abort();
            }
            let _ = task.await;
        }
    }
}

/// What the reader knows about delivery: records read but not fully acked, progress carried
/// over from before, and the commit point.
struct Progress {
    /// Records read in this generation and not yet committed.
    pending: BTreeMap<u64, Partial>,
    /// Partial progress of records not read again yet (from the previous run).
    carried: Carried,
    /// All records below this are acked (the WAL's commit point).
    next_unacked: u64,
    /// The next record to read.
    reads_from: u64,
    /// Records below this may have been in a posted request (kept in commits so a restart
    /// can count what it sends again; a clean stop keeps only the previous run's mark, as it
    /// counts its own aborts).
    posted_until: u64,
    /// The posted mark in the last commit.
    committed_posted: u64,
}

impl Progress {
    fn apply_ack(&mut self, ack: Ack) -> Vec<Vec<u8>> {
        for (seq, split, n) in ack.counts {
            if let Some(p) = self.pending.get_mut(&seq) {
                p.remaining = p.remaining.saturating_sub(n);
                if let Some(a) = p.acked.get_mut(split as usize) {
                    *a += n;
                }
            }
        }
        ack.bodies
    }

    /// Commits the longest fully-acked prefix plus the partial progress of the rest (and of
    /// carried records not read again yet).
    fn commit(&mut self, wal: &Wal, metrics: &Metrics, name: &str) {
        let before = self.next_unacked;
        let mut changed = false;
        while let Some((&seq, p)) = self.pending.first_key_value() {
            if p.remaining > 0 {
                break;
            }
            self.pending.remove(&seq);
            self.next_unacked = seq + 1;
            changed = true;
        }
        if self.pending.is_empty() && self.reads_from > self.next_unacked {
            self.next_unacked = self.reads_from;
            changed = true;
        }
        let partial_progress = self.pending.values().any(|p| p.acked.iter().any(|&a| a > 0));
        // A new posted mark is written soon (commits are tried at least every second), so a
        // kill leaves few posted records uncounted.
        let posted_moved = self.posted_until > self.committed_posted;
        if changed || partial_progress || posted_moved {
            self.committed_posted = self.posted_until;
            let extra = encode_partials(&self.pending, &self.carried, self.posted_until);
            if let Err(e) = crate::wal::blocking(|| wal.commit(self.next_unacked, &extra)) {
                tracing::error!(remote = %name, error = %e, "Committing the WAL position failed.");
                metrics.wal_commit_error(name);
                self.next_unacked = before.max(self.next_unacked);
            }
        }
    }

    /// Writes the commit file even when nothing moved (the last commit before stopping).
    fn force_commit(&mut self, wal: &Wal, metrics: &Metrics, name: &str) {
        let extra = encode_partials(&self.pending, &self.carried, self.posted_until);
        if let Err(e) = crate::wal::blocking(|| wal.commit(self.next_unacked, &extra)) {
            tracing::error!(remote = %name, error = %e, "Committing the WAL position failed.");
            metrics.wal_commit_error(name);
        }
    }

    /// After a generation drained: records not fully acked are read again by the next
    /// generation with their progress, together with carried records never read.
    fn end_generation(&mut self) {
        for (seq, p) in std::mem::take(&mut self.pending) {
            if p.remaining > 0 || p.acked.iter().any(|&a| a > 0) {
                self.carried.insert(seq, (p.nshards, p.acked));
            }
        }
        self.reads_from = self.next_unacked;
    }

    /// Starts routing a record: counts the frames still to send (so that acks of its first
    /// chunks cannot complete it early), records it as pending, and returns the [`Routing`]
    /// that cuts its per-shard chunks one at a time — only the chunks a shard has room for
    /// exist at once, not a copy of the whole record.
    fn route<'p>(&mut self, seq: u64, payload: &'p [u8], nshards: usize, per_send: u32) -> Routing<'p> {
        // Carried records before this one were skipped by the reader (evicted or corrupt):
        // their progress means nothing any more.
        self.carried.retain(|s, _| *s >= seq);
        let (split_n, already) = match self.carried.remove(&seq) {
            Some((n, acked)) => (n as usize, acked),
            None => (nshards, vec![0; nshards]),
        };
        let mut seen = vec![0u32; split_n];
        let mut remaining = 0u32;
        let mut frames = frame::Frames::new(payload);
        for (hash, _) in frames.by_ref() {
            let k = (hash % split_n as u64) as usize;
            seen[k] += 1;
            if seen[k] > already[k] {
                remaining += 1;
            }
        }
        self.pending.insert(
            seq,
            Partial {
                nshards: split_n as u32,
                acked: already.clone(),
                remaining,
            },
        );
        self.reads_from = seq + 1;
        Routing {
            seq,
            nshards,
            per_send,
            seen: vec![0; split_n],
            open: (0..split_n).map(|k| Item::empty(seq, k)).collect(),
            already,
            frames: frame::Frames::new(payload),
            flushed: 0,
            remaining,
            malformed: frames.malformed,
            max_bytes: 0,
            pool: Vec::new(),
        }
    }
}

impl Item {
    fn empty(seq: u64, split: usize) -> Self {
        Item {
            seq,
            split: split as u32,
            count: 0,
            body: Vec::new(),
        }
    }
}

/// A record being cut into per-shard chunks of at most `per_send` frames, skipping frames
/// acked before (a record carried over with partial progress).
struct Routing<'p> {
    seq: u64,
    nshards: usize,
    per_send: u32,
    already: Vec<u32>,
    seen: Vec<u32>,
    open: Vec<Item>,
    frames: frame::Frames<'p>,
    /// Open chunks handed out after the last frame.
    flushed: usize,
    /// Frames to send.
    remaining: u32,
    /// Trailing bytes did not form a frame.
    malformed: bool,
    /// Byte bound of a chunk (0 = none).
    max_bytes: usize,
    /// Buffers for new chunks.
    pool: Vec<Vec<u8>>,
}

impl Routing<'_> {
    /// The next chunk and the shard it goes to. A record split with another shard count
    /// (carried from a run with other shards) maps its split index onto a current shard; no
    /// reshard happens while such records remain, so a series stays on one shard and in order.
    fn next(&mut self, protocol: &dyn Protocol) -> Option<(usize, Item)> {
        let split_n = self.open.len();
        for (hash, body) in self.frames.by_ref() {
            let k = (hash % split_n as u64) as usize;
            self.seen[k] += 1;
            if self.seen[k] <= self.already[k] {
                continue;
            }
            let chunk = &mut self.open[k];
            protocol.frame(body, &mut chunk.body);
            chunk.count += 1;
            if chunk.count == self.per_send || (self.max_bytes > 0 && chunk.body.len() >= self.max_bytes) {
                let mut next = Item::empty(self.seq, k);
                next.body = self.pool.pop().unwrap_or_default();
                let full = std::mem::replace(chunk, next);
                return Some((k % self.nshards, full));
            }
        }
        while self.flushed < split_n {
            let k = self.flushed;
            self.flushed += 1;
            if self.open[k].count > 0 {
                let last = std::mem::replace(&mut self.open[k], Item::empty(self.seq, k));
                return Some((k % self.nshards, last));
            }
        }
        None
    }
}

/// One generation of shards: their channels, tasks and the acks they send back.
struct Generation {
    nshards: usize,
    txs: Vec<mpsc::Sender<Item>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    acks: mpsc::UnboundedReceiver<Ack>,
}

/// The reader side of the engine: reads the WAL, routes frames to shards, applies acks,
/// commits, sizes the shards. Lives as long as the sender; generations of shards come and go.
struct Reader {
    cfg: SenderConfig,
    wal: Arc<Wal>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<Option<Instant>>,
    progress: Progress,
    stats: Arc<ShardStats>,
    sizing: Sizing,
    /// Records below this were posted before this start (counted when sent again).
    dispatched_before: u64,
    /// Emptied chunk buffers returned by the shards.
    pool: Vec<Vec<u8>>,
}

impl Reader {
    /// Picks up where the commit file says the previous run stopped.
    fn new(
        cfg: SenderConfig,
        wal: Arc<Wal>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<Option<Instant>>,
    ) -> Self {
        let (next_unacked, extra) = wal.committed();
        let (carried, dispatched_before) = decode_partials(&extra);
        let progress = Progress {
            pending: BTreeMap::new(),
            carried,
            next_unacked,
            reads_from: next_unacked,
            posted_until: dispatched_before,
            committed_posted: dispatched_before,
        };
        let stats = Arc::new(ShardStats::default());
        stats
            .posted_until
            .store(dispatched_before, std::sync::atomic::Ordering::Relaxed);
        let sizing = Sizing::new(&wal);
        Self {
            cfg,
            wal,
            metrics,
            shutdown,
            progress,
            stats,
            sizing,
            dispatched_before,
            pool: Vec::new(),
        }
    }

    /// Records partly acked before a restart were split with the shard count of that run; it
    /// is used again so their remaining frames and new records of the same series share a
    /// shard.
    fn initial_shards(&self) -> usize {
        match self.progress.carried.values().next() {
            Some((n, _)) => (*n as usize).max(1),
            None => self.cfg.queue.min_shards.max(1),
        }
    }

    /// Applies an ack and keeps its buffers for new chunks.
    fn take_ack(&mut self, ack: Ack) {
        for b in self.progress.apply_ack(ack) {
            if self.pool.len() < 8 && b.capacity() > 0 {
                self.pool.push(b);
            }
        }
    }

    fn stopping(&self) -> bool {
        self.shutdown.borrow().is_some()
    }

    fn commit(&mut self) {
        self.progress.commit(&self.wal, &self.metrics, &self.cfg.name);
    }

    fn decide(&mut self, nshards: usize) -> usize {
        self.sizing
            .decide(nshards, &self.cfg.queue, &self.stats, &self.wal, &self.progress)
    }

    /// Starts `nshards` shards.
    fn start_generation(&self, nshards: usize) -> Generation {
        let q = &self.cfg.queue;
        self.metrics.set_shards(&self.cfg.name, nshards as i64);
        // Unbounded on purpose: acks are bounded by the batches in flight (shards × channel
        // capacity / batch size), and a bounded ack channel could deadlock against the reader
        // waiting for room in a shard channel.
        let (ack_tx, acks) = mpsc::unbounded_channel::<Ack>();
        let mut txs = Vec::with_capacity(nshards);
        let mut tasks = Vec::with_capacity(nshards);
        for i in 0..nshards {
            let chunks = (q.capacity / q.max_samples_per_send.max(1)).max(2);
            let (tx, rx) = mpsc::channel::<Item>(chunks);
            txs.push(tx);
            tasks.push(tokio::spawn(shard(
                i,
                self.cfg.clone(),
                rx,
                ack_tx.clone(),
                self.metrics.clone(),
                self.shutdown.clone(),
                self.stats.clone(),
            )));
        }
        Generation {
            nshards,
            txs,
            tasks,
            acks,
        }
    }

    /// Feeds the generation's shards until shutdown or a reshard decision; returns the shard
    /// count wanted next.
    async fn feed(&mut self, g: &mut Generation) -> usize {
        let nshards = g.nshards;
        let per_send = self.cfg.queue.max_samples_per_send.max(1) as u32;
        let mut reader = self.wal.reader(self.progress.reads_from);
        // Checked every second; `Sizing` decides once per period, and as soon as the first
        // pushes are timed.
        let mut reshard_tick = tokio::time::interval_at(tokio::time::Instant::now() + RESHARD_CHECK, RESHARD_CHECK);
        reshard_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut desired = nshards;
        let mut caught_up = false;
        let notify = self.wal.notifier();
        loop {
            if self.stopping() {
                return desired;
            }
            // Apply acks that are already there without waiting.
            while let Ok(ack) = g.acks.try_recv() {
                self.take_ack(ack);
            }
            self.progress.posted_until = self.stats.posted_until.load(std::sync::atomic::Ordering::Relaxed);
            self.commit();
            if caught_up {
                tokio::select! {
                    _ = notify.notified() => { caught_up = false; }
                    _ = tokio::time::sleep(Duration::from_millis(250)) => { caught_up = false; }
                    Some(ack) = g.acks.recv() => self.take_ack(ack),
                    _ = self.shutdown.changed() => {}
                    _ = reshard_tick.tick() => {
                        desired = self.decide(nshards);
                        if desired != nshards { return desired; }
                    }
                }
                continue;
            }
            let record = match crate::wal::blocking(|| reader.next()) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    caught_up = true;
                    // Evictions are counted from the WAL's own statistics (app.rs).
                    let _ = reader.take_evicted();
                    continue;
                }
                Err(e) => {
                    tracing::error!(remote = %self.cfg.name, error = %e, "Reading the WAL failed; retrying.");
                    self.metrics.wal_read_error(&self.cfg.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    reader = self.wal.reader(self.progress.reads_from);
                    continue;
                }
            };
            let _ = reader.take_evicted();
            let mut routing = self.progress.route(record.seq, &record.payload, nshards, per_send);
            routing.max_bytes = self.cfg.max_bytes_per_send;
            routing.pool = std::mem::take(&mut self.pool);
            for item in &mut routing.open {
                if let Some(b) = routing.pool.pop() {
                    item.body = b;
                }
            }
            if record.seq < self.dispatched_before && routing.remaining > 0 {
                // Posted before the restart and not (fully) acked: the receiver may have it.
                self.metrics
                    .push_unknown_outcome(&self.cfg.name, Unknown::Restart.as_str());
            }
            if routing.malformed {
                self.metrics.wal_corrupt(&self.cfg.name);
            }
            let protocol = self.cfg.protocol.clone();
            while let Some((target, item)) = routing.next(&*protocol) {
                if !self.hand_over(g, target, item, &mut reshard_tick, &mut desired).await {
                    return desired;
                }
            }
            self.pool.append(&mut routing.pool);
            drop(routing);
            reader.recycle(record.payload);
            if desired == nshards && reshard_tick_ready(&mut reshard_tick) {
                desired = self.decide(nshards);
            }
            if desired != nshards {
                return desired;
            }
        }
    }

    /// Waits for room in shard `target` while still taking acks (and committing them) and
    /// deciding the shard count (a new count takes effect after the record). False when the
    /// shard is gone or shutdown began.
    async fn hand_over(
        &mut self,
        g: &mut Generation,
        target: usize,
        item: Item,
        reshard_tick: &mut tokio::time::Interval,
        desired: &mut usize,
    ) -> bool {
        let tx = g.txs[target].clone();
        loop {
            tokio::select! {
                biased;
                Some(ack) = g.acks.recv() => {
                    self.take_ack(ack);
                    self.commit();
                }
                _ = reshard_tick.tick(), if *desired == g.nshards => {
                    *desired = self.decide(g.nshards);
                }
                permit = tx.reserve() => return match permit {
                    Ok(p) => {
                        p.send(item);
                        true
                    }
                    Err(_) => false,
                },
                _ = self.shutdown.changed() => return false,
            }
        }
    }

    /// Ends a generation: closes its channels, lets its shards finish (they stop retrying once
    /// the shutdown deadline passes) and collects their acks.
    async fn drain(&mut self, g: Generation) {
        let Generation {
            txs, tasks, mut acks, ..
        } = g;
        drop(txs);
        while let Some(ack) = acks.recv().await {
            self.take_ack(ack);
            self.commit();
        }
        for t in tasks {
            let _ = t.await;
        }
        self.progress.end_generation();
    }

    /// The last commit before the sender stops.
    fn finish(&mut self) {
        // Requests cut off by the deadline were counted as they were aborted; records the
        // previous run had posted and this one did not read again stay marked.
        self.progress.posted_until = self.dispatched_before;
        self.progress.force_commit(&self.wal, &self.metrics, &self.cfg.name);
        tracing::info!(remote = %self.cfg.name, unacked_records = self.wal.next_seq().saturating_sub(self.progress.next_unacked), "Sender stopped; unsent samples stay in the WAL.");
    }
}

/// The sender: generations of shards fed by one [`Reader`], until shutdown.
pub async fn run(cfg: SenderConfig, wal: Arc<Wal>, metrics: Arc<Metrics>, shutdown: watch::Receiver<Option<Instant>>) {
    let mut reader = Reader::new(cfg, wal, metrics, shutdown);
    let mut nshards = reader.initial_shards();
    loop {
        let mut generation = reader.start_generation(nshards);
        let desired = reader.feed(&mut generation).await;
        reader.drain(generation).await;
        if reader.stopping() {
            reader.finish();
            return;
        }
        reader.commit();
        if desired != nshards {
            tracing::info!(remote = %reader.cfg.name, from = nshards, to = desired, "Resharding.");
            nshards = desired;
        }
    }
}

fn reshard_tick_ready(t: &mut tokio::time::Interval) -> bool {
    use futures::FutureExt;
    t.tick().now_or_never().is_some()
}

/// How often the shard count is reconsidered.
const RESHARD_PERIOD: Duration = Duration::from_secs(5);
/// How often the reader asks [`Sizing`].
const RESHARD_CHECK: Duration = Duration::from_secs(1);

/// Send statistics for the resharding decision.
#[derive(Default)]
struct ShardStats {
    /// Time shards spent sending (requests, retries and backoff included).
    busy_nanos: std::sync::atomic::AtomicU64,
    /// Samples finished (sent, duplicate or dropped).
    done: std::sync::atomic::AtomicU64,
    /// One past the highest record seq that was part of a posted request.
    posted_until: std::sync::atomic::AtomicU64,
}

/// The shard count from the rates, as Prometheus's queue manager does: the time one sample
/// costs a shard × (the incoming rate + a share of the backlog to catch up), with hysteresis.
struct Sizing {
    last: Instant,
    appended_samples: u64,
    appended_records: u64,
    /// Smoothed rates (samples per second).
    in_rate: Option<f64>,
    /// Smoothed shard-seconds per sample.
    cost: Option<f64>,
}

impl Sizing {
    fn new(wal: &Wal) -> Self {
        let s = wal.stats();
        Self {
            last: Instant::now(),
            appended_samples: s.appended_items,
            appended_records: s.appended_records,
            in_rate: None,
            cost: None,
        }
    }

    fn decide(
        &mut self,
        n: usize,
        q: &config::agent::QueueConfig,
        stats: &ShardStats,
        wal: &Wal,
        p: &Progress,
    ) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        let elapsed = self.last.elapsed().as_secs_f64().max(0.001);
        let first = self.cost.is_none() && stats.done.load(Relaxed) > 0;
        if elapsed < RESHARD_PERIOD.as_secs_f64() && !first {
            return n;
        }
        let s = wal.stats();
        self.last = Instant::now();
        let appended = s.appended_items.saturating_sub(self.appended_samples);
        let records = s.appended_records.saturating_sub(self.appended_records);
        self.appended_samples = s.appended_items;
        self.appended_records = s.appended_records;
        let busy = stats.busy_nanos.swap(0, Relaxed) as f64 / 1e9;
        let done = stats.done.swap(0, Relaxed);
        let smooth = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.5 * o + 0.5 * new));
        self.in_rate = smooth(self.in_rate, appended as f64 / elapsed);
        if done > 0 {
            self.cost = smooth(self.cost, busy / done as f64);
        }
        let max = q.max_shards.max(1);
        let min = q.min_shards.max(1).min(max);
        // Records partly sent with the current split must finish before the split changes.
        if !p.carried.is_empty() {
            return n;
        }
        let backlog_records = s.next_seq.saturating_sub(p.next_unacked);
        let per_record = if s.appended_records > 0 {
            s.appended_items as f64 / s.appended_records as f64
        } else if records > 0 {
            appended as f64 / records as f64
        } else {
            0.0
        };
        let backlog = backlog_records as f64 * per_record;
        let Some(cost) = self.cost else {
            // Nothing finished yet: grow only if shards are saturated and a backlog exists.
            return if busy > 0.9 * elapsed * n as f64 && backlog_records > 1 {
                (n * 2).min(max)
            } else {
                n
            };
        };
        // Catch up with the backlog within 10 periods, keep 20 % headroom.
        let in_rate = self.in_rate.unwrap_or(0.0);
        let needed = cost * (in_rate + backlog / (10.0 * RESHARD_PERIOD.as_secs_f64())) * 1.2;
        let desired = (needed.ceil() as usize).clamp(min, max);
        tracing::debug!(shards = n, desired, cost, in_rate, backlog, busy, done, "Shard sizing.");
        if desired > n {
            desired
        } else if (desired as f64) < 0.7 * n as f64 && backlog_records <= 2 {
            desired.max(min)
        } else {
            n
        }
    }
}

enum Outcome {
    Sent,
    /// Rejected as already present ("duplicate sample for timestamp"): counted apart from loss.
    Duplicate,
    Dropped(&'static str),
    Aborted,
}

#[allow(clippy::too_many_arguments)]
async fn shard(
    _index: usize,
    cfg: SenderConfig,
    mut rx: mpsc::Receiver<Item>,
    acks: mpsc::UnboundedSender<Ack>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<Option<Instant>>,
    stats: Arc<ShardStats>,
) {
    let q = &cfg.queue;
    let max = q.max_samples_per_send.max(1);
    let deadline = q.batch_send_deadline.get();
    let mut batch: Vec<Item> = Vec::new();
    let mut carry: Option<Item> = None;
    let mut raw = Vec::new();
    let mut compressed = Vec::new();
    let mut closed = false;
    loop {
        // Fill a batch: the carried chunk or the first to arrive, then more until full (never
        // over max_samples_per_send) or the deadline.
        let first = match carry.take() {
            Some(item) => item,
            None if closed => break,
            None => match rx.recv().await {
                Some(item) => item,
                None => break,
            },
        };
        let mut samples = first.count as usize;
        let mut bytes = first.body.len();
        batch.push(first);
        let max_bytes = if cfg.max_bytes_per_send == 0 {
            usize::MAX
        } else {
            cfg.max_bytes_per_send
        };
        let until = tokio::time::Instant::now() + deadline;
        while samples < max && bytes < max_bytes && !closed {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(item)) => {
                    if samples + item.count as usize > max || bytes + item.body.len() > max_bytes {
                        carry = Some(item);
                        break;
                    }
                    samples += item.count as usize;
                    bytes += item.body.len();
                    batch.push(item);
                }
                Ok(None) => closed = true,
                Err(_) => break,
            }
        }
        let started = Instant::now();
        if let Some(top) = batch.iter().map(|i| i.seq + 1).max() {
            stats.posted_until.fetch_max(top, std::sync::atomic::Ordering::Relaxed);
        }
        let outcome = send_batch(&cfg, &batch, &mut raw, &mut compressed, &metrics, &shutdown).await;
        stats.busy_nanos.fetch_add(
            started.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if !matches!(outcome, Outcome::Aborted) {
            stats
                .done
                .fetch_add(samples as u64, std::sync::atomic::Ordering::Relaxed);
        }
        match outcome {
            Outcome::Sent => metrics.samples_sent(&cfg.name, samples as u64),
            Outcome::Duplicate => metrics.samples_duplicate(&cfg.name, samples as u64),
            Outcome::Dropped(reason) => metrics.samples_dropped(&cfg.name, reason, samples as u64),
            Outcome::Aborted => return, // shutdown deadline passed: no ack, the WAL keeps them
        }
        if acks
            .send(Ack {
                bodies: batch
                    .iter_mut()
                    .map(|i| {
                        let mut b = std::mem::take(&mut i.body);
                        b.clear();
                        b
                    })
                    .collect(),
                counts: ack_counts(&mut batch),
            })
            .is_err()
        {
            return;
        }
    }
}

fn ack_counts(batch: &mut Vec<Item>) -> Vec<(u64, u32, u32)> {
    let mut counts: Vec<(u64, u32, u32)> = Vec::new();
    for item in batch.drain(..) {
        match counts
            .iter_mut()
            .rev()
            .find(|(s, k, _)| *s == item.seq && *k == item.split)
        {
            Some((_, _, n)) => *n += item.count,
            None => counts.push((item.seq, item.split, item.count)),
        }
    }
    counts
}

/// Why a request's samples may reach the receiver twice: its answer never came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unknown {
    /// `remote_timeout` passed while waiting for the answer.
    Timeout,
    /// The connection broke after the request was (maybe) written.
    Connection,
    /// The shutdown deadline passed while the request was in flight.
    Shutdown,
    /// A record dispatched before a restart (or `kill -9`) without an ack is sent again.
    Restart,
}

impl Unknown {
    /// Label value of the `reason` of `sre_agent_remote_pushes_unknown_outcome_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Unknown::Timeout => "timeout",
            Unknown::Connection => "connection",
            Unknown::Shutdown => "shutdown",
            Unknown::Restart => "restart",
        }
    }

    /// Every reason as label values, for creating the counters at zero.
    pub const REASONS: [&'static str; 4] = ["timeout", "connection", "shutdown", "restart"];
}

/// How a request ended, as far as the sender can tell.
enum PostError {
    /// Nothing was sent (no connection could be made): a retry cannot duplicate.
    NotSent(String),
    /// The request may have been received; its answer never came.
    Unknown(Unknown, String),
}

/// What a receiver's non-retryable answer means for the frames of the request.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The receiver already has them (for remote write, "duplicate sample for timestamp"):
    /// delivered.
    Duplicate,
    /// Lost, with the reason for `sre_agent_remote_samples_dropped_total`.
    Dropped(&'static str),
}

/// Sends one batch with retries. Returns `Aborted` when the shutdown deadline passes first.
///
/// A request in flight is never abandoned and re-sent when shutdown begins: it is awaited until
/// the deadline, and only when the deadline cuts it off are its samples left for the next start
/// (counted as an unknown outcome).
async fn send_batch(
    cfg: &SenderConfig,
    batch: &[Item],
    raw: &mut Vec<u8>,
    compressed: &mut Vec<u8>,
    metrics: &Metrics,
    shutdown: &watch::Receiver<Option<Instant>>,
) -> Outcome {
    raw.clear();
    for item in batch {
        raw.extend_from_slice(&item.body);
    }
    compressed.clear();
    cfg.protocol.encode(raw, compressed);
    let body = Bytes::copy_from_slice(compressed);
    let samples: u64 = batch.iter().map(|i| u64::from(i.count)).sum();
    let q = &cfg.queue;
    let mut backoff = q.min_backoff.get().max(Duration::from_millis(1));
    let max_backoff = q.max_backoff.get().max(backoff);
    let mut sd = shutdown.clone();
    loop {
        if let Some(deadline) = *sd.borrow() {
            if Instant::now() >= deadline {
                return Outcome::Aborted;
            }
        }
        let started = Instant::now();
        let request = post(cfg, body.clone());
        tokio::pin!(request);
        let result = loop {
            let deadline = *sd.borrow_and_update();
            match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), &mut request).await {
                    Ok(r) => break r,
                    Err(_) => {
                        metrics.push_unknown_outcome(&cfg.name, Unknown::Shutdown.as_str());
                        tracing::warn!(remote = %cfg.name, samples, "The shutdown deadline cut off a request in flight; its samples stay in the WAL and are sent again at the next start (the receiver may have them).");
                        return Outcome::Aborted;
                    }
                },
                None => tokio::select! {
                    r = &mut request => break r,
                    // Shutdown began mid-request: keep waiting for the same request, now
                    // bounded by the deadline.
                    changed = sd.changed() => if changed.is_err() {
                        break (&mut request).await;
                    },
                },
            }
        };
        metrics.observe_send(&cfg.name, started.elapsed());
        let retry_after = match result {
            Ok((status, _, _)) if status.is_success() => return Outcome::Sent,
            Ok((status, retry_after, text)) => {
                let retryable =
                    status.is_server_error() || (status == StatusCode::TOO_MANY_REQUESTS && q.retry_on_http_429);
                if status.is_redirection() {
                    tracing::warn!(remote = %cfg.name, %status, samples, follow_redirects = cfg.follow_redirects, "Receiver answered a redirect that is not followed (only 307/308 are, with follow_redirects); dropped. Point url at the final address.");
                    return Outcome::Dropped("http_3xx");
                }
                if !retryable {
                    return match cfg.protocol.classify(status, &text) {
                        Rejection::Duplicate => {
                            tracing::info!(remote = %cfg.name, %status, body = %text.trim(), samples, "Receiver already had these samples; not resent.");
                            Outcome::Duplicate
                        }
                        Rejection::Dropped(reason) => {
                            tracing::warn!(remote = %cfg.name, %status, body = %text.trim(), samples, reason, "Receiver rejected a batch; dropped.");
                            Outcome::Dropped(reason)
                        }
                    };
                }
                tracing::warn!(remote = %cfg.name, %status, body = %text.trim(), "Receiver failed; retrying.");
                retry_after
            }
            Err(PostError::NotSent(e)) => {
                tracing::warn!(remote = %cfg.name, error = %e, "Sending failed; retrying.");
                None
            }
            Err(PostError::Unknown(why, e)) => {
                // The receiver may have stored these samples: the retry may repeat them.
                metrics.push_unknown_outcome(&cfg.name, why.as_str());
                tracing::warn!(remote = %cfg.name, error = %e, reason = why.as_str(), "No answer to a request; retrying (the receiver may get these samples twice).");
                None
            }
        };
        metrics.samples_retried(&cfg.name, samples);
        // A receiver's Retry-After is honoured up to a minute (or the longest backoff, when
        // longer): a day-long value must not stall a shard.
        let mut wait = retry_after.map_or(backoff, |r| r.min(max_backoff.max(Duration::from_secs(60))));
        if let Some(deadline) = *sd.borrow() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Outcome::Aborted;
            }
            wait = wait.min(left);
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = sd.changed() => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// How many redirects a push follows (Go's default, which Prometheus uses).
const MAX_REDIRECTS: usize = 10;

async fn post(cfg: &SenderConfig, body: Bytes) -> Result<(StatusCode, Option<Duration>, String), PostError> {
    let first = cfg.url.to_string();
    let auth = cfg.auth.header().map_err(|e| PostError::NotSent(e.to_string()))?;
    let work = async {
        let mut url = first.clone();
        let mut hops = 0;
        let resp = loop {
            let mut req = Request::post(url.as_str())
                .body(Full::new(body.clone()))
                .map_err(|e| PostError::NotSent(e.to_string()))?;
            for (k, v) in cfg.protocol.headers() {
                req.headers_mut().insert(k.clone(), v.clone());
            }
            for (k, v) in &cfg.headers {
                req.headers_mut().insert(k.clone(), v.clone());
            }
            // Credentials follow a redirect only to the same host or a subdomain (as Go's client).
            if let Some(a) = auth
                .as_ref()
                .filter(|_| crate::http::credentials_may_follow(&first, &url))
            {
                req.headers_mut().insert(header::AUTHORIZATION, a.clone());
            }
            let resp = cfg.client.request(req).await.map_err(|e| {
                let text = crate::http::error_chain(&e);
                if e.is_connect() && hops == 0 {
                    PostError::NotSent(text)
                } else {
                    PostError::Unknown(Unknown::Connection, text)
                }
            })?;
            // Only method-preserving redirects can carry a push: 301/302/303 would turn the
            // POST into a GET (as Go's client does), which no receiver accepts.
            let status = resp.status();
            let preserving = status == StatusCode::TEMPORARY_REDIRECT || status == StatusCode::PERMANENT_REDIRECT;
            match resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()) {
                Some(loc) if cfg.follow_redirects && preserving && hops < MAX_REDIRECTS => {
                    url = crate::http::join_location(&url, loc);
                    hops += 1;
                }
                _ => break resp,
            }
        };
        let status = resp.status();
        let retry_after = resp.headers().get(header::RETRY_AFTER).and_then(parse_retry_after);
        let text = if status.is_success() {
            String::new()
        } else {
            let b = http_body_util::Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            String::from_utf8_lossy(&b).into_owned()
        };
        Ok::<_, PostError>((status, retry_after, text))
    };
    match tokio::time::timeout(cfg.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(PostError::Unknown(
            Unknown::Timeout,
            format!("request timed out after {:?}", cfg.timeout),
        )),
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(s).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partials_round_trip() {
        let mut p = BTreeMap::new();
        p.insert(
            7,
            Partial {
                nshards: 3,
                acked: vec![1, 0, 5],
                remaining: 2,
            },
        );
        p.insert(
            9,
            Partial {
                nshards: 2,
                acked: vec![0, 0],
                remaining: 4,
            },
        );
        let (d, dispatched) = decode_partials(&encode_partials(&p, &Carried::new(), 10));
        assert_eq!(dispatched, 10);
        assert_eq!(d.len(), 1);
        assert_eq!(d[&7], (3, vec![1, 0, 5]));
    }

    fn progress_with_carried() -> Progress {
        let mut carried = Carried::new();
        carried.insert(11, (4, vec![2, 0, 1, 0]));
        carried.insert(12, (4, vec![0, 3, 0, 0]));
        Progress {
            pending: BTreeMap::new(),
            carried,
            next_unacked: 10,
            reads_from: 10,
            posted_until: 0,
            committed_posted: 0,
        }
    }

    /// Regression: partial progress carried from a restart for records not read again yet was
    /// left out of every commit, so a crash afterwards sent their acked frames again.
    #[test]
    fn commits_keep_carried_progress_of_records_not_read_yet() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), Default::default()).unwrap();
        for _ in 0..13 {
            wal.append(b"", 0).unwrap();
        }
        let metrics = Metrics::new();
        let mut p = progress_with_carried();
        // Record 10 is read and fully acked; 11 and 12 are not read yet.
        p.pending.insert(
            10,
            Partial {
                nshards: 4,
                acked: vec![0; 4],
                remaining: 0,
            },
        );
        p.reads_from = 11;
        p.posted_until = 11;
        p.commit(&wal, &metrics, "t");
        let (next, extra) = wal.committed();
        assert_eq!(next, 11);
        let (d, dispatched) = decode_partials(&extra);
        assert_eq!(dispatched, 11);
        assert_eq!(d[&11], (4, vec![2, 0, 1, 0]));
        assert_eq!(d[&12], (4, vec![0, 3, 0, 0]));
    }

    /// Regression: at a reshard the next generation's carried progress was rebuilt from the
    /// records read in this generation only, dropping records carried but not read yet.
    #[test]
    fn a_generation_end_keeps_carried_records_not_read_yet() {
        let mut p = progress_with_carried();
        p.pending.insert(
            10,
            Partial {
                nshards: 4,
                acked: vec![1, 0, 0, 0],
                remaining: 3,
            },
        );
        p.end_generation();
        assert_eq!(p.carried.len(), 3);
        assert_eq!(p.carried[&10], (4, vec![1, 0, 0, 0]));
        assert_eq!(p.carried[&12], (4, vec![0, 3, 0, 0]));
        assert_eq!(p.reads_from, 10);
    }

    #[test]
    fn routing_a_carried_record_skips_its_acked_frames() {
        let mut payload = Vec::new();
        for i in 0..40u64 {
            crate::remote_write::frame::push(&mut payload, i, format!("s{i}").as_bytes(), 1.0, 1000);
        }
        let mut p = progress_with_carried();
        let mut routing = p.route(11, &payload, 4, 7);
        assert!(!routing.malformed);
        assert_eq!(routing.remaining, 37, "counted before any chunk is cut");
        let protocol = crate::remote_write::RemoteWrite::new();
        let items: Vec<(usize, Item)> = std::iter::from_fn(|| routing.next(&protocol)).collect();
        assert!(
            items.iter().all(|(_, i)| i.count <= 7),
            "chunks of at most per_send frames"
        );
        let sent: u32 = items.iter().map(|(_, i)| i.count).sum();
        assert_eq!(sent, 40 - 3, "2 frames of split 0 and 1 of split 2 were acked before");
        assert!(!p.carried.contains_key(&11));
        assert_eq!(p.pending[&11].acked, vec![2, 0, 1, 0]);
        assert_eq!(p.pending[&11].remaining, 37);
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("3")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }
}
