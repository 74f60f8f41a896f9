//! The series side of a scrape: turns a parsed body into encoded samples for every output,
//! with the series cache, staleness markers and the five report series.
//!
//! The cache maps the raw series text of the exposition (`name{labels}` as scraped) to the
//! finished, encoded label set of every output, so a steady-state scrape does a hash lookup
//! and a memcpy per sample and allocates nothing per sample.

use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxBuildHasher;

use super::client::ScrapeError;
use super::parse::{Entry, Format, Parser};
use super::scrape_loop::ScrapeSettings;
use crate::labels::{Labels, METRIC_NAME};
use crate::relabel;
use crate::remote_write::{file_sink, frame, proto, Outputs};
use crate::telemetry::Metrics;

/// A series' encoded labels for one output, holding only what differs from its target.
///
/// `labels` is `[k][k × u16 LE offset][D]`: D is the encoded label fields of the series that are
/// not one of the target's own labels (its [`Base`]), and offset *j* says where in D the target's
/// label *j* goes back in (`ABSENT`: the series does not carry it — dropped or changed by
/// relabeling). `k == FULL` means the complete encoded labels follow instead (series handed
/// over at a reload, or too long for u16 offsets). With a target's `job`, `instance` and the
/// labels relabeling gave it (namespace, pod, node, …) written once per target instead of once
/// per series, a series costs what its own labels cost.
struct Encoded {
    hash: u64,
    labels: Box<[u8]>,
}

/// Marks an [`Encoded`] holding complete labels.
const FULL: u8 = 0xFF;
/// A target label the series does not carry.
const ABSENT: u16 = u16::MAX;

/// The encoded label fields of a target's own labels (and the external labels), one per label,
/// sorted by name, with the pairs they encode.
#[derive(Default)]
struct Base {
    pairs: Vec<(Box<str>, Box<str>)>,
    encoded: Vec<Box<[u8]>>,
}

impl Base {
    fn new(target: &Labels, external: &Labels) -> Self {
        let mut all = target.clone();
        for (n, v) in external.iter() {
            if all.get(n).is_none() {
                all.set(n, v);
            }
        }
        let mut base = Base::default();
        for (n, v) in all.iter() {
            if n.starts_with("__") || base.pairs.len() >= usize::from(FULL) - 1 {
                continue;
            }
            let mut enc = Vec::new();
            proto::encode_labels(std::iter::once((n, v)), &mut enc);
            base.pairs.push((n.into(), v.into()));
            base.encoded.push(enc.into_boxed_slice());
        }
        base
    }

    /// `labels` (sorted) in the compact form of [`Encoded`], and their hash.
    fn compact(&self, labels: &Labels) -> Encoded {
        let mut full = Vec::with_capacity(128);
        proto::encode_labels(labels.iter(), &mut full);
        let hash = frame::series_hash(&full);
        let k = self.pairs.len();
        let mut offsets = vec![ABSENT; k];
        let mut rest = Vec::with_capacity(64);
        let mut j = 0;
        for (n, v) in labels.iter() {
            while j < k && &*self.pairs[j].0 < n {
                j += 1;
            }
            if j < k && &*self.pairs[j].0 == n && &*self.pairs[j].1 == v {
                offsets[j] = rest.len().min(usize::from(ABSENT)) as u16;
                j += 1;
                continue;
            }
            proto::encode_labels(std::iter::once((n, v)), &mut rest);
        }
        if rest.len() >= usize::from(ABSENT) {
            let mut out = Vec::with_capacity(1 + full.len());
            out.push(FULL);
            out.extend_from_slice(&full);
            return Encoded {
                hash,
                labels: out.into_boxed_slice(),
            };
        }
        let mut out = Vec::with_capacity(1 + 2 * k + rest.len());
        out.push(k as u8);
        for o in offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        out.extend_from_slice(&rest);
        Encoded {
            hash,
            labels: out.into_boxed_slice(),
        }
    }

    /// Writes the complete encoded labels of `enc` (in label order) to `out`.
    #[inline]
    fn write(&self, enc: &[u8], out: &mut Vec<u8>) {
        let Some((&k, rest)) = enc.split_first() else { return };
        if k == FULL {
            out.extend_from_slice(rest);
            return;
        }
        let k = usize::from(k);
        let (offsets, own) = rest.split_at(2 * k);
        let mut at = 0;
        for (j, o) in offsets.chunks_exact(2).enumerate() {
            let o = u16::from_le_bytes([o[0], o[1]]);
            if o == ABSENT {
                continue;
            }
            let o = usize::from(o);
            out.extend_from_slice(&own[at..o]);
            if let Some(b) = self.encoded.get(j) {
                out.extend_from_slice(b);
            }
            at = o;
        }
        out.extend_from_slice(&own[at..]);
    }

