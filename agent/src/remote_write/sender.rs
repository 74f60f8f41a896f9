//! Drains one endpoint's WAL to its receiver.
//!
//! A reader task reads WAL records in order and routes every frame to a shard by its series
//! hash, so samples of one series stay in order. Each shard batches up to
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

use super::wal::Wal;
use super::{frame, proto};
use crate::http::HttpClient;
use crate::telemetry::Metrics;

/// Everything the sender needs besides the WAL.
#[derive(Clone)]
pub struct SenderConfig {
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

fn encode_partials(p: &BTreeMap<u64, Partial>) -> Vec<u8> {
    let mut out = Vec::new();
    for (seq, part) in p {
        if part.acked.iter().all(|&a| a == 0) {
            continue;
        }
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&part.nshards.to_le_bytes());
        for a in &part.acked {
            out.extend_from_slice(&a.to_le_bytes());
        }
    }
    out
}

fn decode_partials(mut b: &[u8]) -> BTreeMap<u64, (u32, Vec<u32>)> {
    let mut out = BTreeMap::new();
    while b.len() >= 12 {
        let seq = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let n = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        b = &b[12..];
        if n == 0 || b.len() < 4 * n as usize {
            break;
        }
        let acked = (0..n as usize)
            .map(|i| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap_or_default()))
            .collect();
        b = &b[4 * n as usize..];
        out.insert(seq, (n, acked));
    }
    out
}

