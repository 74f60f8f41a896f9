//! Wiring: builds outputs, senders, discovery and scrape jobs from a validated config, runs
//! them, reloads on SIGHUP / `POST /-/reload`, and shuts down cleanly on SIGTERM.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use config::agent::{AgentConfig, RemoteWriteConfig, ScrapeConfig};
use config::units::WalFsync;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{mpsc, watch};

use crate::discovery::{self, TargetGroup};
use crate::labels::Labels;
use crate::relabel;
use crate::remote_write::{file_sink::FileSink, Endpoint, Outputs};
use crate::scrape::manager::{Inherited, Job, Manager};
use crate::scrape::scrape_loop::ScrapeSettings;
use crate::scrape::target::JobDefaults;
use crate::sender::{SenderConfig, SenderHandle};
use crate::telemetry::server::{self, ReloadRequest, ServerState};
use crate::telemetry::Metrics;
use crate::wal::{FsyncPolicy, Wal, WalOptions};

/// Command-line settings that override the config file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen-address`.
    pub listen_address: Option<String>,
    /// `--storage-path`.
    pub storage_path: Option<PathBuf>,
}

/// Loads and validates the config file; the error text lists every problem, one per line.
pub fn load(path: &Path) -> Result<(AgentConfig, Vec<String>), String> {
    match config::load_agent_config(path) {
        Ok(loaded) => {
            // What only the agent can check (template functions, JSON paths, time layouts and
            // zones of the logs pipelines), at the line and column of the stage.
            let file = path.display().to_string();
            let errors = crate::logs::check_pipelines(&loaded.value, &loaded.spans, &file);
            if !errors.is_empty() {
                return Err(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"));
            }
            Ok((loaded.value, loaded.warnings.iter().map(|w| w.to_string()).collect()))
        }
        Err(errors) => Err(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")),
    }
}

/// The storage directory for a config and overrides.
pub fn storage_dir(cfg: &AgentConfig, ov: &Overrides) -> PathBuf {
    ov.storage_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(&cfg.storage.path))
}

/// Takes the exclusive lock on the storage directory.
pub fn lock_storage(dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating storage directory {}", dir.display()))?;
    let path = dir.join("lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow!(
            "storage directory {} is locked by another agent; give each agent its own --storage-path",
            dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow!("locking {}: {e}", path.display())),
    }
}