    /// Appends a sample of `enc` as a frame.
    #[inline]
    fn push(&self, buf: &mut Vec<u8>, enc: &Encoded, value: f64, ts: i64) {
        crate::frame::push_with(buf, enc.hash, |b| {
            self.write(&enc.labels, b);
            proto::encode_sample(value, ts, b);
        });
    }

    /// `enc` with its complete labels (for a loop whose target labels may differ).
    fn completed(&self, enc: Encoded) -> Encoded {
        if enc.labels.first() == Some(&FULL) {
            return enc;
        }
        let mut out = vec![FULL];
        self.write(&enc.labels, &mut out);
        Encoded {
            hash: enc.hash,
            labels: out.into_boxed_slice(),
        }
    }
}

struct CacheEntry {
    /// Iteration in which the series was last seen.
    iter: u64,
    /// The value of `iter` before this iteration updated it.
    prev_iter: u64,
    /// Hash of the final label set: two raw series that end up with the same labels (label
    /// order, metric relabeling) are one series, and only its first sample per scrape counts.
    series_id: u64,
    /// Dropped by metric relabeling (or invalid): skip.
    dropped: bool,
    /// The sample carried its own timestamp (no staleness tracking, as Prometheus).
    explicit_ts: bool,
    /// One per output endpoint; None when dropped by that endpoint's write relabeling.
    per_endpoint: Box<[Option<Encoded>]>,
    /// `name{labels}` for the file sink.
    text: Option<Box<str>>,
}

/// The series of a target's last scrape, handed by a loop stopped for a reload to the loop
/// that replaces it, so that a series gone at the reload still gets its staleness marker at
/// the new loop's first scrape (as Prometheus does by handing its scrape cache on).
pub struct Leftover {
    /// The job the target belonged to.
    pub job: String,
    series: Vec<LeftSeries>,
    /// The report series (`up`, …): ended only when the target is gone.
    report: Vec<LeftSeries>,
}

impl Leftover {
    /// The target is gone at the reload: staleness markers for all its series, at `ts`, to the
    /// endpoints of `outputs` that had them.
    pub fn write_stale(self, outputs: &Outputs, metrics: &Metrics, ts: i64) {
        let stale = f64::from_bits(proto::STALE_NAN_BITS);
        let all = || self.series.iter().chain(&self.report);
        for ep in &outputs.endpoints {
            let mut buf = outputs.pool.take();
            let mut n = 0u32;
            for s in all() {
                if let Some((_, enc)) = s.per_endpoint.iter().find(|(name, _)| **name == *ep.name) {
                    Base::default().push(&mut buf, enc, stale, ts); // leftovers hold complete labels
                    n += 1;
                }
            }
            if n > 0 {
                ep.append(&buf, n, metrics);
            }
            outputs.pool.give(buf);
        }
        if let Some(sink) = &outputs.file_sink {
            let mut buf = Vec::new();
            for s in all() {
                if let Some(t) = &s.text {
                    file_sink::push_line(&mut buf, t, stale, ts);
                }
            }
            if !buf.is_empty() {
                if let Err(e) = sink.write_block(&buf) {
                    metrics.file_sink_error();
                    tracing::error!(error = %e, "Writing to the file sink failed; samples lost for that sink.");
                }
            }
        }
    }
}

struct LeftSeries {
    series_id: u64,
    /// Encodings by endpoint name (endpoints may be added or removed by the reload).
    per_endpoint: Vec<(Arc<str>, Encoded)>,
    text: Option<Box<str>>,
}

