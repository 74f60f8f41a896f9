//! The agent's own telemetry: self metrics (this module) and the HTTP endpoints
//! (`/metrics`, `/healthz`, `/readyz`, the status page, `/-/reload`, see [`server`]).

pub mod server;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type L = Vec<(&'static str, String)>;

fn hist() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every self metric; names are `sre_agent_<name>_<unit>[_total]`.
pub struct Metrics {
    registry: Mutex<Registry>,
    scrapes: Family<L, Counter>,
    scrape_failures: Family<L, Counter>,
    scrape_duration: Family<L, Histogram, fn() -> Histogram>,
    scraped_samples: Family<L, Counter>,
    duplicate_samples: Family<L, Counter>,
    appended: Family<L, Counter>,
    sent: Family<L, Counter>,
    retried: Family<L, Counter>,
    pushes_retried: Family<L, Counter>,
    dropped: Family<L, Counter>,
    duplicate: Family<L, Counter>,
    unknown_outcome: Family<L, Counter>,
    send_duration: Family<L, Histogram, fn() -> Histogram>,
    shards: Family<L, Gauge>,
    wal_bytes: Family<L, Gauge>,
    wal_segments: Family<L, Gauge>,
    wal_pending_records: Family<L, Gauge>,
    wal_corrupt: Family<L, Counter>,
    wal_errors: Family<L, Counter>,
    targets: Family<L, Gauge>,
    reloads: Family<L, Counter>,
    discovery_errors: Family<L, Counter>,
    discovery_updates: Family<L, Counter>,
    reload_ok: Gauge,
    file_sink_errors: Counter,
    ready: AtomicBool,
    /// The shared pod cache's metrics (`sre_agent_pod_cache_*`, a sub-registry).
    pub pod_cache: PodCacheMetrics,
    /// The logs path's metrics (`sre_agent_logs_*`).
    pub logs: std::sync::Arc<LogsMetrics>,
    /// The flows path's own metrics (`sre_agent_flows_*`; the flow series themselves go
    /// through the series cache to remote_write, not here).
    pub flows: std::sync::Arc<FlowsMetrics>,
}

/// Metrics of the flows collector, registered under `sre_agent_flows_`.
#[derive(Default)]
pub struct FlowsMetrics {
    /// 1 while the programs count.
    pub active: Gauge,
    off: Family<L, Gauge>,
    /// 1 while drops are counted (the `skb:kfree_skb` program is attached).
    pub drops_active: Gauge,
    /// Interfaces attached to (tc mode).
    pub interfaces: Gauge,
    /// Attach failures.
    pub attach_errors: Counter,
    /// Flows in the kernel's table at the last drain.
    pub table_entries: Gauge,
    /// New flows the full table could not hold (their packets are not counted).
    pub table_full: Counter,
    /// New drop keys the full drop table could not hold.
    pub drops_table_full: Counter,
    /// Flows removed from the table after `idle_timeout` without packets.
    pub evicted: Counter,
    /// Packets that were not IPv4/IPv6 or too short to parse.
    pub unparsed: Counter,
    /// Packets counted into flows.
    pub packets: Counter,
    /// Label sets held.
    pub label_sets: Gauge,
    label_sets_dropped: Family<L, Counter>,
    /// Failed drains (reading the tables).
    pub drain_errors: Counter,
    /// Drains done.
    pub drains: Counter,
}

impl FlowsMetrics {
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("flows");
        r.register(
            "active",
            "1 while the eBPF programs count flows; 0 when flows are off.",
            self.active.clone(),
        );
        r.register(
            "off",
            "1 with the reason flows are off (disabled, not-built, no-privileges, unsupported, attach-failed).",
            self.off.clone(),
        );
        r.register(
            "drops_active",
            "1 while drops are counted by kernel reason.",
            self.drops_active.clone(),
        );
        r.register(
            "interfaces",
            "Interfaces the classifier is attached to.",
            self.interfaces.clone(),
        );
        r.register(
            "attach_errors",
            "Failed attaches to interfaces.",
            self.attach_errors.clone(),
        );
        r.register(
            "table_entries",
            "Flows in the kernel's flow table.",
            self.table_entries.clone(),
        );
        r.register(
            "table_full",
            "New flows not counted because the flow table was full (raise flows.max_flows).",
            self.table_full.clone(),
        );
        r.register(
            "drops_table_full",
            "Drops not counted because the drop table was full.",
            self.drops_table_full.clone(),
        );
        r.register(
            "evicted",
            "Flows removed from the table after flows.idle_timeout without packets.",
            self.evicted.clone(),
        );
        r.register(
            "unparsed_packets",
            "Packets that were not IPv4/IPv6 or too short to parse.",
            self.unparsed.clone(),
        );
        r.register("packets", "Packets counted into flows.", self.packets.clone());
        r.register(
            "label_sets",
            "Label sets of the flow metrics held.",
            self.label_sets.clone(),
        );
        r.register(
            "label_sets_dropped",
            "New label sets not counted because the metric had flows.max_label_sets, by metric.",
            self.label_sets_dropped.clone(),
        );
        r.register(
            "drain_errors",
            "Failed reads of the kernel's tables.",
            self.drain_errors.clone(),
        );
        r.register("drains", "Reads of the kernel's tables.", self.drains.clone());
    }

    /// Flows are off for `reason` (or on, with `None`).
    pub fn set_off(&self, reason: Option<&str>) {
        self.off.clear();
        match reason {
            Some(r) => {
                self.active.set(0);
                self.off.get_or_create(&vec![("reason", r.to_owned())]).set(1);
            }
            None => {
                self.active.set(1);
            }
        }
    }

    /// `n` more label sets of `metric` were dropped.
    pub fn label_sets_dropped(&self, metric: &str, n: u64) {
        self.label_sets_dropped
            .get_or_create(&vec![("metric", metric.to_owned())])
            .inc_by(n);
    }
}