/// The name of a remote_write entry: `name`, else derived from the URL.
pub fn remote_name(rw: &RemoteWriteConfig) -> String {
    let raw = rw
        .name
        .clone()
        .unwrap_or_else(|| format!("{:016x}", xxhash_rust::xxh3::xxh3_64(rw.url.as_bytes()))[..6].to_owned());
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Logs WAL directories no configured remote_write uses (a removed entry, or a changed URL
/// without a `name`): their data is kept, not sent, until removed by hand.
fn warn_orphaned_wals(dir: &Path, names: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if names.contains(&name) {
            continue;
        }
        let bytes: u64 = std::fs::read_dir(e.path())
            .map(|d| d.flatten().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        tracing::warn!(
            wal = %e.path().display(),
            bytes,
            "WAL of a remote_write that is no longer configured; its samples will not be sent. \
             Set `name` on remote_write entries to keep a queue across URL changes, or delete the directory."
        );
    }
}

/// A remote_write queue: its WAL and the sender draining it. Kept across reloads while its
/// settings stay the same, so nothing is interrupted or sent twice.
struct Queue {
    /// The queue's name (its WAL directory).
    name: String,
    /// The settings it was started with (remote_write entry and WAL sizing).
    fingerprint: String,
    /// The WAL's own settings: while they stay, a reload that changes the sender keeps the WAL
    /// (and scraping into it) and restarts only the sender.
    wal_fingerprint: String,
    wal: Arc<Wal>,
    sender: SenderHandle,
    /// The WAL's counters already added to the self metrics.
    reported: Arc<Reported>,
    /// Syncs the WAL at `storage.wal_fsync`'s interval.
    syncer: Option<tokio::task::JoinHandle<()>>,
}

/// Whether this process opens the WAL in `dir` for the first time.
fn first_open(dir: &Path) -> bool {
    static OPENED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut opened = OPENED.lock().unwrap_or_else(|p| p.into_inner());
    if opened.iter().any(|d| d == dir) {
        return false;
    }
    opened.push(dir.to_path_buf());
    true
}

/// Totals of a WAL's own counters already added to the self metrics, so that the metrics
/// grow by what the WAL counted since (the WAL counts from its open; the metrics never reset).
#[derive(Default)]
struct Reported {
    corrupt_records: std::sync::atomic::AtomicU64,
    evicted_samples: std::sync::atomic::AtomicU64,
}

impl Reported {
    /// What grew since the last call.
    fn delta(counter: &std::sync::atomic::AtomicU64, total: u64) -> u64 {
        total.saturating_sub(counter.swap(total, std::sync::atomic::Ordering::Relaxed))
    }
}

/// One generation of running components (replaced on reload; queues are handed on).
struct Running {
    manager: Manager,
    /// What the scrape loops write to, and the settings it was built from.
    outputs: (Arc<Outputs>, String),
    /// Each job's settings, by name.
    job_fingerprints: std::collections::HashMap<String, String>,
    queues: Vec<Queue>,
    /// Each job's discovery providers, by job name.
    discovery: std::collections::HashMap<String, JobDiscovery>,
    wal_stats: tokio::task::JoinHandle<()>,
}

/// A job's running discovery: its provider tasks, a receiver per provider that no job reads
/// (so a clone of it tells whether the provider has published since it started), the
/// senders of static groups, and the pod caches it reads.
struct JobDiscovery {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    witnesses: Vec<watch::Receiver<Vec<TargetGroup>>>,
    _keep: Vec<watch::Sender<Vec<TargetGroup>>>,
    cache_keys: Vec<crate::pods::CacheKey>,
}

impl JobDiscovery {
    fn abort(&self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

impl Running {
    /// Stops scraping and discovery, and returns the queues (still sending) and each
    /// target's series for the next generation.
    async fn stop_sources(self) -> (Vec<Queue>, Inherited) {
        let none = std::collections::HashSet::new();
        let (queues, inherited, _) = self.stop_sources_keeping(&none, &none).await;
        (queues, inherited)
    }

    /// Like [`Running::stop_sources`], but the scrape loops of the jobs in `keep` go on
    /// running and are handed back with the outputs they write to, and so does the discovery
    /// of the jobs in `keep_discovery`.
    async fn stop_sources_keeping(
        mut self,
        keep: &std::collections::HashSet<String>,
        keep_discovery: &std::collections::HashSet<String>,
    ) -> (Vec<Queue>, Inherited, Kept) {
        let (inherited, adopted) = self.manager.stop_keeping(keep).await;
        let discovery: std::collections::HashMap<String, JobDiscovery> = self
            .discovery
            .drain()
            .filter_map(|(job, d)| {
                if keep_discovery.contains(&job) {
                    Some((job, d))
                } else {
                    d.abort();
                    None
                }
            })
            .collect();
        self.wal_stats.abort();
        (
            self.queues,
            inherited,
            Kept {
                adopted,
                outputs: self.outputs,
                discovery,
            },
        )
    }

    async fn stop(self, send_timeout: Duration) {
        let (queues, _) = self.stop_sources().await;
        stop_queues(queues, send_timeout).await;
    }
}

/// Stops senders: requests in flight are answered or cut off at `send_timeout`, never
/// abandoned and sent again.
async fn stop_queues(queues: Vec<Queue>, send_timeout: Duration) {
    futures::future::join_all(queues.into_iter().map(|q| async move {
        q.sender.shutdown(send_timeout).await;
        if let Some(s) = q.syncer {
            s.abort();
        }
        // What was appended reaches the disk before the process may exit.
        let wal = q.wal.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || wal.sync()).await {
            tracing::error!(remote = %q.name, error = %e, "Syncing the WAL failed.");
        }
    }))
    .await;
}

/// The WAL's fsync policy from `storage.wal_fsync`.
fn wal_fsync(storage: &config::agent::StorageConfig) -> FsyncPolicy {
    match storage.wal_fsync {
        WalFsync::Never => FsyncPolicy::Never,
        WalFsync::Always => FsyncPolicy::Always,
        WalFsync::Interval(d) => FsyncPolicy::Interval(d.get()),
    }
}

/// For the `Interval` policy: a task syncing the WAL at that interval, off the async workers.
fn start_syncer(
    name: &str,
    wal: &Arc<Wal>,
    policy: FsyncPolicy,
    metrics: &Arc<Metrics>,
) -> Option<tokio::task::JoinHandle<()>> {
    let FsyncPolicy::Interval(every) = policy else {
        return None;
    };
    let (wal, name, metrics) = (wal.clone(), name.to_owned(), metrics.clone());
    Some(tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            let w = wal.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || w.sync()).await {
                metrics.wal_sync_error(&name);
                tracing::error!(remote = %name, error = %e, "Syncing the WAL failed.");
            }
        }
    }))
}

/// The settings a queue depends on: a change restarts its sender.
fn queue_fingerprint(rw: &RemoteWriteConfig, storage: &config::agent::StorageConfig) -> String {
    format!("{rw:?}|{}", wal_fingerprint(storage))
}

/// The settings a queue's WAL depends on.
fn wal_fingerprint(storage: &config::agent::StorageConfig) -> String {
    format!("{}|{:?}", storage.wal_max_size.0, storage.wal_fsync)
}

fn scrape_settings(sc: &ScrapeConfig, cfg: &AgentConfig, base: &Path) -> anyhow::Result<ScrapeSettings> {
    let g = &cfg.global;
    let client = crate::http::build_client(base, sc.tls_config.as_ref(), sc.enable_http2.unwrap_or(true))
        .with_context(|| format!("scrape config {:?}", sc.job_name))?;
    let auth = crate::http::Auth::new(
        base,
        sc.basic_auth.as_ref(),
        sc.authorization.as_ref(),
        sc.bearer_token.as_deref(),
        sc.bearer_token_file.as_deref(),
    )
    .with_context(|| format!("scrape config {:?}", sc.job_name))?;
    Ok(ScrapeSettings {
        job: sc.job_name.clone(),
        client,
        auth,
        honor_labels: sc.honor_labels,
        honor_timestamps: sc.honor_timestamps.unwrap_or(true),
        sample_limit: sc.sample_limit.unwrap_or(g.sample_limit),
        label_limit: sc.label_limit.unwrap_or(g.label_limit),
        label_name_length_limit: sc.label_name_length_limit.unwrap_or(g.label_name_length_limit),
        label_value_length_limit: sc.label_value_length_limit.unwrap_or(g.label_value_length_limit),
        body_size_limit: sc.body_size_limit.unwrap_or(g.body_size_limit).0,
        follow_redirects: sc.follow_redirects.unwrap_or(true),
        report_series: true,
        metric_relabel: relabel::compile(&sc.metric_relabel_configs)
            .map_err(|e| anyhow!("scrape config {:?}: metric_relabel_configs: {e}", sc.job_name))?,
    })
}