/// Series of the synthetic per-scrape metrics.
const REPORT_NAMES: [&str; 5] = [
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

/// Per-output buffers of one scrape.
struct Batch {
    per_endpoint: Vec<Vec<u8>>,
    file: Vec<u8>,
    samples: u32,
    /// What each endpoint's buffer held at the end of the last scrape: the next one is sized
    /// for it at once, rather than grown by doubling (copies, and up to twice the memory).
    last_len: Vec<usize>,
}

impl Batch {
    /// Takes empty buffers from the shared pool for the scrape in progress.
    fn acquire(&mut self, pool: &crate::remote_write::BufferPool) {
        for (b, last) in self.per_endpoint.iter_mut().zip(&self.last_len) {
            if b.capacity() == 0 {
                *b = pool.take();
            }
            b.reserve_exact((last + last / 32).saturating_sub(b.len()));
        }
        if self.file.capacity() == 0 {
            self.file = pool.take();
        }
    }

    /// Gives the buffers back: targets scrape at different moments, so a few buffers serve
    /// them all instead of one scrape-sized buffer per target and output.
    fn release(&mut self, pool: &crate::remote_write::BufferPool) {
        for (b, last) in self.per_endpoint.iter_mut().zip(self.last_len.iter_mut()) {
            if !b.is_empty() {
                *last = b.len();
            }
            pool.give(std::mem::take(b));
        }
        pool.give(std::mem::take(&mut self.file));
        self.samples = 0;
    }

    fn clear(&mut self) {
        self.per_endpoint.iter_mut().for_each(Vec::clear);
        self.file.clear();
        self.samples = 0;
    }

    fn push(&mut self, base: &Base, entry_endpoints: &[Option<Encoded>], text: Option<&str>, value: f64, ts: i64) {
        for (buf, enc) in self.per_endpoint.iter_mut().zip(entry_endpoints) {
            if let Some(enc) = enc {
                base.push(buf, enc, value, ts);
            }
        }
        if let Some(t) = text {
            file_sink::push_line(&mut self.file, t, value, ts);
        }
        self.samples += 1;
    }
}

/// The longest line a streamed body may have: what is held at once is one piece of the body
/// plus at most this (a line of valid exposition this long would already break any label
/// value length limit; without one, a page of a single endless line stops here).
pub const MAX_LINE: usize = 4 << 20;

/// Feeds a streamed body to an [`Appender`] in whole lines as it arrives: the longest part
/// held is one piece of the body plus the line it cut, never the body.
pub struct StreamParse<'a> {
    appender: &'a mut Appender,
    /// The cut line carried to the next piece (a buffer the scrape loop keeps).
    pending: &'a mut Vec<u8>,
    format: Format,
    ts: i64,
    lines: usize,
    eof: bool,
}

impl<'a> StreamParse<'a> {
    /// Parses into `appender` for a scrape at `ts`; `pending` is a reusable buffer.
    pub fn new(appender: &'a mut Appender, pending: &'a mut Vec<u8>, ts: i64) -> Self {
        pending.clear();
        Self {
            appender,
            pending,
            format: Format::Text,
            ts,
            lines: 0,
            eof: false,
        }
    }

    /// Refuses a cut line that would grow past [`MAX_LINE`] with `more` bytes.
    fn check_line(&self, more: usize) -> Result<(), ScrapeError> {
        if self.pending.len() + more <= MAX_LINE {
            return Ok(());
        }
        Err(ScrapeError::Parse(format!(
            "line {} is longer than {} MiB",
            self.lines + 1,
            MAX_LINE >> 20
        )))
    }

    fn parse(&mut self, lines: &[u8], last: bool) -> Result<(), ScrapeError> {
        if self.eof {
            if lines.iter().all(u8::is_ascii_whitespace) && last {
                return Ok(());
            }
            let e = super::parse::ParseError::after_eof(self.lines + 1);
            return Err(ScrapeError::Parse(e.to_string()));
        }
        let parser = Parser::chunk(lines, self.format, self.lines, last);
        let parser = self.appender.append_chunk(parser, self.ts)?;
        self.lines = parser.line();
        self.eof = parser.saw_eof();
        Ok(())
    }
}

impl super::client::BodySink for StreamParse<'_> {
    fn start(&mut self, content_type: &str) {
        self.format = Format::from_content_type(content_type);
    }

    fn data(&mut self, piece: &[u8]) -> Result<(), ScrapeError> {
        let Some(cut) = memchr::memrchr(b'\n', piece) else {
            self.check_line(piece.len())?;
            self.pending.extend_from_slice(piece);
            return Ok(());
        };
        if !self.pending.is_empty() {
            // The cut line ends at the piece's first newline.
            self.check_line(memchr::memchr(b'\n', piece).unwrap_or(cut))?;
        }
        let (whole, rest) = piece.split_at(cut + 1);
        if self.pending.is_empty() {
            // The common case: parse straight from the piece, no copy.
            self.parse(whole, false)?;
        } else {
            let mut held = std::mem::take(self.pending);
            held.extend_from_slice(whole);
            let r = self.parse(&held, false);
            held.clear();
            *self.pending = held;
            r?;
        }
        self.pending.extend_from_slice(rest);
        Ok(())
    }

    fn end(&mut self) -> Result<(), ScrapeError> {
        let held = std::mem::take(self.pending);
        let r = self.parse(&held, true);
        *self.pending = held;
        r
    }
}

