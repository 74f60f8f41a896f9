//! One target's scrape loop: fetch, parse, label, append to every output, track staleness.
//!
//! The series cache maps the raw series text of the exposition (`name{labels}` as scraped) to
//! the finished, encoded label set of every output, so a steady-state scrape does a hash lookup
//! and a memcpy per sample and allocates nothing.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use rustc_hash::FxBuildHasher;
use tokio::sync::watch;

use super::client::{self, ScrapeError};
use super::parse::{Entry, Format, Parser};
use super::target::Target;
use crate::http::HttpClient;
use crate::labels::{Labels, METRIC_NAME};
use crate::relabel::{self, Rule};
use crate::remote_write::{file_sink, frame, proto, Outputs};
use crate::telemetry::Metrics;

/// Scrape settings shared by a job's targets.
pub struct ScrapeSettings {
    /// `job_name`.
    pub job: String,
    /// HTTP client (TLS settings of the job).
    pub client: HttpClient,
    /// `Authorization` header, if any.
    pub auth: Option<HeaderValue>,
    /// `honor_labels`.
    pub honor_labels: bool,
    /// `honor_timestamps`.
    pub honor_timestamps: bool,
    /// `sample_limit` (0 = none).
    pub sample_limit: u64,
    /// `label_limit` (0 = none).
    pub label_limit: u64,
    /// `label_name_length_limit` (0 = none).
    pub label_name_length_limit: u64,
    /// `label_value_length_limit` (0 = none).
    pub label_value_length_limit: u64,
    /// `body_size_limit` in bytes (0 = none).
    pub body_size_limit: u64,
    /// `metric_relabel_configs`.
    pub metric_relabel: Vec<Rule>,
}

/// What the status page shows about a target.
#[derive(Clone, Debug, Default)]
pub struct TargetStatus {
    /// "unknown", "up" or "down".
    pub health: &'static str,
    /// Wall-clock time of the last scrape start (ms since epoch).
    pub last_scrape_ms: i64,
    /// Duration of the last scrape.
    pub last_duration: Duration,
    /// Samples scraped in the last scrape.
    pub last_samples: u64,
    /// Error of the last scrape, empty when it succeeded.
    pub last_error: String,
}

/// Handle the manager keeps for a running loop.
pub struct LoopHandle {
    /// The target.
    pub target: Target,
    /// Shared status.
    pub status: Arc<Mutex<TargetStatus>>,
    stop: watch::Sender<Option<StopMode>>,
    task: tokio::task::JoinHandle<()>,
}

/// How a loop stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// The target went away: write staleness markers for its series.
    TargetGone,
    /// The agent is shutting down or reloading: write nothing.
    Shutdown,
}

impl LoopHandle {
    /// Starts the loop for `target`.
    pub fn start(target: Target, settings: Arc<ScrapeSettings>, outputs: Arc<Outputs>, metrics: Arc<Metrics>) -> Self {
        let status = Arc::new(Mutex::new(TargetStatus {
            health: "unknown",
            ..Default::default()
        }));
        let (stop, stop_rx) = watch::channel(None);
        let mut sl = ScrapeLoop::new(target.clone(), settings, outputs, metrics, status.clone());
        let task = tokio::spawn(async move { sl.run(stop_rx).await });
        Self {
            target,
            status,
            stop,
            task,
        }
    }

    /// Stops the loop and waits for it.
    pub async fn stop(self, mode: StopMode) {
        let _ = self.stop.send(Some(mode));
        let _ = self.task.await;
    }
}

struct Encoded {
    hash: u64,
    labels: Box<[u8]>,
}

struct CacheEntry {
    /// Iteration in which the series was last seen.
    iter: u64,
    /// Dropped by metric relabeling (or invalid): skip.
    dropped: bool,
    /// The sample carried its own timestamp (no staleness tracking, as Prometheus).
    explicit_ts: bool,
    /// One per output endpoint; None when dropped by that endpoint's write relabeling.
    per_endpoint: Box<[Option<Encoded>]>,
    /// `name{labels}` for the file sink.
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
}

impl Batch {
    fn clear(&mut self) {
        self.per_endpoint.iter_mut().for_each(Vec::clear);
        self.file.clear();
        self.samples = 0;
    }

    fn push(&mut self, entry_endpoints: &[Option<Encoded>], text: Option<&str>, value: f64, ts: i64) {
        for (buf, enc) in self.per_endpoint.iter_mut().zip(entry_endpoints) {
            if let Some(enc) = enc {
                frame::push(buf, enc.hash, &enc.labels, value, ts);
            }
        }
        if let Some(t) = text {
            file_sink::push_line(&mut self.file, t, value, ts);
        }
        self.samples += 1;
    }
}