/// A digest of the files a job's clients read once when built (TLS material, a kubeconfig, a
/// basic-auth password for the API server): a reload rebuilds a job whose files changed
/// (a rotated certificate) even if its settings did not. Credential files read at every
/// request are left out.
fn files_digest(sc: &ScrapeConfig, base: &Path) -> u64 {
    let tls = |t: &Option<config::agent::TlsConfig>| -> Vec<Option<String>> {
        t.as_ref()
            .map(|t| vec![t.ca_file.clone(), t.cert_file.clone(), t.key_file.clone()])
            .unwrap_or_default()
    };
    let mut files = tls(&sc.tls_config);
    for k in &sc.kubernetes_sd_configs {
        files.extend(tls(&k.tls_config));
        files.push(k.kubeconfig_file.clone());
        files.push(k.basic_auth.as_ref().and_then(|b| b.password_file.clone()));
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for f in files.into_iter().flatten() {
        h.update(f.as_bytes());
        match std::fs::read(crate::http::resolve(base, &f)) {
            Ok(bytes) => h.update(&bytes),
            Err(_) => h.update(b"\0unreadable"),
        }
    }
    h.digest()
}

/// The Kubernetes SD config with its file paths made relative to the config file's directory.
fn resolve_sd_paths(k: &config::agent::KubernetesSdConfig, base: &Path) -> config::agent::KubernetesSdConfig {
    let r = |p: &mut Option<String>| {
        if let Some(v) = p.as_mut() {
            *v = crate::http::resolve(base, v).display().to_string();
        }
    };
    let mut k = k.clone();
    r(&mut k.kubeconfig_file);
    r(&mut k.bearer_token_file);
    if let Some(a) = k.authorization.as_mut() {
        r(&mut a.credentials_file);
    }
    if let Some(b) = k.basic_auth.as_mut() {
        r(&mut b.password_file);
    }
    if let Some(t) = k.tls_config.as_mut() {
        r(&mut t.ca_file);
        r(&mut t.cert_file);
        r(&mut t.key_file);
    }
    k
}

/// The `Authorization` source of a remote_write entry.
fn remote_auth(base: &Path, rw: &RemoteWriteConfig) -> Result<crate::http::Auth, crate::http::HttpSetupError> {
    crate::http::Auth::new(
        base,
        rw.basic_auth.as_ref(),
        rw.authorization.as_ref(),
        rw.bearer_token.as_deref(),
        rw.bearer_token_file.as_deref(),
    )
}

/// Interval and timeout of a scrape config with Prometheus's defaulting.
pub fn interval_timeout(sc: &ScrapeConfig, cfg: &AgentConfig) -> (Duration, Duration) {
    let interval = sc.scrape_interval.unwrap_or(cfg.global.scrape_interval).get();
    let timeout = sc
        .scrape_timeout
        .map(|t| t.get())
        .unwrap_or_else(|| cfg.global.scrape_timeout.get().min(interval));
    (interval, timeout)
}

/// One remote_write entry, built and checked, not started.
struct BuiltQueue {
    name: String,
    fingerprint: String,
    wal_fingerprint: String,
    sender: SenderConfig,
    write_relabel: Vec<relabel::Rule>,
}

/// One scrape config, built and checked, not started.
struct BuiltJob {
    /// Its settings (the scrape config and the global section): a reload keeps the loops of a
    /// job whose settings stay.
    fingerprint: String,
    defaults: JobDefaults,
    relabel: Vec<relabel::Rule>,
    settings: Arc<ScrapeSettings>,
    target_limit: u64,
    static_configs: Vec<config::agent::StaticConfig>,
    file_sd: Vec<(Vec<PathBuf>, Duration)>,
    kubernetes_sd: Vec<config::agent::KubernetesSdConfig>,
}

/// A configuration built and checked completely, with nothing started and nothing of the
/// running generation touched: a reload builds this first and refuses the file if it fails.
/// Only what needs the storage (opening WALs, the file sink) is left to [`launch`].
pub struct Built {
    queues: Vec<BuiltQueue>,
    jobs: Vec<BuiltJob>,
    outputs_fingerprint: String,
    external_labels: Labels,
    file_sink: Option<PathBuf>,
    storage: config::agent::StorageConfig,
}

/// Builds everything of `cfg` that can fail on files or settings: HTTP clients, TLS,
/// credentials, headers, rules, scrape settings; checks that an existing file sink is
/// writable. `check-config` runs it too.
pub fn build(cfg: &AgentConfig, config_path: &Path) -> anyhow::Result<Built> {
    let base = config_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let names: Vec<String> = cfg.remote_write.iter().map(remote_name).collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(anyhow!(
                "remote_write entries {} and {} would share the queue {n:?}; give them distinct `name`s",
                names[..i].iter().position(|x| x == n).unwrap_or(0) + 1,
                i + 1
            ));
        }
    }
    let mut queues = Vec::new();
    for rw in &cfg.remote_write {
        let name = remote_name(rw);
        let url: http::Uri = rw
            .url
            .parse()
            .with_context(|| format!("remote_write url {:?}", rw.url))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &rw.headers {
            headers.insert(
                HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("remote_write header name {k:?}"))?,
                HeaderValue::from_str(v).with_context(|| format!("remote_write header {k:?} value"))?,
            );
        }
        let auth = remote_auth(&base, rw)?;
        let client = crate::http::build_client(&base, rw.tls_config.as_ref(), rw.enable_http2.unwrap_or(true))?;
        queues.push(BuiltQueue {
            fingerprint: queue_fingerprint(rw, &cfg.storage),
            wal_fingerprint: wal_fingerprint(&cfg.storage),
            sender: SenderConfig {
                protocol: Arc::new(crate::remote_write::RemoteWrite::new()),
                name: name.clone(),
                url,
                client,
                headers,
                auth,
                timeout: rw.remote_timeout.map(|d| d.get()).unwrap_or(Duration::from_secs(30)),
                queue: rw.queue_config.clone(),
                follow_redirects: rw.follow_redirects.unwrap_or(true),
                max_bytes_per_send: 0,
            },
            write_relabel: relabel::compile(&rw.write_relabel_configs)
                .map_err(|e| anyhow!("remote_write {:?}: write_relabel_configs: {e}", rw.url))?,
            name,
        });
    }
    if let Some(fs) = &cfg.file_sink {
        // Checked without creating anything: an existing file must be writable.
        let p = Path::new(&fs.path);
        if fs.path != "-" && p.exists() {
            std::fs::OpenOptions::new()
                .append(true)
                .open(p)
                .with_context(|| format!("opening file_sink {}", fs.path))?;
        }
    }
    let mut jobs = Vec::new();
    for sc in &cfg.scrape_configs {
        let (interval, timeout) = interval_timeout(sc, cfg);
        jobs.push(BuiltJob {
            fingerprint: format!("{sc:?}|{:?}|{:x}", cfg.global, files_digest(sc, &base)),
            defaults: JobDefaults {
                job: sc.job_name.clone(),
                scheme: sc.scheme.clone().unwrap_or_else(|| "http".to_owned()),
                metrics_path: sc.metrics_path.clone().unwrap_or_else(|| "/metrics".to_owned()),
                interval,
                timeout,
                params: sc.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            },
            relabel: relabel::compile(&sc.relabel_configs)
                .map_err(|e| anyhow!("scrape config {:?}: relabel_configs: {e}", sc.job_name))?,
            settings: Arc::new(scrape_settings(sc, cfg, &base)?),
            target_limit: sc.target_limit.unwrap_or(cfg.global.target_limit),
            static_configs: sc.static_configs.clone(),
            file_sd: sc
                .file_sd_configs
                .iter()
                .map(|f| {
                    let files = f.files.iter().map(|p| crate::http::resolve(&base, p)).collect();
                    (files, f.refresh_interval.get())
                })
                .collect(),
            kubernetes_sd: sc
                .kubernetes_sd_configs
                .iter()
                .map(|k| resolve_sd_paths(k, &base))
                .collect(),
        });
    }
    Ok(Built {
        outputs_fingerprint: outputs_fingerprint(cfg),
        queues,
        jobs,
        external_labels: Labels::from_pairs(cfg.global.external_labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        file_sink: cfg.file_sink.as_ref().map(|f| PathBuf::from(&f.path)),
        storage: cfg.storage.clone(),
    })
}