/// Per-target series state and the buffers of the scrape in progress.
pub struct Appender {
    target_labels: Labels,
    /// The target's own labels, encoded once: series store only what differs.
    base: Base,
    settings: Arc<ScrapeSettings>,
    outputs: Arc<Outputs>,
    metrics: Arc<Metrics>,
    /// Keyed by the 128-bit xxh3 of the raw series text (not the text itself: 16 bytes per
    /// series instead of ~100; a collision between two series of one target is
    /// practically impossible).
    cache: hashbrown::HashTable<(u128, CacheEntry)>,
    report: Vec<CacheEntry>,
    iter: u64,
    batch: Batch,
    scratch: Labels,
    /// (scraped, post-relabeling, added) of the scrape in progress, kept when it fails.
    counts: (u64, u64, u64),
    /// The scrape in progress went over `sample_limit` (it goes on counting).
    limit_hit: bool,
    /// Series ids of the scrape in progress, to drop duplicates.
    seen: hashbrown::HashSet<u64, FxBuildHasher>,
    /// Between `begin` and `finish`.
    in_progress: bool,
    /// Series of the loop this one replaced at a reload: those missing from the first scrape
    /// get staleness markers.
    inherited: Option<Vec<Inherited>>,
}

/// An inherited series: its id, encodings per current endpoint, file-sink text.
type Inherited = (u64, Box<[Option<Encoded>]>, Option<Box<str>>);

/// Outcome of one scrape, for the status page and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScrapeReport {
    /// 1 when the scrape succeeded.
    pub up: f64,
    /// Samples in the body.
    pub scraped: u64,
    /// Samples after metric relabeling.
    pub post_relabel: u64,
    /// Series new to the cache.
    pub added: u64,
}

impl Appender {
    /// State for a target with these (final) labels.
    pub fn new(
        target_labels: Labels,
        settings: Arc<ScrapeSettings>,
        outputs: Arc<Outputs>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let n = outputs.endpoints.len();
        let base = Base::new(&target_labels, &outputs.external_labels);
        let report = REPORT_NAMES[..if settings.report_series { REPORT_NAMES.len() } else { 0 }]
            .iter()
            .map(|name| {
                let mut l = target_labels.clone();
                l.set(METRIC_NAME, name);
                finish_entry(&outputs, &base, &l, false)
            })
            .collect();
        Self {
            target_labels,
            base,
            settings,
            outputs,
            metrics,
            cache: hashbrown::HashTable::new(),
            report,
            iter: 0,
            batch: Batch {
                per_endpoint: vec![Vec::new(); n],
                file: Vec::new(),
                samples: 0,
                last_len: vec![0; n],
            },
            scratch: Labels::new(),
            seen: hashbrown::HashSet::default(),
            counts: (0, 0, 0),
            limit_hit: false,
            in_progress: false,
            inherited: None,
        }
    }

    /// Takes over the series of the loop this one replaces (see [`Leftover`]).
    pub fn inherit(&mut self, left: Leftover) {
        let names: Vec<&str> = self.outputs.endpoints.iter().map(|e| e.name.as_str()).collect();
        let series = left
            .series
            .into_iter()
            .map(|s| {
                let mut per: Vec<Option<Encoded>> = names.iter().map(|_| None).collect();
                for (name, enc) in s.per_endpoint {
                    if let Some(i) = names.iter().position(|n| **n == *name) {
                        per[i] = Some(enc);
                    }
                }
                (s.series_id, per.into_boxed_slice(), s.text)
            })
            .collect();
        self.inherited = Some(series);
    }