/// Metrics of the logs path, registered under `sre_agent_logs_`; plus the values of
/// pipeline `metrics` stages, rendered after the agent's own.
#[derive(Default)]
pub struct LogsMetrics {
    files: Family<L, Gauge>,
    bytes_read: Family<L, Counter>,
    lines_read: Family<L, Counter>,
    entries: Family<L, Counter>,
    dropped: Family<L, Counter>,
    lost_bytes: Family<L, Counter>,
    format_errors: Family<L, Counter>,
    truncated: Family<L, Counter>,
    truncations: Family<L, Counter>,
    turns: Family<L, Counter>,
    errors: Family<L, Counter>,
    paused: Counter,
    lag_bytes: Gauge,
    file_position: Family<L, Gauge>,
    file_size: Family<L, Gauge>,
    file_rows: Mutex<Vec<L>>,
    positions_saved: Gauge,
    positions_errors: Counter,
    /// Values of pipeline `metrics` stages.
    pub stages: std::sync::Arc<crate::logs::pipeline::StageMetrics>,
}

impl LogsMetrics {
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("logs");
        r.register(
            "files",
            "Log files tailed (state=open) and waiting for a free slot (state=waiting).",
            self.files.clone(),
        );
        r.register(
            "read_bytes",
            "Bytes read from log files, by job.",
            self.bytes_read.clone(),
        );
        r.register(
            "read_lines",
            "Lines read from log files, by job.",
            self.lines_read.clone(),
        );
        r.register(
            "entries_written",
            "Entries written to a client's WAL, by job and client.",
            self.entries.clone(),
        );
        r.register(
            "entries_dropped",
            "Entries dropped by pipeline stages, by job and reason.",
            self.dropped.clone(),
        );
        r.register(
            "lost_bytes",
            "Bytes of log files never read, by job and reason (truncated: copytruncate before they were read; deleted_before_read).",
            self.lost_bytes.clone(),
        );
        r.register(
            "format_errors",
            "Lines not in the container format (kept as they are), by job.",
            self.format_errors.clone(),
        );
        r.register(
            "truncated_lines",
            "Lines cut at max_line_size, by job.",
            self.truncated.clone(),
        );
        r.register(
            "file_turns",
            "Files closed at their end to let files waiting for a slot be read (logs.max_open_files), by job.",
            self.turns.clone(),
        );
        r.register(
            "file_truncations",
            "Files found truncated (copytruncate) and read again from the start, by job.",
            self.truncations.clone(),
        );
        r.register(
            "errors",
            "Errors, by kind (open, read, wal_append) and job or client.",
            self.errors.clone(),
        );
        r.register(
            "reading_paused",
            "Times reading paused because a client's WAL was full.",
            self.paused.clone(),
        );
        r.register(
            "lag_bytes",
            "Bytes of tailed files not read yet.",
            self.lag_bytes.clone(),
        );
        r.register(
            "file_position_bytes",
            "Position of each tailed file (bytes read into the WAL), by path and job.",
            self.file_position.clone(),
        );
        r.register(
            "file_size_bytes",
            "Size of each tailed file, by path and job.",
            self.file_size.clone(),
        );
        r.register(
            "positions_saved_timestamp_seconds",
            "When positions were last saved (the commit age is now minus this).",
            self.positions_saved.clone(),
        );
        r.register(
            "positions_errors",
            "Failed saves of the positions file.",
            self.positions_errors.clone(),
        );
    }
    fn job(job: &str) -> L {
        vec![("job", job.to_owned())]
    }
    /// Files open and waiting.
    pub fn set_files(&self, open: usize, waiting: usize) {
        self.files
            .get_or_create(&vec![("state", "open".to_owned())])
            .set(open as i64);
        self.files
            .get_or_create(&vec![("state", "waiting".to_owned())])
            .set(waiting as i64);
    }
    /// Bytes read.
    pub fn bytes_read(&self, job: &str, n: u64) {
        self.bytes_read.get_or_create(&Self::job(job)).inc_by(n);
    }
    /// Lines read.
    pub fn lines_read(&self, job: &str, n: u64) {
        self.lines_read.get_or_create(&Self::job(job)).inc_by(n);
    }
    /// Entries written to a client's WAL.
    pub fn entries(&self, job: &str, client: &str, n: u64) {
        self.entries
            .get_or_create(&vec![("job", job.to_owned()), ("client", client.to_owned())])
            .inc_by(n);
    }
    /// Entries dropped by a stage.
    pub fn dropped(&self, job: &str, reason: &str, n: u64) {
        self.dropped
            .get_or_create(&vec![("job", job.to_owned()), ("reason", reason.to_owned())])
            .inc_by(n);
    }
    /// Bytes never read.
    pub fn lost_bytes(&self, job: &str, reason: &'static str, n: u64) {
        self.lost_bytes
            .get_or_create(&vec![("job", job.to_owned()), ("reason", reason.to_owned())])
            .inc_by(n);
    }
    /// A line not in the container format.
    pub fn format_error(&self, job: &str) {
        self.format_errors.get_or_create(&Self::job(job)).inc();
    }
    /// A line cut at max_line_size.
    pub fn truncated(&self, job: &str) {
        self.truncated.get_or_create(&Self::job(job)).inc();
    }
    /// A file found truncated.
    pub fn truncations(&self, job: &str) {
        self.truncations.get_or_create(&Self::job(job)).inc();
    }
    /// An idle file was closed to give a waiting one its turn.
    pub fn turns(&self, job: &str) {
        self.turns.get_or_create(&Self::job(job)).inc();
    }
    fn error(&self, kind: &str, who: &str) {
        self.errors
            .get_or_create(&vec![("kind", kind.to_owned()), ("source", who.to_owned())])
            .inc();
    }
    /// Opening a file failed.
    pub fn open_error(&self, job: &str) {
        self.error("open", job);
    }
    /// Reading a file failed.
    pub fn read_error(&self, job: &str) {
        self.error("read", job);
    }
    /// Appending to a client's WAL failed.
    pub fn wal_append_error(&self, client: &str) {
        self.error("wal_append", client);
    }
    /// Reading paused on a full WAL.
    pub fn paused(&self) {
        self.paused.inc();
    }
    /// Unread bytes of tailed files.
    pub fn set_lag(&self, n: u64) {
        self.lag_bytes.set(n as i64);
    }
    /// Position and size of every tailed file (series of files no longer tailed go).
    pub fn set_file_rows<'a>(&self, rows: impl Iterator<Item = (&'a str, &'a str, u64, u64)>) {
        let mut now: Vec<L> = Vec::new();
        for (path, job, offset, size) in rows {
            let l: L = vec![("path", path.to_owned()), ("job", job.to_owned())];
            self.file_position.get_or_create(&l).set(offset as i64);
            self.file_size.get_or_create(&l).set(size as i64);
            now.push(l);
        }
        let mut before = self.file_rows.lock().unwrap_or_else(|p| p.into_inner());
        for old in before.iter().filter(|o| !now.contains(o)) {
            self.file_position.remove(old);
            self.file_size.remove(old);
        }
        *before = now;
    }
    /// Positions were saved now.
    pub fn positions_saved(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.positions_saved.set(now as i64);
    }
    /// Saving positions failed.
    pub fn positions_error(&self) {
        self.positions_errors.inc();
    }
    /// Creates the series of a job at zero.
    pub fn init_job(&self, job: &str) {
        for f in [&self.bytes_read, &self.lines_read, &self.format_errors, &self.truncated] {
            let _ = f.get_or_create(&Self::job(job));
        }
    }
}