/// Checks everything of `cfg` that can fail on files or settings without starting anything
/// (`check-config`).
pub fn preflight(cfg: &AgentConfig, config_path: &Path) -> anyhow::Result<()> {
    build(cfg, config_path)?;
    if let Some(l) = &cfg.logs {
        let base = config_path.parent().map(Path::to_path_buf).unwrap_or_default();
        crate::logs::preflight(l, &base)?;
    }
    Ok(())
}

/// Stops a logs path whose last reference is `l` (the status page may hold one briefly).
async fn stop_logs(mut l: Arc<crate::logs::Logs>, timeout: Duration) {
    loop {
        match Arc::try_unwrap(l) {
            Ok(logs) => return logs.stop(timeout).await,
            Err(back) => {
                l = back;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Opens a new queue's WAL.
fn open_wal(
    storage: &Path,
    name: &str,
    settings: &config::agent::StorageConfig,
) -> anyhow::Result<(Arc<Wal>, Arc<Reported>)> {
    let dir = storage.join("wal").join(name);
    let wal = Wal::open(
        &dir,
        WalOptions {
            max_size_bytes: settings.wal_max_size.0,
            segment_size_bytes: (settings.wal_max_size.0 / 8).clamp(1 << 20, 64 << 20),
            fsync: wal_fsync(settings),
            refuse_when_full: false,
        },
    )
    .with_context(|| format!("opening WAL {}", dir.display()))?;
    let wal = Arc::new(wal);
    // Holes found when this process opened the WAL before (a reload that changed the queue)
    // were counted then; a reopened WAL starts its count from them.
    let reported = Arc::new(Reported::default());
    if !first_open(&dir) {
        reported
            .corrupt_records
            .store(wal.stats().corrupt_records, std::sync::atomic::Ordering::Relaxed);
    }
    Ok((wal, reported))
}

/// What outlives configuration generations: the storage directory, the self metrics and the
/// pod caches; and how long a stopping sender may take.
#[derive(Clone, Copy)]
struct Host<'a> {
    storage: &'a Path,
    metrics: &'a Arc<Metrics>,
    caches: &'a crate::pods::PodCaches,
    send_timeout: Duration,
}

/// Scrape loops a reload keeps running, and the outputs they write to.
struct Kept {
    adopted: crate::scrape::manager::Adopted,
    outputs: (Arc<Outputs>, String),
    discovery: std::collections::HashMap<String, JobDiscovery>,
}

/// The settings the scrape loops' outputs are built from: while they stay (same queues and
/// WAL settings, write relabeling, external labels, file sink), a reload keeps the outputs.
fn outputs_fingerprint(cfg: &AgentConfig) -> String {
    let queues: Vec<(String, String)> = cfg
        .remote_write
        .iter()
        .map(|rw| (remote_name(rw), format!("{:?}", rw.write_relabel_configs)))
        .collect();
    format!(
        "{queues:?}|{:?}|{:?}|{}",
        cfg.global.external_labels,
        cfg.file_sink.as_ref().map(|f| &f.path),
        wal_fingerprint(&cfg.storage)
    )
}

/// How [`launch`] gets a queue's WAL.
enum Opened {
    /// The running queue, untouched.
    Reuse,
    /// The running queue's WAL, with a new sender.
    Handover,
    /// Opened now.
    New(Arc<Wal>, Arc<Reported>),
}

/// Starts a built configuration. `reuse` holds the queues of the previous generation whose
/// settings did not change; they are taken over as they are. What can still fail here is
/// opening the new queues' WALs and the file sink; then nothing was started.
fn launch(
    built: Built,
    host: &Host<'_>,
    reuse: &mut Vec<Queue>,
    handover: &mut Vec<Queue>,
    inherited: Inherited,
    kept: &mut Option<Kept>,
) -> anyhow::Result<Running> {
    let Host {
        storage,
        metrics,
        caches,
        ..
    } = *host;
    let names: Vec<String> = built.queues.iter().map(|q| q.name.clone()).collect();
    warn_orphaned_wals(&storage.join("wal"), &names);
    // Open first (fallible), start after.
    let mut opened = Vec::new();
    for q in &built.queues {
        if reuse.iter().any(|r| r.name == q.name && r.fingerprint == q.fingerprint) {
            opened.push(Opened::Reuse);
            continue;
        }
        if handover
            .iter()
            .any(|r| r.name == q.name && r.wal_fingerprint == q.wal_fingerprint)
        {
            opened.push(Opened::Handover);
            continue;
        }
        if reuse.iter().chain(handover.iter()).any(|r| r.name == q.name) {
            return Err(anyhow!("queue {:?} is still running with other settings", q.name));
        }
        let (wal, reported) = open_wal(storage, &q.name, &built.storage)?;
        opened.push(Opened::New(wal, reported));
    }
    let reuse_outputs = kept.as_ref().is_some_and(|k| k.outputs.1 == built.outputs_fingerprint);
    let file_sink = match &built.file_sink {
        // Kept outputs keep their file sink open.
        _ if reuse_outputs => None,
        Some(p) => Some(Arc::new(
            FileSink::open(p).with_context(|| format!("opening file_sink {}", p.display()))?,
        )),
        None => None,
    };
    let mut queues = Vec::new();
    let mut endpoints = Vec::new();
    for (q, opened) in built.queues.into_iter().zip(opened) {
        metrics.init_remote(
            &q.name,
            &crate::remote_write::REJECTION_REASONS,
            &crate::sender::Unknown::REASONS,
        );
        let queue = match opened {
            Opened::Reuse => {
                let i = reuse
                    .iter()
                    .position(|r| r.name == q.name && r.fingerprint == q.fingerprint)
                    .ok_or_else(|| anyhow!("queue {:?} vanished", q.name))?;
                reuse.swap_remove(i)
            }
            Opened::Handover => {
                // Same WAL, new sender settings: scraping goes on into the WAL at once; the
                // new sender starts where the old one committed, once that one has stopped as
                // at shutdown (answers awaited, nothing abandoned and sent again).
                let i = handover
                    .iter()
                    .position(|r| r.name == q.name)
                    .ok_or_else(|| anyhow!("queue {:?} vanished", q.name))?;
                let old = handover.swap_remove(i);
                let sender = SenderHandle::start_after(
                    old.sender,
                    host.send_timeout,
                    q.sender,
                    old.wal.clone(),
                    metrics.clone(),
                );
                Queue {
                    name: q.name.clone(),
                    fingerprint: q.fingerprint,
                    wal_fingerprint: q.wal_fingerprint,
                    wal: old.wal,
                    sender,
                    reported: old.reported,
                    syncer: old.syncer,
                }
            }
            Opened::New(wal, reported) => {
                let sender = SenderHandle::start(q.sender, wal.clone(), metrics.clone());
                let syncer = start_syncer(&q.name, &wal, wal_fsync(&built.storage), metrics);
                Queue {
                    name: q.name.clone(),
                    fingerprint: q.fingerprint,
                    wal_fingerprint: q.wal_fingerprint,
                    wal,
                    sender,
                    reported,
                    syncer,
                }
            }
        };
        endpoints.push(Arc::new(Endpoint {
            name: q.name,
            wal: queue.wal.clone(),
            write_relabel: q.write_relabel,
        }));
        queues.push(queue);
    }
    // Nothing fails from here on: take over the kept loops and discovery.
    let (same_outputs, mut kept_discovery) = match kept.take() {
        Some(k) if reuse_outputs => (Some((k.outputs.0, k.adopted)), k.discovery),
        Some(k) => (None, k.discovery),
        None => (None, Default::default()),
    };
    let (outputs, adopted) = match same_outputs {
        // Same queues (kept or handed over, so the same WALs): the running loops' outputs.
        Some(kept) => kept,
        None => (
            Arc::new(Outputs {
                endpoints,
                external_labels: built.external_labels,
                file_sink,
                pool: Default::default(),
            }),
            Default::default(),
        ),
    };
    let wal_stats = start_wal_stats(&queues, metrics);
    let job_fingerprints = built
        .jobs
        .iter()
        .map(|j| (j.defaults.job.clone(), j.fingerprint.clone()))
        .collect();
    let (jobs, discovery) = start_discovery(built.jobs, metrics, caches, &mut kept_discovery);
    let manager = Manager::start(jobs, outputs.clone(), metrics.clone(), inherited, adopted);
    Ok(Running {
        manager,
        outputs: (outputs, built.outputs_fingerprint),
        job_fingerprints,
        queues,
        discovery,
        wal_stats,
    })
}

/// Publishes the queues' WAL gauges and adds what their counters grew, every 2 s.
fn start_wal_stats(queues: &[Queue], metrics: &Arc<Metrics>) -> tokio::task::JoinHandle<()> {
    let wals: Vec<(String, Arc<Wal>, Arc<Reported>)> = queues
        .iter()
        .map(|q| (q.name.clone(), q.wal.clone(), q.reported.clone()))
        .collect();
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(2));
        loop {
            t.tick().await;
            for (name, wal, reported) in &wals {
                let s = wal.stats();
                metrics.set_wal(
                    name,
                    s.bytes,
                    s.segments as u64,
                    s.next_seq.saturating_sub(s.committed_seq),
                );
                metrics.wal_corrupt_add(name, Reported::delta(&reported.corrupt_records, s.corrupt_records));
                metrics.samples_dropped(
                    name,
                    "wal_evicted",
                    Reported::delta(&reported.evicted_samples, s.evicted_items),
                );
            }
        }
    })
}