    /// The series of the last complete scrape, for the loop that replaces this one.
    pub fn into_leftover(mut self) -> Leftover {
        if self.in_progress {
            // Abandoned mid-scrape: what it touched counts as of the scrape before.
            for (_, e) in self.cache.iter_mut() {
                if e.iter == self.iter {
                    e.iter = e.prev_iter;
                }
            }
            self.iter -= 1;
        }
        let last = self.iter;
        // The next loop may have other target labels: hand on complete encodings.
        let base = std::mem::take(&mut self.base);
        let names: Vec<Arc<str>> = self
            .outputs
            .endpoints
            .iter()
            .map(|e| Arc::from(e.name.as_str()))
            .collect();
        let mut series = Vec::new();
        for (_, e) in self.cache.drain() {
            if last == 0 || e.iter != last || e.dropped || e.explicit_ts {
                continue;
            }
            let per_endpoint = names
                .iter()
                .cloned()
                .zip(e.per_endpoint.into_vec())
                .filter_map(|(n, enc)| enc.map(|enc| (n, base.completed(enc))))
                .collect();
            series.push(LeftSeries {
                series_id: e.series_id,
                per_endpoint,
                text: e.text,
            });
        }
        // Series the previous loop had inherited and not yet settled stay with the next one.
        if let Some(inh) = self.inherited.take() {
            for (series_id, per, text) in inh {
                let per_endpoint = names
                    .iter()
                    .cloned()
                    .zip(per.into_vec())
                    .filter_map(|(n, enc)| enc.map(|enc| (n, base.completed(enc))))
                    .collect();
                series.push(LeftSeries {
                    series_id,
                    per_endpoint,
                    text,
                });
            }
        }
        self.batch.release(&self.outputs.pool);
        let report = if last == 0 {
            Vec::new()
        } else {
            std::mem::take(&mut self.report)
                .into_iter()
                .map(|e| LeftSeries {
                    series_id: e.series_id,
                    per_endpoint: names
                        .iter()
                        .cloned()
                        .zip(e.per_endpoint.into_vec())
                        .filter_map(|(n, enc)| enc.map(|enc| (n, base.completed(enc))))
                        .collect(),
                    text: e.text,
                })
                .collect()
        };
        Leftover {
            job: self.settings.job.clone(),
            series,
            report,
        }
    }

    /// Staleness markers for inherited series that this (first) scrape did not have; all of
    /// them when it failed.
    fn write_stale_inherited(&mut self, ts: i64, scrape_ok: bool) {
        let Some(inh) = self.inherited.take() else { return };
        let stale = f64::from_bits(proto::STALE_NAN_BITS);
        for (id, per, text) in &inh {
            if !scrape_ok || !self.seen.contains(id) {
                self.batch.push(&self.base, per, text.as_deref(), stale, ts);
            }
        }
    }

    /// Starts a scrape: a new iteration with empty buffers.
    pub fn begin(&mut self) {
        self.in_progress = true;
        self.iter += 1;
        self.counts = (0, 0, 0);
        self.limit_hit = false;
        self.batch.acquire(&self.outputs.pool);
        self.batch.clear();
        self.seen.clear();
    }

    /// Ends a scrape: staleness, cache upkeep, the report series, then appends everything to
    /// the outputs. `result` is what [`Appender::append_body`] returned (or the fetch error).
    pub fn finish(
        &mut self,
        result: Result<(u64, u64, u64), &ScrapeError>,
        ts: i64,
        duration: Duration,
    ) -> ScrapeReport {
        let report = match result {
            Ok((scraped, post_relabel, added)) => {
                self.write_stale_missing(ts);
                self.write_stale_inherited(ts, true);
                ScrapeReport {
                    up: 1.0,
                    scraped,
                    post_relabel,
                    added,
                }
            }
            Err(_) => {
                // Discard whatever this scrape buffered and end the series of the previous one.
                // The report keeps the counts reached before the failure, as Prometheus does.
                self.batch.clear();
                self.write_stale_previous(ts);
                self.write_stale_inherited(ts, false);
                let (scraped, post_relabel, added) = self.counts;
                ScrapeReport {
                    up: 0.0,
                    scraped,
                    post_relabel,
                    added,
                }
            }
        };
        self.evict_old();
        let values = [
            report.up,
            duration.as_secs_f64(),
            report.scraped as f64,
            report.post_relabel as f64,
            report.added as f64,
        ];
        for (e, v) in self.report.iter().zip(values) {
            self.batch.push(&self.base, &e.per_endpoint, e.text.as_deref(), v, ts);
        }
        self.flush();
        self.in_progress = false;
        report
    }

    /// Samples buffered in the scrape in progress.
    pub fn buffered_samples(&self) -> u32 {
        self.batch.samples
    }

    /// Parses `body` and buffers its samples (see [`Appender::finish`]).
    pub fn scrape_body(&mut self, body: &[u8], format: Format, ts: i64) -> Result<(u64, u64, u64), ScrapeError> {
        self.append_body(body, format, ts)
    }