/// Metrics of the shared pod caches, registered under `sre_agent_pod_cache_`.
#[derive(Default)]
pub struct PodCacheMetrics {
    pods: Family<L, Gauge>,
    watch_errors: Family<L, Counter>,
    relists: Family<L, Counter>,
    events: Family<L, Counter>,
    watches_started: Counter,
}

impl PodCacheMetrics {
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("pod_cache");
        r.register("pods", "Pods held, by cache.", self.pods.clone());
        r.register(
            "watch_errors",
            "Failed pod lists/watches (retried after a backoff), by cache.",
            self.watch_errors.clone(),
        );
        r.register(
            "relists",
            "Pod lists after the first (a watch expired with 410 Gone, or reconnected), by cache.",
            self.relists.clone(),
        );
        r.register("events", "Pod changes applied, by cache.", self.events.clone());
        r.register(
            "watches_started",
            "Pod watches started (a reload that keeps the connection settings starts none).",
            self.watches_started.clone(),
        );
    }
    fn cache(name: &str) -> L {
        vec![("cache", name.to_owned())]
    }
    /// A cache was started.
    pub fn started(&self, name: &str) {
        self.watches_started.inc();
        for f in [&self.watch_errors, &self.relists, &self.events] {
            let _ = f.get_or_create(&Self::cache(name));
        }
    }
    /// A list or watch failed.
    pub fn watch_error(&self, name: &str) {
        self.watch_errors.get_or_create(&Self::cache(name)).inc();
    }
    /// A list after the first completed.
    pub fn relist(&self, name: &str) {
        self.relists.get_or_create(&Self::cache(name)).inc();
    }
    /// A change was applied; the cache now holds `pods`.
    pub fn event(&self, name: &str, pods: usize) {
        self.events.get_or_create(&Self::cache(name)).inc();
        self.set_pods(name, pods);
    }
    /// The cache holds `pods`.
    pub fn set_pods(&self, name: &str, pods: usize) {
        self.pods.get_or_create(&Self::cache(name)).set(pods as i64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("sre_agent");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            logs: Default::default(),
            scrapes: Family::default(),
            scrape_failures: Family::default(),
            scrape_duration: Family::new_with_constructor(hist),
            scraped_samples: Family::default(),
            duplicate_samples: Family::default(),
            appended: Family::default(),
            sent: Family::default(),
            retried: Family::default(),
            pushes_retried: Family::default(),
            dropped: Family::default(),
            duplicate: Family::default(),
            unknown_outcome: Family::default(),
            send_duration: Family::new_with_constructor(hist),
            shards: Family::default(),
            wal_bytes: Family::default(),
            wal_segments: Family::default(),
            wal_pending_records: Family::default(),
            wal_corrupt: Family::default(),
            wal_errors: Family::default(),
            targets: Family::default(),
            reloads: Family::default(),
            discovery_errors: Family::default(),
            discovery_updates: Family::default(),
            reload_ok: Gauge::default(),
            file_sink_errors: Counter::default(),
            ready: AtomicBool::new(false),
            pod_cache: PodCacheMetrics::default(),
            flows: Default::default(),
        };
        m.pod_cache.register(&mut r);
        m.flows.register(&mut r);
        // Registered per component: the scrape side at the root (its names predate the
        // components), the others in sub-registries named after them (`sre_agent_wal_*`, …).
        r.register("scrapes", "Scrapes performed, by job.", m.scrapes.clone());
        r.register(
            "scrape_failures",
            "Failed scrapes, by job and reason.",
            m.scrape_failures.clone(),
        );
        r.register(
            "scrape_duration_seconds",
            "Duration of scrapes, by job.",
            m.scrape_duration.clone(),
        );
        r.register(
            "scraped_samples",
            "Samples parsed from scrapes, by job.",
            m.scraped_samples.clone(),
        );
        r.register(
            "duplicate_samples",
            "Samples of a series repeated within one scrape, dropped.",
            m.duplicate_samples.clone(),
        );
        r.register(
            "targets",
            "Scrape targets, by job and state (active, dropped, invalid).",
            m.targets.clone(),
        );
        r.register(
            "file_sink_errors",
            "Failed writes to the file sink.",
            m.file_sink_errors.clone(),
        );
        {
            let wal = r.sub_registry_with_prefix("wal");
            wal.register(
                "samples_appended",
                "Samples written to the WAL, by remote.",
                m.appended.clone(),
            );
            wal.register(
                "size_bytes",
                "Bytes on disk in the WAL, by remote.",
                m.wal_bytes.clone(),
            );
            wal.register(
                "segments",
                "Segment files in the WAL, by remote.",
                m.wal_segments.clone(),
            );
            wal.register(
                "pending_records",
                "WAL records not yet acknowledged by the receiver, by remote.",
                m.wal_pending_records.clone(),
            );
            wal.register(
                "corrupt_records",
                "Corrupt WAL records skipped, by remote.",
                m.wal_corrupt.clone(),
            );
            wal.register(
                "errors",
                "WAL read/commit errors, by remote and operation.",
                m.wal_errors.clone(),
            );
        }
        {
            let remote = r.sub_registry_with_prefix("remote");
            remote.register(
                "samples_sent",
                "Samples the receiver accepted, by remote.",
                m.sent.clone(),
            );
            remote.register(
                "samples_retried",
                "Samples sent again after a failed request, by remote.",
                m.retried.clone(),
            );
            remote.register(
                "pushes_retried",
                "Requests sent again after a 5xx, a 429 or no answer, by remote.",
                m.pushes_retried.clone(),
            );
            remote.register(
                "samples_dropped",
                "Samples dropped, by remote and reason.",
                m.dropped.clone(),
            );
            remote.register("samples_duplicate", "Samples the receiver answered as already stored (\"duplicate sample for timestamp\"; not loss), by remote.", m.duplicate.clone());
            remote.register("pushes_unknown_outcome", "Pushes whose answer never came (timeout, connection broken after sending, shutdown deadline while in flight), and records posted before a crash or kill and sent again after the restart (reason restart), by remote and reason: their samples may reach the receiver twice.", m.unknown_outcome.clone());
            remote.register(
                "send_duration_seconds",
                "Duration of remote-write requests, by remote.",
                m.send_duration.clone(),
            );
            remote.register(
                "shards",
                "Current number of sending shards, by remote.",
                m.shards.clone(),
            );
        }
        {
            let discovery = r.sub_registry_with_prefix("discovery");
            discovery.register(
                "errors",
                "Service discovery errors (watch failures, unreadable files), by job and mechanism.",
                m.discovery_errors.clone(),
            );
            discovery.register(
                "updates",
                "Target group updates published by service discovery, by job and mechanism.",
                m.discovery_updates.clone(),
            );
        }
        {
            let config = r.sub_registry_with_prefix("config");
            config.register("reloads", "Configuration reloads, by result.", m.reloads.clone());
            config.register(
                "last_reload_successful",
                "1 when the last reload succeeded.",
                m.reload_ok.clone(),
            );
        }
        for result in ["success", "failure"] {
            let _ = m.reloads.get_or_create(&vec![("result", result.to_owned())]);
        }
        let info: Family<L, Gauge> = Family::default();
        info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
            .set(1);
        r.register("build_info", "Version of the agent.", info);
        m.logs.register(&mut r);
        m.reload_ok.set(1);
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        m
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = encode(&mut out, &r);
        let stages = self.logs.stages.render();
        if !stages.is_empty() {
            match out.rfind("# EOF") {
                Some(i) => out.insert_str(i, &stages),
                None => out.push_str(&stages),
            }
        }
        out
    }

    fn job(job: &str) -> L {
        vec![("job", job.to_owned())]
    }
    fn remote(name: &str) -> L {
        vec![("remote", name.to_owned())]
    }

    /// A scrape finished (successfully or not).
    pub fn scrape_done(&self, job: &str, d: Duration, samples: u64) {
        self.scrapes.get_or_create(&Self::job(job)).inc();
        self.scrape_duration
            .get_or_create(&Self::job(job))
            .observe(d.as_secs_f64());
        self.scraped_samples.get_or_create(&Self::job(job)).inc_by(samples);
    }
    /// A scrape failed for `reason`.
    pub fn scrape_failure(&self, job: &str, reason: &'static str) {
        self.scrape_failures
            .get_or_create(&vec![("job", job.to_owned()), ("reason", reason.to_owned())])
            .inc();
    }
    /// A series appeared twice in one scrape.
    pub fn duplicate_samples(&self, job: &str, n: u64) {
        if n > 0 {
            self.duplicate_samples.get_or_create(&Self::job(job)).inc_by(n);
        }
    }
    /// Samples went into the WAL.
    pub fn samples_appended(&self, remote: &str, n: u64) {
        self.appended.get_or_create(&Self::remote(remote)).inc_by(n);
    }
    /// Samples were accepted by the receiver.
    pub fn samples_sent(&self, remote: &str, n: u64) {
        self.sent.get_or_create(&Self::remote(remote)).inc_by(n);
    }
    /// Samples will be sent again.
    pub fn samples_retried(&self, remote: &str, n: u64) {
        self.retried.get_or_create(&Self::remote(remote)).inc_by(n);
        self.pushes_retried.get_or_create(&Self::remote(remote)).inc();
    }
    /// Samples the receiver already had.
    pub fn samples_duplicate(&self, remote: &str, n: u64) {
        self.duplicate.get_or_create(&Self::remote(remote)).inc_by(n);
    }
    /// Samples were dropped.
    pub fn samples_dropped(&self, remote: &str, reason: &'static str, n: u64) {
        self.dropped
            .get_or_create(&vec![("remote", remote.to_owned()), ("reason", reason.to_owned())])
            .inc_by(n);
    }
    /// A push whose answer never came: its samples are sent again.
    pub fn push_unknown_outcome(&self, remote: &str, reason: &'static str) {
        self.unknown_outcome
            .get_or_create(&vec![("remote", remote.to_owned()), ("reason", reason.to_owned())])
            .inc();
    }
    /// Records a send's duration.
    pub fn observe_send(&self, remote: &str, d: Duration) {
        self.send_duration
            .get_or_create(&Self::remote(remote))
            .observe(d.as_secs_f64());
    }
    /// Current shard count.
    pub fn set_shards(&self, remote: &str, n: i64) {
        self.shards.get_or_create(&Self::remote(remote)).set(n);
    }
    /// WAL gauges.
    pub fn set_wal(&self, remote: &str, bytes: u64, segments: u64, pending_records: u64) {
        self.wal_bytes.get_or_create(&Self::remote(remote)).set(bytes as i64);
        self.wal_segments
            .get_or_create(&Self::remote(remote))
            .set(segments as i64);
        self.wal_pending_records
            .get_or_create(&Self::remote(remote))
            .set(pending_records as i64);
    }
    /// A corrupt WAL record was skipped.
    pub fn wal_corrupt(&self, remote: &str) {
        self.wal_corrupt.get_or_create(&Self::remote(remote)).inc();
    }
    /// Corrupt records the WAL found since the last report.
    pub fn wal_corrupt_add(&self, remote: &str, n: u64) {
        self.wal_corrupt.get_or_create(&Self::remote(remote)).inc_by(n);
    }
    /// A WAL read failed.
    pub fn wal_read_error(&self, remote: &str) {
        self.wal_errors
            .get_or_create(&vec![("remote", remote.to_owned()), ("op", "read".to_owned())])
            .inc();
    }
    /// A periodic WAL sync failed.
    pub fn wal_sync_error(&self, remote: &str) {
        self.wal_errors
            .get_or_create(&vec![("remote", remote.to_owned()), ("op", "sync".to_owned())])
            .inc();
    }
    /// A WAL commit failed.
    pub fn wal_commit_error(&self, remote: &str) {
        self.wal_errors
            .get_or_create(&vec![("remote", remote.to_owned()), ("op", "commit".to_owned())])
            .inc();
    }
    /// Target counts of a job.
    pub fn set_targets(&self, job: &str, active: usize, dropped: usize, invalid: usize) {
        for (state, n) in [("active", active), ("dropped", dropped), ("invalid", invalid)] {
            self.targets
                .get_or_create(&vec![("job", job.to_owned()), ("state", state.to_owned())])
                .set(n as i64);
        }
    }
    /// A discovery error for `job` from `mechanism` (`file`, `kubernetes`).
    pub fn discovery_error(&self, job: &str, mechanism: &'static str) {
        self.discovery_errors
            .get_or_create(&vec![("job", job.to_owned()), ("mechanism", mechanism.to_owned())])
            .inc();
    }
    /// Adds what a discovery provider of `job`/`mechanism` counted since its last report
    /// (counters never go back, whatever reloads restart providers).
    pub fn discovery_add(&self, job: &str, mechanism: &'static str, errors: u64, updates: u64) {
        let l = vec![("job", job.to_owned()), ("mechanism", mechanism.to_owned())];
        for (family, n) in [(&self.discovery_errors, errors), (&self.discovery_updates, updates)] {
            family.get_or_create(&l).inc_by(n);
        }
    }
    /// Creates a job's counters at zero, so dashboards and `rate()`/`increase()` alerts see
    /// series before the first failure rather than nothing: failures by every reason,
    /// duplicates, and the discovery counters of each mechanism the job uses.
    pub fn init_job(&self, job: &str, failure_reasons: &[&'static str], mechanisms: &[&'static str]) {
        for reason in failure_reasons {
            let _ = self
                .scrape_failures
                .get_or_create(&vec![("job", job.to_owned()), ("reason", (*reason).to_owned())]);
        }
        let _ = self.duplicate_samples.get_or_create(&Self::job(job));
        for mechanism in mechanisms {
            self.discovery_add(job, mechanism, 0, 0);
        }
    }

    /// Creates a remote's counters at zero (see [`Metrics::init_job`]).
    pub fn init_remote(&self, remote: &str, drop_reasons: &[&'static str], unknown_reasons: &[&'static str]) {
        let r = Self::remote(remote);
        for family in [
            &self.appended,
            &self.sent,
            &self.retried,
            &self.pushes_retried,
            &self.duplicate,
        ] {
            let _ = family.get_or_create(&r);
        }
        for op in ["read", "commit", "sync"] {
            let _ = self
                .wal_errors
                .get_or_create(&vec![("remote", remote.to_owned()), ("op", op.to_owned())]);
        }
        for reason in unknown_reasons {
            let _ = self
                .unknown_outcome
                .get_or_create(&vec![("remote", remote.to_owned()), ("reason", (*reason).to_owned())]);
        }
        for reason in drop_reasons.iter().chain(&["wal_evicted", "wal_write_error"]) {
            let _ = self
                .dropped
                .get_or_create(&vec![("remote", remote.to_owned()), ("reason", (*reason).to_owned())]);
        }
    }

    /// A reload finished.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&vec![("result", result.to_owned())]).inc();
        self.reload_ok.set(ok as i64);
    }
    /// A file sink write failed.
    pub fn file_sink_error(&self) {
        self.file_sink_errors.inc();
    }
    /// Marks the agent ready (config loaded, WAL open, discovery started).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    /// Whether the agent is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod names_tests {
    use super::Metrics;

    /// Dashboards, alerts and tests select these names: splitting the registry into
    /// components must not rename any.
    #[test]
    fn metric_names_are_stable_across_the_component_registries() {
        let m = Metrics::new();
        // Families are rendered once they have a series.
        m.init_job("j", &["timeout"], &["kubernetes"]);
        m.init_remote("r", &["http_4xx"], &["timeout"]);
        m.scrape_done("j", std::time::Duration::from_millis(5), 1);
        m.set_targets("j", 1, 0, 0);
        m.observe_send("r", std::time::Duration::from_millis(5));
        m.set_shards("r", 1);
        m.set_wal("r", 1, 1, 0);
        m.wal_corrupt_add("r", 0);
        m.pod_cache.started("c");
        m.pod_cache.set_pods("c", 0);
        m.file_sink_error();
        m.flows.set_off(Some("disabled"));
        m.flows.label_sets_dropped("hubble_icmp_total", 1);
        let text = m.render();
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        names.sort_unstable();
        let mut want = vec![
            "sre_agent_build_info",
            "sre_agent_config_last_reload_successful",
            "sre_agent_config_reloads",
            "sre_agent_discovery_errors",
            "sre_agent_discovery_updates",
            "sre_agent_duplicate_samples",
            "sre_agent_file_sink_errors",
            "sre_agent_flows_active",
            "sre_agent_flows_attach_errors",
            "sre_agent_flows_drain_errors",
            "sre_agent_flows_drains",
            "sre_agent_flows_drops_active",
            "sre_agent_flows_drops_table_full",
            "sre_agent_flows_evicted",
            "sre_agent_flows_interfaces",
            "sre_agent_flows_label_sets",
            "sre_agent_flows_label_sets_dropped",
            "sre_agent_flows_off",
            "sre_agent_flows_packets",
            "sre_agent_flows_table_entries",
            "sre_agent_flows_table_full",
            "sre_agent_flows_unparsed_packets",
            "sre_agent_logs_lag_bytes",
            "sre_agent_logs_positions_errors",
            "sre_agent_logs_positions_saved_timestamp_seconds",
            "sre_agent_logs_reading_paused",
            "sre_agent_pod_cache_events",
            "sre_agent_pod_cache_pods",
            "sre_agent_pod_cache_relists",
            "sre_agent_pod_cache_watch_errors",
            "sre_agent_pod_cache_watches_started",
            "sre_agent_remote_pushes_unknown_outcome",
            "sre_agent_remote_pushes_retried",
            "sre_agent_remote_samples_dropped",
            "sre_agent_remote_samples_duplicate",
            "sre_agent_remote_samples_retried",
            "sre_agent_remote_samples_sent",
            "sre_agent_remote_send_duration_seconds",
            "sre_agent_remote_shards",
            "sre_agent_scrape_duration_seconds",
            "sre_agent_scrape_failures",
            "sre_agent_scraped_samples",
            "sre_agent_scrapes",
            "sre_agent_targets",
            "sre_agent_wal_corrupt_records",
            "sre_agent_wal_errors",
            "sre_agent_wal_pending_records",
            "sre_agent_wal_samples_appended",
            "sre_agent_wal_segments",
            "sre_agent_wal_size_bytes",
        ];
        want.sort_unstable();
        assert_eq!(names, want);
    }
}