/// Control of a running sender.
pub struct SenderHandle {
    shutdown: watch::Sender<Option<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl SenderHandle {
    /// Starts the sender for `wal`.
    pub fn start(cfg: SenderConfig, wal: Arc<Wal>, metrics: Arc<Metrics>) -> Self {
        let (shutdown, rx) = watch::channel(None);
        let task = tokio::spawn(run(cfg, wal, metrics, rx));
        Self { shutdown, task }
    }

    /// Stops reading, sends what the receiver accepts before `deadline`, keeps the rest in the
    /// WAL, and returns.
    pub async fn shutdown(self, timeout: Duration) {
        let _ = self.shutdown.send(Some(Instant::now() + timeout));
        // The task itself honours the deadline; this outer bound only guards against bugs.
        let _ = tokio::time::timeout(timeout + Duration::from_secs(5), self.task).await;
    }
}

/// The reader/commit loop. Returns after a shutdown request.
pub async fn run(
    cfg: SenderConfig,
    wal: Arc<Wal>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<Option<Instant>>,
) {
    let q = cfg.queue.clone();
    let mut nshards = q.min_shards.max(1);
    let (mut next_unacked, extra) = wal.committed();
    let mut carried = decode_partials(&extra);
    // Records partly acked before a restart were split with the shard count of that run; use
    // it again so their remaining frames and new records of the same series share a shard.
    if let Some((n, _)) = carried.values().next() {
        nshards = (*n as usize).max(1);
    }
    let mut reads_from = next_unacked;
    let stats = Arc::new(ShardStats::default());
    loop {
        metrics.set_shards(&cfg.name, nshards as i64);
        // One generation of shards; it ends on reshard or shutdown.
        // Unbounded on purpose: acks are bounded by the batches in flight (shards × channel
        // capacity / batch size), and a bounded ack channel could deadlock against the reader
        // waiting for room in a shard channel.
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Ack>();
        let mut txs = Vec::with_capacity(nshards);
        let mut tasks = Vec::with_capacity(nshards);
        for i in 0..nshards {
            let chunks = (q.capacity / q.max_samples_per_send.max(1)).max(2);
            let (tx, rx) = mpsc::channel::<Item>(chunks);
            txs.push(tx);
            tasks.push(tokio::spawn(shard(
                i,
                cfg.clone(),
                rx,
                ack_tx.clone(),
                metrics.clone(),
                shutdown.clone(),
                stats.clone(),
            )));
        }
        drop(ack_tx);
        let mut pending: BTreeMap<u64, Partial> = BTreeMap::new();
        let mut reader = wal.reader(reads_from);
        let mut reshard_tick = tokio::time::interval(Duration::from_secs(10));
        reshard_tick.tick().await;
        let mut desired = nshards;
        let mut caught_up = false;
        let notify = wal.notifier();
        // Feed shards until shutdown or a reshard decision.
        'feed: loop {
            if shutdown.borrow().is_some() {
                break 'feed;
            }
            // Apply acks that are already there without waiting.
            while let Ok(ack) = ack_rx.try_recv() {
                apply_ack(&mut pending, ack);
            }
            commit(&wal, &mut pending, &mut next_unacked, reads_from, &metrics, &cfg.name);
            if caught_up {
                tokio::select! {
                    _ = notify.notified() => { caught_up = false; }
                    _ = tokio::time::sleep(Duration::from_millis(250)) => { caught_up = false; }
                    Some(ack) = ack_rx.recv() => apply_ack(&mut pending, ack),
                    _ = shutdown.changed() => {}
                    _ = reshard_tick.tick() => {
                        desired = decide_shards(nshards, &q, &stats, &wal, reads_from);
                        if desired != nshards { break 'feed; }
                    }
                }
                continue;
            }
            let record = match reader.next() {
                Ok(Some(r)) => r,
                Ok(None) => {
                    caught_up = true;
                    // Evictions are counted from the WAL's own statistics (app.rs).
                    let _ = reader.take_evicted();
                    continue;
                }
                Err(e) => {
                    tracing::error!(remote = %cfg.name, error = %e, "Reading the WAL failed; retrying.");
                    metrics.wal_read_error(&cfg.name);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    reader = wal.reader(reads_from);
                    continue;
                }
            };
            let _ = reader.take_evicted();
            let seq = record.seq;
            let payload = record.payload;
            let skip = carried.remove(&seq);
            let (split_n, mut already) = match &skip {
                Some((n, acked)) => (*n as usize, acked.clone()),
                None => (nshards, vec![0; nshards]),
            };
            let mut seen = vec![0u32; split_n];
            let mut part = Partial {
                nshards: split_n as u32,
                acked: already.clone(),
                remaining: 0,
            };
            let per_send = q.max_samples_per_send.max(1) as u32;
            let mut open: Vec<Item> = (0..split_n)
                .map(|k| Item {
                    seq,
                    split: k as u32,
                    count: 0,
                    body: Vec::new(),
                })
                .collect();
            let mut items: Vec<(usize, Item)> = Vec::new();
            let mut frames = frame::Frames::new(&payload);
            for (hash, body) in frames.by_ref() {
                let k = (hash % split_n as u64) as usize;
                seen[k] += 1;
                if seen[k] <= already[k] {
                    continue;
                }
                let chunk = &mut open[k];
                proto::frame_timeseries(body, &mut chunk.body);
                chunk.count += 1;
                part.remaining += 1;
                if chunk.count == per_send {
                    let full = std::mem::replace(
                        chunk,
                        Item {
                            seq,
                            split: k as u32,
                            count: 0,
                            body: Vec::new(),
                        },
                    );
                    items.push((k, full));
                }
            }
            for (k, chunk) in open.into_iter().enumerate() {
                if chunk.count > 0 {
                    items.push((k, chunk));
                }
            }
            if frames.malformed {
                metrics.wal_corrupt(&cfg.name);
            }
            already.clear();
            if part.remaining == 0 {
                pending.insert(seq, part);
                reads_from = seq + 1;
                continue;
            }
            pending.insert(seq, part);
            reads_from = seq + 1;
            for (k, item) in items {
                // When the record was split with another shard count, map its split index onto
                // a current shard; the hash keeps series → shard stable within a generation.
                let target = k % nshards;
                let tx = &txs[target];
                // Wait for room in the shard while still taking acks (and committing them).
                loop {
                    tokio::select! {
                        biased;
                        Some(ack) = ack_rx.recv() => {
                            apply_ack(&mut pending, ack);
                            commit(&wal, &mut pending, &mut next_unacked, reads_from, &metrics, &cfg.name);
                        }
                        permit = tx.reserve() => match permit {
                            Ok(p) => {
                                p.send(item);
                                break;
                            }
                            Err(_) => break 'feed,
                        },
                        _ = shutdown.changed() => break 'feed,
                    }
                }
            }
            if reshard_tick_ready(&mut reshard_tick) {
                desired = decide_shards(nshards, &q, &stats, &wal, reads_from);
                if desired != nshards {
                    break 'feed;
                }
            }
        }
        // Drain this generation: close the channels, let shards finish (they stop retrying once
        // the shutdown deadline passes), collect their acks.
        drop(txs);
        while let Some(ack) = ack_rx.recv().await {
            apply_ack(&mut pending, ack);
            commit(&wal, &mut pending, &mut next_unacked, reads_from, &metrics, &cfg.name);
        }
        for t in tasks {
            let _ = t.await;
        }
        commit(&wal, &mut pending, &mut next_unacked, reads_from, &metrics, &cfg.name);
        // Records not fully acked are read again by the next generation / next start, with
        // their partial progress.
        carried = pending
            .iter()
            .filter(|(_, p)| p.remaining > 0 || p.acked.iter().any(|&a| a > 0))
            .map(|(s, p)| (*s, (p.nshards, p.acked.clone())))
            .collect();
        reads_from = next_unacked;
        if shutdown.borrow().is_some() {
            let unsent: u32 = pending.values().map(|p| p.remaining).sum();
            tracing::info!(remote = %cfg.name, unsent_samples = unsent, "Sender stopped; unsent samples stay in the WAL.");
            return;
        }
        if desired != nshards {
            tracing::info!(remote = %cfg.name, from = nshards, to = desired, "Resharding.");
            nshards = desired;
        }
    }
}

fn reshard_tick_ready(t: &mut tokio::time::Interval) -> bool {
    use futures::FutureExt;
    t.tick().now_or_never().is_some()
}

fn apply_ack(pending: &mut BTreeMap<u64, Partial>, ack: Ack) {
    for (seq, split, n) in ack.counts {
        if let Some(p) = pending.get_mut(&seq) {
            p.remaining = p.remaining.saturating_sub(n);
            if let Some(a) = p.acked.get_mut(split as usize) {
                *a += n;
            }
        }
    }
}

/// Commits the longest fully-acked prefix plus partial progress of the rest.
fn commit(
    wal: &Wal,
    pending: &mut BTreeMap<u64, Partial>,
    next_unacked: &mut u64,
    reads_from: u64,
    metrics: &Metrics,
    name: &str,
) {
    let before = *next_unacked;
    let mut changed = false;
    while let Some((&seq, p)) = pending.first_key_value() {
        if p.remaining == 0 {
            pending.remove(&seq);
            *next_unacked = seq + 1;
            changed = true;
        } else {
            break;
        }
    }
    if pending.is_empty() && reads_from > *next_unacked {
        *next_unacked = reads_from;
        changed = true;
    }
    let partial_progress = pending.values().any(|p| p.acked.iter().any(|&a| a > 0));
    if changed || partial_progress {
        let extra = encode_partials(pending);
        if let Err(e) = wal.commit(*next_unacked, &extra) {
            tracing::error!(remote = %name, error = %e, "Committing the WAL position failed.");
            metrics.wal_commit_error(name);
            *next_unacked = before.max(*next_unacked);
        }
    }
}

/// Send statistics for the resharding decision.
#[derive(Default)]
struct ShardStats {
    busy_nanos: std::sync::atomic::AtomicU64,
    sent: std::sync::atomic::AtomicU64,
}

/// Chooses the shard count: grow while shards are mostly busy and a backlog exists, shrink
/// when they idle with no backlog.
fn decide_shards(n: usize, q: &config::agent::QueueConfig, stats: &ShardStats, wal: &Wal, reads_from: u64) -> usize {
    use std::sync::atomic::Ordering::Relaxed;
    let busy = stats.busy_nanos.swap(0, Relaxed) as f64 / 1e9;
    stats.sent.swap(0, Relaxed);
    let utilisation = busy / (10.0 * n as f64);
    let backlog_records = wal.next_seq().saturating_sub(reads_from);
    let max = q.max_shards.max(1);
    let min = q.min_shards.max(1).min(max);
    if utilisation > 0.7 && backlog_records > 2 {
        (n * 2).min(max)
    } else if utilisation < 0.2 && backlog_records <= 1 && n > min {
        (n / 2).max(min)
    } else {
        n
    }
}

enum Outcome {
    Sent,
    /// Rejected as already present (out of order / duplicate): counted apart from loss.
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
        batch.push(first);
        let until = tokio::time::Instant::now() + deadline;
        while samples < max && !closed {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(item)) => {
                    if samples + item.count as usize > max {
                        carry = Some(item);
                        break;
                    }
                    samples += item.count as usize;
                    batch.push(item);
                }
                Ok(None) => closed = true,
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let outcome = send_batch(&cfg, &batch, &mut raw, &mut compressed, &metrics, &shutdown).await;
        stats.busy_nanos.fetch_add(
            started.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        match outcome {
            Outcome::Sent => metrics.samples_sent(&cfg.name, samples as u64),
            Outcome::Duplicate => metrics.samples_duplicate(&cfg.name, samples as u64),
            Outcome::Dropped(reason) => metrics.samples_dropped(&cfg.name, reason, samples as u64),
            Outcome::Aborted => return, // shutdown deadline passed: no ack, the WAL keeps them
        }
        if acks
            .send(Ack {
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

/// Sends one batch with retries. Returns `Aborted` when the shutdown deadline passes first.
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
    proto::compress(raw, compressed);
    let body = Bytes::copy_from_slice(compressed);
    let q = &cfg.queue;
    let mut backoff = q.min_backoff.get().max(Duration::from_millis(1));
    let max_backoff = q.max_backoff.get().max(backoff);
    loop {
        if let Some(deadline) = *shutdown.borrow() {
            if Instant::now() >= deadline {
                return Outcome::Aborted;
            }
        }
        let started = Instant::now();
        let deadline = *shutdown.borrow();
        let result = match deadline {
            // Shutting down: an in-flight request may not outlast the deadline.
            Some(d) => match tokio::time::timeout_at(d.into(), post(cfg, body.clone())).await {
                Ok(r) => r,
                Err(_) => return Outcome::Aborted,
            },
            None => {
                let mut sd = shutdown.clone();
                tokio::select! {
                    r = post(cfg, body.clone()) => r,
                    _ = sd.changed() => {
                        // Shutdown began mid-request: give it until the deadline.
                        let d = (*sd.borrow()).unwrap_or_else(Instant::now);
                        match tokio::time::timeout_at(d.into(), post(cfg, body.clone())).await {
                            Ok(r) => r,
                            Err(_) => return Outcome::Aborted,
                        }
                    }
                }
            }
        };
        metrics.observe_send(&cfg.name, started.elapsed());
        let retry_after = match result {
            Ok((status, _, _)) if status.is_success() => return Outcome::Sent,
            Ok((status, retry_after, text)) => {
                let retryable =
                    status.is_server_error() || (status == StatusCode::TOO_MANY_REQUESTS && q.retry_on_http_429);
                if !retryable {
                    let lower = text.to_ascii_lowercase();
                    let samples = batch.iter().map(|i| i.count).sum::<u32>();
                    // A receiver that already has these samples (a resend after a crash between
                    // its answer and our commit) rejects them as out of order / duplicate:
                    // that is not loss.
                    if [
                        "out of order",
                        "out-of-order",
                        "too old",
                        "out of bounds",
                        "duplicate sample",
                    ]
                    .iter()
                    .any(|m| lower.contains(m))
                    {
                        tracing::info!(remote = %cfg.name, %status, body = %text.trim(), samples, "Receiver already had a batch (out of order or duplicate); not resent.");
                        return Outcome::Duplicate;
                    }
                    tracing::warn!(remote = %cfg.name, %status, body = %text.trim(), samples, "Receiver rejected a batch; dropped.");
                    return Outcome::Dropped("http_4xx");
                }
                tracing::warn!(remote = %cfg.name, %status, body = %text.trim(), "Receiver failed; retrying.");
                retry_after
            }
            Err(e) => {
                tracing::warn!(remote = %cfg.name, error = %e, "Sending failed; retrying.");
                None
            }
        };
        metrics.samples_retried(&cfg.name, batch.iter().map(|i| u64::from(i.count)).sum());
        let mut wait = retry_after.unwrap_or(backoff);
        if let Some(deadline) = *shutdown.borrow() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Outcome::Aborted;
            }
            wait = wait.min(left);
        }
        let mut sd = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = sd.changed() => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

async fn post(cfg: &SenderConfig, body: Bytes) -> Result<(StatusCode, Option<Duration>, String), String> {
    let mut req = Request::post(cfg.url.clone())
        .header(header::CONTENT_ENCODING, "snappy")
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .header(header::USER_AGENT, crate::scrape::client::user_agent())
        .header("X-Prometheus-Remote-Write-Version", "0.1.0")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    for (k, v) in &cfg.headers {
        req.headers_mut().insert(k.clone(), v.clone());
    }
    if let Some(a) = cfg.auth.header().map_err(|e| e.to_string())? {
        req.headers_mut().insert(header::AUTHORIZATION, a);
    }
    let work = async {
        let resp = cfg
            .client
            .request(req)
            .await
            .map_err(|e| crate::scrape::client::error_chain(&e))?;
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
        Ok::<_, String>((status, retry_after, text))
    };
    match tokio::time::timeout(cfg.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("request timed out after {:?}", cfg.timeout)),
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
        let d = decode_partials(&encode_partials(&p));
        assert_eq!(d.len(), 1);
        assert_eq!(d[&7], (3, vec![1, 0, 5]));
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