    /// Parses a whole body and appends its samples to the batch. Returns (scraped,
    /// post-relabeling, series added).
    pub fn append_body(&mut self, body: &[u8], format: Format, ts: i64) -> Result<(u64, u64, u64), ScrapeError> {
        self.limit_hit = false;
        self.append_chunk(Parser::new(body, format), ts)?;
        self.end_body()
    }

    /// After the last [`Appender::append_chunk`] of a body: its totals, or the sample-limit
    /// error.
    pub fn end_body(&mut self) -> Result<(u64, u64, u64), ScrapeError> {
        let (scraped, post, added) = self.counts;
        if self.limit_hit {
            self.limit_hit = false;
            return Err(ScrapeError::SampleLimit {
                got: post,
                limit: self.settings.sample_limit,
            });
        }
        Ok((scraped, post, added))
    }

    /// Appends the samples of one piece of a streamed body (whole lines; see
    /// [`Parser::chunk`]) to the batch; totals so far are kept for [`Appender::end_body`].
    /// Returns the parser, for its line count and `# EOF` state.
    pub fn append_chunk<'p>(&mut self, mut parser: Parser<'p>, ts: i64) -> Result<Parser<'p>, ScrapeError> {
        let s = self.settings.clone();
        let (mut scraped, mut post, mut added) = self.counts;
        let mut limit_hit = self.limit_hit;
        // Counted once per piece, not per sample: the metric's label lookup allocates.
        let mut duplicates = 0u64;
        while let Some(entry) = parser.next_entry() {
            let sample = match entry.map_err(|e| ScrapeError::Parse(e.to_string()))? {
                Entry::Sample(sample) => sample,
                _ => continue,
            };
            scraped += 1;
            self.counts.0 = scraped;
            let iter = self.iter;
            let key = xxhash_rust::xxh3::xxh3_128(sample.series);
            let entry = match self.cache.entry(key as u64, |(k, _)| *k == key, |(k, _)| *k as u64) {
                hashbrown::hash_table::Entry::Occupied(o) => &mut o.into_mut().1,
                hashbrown::hash_table::Entry::Vacant(v) => {
                    let e = build_entry(
                        &sample,
                        &s,
                        &self.target_labels,
                        &self.outputs,
                        &self.base,
                        &mut self.scratch,
                    )?;
                    if !e.dropped {
                        added += 1;
                    }
                    &mut v.insert((key, e)).into_mut().1
                }
            };
            if entry.iter == iter {
                // The same series twice in one scrape: Prometheus rejects the duplicate.
                duplicates += 1;
                continue;
            }
            entry.prev_iter = entry.iter;
            entry.iter = iter;
            if entry.dropped {
                continue;
            }
            if !self.seen.insert(entry.series_id) {
                // Another raw series with the same final labels: Prometheus keeps the first
                // sample and rejects the duplicate.
                duplicates += 1;
                continue;
            }
            post += 1;
            self.counts = (scraped, post, added);
            if s.sample_limit > 0 && post > s.sample_limit {
                // Keep counting (the report shows the real totals), send nothing.
                limit_hit = true;
                continue;
            }
            let t = match sample.timestamp_ms {
                Some(t) if s.honor_timestamps => t,
                _ => ts,
            };
            entry.explicit_ts = sample.timestamp_ms.is_some() && s.honor_timestamps;
            for (buf, enc) in self.batch.per_endpoint.iter_mut().zip(entry.per_endpoint.iter()) {
                if let Some(enc) = enc {
                    self.base.push(buf, enc, sample.value, t);
                }
            }
            if let Some(text) = &entry.text {
                file_sink::push_line(&mut self.batch.file, text, sample.value, t);
            }
            self.batch.samples += 1;
        }
        self.counts = (scraped, post, added);
        self.limit_hit = limit_hit;
        self.metrics.duplicate_samples(&s.job, duplicates);
        Ok(parser)
    }

    /// Staleness markers for series seen in the previous iteration but not in this one.
    fn write_stale_missing(&mut self, ts: i64) {
        let prev = self.iter - 1;
        let stale = f64::from_bits(proto::STALE_NAN_BITS);
        for (_, e) in self.cache.iter() {
            if prev > 0 && e.iter == prev && !e.dropped && !e.explicit_ts && !self.seen.contains(&e.series_id) {
                self.batch
                    .push(&self.base, &e.per_endpoint, e.text.as_deref(), stale, ts);
            }
        }
    }

    /// A failed scrape: staleness markers for every series of the previous iteration,
    /// including those this scrape touched before it failed (none of its samples are sent);
    /// series new in the failed scrape get none, as in Prometheus.
    fn write_stale_previous(&mut self, ts: i64) {
        let (prev, cur) = (self.iter - 1, self.iter);
        let stale = f64::from_bits(proto::STALE_NAN_BITS);
        for (_, e) in self.cache.iter_mut() {
            if e.iter == cur {
                // Touched by the failed scrape: undo, so it counts as unseen in this one.
                e.iter = e.prev_iter;
            }
            if prev > 0 && e.iter == prev && !e.dropped && !e.explicit_ts {
                self.batch
                    .push(&self.base, &e.per_endpoint, e.text.as_deref(), stale, ts);
            }
        }
    }

    /// Target gone: staleness markers for every series of the last scrape and the report series.
    pub fn write_stale_all(&mut self, ts: i64) {
        self.batch.acquire(&self.outputs.pool);
        self.batch.clear();
        let stale = f64::from_bits(proto::STALE_NAN_BITS);
        let last = self.iter;
        for (_, e) in self.cache.iter() {
            if e.iter == last && !e.dropped && !e.explicit_ts {
                self.batch
                    .push(&self.base, &e.per_endpoint, e.text.as_deref(), stale, ts);
            }
        }
        if self.iter > 0 {
            for e in &self.report {
                self.batch
                    .push(&self.base, &e.per_endpoint, e.text.as_deref(), stale, ts);
            }
        }
        self.flush();
    }

    /// Forgets series not seen in this or the previous iteration.
    fn evict_old(&mut self) {
        let keep_from = self.iter.saturating_sub(1);
        self.cache.retain(|(_, e)| e.iter >= keep_from);
    }

    /// Appends the batch to every output.
    pub fn flush(&mut self) {
        let samples = self.batch.samples;
        if samples == 0 {
            self.batch.release(&self.outputs.pool);
            return;
        }
        for (ep, buf) in self.outputs.endpoints.iter().zip(&self.batch.per_endpoint) {
            if buf.is_empty() {
                continue;
            }
            let n = frame::Frames::new(buf).count() as u32;
            ep.append(buf, n, &self.metrics);
        }
        if let Some(sink) = &self.outputs.file_sink {
            if let Err(e) = sink.write_block(&self.batch.file) {
                self.metrics.file_sink_error();
                tracing::error!(error = %e, "Writing to the file sink failed; samples lost for that sink.");
            }
        }
        self.batch.release(&self.outputs.pool);
    }
}