struct ScrapeLoop {
    target: Target,
    settings: Arc<ScrapeSettings>,
    outputs: Arc<Outputs>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<TargetStatus>>,
    cache: hashbrown::HashTable<(Box<[u8]>, CacheEntry)>,
    hasher: FxBuildHasher,
    report: Vec<CacheEntry>,
    iter: u64,
    batch: Batch,
    scratch: Labels,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl ScrapeLoop {
    fn new(
        target: Target,
        settings: Arc<ScrapeSettings>,
        outputs: Arc<Outputs>,
        metrics: Arc<Metrics>,
        status: Arc<Mutex<TargetStatus>>,
    ) -> Self {
        let n = outputs.endpoints.len();
        let mut sl = Self {
            target,
            settings,
            outputs,
            metrics,
            status,
            cache: hashbrown::HashTable::new(),
            hasher: FxBuildHasher,
            report: Vec::new(),
            iter: 0,
            batch: Batch {
                per_endpoint: vec![Vec::new(); n],
                file: Vec::new(),
                samples: 0,
            },
            scratch: Labels::new(),
        };
        sl.report = REPORT_NAMES
            .iter()
            .map(|name| {
                let mut l = sl.target.labels.clone();
                l.set(METRIC_NAME, name);
                finish_entry(&sl.outputs, &l, false)
            })
            .collect();
        sl
    }

    /// Offset of the first scrape within the interval, from a hash of the target, so that
    /// targets spread over the interval (as Prometheus does).
    fn offset(&self) -> Duration {
        let h = xxhash_rust::xxh3::xxh3_64(self.target.key().as_bytes());
        let iv = self.target.interval.as_nanos().max(1) as u64;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let base = now % iv;
        let want = h % iv;
        Duration::from_nanos((want + iv - base) % iv)
    }

    async fn run(&mut self, mut stop: watch::Receiver<Option<StopMode>>) {
        let start = tokio::time::Instant::now() + self.offset();
        let mut ticker = tokio::time::interval_at(start, self.target.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = ticker.tick() => {}
            }
            // A scrape in progress is not interrupted by a stop request for shutdown, but a
            // stop arriving during the scrape is honoured right after it.
            self.scrape_once().await;
            if stop.borrow().is_some() {
                break;
            }
        }
        let mode = (*stop.borrow()).unwrap_or(StopMode::Shutdown);
        if mode == StopMode::TargetGone {
            self.write_stale_all(now_ms());
        }
    }

    async fn scrape_once(&mut self) {
        let started = Instant::now();
        let ts = now_ms();
        self.iter += 1;
        self.batch.clear();
        let s = self.settings.clone();
        let fetched = client::fetch(
            &s.client,
            &self.target.url,
            s.auth.as_ref(),
            self.target.timeout,
            s.body_size_limit,
        )
        .await;
        let result = match fetched {
            Ok(f) => {
                let format = Format::from_content_type(&f.content_type);
                self.append_body(&f.body, format, ts)
            }
            Err(e) => Err(e),
        };
        let duration = started.elapsed();
        let (up, scraped, post, added, err) = match result {
            Ok((scraped, post, added)) => {
                self.write_stale_missing(ts);
                (1.0, scraped, post, added, String::new())
            }
            Err(e) => {
                // Discard whatever this scrape buffered and end the previous scrape's series.
                self.batch.clear();
                self.write_stale_previous(ts);
                self.metrics.scrape_failure(&s.job, e.kind());
                let msg = e.to_string();
                tracing::warn!(target_url = %self.target.url, job = %s.job, error = %msg, "Scrape failed.");
                (0.0, 0, 0, 0, msg)
            }
        };
        self.evict_old();
        let values = [up, duration.as_secs_f64(), scraped as f64, post as f64, added as f64];
        for (i, v) in values.into_iter().enumerate() {
            let e = &self.report[i];
            self.batch.push(&e.per_endpoint, e.text.as_deref(), v, ts);
        }
        self.flush();
        self.metrics.scrape_done(&s.job, duration, scraped);
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.health = if up == 1.0 { "up" } else { "down" };
        st.last_scrape_ms = ts;
        st.last_duration = duration;
        st.last_samples = scraped;
        st.last_error = err;
    }