/// Starts each job's discovery providers, or takes over those `kept` of an unchanged job (a
/// reload). Kubernetes providers read the shared pod caches; caches no job of this
/// configuration reads are let go.
fn start_discovery(
    built: Vec<BuiltJob>,
    metrics: &Arc<Metrics>,
    caches: &crate::pods::PodCaches,
    kept: &mut std::collections::HashMap<String, JobDiscovery>,
) -> (Vec<Job>, std::collections::HashMap<String, JobDiscovery>) {
    let node_name = std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty());
    let mut used = std::collections::BTreeSet::new();
    let mut jobs = Vec::new();
    let mut all = std::collections::HashMap::new();
    for bj in built {
        let job_name = bj.defaults.job.clone();
        let mut mechanisms = Vec::new();
        if !bj.file_sd.is_empty() {
            mechanisms.push("file");
        }
        if !bj.kubernetes_sd.is_empty() {
            mechanisms.push("kubernetes");
        }
        metrics.init_job(&job_name, crate::scrape::client::ScrapeError::KINDS, &mechanisms);
        let d = match kept.remove(&job_name) {
            Some(d) => d,
            None => start_job_discovery(&bj, &job_name, node_name.as_deref(), metrics, caches),
        };
        used.extend(d.cache_keys.iter().cloned());
        // A clone of a witness sees whatever the provider published since it started, so the
        // job knows at once which providers have published their list.
        let providers = d.witnesses.clone();
        all.insert(job_name, d);
        jobs.push(Job {
            defaults: bj.defaults,
            relabel: bj.relabel,
            settings: bj.settings,
            providers,
            target_limit: bj.target_limit,
        });
    }
    for (_, d) in kept.drain() {
        d.abort();
    }
    caches.retain(&used);
    (jobs, all)
}