/// Builds the cache entry for a series seen for the first time.
fn build_entry(
    sample: &super::parse::Sample<'_>,
    s: &ScrapeSettings,
    target_labels: &Labels,
    outputs: &Outputs,
    base: &Base,
    scratch: &mut Labels,
) -> Result<CacheEntry, ScrapeError> {
    let l = &mut *scratch;
    l.clear();
    l.set(METRIC_NAME, sample.name);
    for (n, v) in sample.labels() {
        l.set(n, &v);
    }
    // Target labels, as Prometheus's mutateSampleLabels.
    if s.honor_labels {
        for (n, v) in target_labels.iter() {
            if l.get(n).is_none() {
                l.set(n, v);
            }
        }
    } else {
        for (n, v) in target_labels.iter() {
            if let Some(existing) = l.get(n).map(str::to_owned) {
                let mut exported = format!("exported_{n}");
                while l.get(&exported).is_some() {
                    exported = format!("exported_{exported}");
                }
                l.set(&exported, &existing);
            }
            l.set(n, v);
        }
    }
    let mut l = std::mem::take(scratch);
    let keep = relabel::process(&mut l, &s.metric_relabel) && l.get(METRIC_NAME).is_some();
    let result = if keep {
        check_label_limits(&l, s).map(|()| finish_entry(outputs, base, &l, false))
    } else {
        Ok(CacheEntry {
            iter: 0,
            prev_iter: 0,
            series_id: 0,
            dropped: true,
            explicit_ts: false,
            per_endpoint: Box::new([]),
            text: None,
        })
    };
    *scratch = l;
    result
}

