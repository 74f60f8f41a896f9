//! One target's scrape loop: the schedule, the fetch, and the target's status; the series
//! side (cache, staleness, outputs) is the [`Appender`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::appender::{Appender, Leftover, StreamParse};
use super::client;
use super::target::Target;
use crate::http::HttpClient;
use crate::relabel::Rule;
use crate::remote_write::Outputs;
use crate::telemetry::Metrics;

/// Scrape settings shared by a job's targets.
pub struct ScrapeSettings {
    /// `job_name`.
    pub job: String,
    /// HTTP client (TLS settings of the job).
    pub client: HttpClient,
    /// `Authorization` header, if any.
    pub auth: crate::http::Auth,
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
    /// `follow_redirects` (default true).
    pub follow_redirects: bool,
    /// Whether the target has the report series (`up`, `scrape_duration_seconds`, …): true
    /// for scrapes, false for the flows collector, which is not scraped.
    pub report_series: bool,
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
    task: tokio::task::JoinHandle<Option<Leftover>>,
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
    /// Starts the loop for `target`, taking over the series of the loop it replaces at a
    /// reload, if any.
    pub fn start(
        target: Target,
        settings: Arc<ScrapeSettings>,
        outputs: Arc<Outputs>,
        metrics: Arc<Metrics>,
        inherited: Option<Leftover>,
    ) -> Self {
        let status = Arc::new(Mutex::new(TargetStatus {
            health: "unknown",
            ..Default::default()
        }));
        let (stop, stop_rx) = watch::channel(None);
        let mut sl = ScrapeLoop::new(target.clone(), settings, outputs, metrics, status.clone());
        if let Some(left) = inherited {
            sl.appender.inherit(left);
        }
        let task = tokio::spawn(sl.run(stop_rx));
        Self {
            target,
            status,
            stop,
            task,
        }
    }

    /// Stops the loop and waits for it; a shutdown returns the target's series for a
    /// successor (see [`Leftover`]).
    pub async fn stop(self, mode: StopMode) -> Option<Leftover> {
        self.signal(mode);
        self.join().await
    }

    /// Asks the loop to stop (a shutdown also abandons a scrape in progress).
    pub fn signal(&self, mode: StopMode) {
        let _ = self.stop.send(Some(mode));
    }

    /// Waits for the loop to end.
    pub async fn join(self) -> Option<Leftover> {
        self.task.await.ok().flatten()
    }
}

struct ScrapeLoop {
    target: Target,
    settings: Arc<ScrapeSettings>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<TargetStatus>>,
    appender: Appender,
    /// The line cut between two pieces of a streamed body.
    pending: Vec<u8>,
}

/// Carry-over capacity kept between scrapes (a longer line grows it for one scrape only).
const PENDING_KEEP: usize = 256 << 10;

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
        let appender = Appender::new(
            target.labels.clone(),
            settings.clone(),
            outputs.clone(),
            metrics.clone(),
        );
        Self {
            target,
            settings,
            metrics,
            status,
            appender,
            pending: Vec::new(),
        }
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

    async fn run(mut self, mut stop: watch::Receiver<Option<StopMode>>) -> Option<Leftover> {
        let start = tokio::time::Instant::now() + self.offset();
        let mut ticker = tokio::time::interval_at(start, self.target.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = ticker.tick() => {}
            }
            // A shutdown abandons a scrape in progress (nothing of it is written); a target
            // that goes away lets it finish, then ends its series.
            let mut stop2 = stop.clone();
            let abandoned = tokio::select! {
                _ = self.scrape_once() => false,
                _ = async {
                    loop {
                        if *stop2.borrow_and_update() == Some(StopMode::Shutdown) {
                            break;
                        }
                        if stop2.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                } => true,
            };
            if abandoned || stop.borrow().is_some() {
                break;
            }
        }
        let mode = (*stop.borrow()).unwrap_or(StopMode::Shutdown);
        if mode == StopMode::TargetGone {
            self.appender.write_stale_all(now_ms());
            return None;
        }
        Some(self.appender.into_leftover())
    }

    async fn scrape_once(&mut self) {
        let started = Instant::now();
        let ts = now_ms();
        self.appender.begin();
        let s = self.settings.clone();
        let mut pending = std::mem::take(&mut self.pending);
        let fetched = match s.auth.header() {
            Ok(auth) => {
                let mut sink = StreamParse::new(&mut self.appender, &mut pending, ts);
                client::fetch(
                    &s.client,
                    &self.target.url,
                    auth.as_ref(),
                    self.target.timeout,
                    s.body_size_limit,
                    s.follow_redirects,
                    &mut sink,
                )
                .await
            }
            Err(e) => Err(client::ScrapeError::Auth(e.to_string())),
        };
        // A long line may have grown the carry-over buffer; do not keep that between scrapes.
        if pending.capacity() > PENDING_KEEP {
            pending = Vec::new();
        }
        self.pending = pending;
        let result = fetched.and_then(|()| self.appender.end_body());
        let duration = started.elapsed();
        let report = self.appender.finish(result.as_ref().map(|r| *r), ts, duration);
        let err = match &result {
            Ok(_) => String::new(),
            Err(e) => {
                self.metrics.scrape_failure(&s.job, e.kind());
                let msg = e.to_string();
                tracing::warn!(target_url = %self.target.url, job = %s.job, error = %msg, "Scrape failed.");
                msg
            }
        };
        self.metrics.scrape_done(&s.job, duration, report.scraped);
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        st.health = if report.up == 1.0 { "up" } else { "down" };
        st.last_scrape_ms = ts;
        st.last_duration = duration;
        st.last_samples = report.scraped;
        st.last_error = err;
    }
}