/// Starts one job's providers: static groups, file discovery, pod discovery.
fn start_job_discovery(
    bj: &BuiltJob,
    job_name: &str,
    node_name: Option<&str>,
    metrics: &Arc<Metrics>,
    caches: &crate::pods::PodCaches,
) -> JobDiscovery {
    let mut d = JobDiscovery {
        tasks: Vec::new(),
        witnesses: Vec::new(),
        _keep: Vec::new(),
        cache_keys: Vec::new(),
    };
    if !bj.static_configs.is_empty() {
        let (tx, r) = watch::channel(Vec::new());
        // Sent, not the initial value: the job sees the provider has published its list.
        tx.send_replace(discovery::static_groups(job_name, &bj.static_configs));
        d._keep.push(tx);
        d.witnesses.push(r);
    }
    for (files, refresh) in bj.file_sd.iter().cloned() {
        let (tx, r) = watch::channel(Vec::new());
        let (m, job) = (metrics.clone(), job_name.to_owned());
        let on_error = move || m.discovery_error(&job, "file");
        d.tasks
            .push(tokio::spawn(discovery::file::run(files, refresh, tx, on_error)));
        d.witnesses.push(r);
    }
    for k in &bj.kubernetes_sd {
        let (tx, r) = watch::channel(Vec::new());
        d.witnesses.push(r);
        let sub = match crate::pods::Subscription::new(k, node_name) {
            Ok(sub) => sub,
            Err(e) => {
                metrics.discovery_error(job_name, "kubernetes");
                tracing::error!(job = %job_name, error = %e, "Kubernetes discovery cannot start; no targets from it.");
                tx.send_replace(Vec::new()); // complete, and empty
                d._keep.push(tx);
                continue;
            }
        };
        let cache = caches.get(&sub);
        d.cache_keys.push(sub.key.clone());
        d.tasks.push(tokio::spawn(run_kubernetes_sd(
            cache,
            sub,
            job_name.to_owned(),
            metrics.clone(),
            tx,
        )));
    }
    d
}

/// One `kubernetes_sd_config`'s provider: pod discovery over the shared pod cache publishing
/// target groups; its updates, and the watch errors of its cache while it reads it, are added
/// to the job's discovery metrics every 5 s.
async fn run_kubernetes_sd(
    cache: Arc<crate::pods::PodCache>,
    sub: crate::pods::Subscription,
    job: String,
    m: Arc<Metrics>,
    tx: watch::Sender<Vec<TargetGroup>>,
) {
    let stats = Arc::new(discovery::kubernetes::PodDiscoveryStats::default());
    let publish = {
        let (cache, stats) = (cache.clone(), stats.clone());
        async move {
            let watch_errors = || cache.stats().watch_errors.load(std::sync::atomic::Ordering::Relaxed);
            let (mut errors, mut updates) = (watch_errors(), 0);
            let mut t = tokio::time::interval(Duration::from_secs(5));
            loop {
                t.tick().await;
                let (e, u) = (watch_errors(), stats.updates());
                m.discovery_add(&job, "kubernetes", e.saturating_sub(errors), u.saturating_sub(updates));
                (errors, updates) = (e, u);
            }
        }
    };
    tokio::select! {
        () = discovery::kubernetes::run(cache, sub, tx, stats) => {}
        () = publish => {}
    }
}