/// Encodes a final label set for every output.
fn finish_entry(outputs: &Outputs, base: &Base, l: &Labels, dropped: bool) -> CacheEntry {
    let mut full = l.clone();
    for (n, v) in outputs.external_labels.iter() {
        if full.get(n).is_none() {
            full.set(n, v);
        }
    }
    let per_endpoint = outputs
        .endpoints
        .iter()
        .map(|ep| {
            let mut w = full.clone();
            if !relabel::process(&mut w, &ep.write_relabel) || w.get(METRIC_NAME).is_none() {
                return None;
            }
            Some(base.compact(&w))
        })
        .collect();
    let text = outputs
        .file_sink
        .as_ref()
        .map(|_| file_sink::series_text(full.get_or_empty(METRIC_NAME), full.iter()).into_boxed_str());
    let mut key = Vec::with_capacity(128);
    proto::encode_labels(l.iter(), &mut key);
    CacheEntry {
        iter: 0,
        prev_iter: 0,
        series_id: frame::series_hash(&key),
        dropped,
        explicit_ts: false,
        per_endpoint,
        text,
    }
}

fn check_label_limits(l: &Labels, s: &ScrapeSettings) -> Result<(), ScrapeError> {
    if s.label_limit > 0 && l.len() as u64 > s.label_limit {
        return Err(ScrapeError::LabelLimit(format!(
            "label_limit exceeded (metric: {}, number of labels: {}, limit: {})",
            l.get_or_empty(METRIC_NAME),
            l.len(),
            s.label_limit
        )));
    }
    for (n, v) in l.iter() {
        if s.label_name_length_limit > 0 && n.len() as u64 > s.label_name_length_limit {
            return Err(ScrapeError::LabelLimit(format!(
                "label_name_length_limit exceeded (metric: {}, label name: {n}, limit: {})",
                l.get_or_empty(METRIC_NAME),
                s.label_name_length_limit
            )));
        }
        if s.label_value_length_limit > 0 && v.len() as u64 > s.label_value_length_limit {
            return Err(ScrapeError::LabelLimit(format!(
                "label_value_length_limit exceeded (metric: {}, label name: {n}, limit: {})",
                l.get_or_empty(METRIC_NAME),
                s.label_value_length_limit
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(l: &Labels) -> Vec<u8> {
        let mut out = Vec::new();
        proto::encode_labels(l.iter(), &mut out);
        out
    }

    #[test]
    fn compact_labels_hold_only_what_differs_and_write_back_exactly() {
        let target = Labels::from_pairs([("instance", "10.0.0.1:9100"), ("job", "node"), ("namespace", "shop")]);
        let external = Labels::from_pairs([("cluster", "lab"), ("job", "ignored: the target's wins")]);
        let base = Base::new(&target, &external);
        assert_eq!(base.pairs.len(), 4, "cluster, instance, job, namespace");
        let cases = [
            // The usual series: every target label, plus its own.
            cases_usual().to_vec(),
            // honor_labels kept the page's job; metric relabeling dropped instance.
            vec![
                ("__name__", "m"),
                ("cluster", "lab"),
                ("job", "other"),
                ("namespace", "shop"),
                ("zz", "last"),
            ],
            // No target label at all.
            vec![("__name__", "m"), ("a", "b")],
        ];
        for pairs in cases {
            let l = Labels::from_pairs(pairs.iter().copied());
            let full = encoded(&l);
            let enc = base.compact(&l);
            assert_eq!(enc.hash, frame::series_hash(&full));
            let mut back = Vec::new();
            base.write(&enc.labels, &mut back);
            assert_eq!(back, full, "{pairs:?}");
            // Handed over at a reload: complete labels, whatever the next target's base.
            let full_enc = base.completed(base.compact(&l));
            let mut back = Vec::new();
            Base::default().write(&full_enc.labels, &mut back);
            assert_eq!(back, full);
        }
        // The usual series stores its own labels only: 4 target labels saved.
        let usual = Labels::from_pairs(cases_usual());
        assert!(base.compact(&usual).labels.len() + 40 < encoded(&usual).len());
        // Own labels too long for u16 offsets: complete labels.
        let long = "x".repeat(70_000);
        let l = Labels::from_pairs([("__name__", "m"), ("big", long.as_str()), ("job", "node")]);
        let enc = base.compact(&l);
        assert_eq!(enc.labels[0], FULL);
        let mut back = Vec::new();
        base.write(&enc.labels, &mut back);
        assert_eq!(back, encoded(&l));
    }

    fn cases_usual() -> [(&'static str, &'static str); 6] {
        [
            ("__name__", "m"),
            ("cluster", "lab"),
            ("code", "200"),
            ("instance", "10.0.0.1:9100"),
            ("job", "node"),
            ("namespace", "shop"),
        ]
    }
}