    /// Parses the body and appends its samples to the batch. Returns (scraped,
    /// post-relabeling, series added).
    fn append_body(&mut self, body: &[u8], format: Format, ts: i64) -> Result<(u64, u64, u64), ScrapeError> {
        let s = self.settings.clone();
        let mut parser = Parser::new(body, format);
        let (mut scraped, mut post, mut added) = (0u64, 0u64, 0u64);
        while let Some(entry) = parser.next_entry() {
            let sample = match entry.map_err(|e| ScrapeError::Parse(e.to_string()))? {
                Entry::Sample(sample) => sample,
                _ => continue,
            };
            scraped += 1;
            let iter = self.iter;
            let hash = self.hasher.hash_one(sample.series);
            let entry = match self.cache.entry(
                hash,
                |(k, _)| **k == *sample.series,
                |(k, _)| self.hasher.hash_one(&**k),
            ) {
                hashbrown::hash_table::Entry::Occupied(o) => &mut o.into_mut().1,
                hashbrown::hash_table::Entry::Vacant(v) => {
                    added += 1;
                    let e = build_entry(&sample, &s, &self.target.labels, &self.outputs, &mut self.scratch)?;
                    &mut v.insert((sample.series.into(), e)).into_mut().1
                }
            };
            if entry.iter == iter {
                // The same series twice in one scrape: Prometheus rejects the duplicate.
                self.metrics.duplicate_sample(&s.job);
                continue;
            }
            entry.iter = iter;
            if entry.dropped {
                continue;
            }
            post += 1;
            if s.sample_limit > 0 && post > s.sample_limit {
                return Err(ScrapeError::SampleLimit {
                    got: post,
                    limit: s.sample_limit,
                });
            }
            let t = match sample.timestamp_ms {
                Some(t) if s.honor_timestamps => t,
                _ => ts,
            };
            entry.explicit_ts = sample.timestamp_ms.is_some() && s.honor_timestamps;
            for (buf, enc) in self.batch.per_endpoint.iter_mut().zip(entry.per_endpoint.iter()) {
                if let Some(enc) = enc {
                    frame::push(buf, enc.hash, &enc.labels, sample.value, t);
                }
            }
            if let Some(text) = &entry.text {
                file_sink::push_line(&mut self.batch.file, text, sample.value, t);
            }
            self.batch.samples += 1;
        }
        Ok((scraped, post, added))
    }

    /// Staleness markers for series seen in the previous iteration but not in this one.
    fn write_stale_missing(&mut self, ts: i64) {
        let prev = self.iter - 1;
        let stale = f64::from_bits(proto::STALE_NAN_BITS);
        for (_, e) in self.cache.iter() {
            if e.iter == prev && !e.dropped && !e.explicit_ts {
                self.batch.push(&e.per_endpoint, e.text.as_deref(), stale, ts);
            }
        }
    }

    /// Staleness markers for every series of the previous iteration (failed scrape).
    fn write_stale_previous(&mut self, ts: i64) {
        self.write_stale_missing(ts);
    }

    /// Target gone: staleness markers for every series of the last scrape and the report series.
    fn write_stale_all(&mut self, ts: i64) {
        self.batch.clear();
        let stale = f64::from_bits(proto::STALE_NAN_BITS);
        let last = self.iter;
        for (_, e) in self.cache.iter() {
            if e.iter == last && !e.dropped && !e.explicit_ts {
                self.batch.push(&e.per_endpoint, e.text.as_deref(), stale, ts);
            }
        }
        if self.iter > 0 {
            for e in &self.report {
                self.batch.push(&e.per_endpoint, e.text.as_deref(), stale, ts);
            }
        }
        self.flush();
    }

    /// Forgets series not seen in this or the previous iteration.
    fn evict_old(&mut self) {
        let keep_from = self.iter.saturating_sub(1);
        self.cache.retain(|(_, e)| e.iter >= keep_from);
    }

    fn flush(&mut self) {
        let samples = self.batch.samples;
        if samples == 0 {
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
        self.batch.clear();
    }
}

/// Builds the cache entry for a series seen for the first time.
fn build_entry(
    sample: &super::parse::Sample<'_>,
    s: &ScrapeSettings,
    target_labels: &Labels,
    outputs: &Outputs,
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
        check_label_limits(&l, s).map(|()| finish_entry(outputs, &l, false))
    } else {
        Ok(CacheEntry {
            iter: 0,
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
fn finish_entry(outputs: &Outputs, l: &Labels, dropped: bool) -> CacheEntry {
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
            let mut buf = Vec::with_capacity(128);
            proto::encode_labels(w.iter(), &mut buf);
            Some(Encoded {
                hash: frame::series_hash(&buf),
                labels: buf.into_boxed_slice(),
            })
        })
        .collect();
    let text = outputs
        .file_sink
        .as_ref()
        .map(|_| file_sink::series_text(full.get_or_empty(METRIC_NAME), full.iter()).into_boxed_str());
    CacheEntry {
        iter: 0,
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