/// Replaces the running generation by `built` (from `new`): ends the series of removed jobs,
/// stops the old scrape loops and discovery (each target's series handed on), keeps the queues
/// whose settings are unchanged and stops the others like at shutdown (requests in flight are
/// answered, never abandoned and sent again), then launches. If the launch fails (a WAL or the
/// file sink cannot be opened), the previous configuration is started again; only an error
/// doing that is returned as `Err`, a refused reload is the `Err` of the pair.
async fn swap(
    old: Running,
    built: Built,
    cfg: &AgentConfig,
    new: &AgentConfig,
    config_path: &Path,
    host: &Host<'_>,
) -> anyhow::Result<(Running, Result<(), String>)> {
    let keep = new.scrape_configs.iter().map(|s| s.job_name.clone()).collect();
    old.manager.retire_jobs(&keep).await;
    let send_timeout = host.send_timeout;
    // Jobs whose settings stay keep their scrape loops running — schedule, series cache and
    // all — as long as the outputs they write to stay too.
    let keep_loops: std::collections::HashSet<String> = if old.outputs.1 == built.outputs_fingerprint {
        built
            .jobs
            .iter()
            .filter(|j| old.job_fingerprints.get(&j.defaults.job) == Some(&j.fingerprint))
            .map(|j| j.defaults.job.clone())
            .collect()
    } else {
        Default::default()
    };
    // Their discovery stays too, whatever happens to the outputs.
    let keep_discovery: std::collections::HashSet<String> = built
        .jobs
        .iter()
        .filter(|j| old.job_fingerprints.get(&j.defaults.job) == Some(&j.fingerprint))
        .map(|j| j.defaults.job.clone())
        .collect();
    let (queues, inherited, kept_loops) = old.stop_sources_keeping(&keep_loops, &keep_discovery).await;
    let (mut kept, others): (Vec<Queue>, Vec<Queue>) = queues.into_iter().partition(|q| {
        new.remote_write
            .iter()
            .any(|rw| remote_name(rw) == q.name && queue_fingerprint(rw, &new.storage) == q.fingerprint)
    });
    // A queue whose sender settings changed but whose WAL settings did not keeps its WAL, so
    // scraping goes on; only queues removed or with new WAL settings stop here, first.
    let new_wal = wal_fingerprint(&new.storage);
    let (mut handover, changed): (Vec<Queue>, Vec<Queue>) = others
        .into_iter()
        .partition(|q| q.wal_fingerprint == new_wal && new.remote_write.iter().any(|rw| remote_name(rw) == q.name));
    stop_queues(changed, send_timeout).await;
    let mut kept_loops = Some(kept_loops);
    match launch(built, host, &mut kept, &mut handover, inherited, &mut kept_loops) {
        Ok(running) => {
            stop_queues(kept, send_timeout).await;
            Ok((running, Ok(())))
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let previous =
                build(cfg, config_path).context("building the previous configuration after a failed reload")?;
            // Nothing was started: the handed-over queues run as they were, and loops kept
            // for the new configuration stop, handing on their series.
            kept.append(&mut handover);
            let inherited = match kept_loops.take() {
                Some(k) => {
                    k.discovery.values().for_each(JobDiscovery::abort);
                    Manager::release(k.adopted).await
                }
                None => Inherited::new(),
            };
            let running = launch(previous, host, &mut kept, &mut Vec::new(), inherited, &mut None)
                .context("restarting the previous configuration after a failed reload")?;
            stop_queues(kept, send_timeout).await;
            Ok((running, Err(msg)))
        }
    }
}

/// How long stopping senders may take: `storage.shutdown_timeout`, at most 25 s (the agent
/// exits within 30 s).
fn send_timeout(cfg: &AgentConfig) -> Duration {
    cfg.storage.shutdown_timeout.get().min(Duration::from_secs(25))
}

/// Runs the agent until SIGTERM/SIGINT. Returns after a clean shutdown.
pub async fn run(config_path: PathBuf, ov: Overrides) -> anyhow::Result<()> {
    let (mut cfg, warnings) = load(&config_path).map_err(|e| anyhow!("{e}"))?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    let storage = storage_dir(&cfg, &ov);
    let _lock = lock_storage(&storage)?;
    let metrics = Arc::new(Metrics::new());
    let listen = ov
        .listen_address
        .clone()
        .unwrap_or_else(|| cfg.server.listen_address.clone());
    let listener = server::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(address = %listen, config = %config_path.display(), storage = %storage.display(), "Agent starting.");

    let status: Arc<std::sync::RwLock<server::StatusSource>> = Arc::new(std::sync::RwLock::new(Arc::new(Vec::new)));
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let (stop_tx, stop_rx) = watch::channel(false);
    let status_for_server = status.clone();
    let files: Arc<std::sync::RwLock<Option<Arc<crate::logs::Logs>>>> = Arc::new(std::sync::RwLock::new(None));
    let files_for_server = files.clone();
    let state = ServerState {
        metrics: metrics.clone(),
        status: Arc::new(move || {
            let f = status_for_server.read().unwrap_or_else(|p| p.into_inner()).clone();
            f()
        }),
        files: Arc::new(move || {
            let l = files_for_server.read().unwrap_or_else(|p| p.into_inner()).clone();
            l.map(|l| l.status()).unwrap_or_default()
        }),
        reload: reload_tx,
    };
    let server_task = tokio::spawn(server::serve(listener, state, stop_rx));
    // Handlers before anything slow (WAL recovery), so a signal during start-up is handled.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    // Pod watches live here, across reloads: a reload keeps those it still needs.
    let caches = crate::pods::PodCaches::new(metrics.clone());
    let mut host = Host {
        storage: &storage,
        metrics: &metrics,
        caches: &caches,
        send_timeout: send_timeout(&cfg),
    };
    let mut running = launch(
        build(&cfg, &config_path)?,
        &host,
        &mut Vec::new(),
        &mut Vec::new(),
        Inherited::new(),
        &mut None,
    )?;
    *status.write().unwrap_or_else(|p| p.into_inner()) = running.manager.status_source();
    let node_name = std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty());
    let start_logs = |cfg: &AgentConfig| -> anyhow::Result<Option<Arc<crate::logs::Logs>>> {
        match &cfg.logs {
            Some(l) if !l.scrape_configs.is_empty() => {
                let env = crate::logs::Env {
                    config_path: &config_path,
                    storage_dir: &storage,
                    storage: &cfg.storage,
                    metrics: &metrics,
                    caches: &caches,
                    node_name: node_name.clone(),
                };
                Ok(Some(Arc::new(crate::logs::start(l, &env)?)))
            }
            _ => Ok(None),
        }
    };
    *files.write().unwrap_or_else(|p| p.into_inner()) = start_logs(&cfg)?;
    // The flows collector appends to the scrape loops' outputs, whichever generation runs.
    let (outputs_tx, outputs_rx) = watch::channel(running.outputs.0.clone());
    let flows_env = crate::flows::collector::Env {
        config_path: &config_path,
        metrics: &metrics,
        caches: &caches,
        node_name: node_name.clone(),
        outputs: outputs_rx,
    };
    let mut flows = crate::flows::collector::start(&cfg.flows, &flows_env);
    let mut flows_fp = crate::flows::collector::fingerprint(&cfg.flows, node_name.as_deref());
    metrics.set_ready(true);

    loop {
        let reply = tokio::select! {
            _ = hup.recv() => None,
            r = reload_rx.recv() => r,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        tracing::info!(config = %config_path.display(), "Reloading configuration.");
        let result = match load(&config_path) {
            Err(e) => Err(e),
            Ok((new_cfg, warnings)) => {
                for w in warnings {
                    tracing::warn!("{w}");
                }
                if storage_dir(&new_cfg, &ov) != storage {
                    Err("storage.path cannot change on reload; restart the agent".to_owned())
                } else {
                    match build(&new_cfg, &config_path) {
                        // Built and checked completely before anything running is touched.
                        Err(e) => Err(format!("{e:#}")),
                        Ok(built) => {
                            host.send_timeout = send_timeout(&cfg);
                            let (r, result) = swap(running, built, &cfg, &new_cfg, &config_path, &host).await?;
                            running = r;
                            outputs_tx.send_replace(running.outputs.0.clone());
                            if result.is_ok() {
                                // The flows collector: kept while its settings stay (the
                                // programs keep counting); else its series end and it
                                // starts anew with the new settings.
                                // A collector that could not start is not tried (and
                                // said) again while the settings stay.
                                let fp = crate::flows::collector::fingerprint(&new_cfg.flows, node_name.as_deref());
                                if fp != flows_fp {
                                    if let Some(f) = flows.take() {
                                        f.stop(true).await;
                                    }
                                    flows = crate::flows::collector::start(&new_cfg.flows, &flows_env);
                                    flows_fp = fp;
                                }
                                // The logs path: kept while its settings stay; else stopped at
                                // a line boundary with its positions saved, and started anew
                                // from them (nothing lost or read twice).
                                let same = match (&*files.read().unwrap_or_else(|p| p.into_inner()), &new_cfg.logs) {
                                    (Some(l), Some(nl)) => {
                                        l.fingerprint
                                            == crate::logs::fingerprint(nl, &new_cfg.storage, node_name.as_deref())
                                    }
                                    (None, None) => true,
                                    (None, Some(nl)) => nl.scrape_configs.is_empty(),
                                    _ => false,
                                };
                                if !same {
                                    let old = files.write().unwrap_or_else(|p| p.into_inner()).take();
                                    if let Some(old) = old {
                                        stop_logs(old, send_timeout(&new_cfg)).await;
                                    }
                                    // Built and checked before; what can still fail here is the
                                    // storage (a WAL, the positions file): the agent keeps running.
                                    let started = start_logs(&new_cfg).unwrap_or_else(|e| {
                                        tracing::error!(error = %format!("{e:#}"), "The logs path could not start; logs are not shipped until the next reload.");
                                        None
                                    });
                                    *files.write().unwrap_or_else(|p| p.into_inner()) = started;
                                }
                                cfg = new_cfg;
                            }
                            result
                        }
                    }
                }
            }
        };
        *status.write().unwrap_or_else(|p| p.into_inner()) = running.manager.status_source();
        match &result {
            Ok(()) => tracing::info!("Configuration reloaded."),
            Err(e) => tracing::error!(error = %e, "Configuration not reloaded; the previous one keeps running."),
        }
        metrics.reload(result.is_ok());
        if let Some(tx) = reply {
            let _ = tx.send(result);
        }
    }
    tracing::info!("Shutting down: stopping scrapes, flushing to receivers.");
    metrics.set_ready(false);
    let timeout = send_timeout(&cfg);
    let logs = files.write().unwrap_or_else(|p| p.into_inner()).take();
    let logs_stop = async {
        if let Some(l) = logs {
            stop_logs(l, timeout).await;
        }
    };
    if let Some(f) = flows.take() {
        f.stop(false).await;
    }
    tokio::join!(running.stop(timeout), logs_stop);
    let _ = stop_tx.send(true);
    let _ = server_task.await;
    tracing::info!("Agent stopped.");
    Ok(())
}
