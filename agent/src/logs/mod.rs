//! The logs path: tail files, run Promtail's pipeline stages, push to Loki through the one
//! sender engine (protocol [`crate::loki::LokiPush`]), with the WAL between.
//!
//! [`start`] builds the clients' queues (a WAL and a sender per client, and per tenant a
//! `tenant` stage names), works out where every file was left (the later of the positions
//! file and the file's last WAL record), starts target discovery (static globs, the
//! `kubernetes_pods` shortcut, `kubernetes_sd_configs` + `relabel_configs` over the shared pod
//! cache) and runs the [`tailer`] on its own thread. [`Logs::stop`] stops reading at a line
//! boundary, saves positions and stops the senders (what Loki did not take stays in the WAL).

pub mod format;
pub mod pipeline;
pub mod positions;
pub mod sink;
pub mod tailer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use config::logs::{ClientConfig, LogsConfig, Stage};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::watch;

use crate::discovery::TargetGroup;
use crate::sender::{SenderConfig, SenderHandle};
use crate::telemetry::Metrics;
use crate::wal::{Wal, WalOptions};
use tailer::{Control, FileStatus, Job, PodMeta, Target};

/// A running logs path.
pub struct Logs {
    control: Arc<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
    queues: Arc<Mutex<Vec<LogQueue>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Stop flags of the jobs' stages (a waiting `limit`).
    stage_stops: Vec<Arc<std::sync::atomic::AtomicBool>>,
    /// The settings it runs with: a reload with the same keeps it running.
    pub fingerprint: String,
}

struct LogQueue {
    name: String,
    wal: Arc<Wal>,
    sender: Option<SenderHandle>,
    syncer: Option<tokio::task::JoinHandle<()>>,
}

/// The queue name of a client: its `name`, else `loki-` and a hash of its URL.
pub fn client_name(c: &ClientConfig) -> String {
    c.name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("loki-{:08x}", xxhash_rust::xxh3::xxh3_64(c.url.as_bytes()) as u32))
}

/// A tenant as a directory-name part, reversibly: unreserved ASCII as it is, other bytes as
/// `%XX` (tenant ids become `X-Scope-OrgID` again after a restart).
fn tenant_dir(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The tenant of a directory-name part made by [`tenant_dir`].
fn tenant_of_dir(s: &str) -> Option<String> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The sender settings of a client.
fn sender_config(c: &ClientConfig, base: &Path, tenant: Option<&str>) -> anyhow::Result<SenderConfig> {
    let name = client_name(c);
    let url: http::Uri = c.url.parse().with_context(|| format!("logs client url {:?}", c.url))?;
    let mut headers = HeaderMap::new();
    for (k, v) in &c.headers {
        headers.insert(
            HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("logs client header name {k:?}"))?,
            HeaderValue::from_str(v).with_context(|| format!("logs client header {k:?} value"))?,
        );
    }
    let auth = crate::http::Auth::new(
        base,
        c.basic_auth.as_ref(),
        c.authorization.as_ref(),
        c.bearer_token.as_deref(),
        c.bearer_token_file.as_deref(),
    )?;
    let client = crate::http::build_client(base, c.tls_config.as_ref(), true)?;
    let tenant = tenant.or(c.tenant_id.as_deref());
    let protocol: Arc<dyn crate::sender::Protocol> = match c.encoding {
        config::logs::LokiEncoding::Protobuf => Arc::new(crate::loki::LokiPush::new(tenant)?),
        config::logs::LokiEncoding::Json => Arc::new(crate::loki::LokiPush::json(tenant)?),
    };
    // `batchsize` bounds the bytes of a push (entries as encoded, labels included); the entry
    // count bound only keeps chunks of tiny lines moving.
    let per_send = 10_000usize;
    Ok(SenderConfig {
        protocol,
        name: match tenant {
            Some(t) if Some(t) != c.tenant_id.as_deref() => format!("{name}@{t}"),
            _ => name,
        },
        url,
        client,
        headers,
        auth,
        timeout: c.timeout.get(),
        queue: config::agent::QueueConfig {
            capacity: per_send * 2,
            max_shards: c.max_shards.max(1),
            min_shards: 1,
            max_samples_per_send: per_send,
            batch_send_deadline: c.batchwait,
            min_backoff: c.backoff_config.min_period,
            max_backoff: c.backoff_config.max_period,
            retry_on_http_429: true,
        },
        follow_redirects: true,
        max_bytes_per_send: c.batchsize.0 as usize,
    })
}

/// Checks what can fail in a logs section without starting anything (`check-config`).
pub fn preflight(cfg: &LogsConfig, base: &Path) -> anyhow::Result<()> {
    for c in &cfg.clients {
        sender_config(c, base, None)?;
    }
    let stages = Arc::new(pipeline::StageMetrics::default());
    for sc in &cfg.scrape_configs {
        pipeline::Compiled::new(&sc.pipeline_stages, stages.clone())
            .map_err(|e| anyhow!("logs scrape config {:?}: {e}", sc.job_name))?;
        crate::relabel::compile(&sc.relabel_configs)
            .map_err(|e| anyhow!("logs scrape config {:?}: relabel_configs: {e}", sc.job_name))?;
    }
    Ok(())
}

/// Compiles every logs pipeline of `cfg` and reports what fails at the stage's line and
/// column in `file` (the config crate's checks cannot parse templates, JSON paths or time
/// layouts; the agent's compiler can).
pub fn check_pipelines(
    cfg: &config::agent::AgentConfig,
    spans: &config::SpanTable,
    file: &str,
) -> Vec<config::ConfigError> {
    let Some(logs) = &cfg.logs else { return Vec::new() };
    let stages = Arc::new(pipeline::StageMetrics::default());
    let mut errors = Vec::new();
    for (i, sc) in logs.scrape_configs.iter().enumerate() {
        if let Err(e) = pipeline::Compiled::new(&sc.pipeline_stages, stages.clone()) {
            let path = format!("logs.scrape_configs[{i}].pipeline_stages{}", e.path());
            let pos = spans.nearest(&path);
            errors.push(config::ConfigError {
                file: file.to_owned(),
                line: pos.line,
                column: pos.column,
                message: format!("{path}: {}", e.message()),
            });
        }
    }
    errors
}

/// Everything [`start`] needs from the agent.
pub struct Env<'a> {
    /// The config file (relative paths are relative to its directory).
    pub config_path: &'a Path,
    /// `storage.path`, resolved.
    pub storage_dir: &'a Path,
    /// The storage settings (WAL size, fsync, shutdown timeout).
    pub storage: &'a config::agent::StorageConfig,
    /// Self metrics.
    pub metrics: &'a Arc<Metrics>,
    /// The shared pod caches.
    pub caches: &'a crate::pods::PodCaches,
    /// `NODE_NAME`.
    pub node_name: Option<String>,
}

/// The settings a running logs path depends on.
pub fn fingerprint(cfg: &LogsConfig, storage: &config::agent::StorageConfig, node_name: Option<&str>) -> String {
    format!("{cfg:?}|{storage:?}|{node_name:?}")
}

/// Starts the logs path of `cfg`.
pub fn start(cfg: &LogsConfig, env: &Env<'_>) -> anyhow::Result<Logs> {
    let base = env.config_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let fingerprint = fingerprint(cfg, env.storage, env.node_name.as_deref());
    let metrics = env.metrics.clone();
    let logs_metrics = metrics.logs.clone();
    let queues: Arc<Mutex<Vec<LogQueue>>> = Arc::new(Mutex::new(Vec::new()));
    let wal_root = env.storage_dir.join("logs");
    let handle = tokio::runtime::Handle::current();
    let fsync = match env.storage.wal_fsync {
        config::units::WalFsync::Never => crate::wal::FsyncPolicy::Never,
        config::units::WalFsync::Always => crate::wal::FsyncPolicy::Always,
        config::units::WalFsync::Interval(d) => crate::wal::FsyncPolicy::Interval(d.get()),
    };
    let wal_opts = WalOptions {
        max_size_bytes: env.storage.wal_max_size.0,
        segment_size_bytes: (env.storage.wal_max_size.0 / 8).clamp(1 << 20, 32 << 20),
        fsync,
        refuse_when_full: true,
    };
    let mut clients = Vec::new();
    let mut wal_positions = Vec::new();
    for c in &cfg.clients {
        let name = client_name(c);
        let (c2, base2, queues2, handle2, metrics2, root2, opts2) = (
            c.clone(),
            base.clone(),
            queues.clone(),
            handle.clone(),
            metrics.clone(),
            wal_root.clone(),
            wal_opts.clone(),
        );
        let open: sink::OpenQueue = Arc::new(move |tenant: Option<&str>| {
            let dir_name = match tenant {
                None => client_name(&c2),
                Some(t) => format!("{}@{}", client_name(&c2), tenant_dir(t)),
            };
            let sc = sender_config(&c2, &base2, tenant).map_err(std::io::Error::other)?;
            open_queue(&root2.join(&dir_name), sc, &opts2, &handle2, &metrics2, &queues2)
        });
        let mut client = sink::ClientSink::new(name.clone(), c.external_labels.clone(), open)
            .with_context(|| format!("opening the logs WAL of client {name}"))?;
        // Queues of tenants a previous run created: drained, and their records count for
        // positions.
        if let Ok(dirs) = std::fs::read_dir(&wal_root) {
            for d in dirs.flatten() {
                let n = d.file_name().to_string_lossy().into_owned();
                if let Some(t) = n.strip_prefix(&format!("{name}@")).and_then(tenant_of_dir) {
                    // A tenant queue with nothing left to send goes (its positions are kept),
                    // so tenants seen once do not count against the cap for ever.
                    let drained = {
                        let w = Arc::new(
                            Wal::open(d.path(), wal_opts.clone())
                                .with_context(|| format!("opening the logs WAL {n}"))?,
                        );
                        if w.committed().0 >= w.next_seq() {
                            wal_positions.extend(
                                sink::positions_in_wal(&w).with_context(|| format!("reading the logs WAL {n}"))?,
                            );
                            true
                        } else {
                            false
                        }
                    };
                    if drained && std::fs::remove_dir_all(d.path()).is_ok() {
                        tracing::info!(queue = %n, "Removed a drained tenant queue.");
                        continue;
                    }
                    client
                        .open_tenant(&t)
                        .with_context(|| format!("opening the logs WAL {n}"))?;
                }
            }
        }
        for q in queues.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if q.name == name || q.name.starts_with(&format!("{name}@")) {
                wal_positions.extend(
                    sink::positions_in_wal(&q.wal).with_context(|| format!("reading the logs WAL {}", q.name))?,
                );
            }
        }
        clients.push(client);
    }
    // Where each file was left: the later of the positions file and the WAL.
    let positions_file = cfg
        .positions
        .filename
        .as_deref()
        .map(|f| crate::http::resolve(&base, f))
        .unwrap_or_else(|| env.storage_dir.join("positions.yaml"));
    let existed = positions_file.exists();
    let since = std::fs::metadata(&positions_file)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| std::time::SystemTime::now());
    let mut positions = match positions::Positions::load(&positions_file) {
        Ok(p) => p,
        Err(e) if cfg.positions.ignore_invalid_yaml => {
            tracing::warn!(error = %e, "Ignoring an invalid positions file.");
            positions::Positions::default()
        }
        Err(e) => return Err(e.into()),
    };
    let first_start = !existed && wal_positions.is_empty();
    for (id, offset, path) in wal_positions {
        positions.merge_wal(id, offset, path);
    }
    // Jobs.
    let mut jobs = Vec::new();
    for sc in &cfg.scrape_configs {
        let compiled = pipeline::Compiled::new(&sc.pipeline_stages, logs_metrics.stages.clone())
            .map_err(|e| anyhow!("logs scrape config {:?}: {e}", sc.job_name))?;
        let container_format = compiled.parses_format || sc.kubernetes_pods.is_some();
        logs_metrics.init_job(&sc.job_name);
        let cri = sc.pipeline_stages.iter().find_map(|s| match s {
            Stage::Cri(c) => Some(c),
            _ => None,
        });
        let max_line_size = match cri.map(|c| c.max_partial_line_size.0 as usize) {
            Some(n) if n > 0 => n,
            _ => cfg.max_line_size.0 as usize,
        };
        jobs.push(Job {
            name: sc.job_name.clone(),
            pipeline: Arc::new(compiled),
            start_at: sc.start_at.unwrap_or(cfg.start_at),
            container_format,
            max_partial_lines: cri.map_or(100, |c| c.max_partial_lines).max(1),
            max_line_size,
            relabel: if sc.kubernetes_pods.is_some() {
                crate::relabel::compile(&sc.relabel_configs)
                    .map_err(|e| anyhow!("logs scrape config {:?}: relabel_configs: {e}", sc.job_name))?
            } else {
                Vec::new()
            },
        });
    }

    let (wake_tx, wake_rx) = crossbeam_channel::unbounded();
    let control = Arc::new(Control {
        stop: Default::default(),
        targets: Mutex::new(None),
        status: Mutex::new(Vec::new()),
        wake: wake_tx.clone(),
    });
    // Pod labels for kubernetes_pods jobs, from the shared cache when an API server is there.
    let mut tasks = Vec::new();
    let mut pods: Option<tailer::PodLookup> = None;
    for sc in &cfg.scrape_configs {
        let Some(kp) = &sc.kubernetes_pods else { continue };
        if pods.is_some() {
            break;
        }
        let k = config::agent::KubernetesSdConfig {
            role: "pod".to_owned(),
            api_server: kp.api_server.clone(),
            kubeconfig_file: kp
                .kubeconfig_file
                .as_deref()
                .map(|f| crate::http::resolve(&base, f).display().to_string()),
            ..Default::default()
        };
        let available = kp.api_server.is_some()
            || kp.kubeconfig_file.is_some()
            || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            || std::env::var_os("KUBECONFIG").is_some();
        if !available {
            tracing::info!(job = %sc.job_name, "No Kubernetes API server configured; pod log labels come from paths only.");
            continue;
        }
        match crate::pods::Subscription::new(&k, env.node_name.as_deref()) {
            Ok(sub) => {
                let cache = env.caches.get(&sub);
                let c = cache.clone();
                pods = Some(Arc::new(move |uid: &str| {
                    c.by_uid(uid).map(|p| {
                        let labels = p.metadata.labels.clone().unwrap_or_default();
                        PodMeta {
                            app: labels
                                .get("app.kubernetes.io/name")
                                .or_else(|| labels.get("app"))
                                .cloned(),
                            node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                        }
                    })
                }));
                // New pods: look again at files whose pod was unknown.
                let wake = wake_tx.clone();
                tasks.push(tokio::spawn(async move {
                    let mut changes = cache.changes();
                    while changes.changed().await.is_ok() {
                        let _ = wake.try_send(false);
                    }
                }));
            }
            Err(e) => {
                tracing::warn!(job = %sc.job_name, error = %e, "Pod labels unavailable; they come from paths only.")
            }
        }
    }
    // Targets: static and kubernetes_pods at once; kubernetes_sd from discovery.
    let mut fixed = Vec::new();
    let mut sd: Vec<(usize, Vec<crate::relabel::Rule>, watch::Receiver<Vec<TargetGroup>>)> = Vec::new();
    for (i, sc) in cfg.scrape_configs.iter().enumerate() {
        let static_rules = crate::relabel::compile(&sc.relabel_configs)
            .map_err(|e| anyhow!("logs scrape config {:?}: relabel_configs: {e}", sc.job_name))?;
        for st in &sc.static_configs {
            // relabel_configs apply to static targets too (`__path__` included), as in Promtail.
            let mut rl = crate::labels::Labels::from_pairs(st.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            if !crate::relabel::process(&mut rl, &static_rules) {
                continue;
            }
            let mut labels: BTreeMap<String, String> = rl.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            let path = labels.remove("__path__").unwrap_or_default();
            labels.retain(|k, v| !k.starts_with("__") && !v.is_empty());
            fixed.push(Target {
                job: i,
                path: crate::http::resolve(&base, &path).display().to_string(),
                labels,
                filename_label: true,
                kubernetes_pods: false,
            });
        }
        if let Some(kp) = &sc.kubernetes_pods {
            fixed.push(Target {
                job: i,
                path: format!("{}/*_*_*/*/*.log", crate::http::resolve(&base, &kp.root).display()),
                labels: BTreeMap::new(),
                filename_label: false,
                kubernetes_pods: true,
            });
        }
        let rules = crate::relabel::compile(&sc.relabel_configs)
            .map_err(|e| anyhow!("logs scrape config {:?}: relabel_configs: {e}", sc.job_name))?;
        for k in &sc.kubernetes_sd_configs {
            let (tx, rx) = watch::channel(Vec::new());
            match crate::pods::Subscription::new(k, env.node_name.as_deref()) {
                Ok(sub) => {
                    let cache = env.caches.get(&sub);
                    let stats = Arc::new(crate::discovery::kubernetes::PodDiscoveryStats::default());
                    tasks.push(tokio::spawn(crate::discovery::kubernetes::run(cache, sub, tx, stats)));
                    sd.push((i, rules.clone(), rx));
                }
                Err(e) => {
                    tracing::error!(job = %sc.job_name, error = %e, "Kubernetes discovery for logs cannot start.");
                }
            }
        }
    }
    *control.targets.lock().unwrap_or_else(|p| p.into_inner()) = Some(fixed.clone());
    if !sd.is_empty() {
        let control = control.clone();
        tasks.push(tokio::spawn(async move {
            let mut rxs: Vec<_> = sd;
            loop {
                let mut all = fixed.clone();
                for (job, rules, rx) in &rxs {
                    all.extend(targets_of_groups(*job, rules, &rx.borrow()));
                }
                *control.targets.lock().unwrap_or_else(|p| p.into_inner()) = Some(all);
                let _ = control.wake.try_send(true);
                let changed =
                    futures::future::select_all(rxs.iter_mut().map(|(_, _, rx)| Box::pin(rx.changed()))).await;
                if changed.0.is_err() {
                    break;
                }
            }
        }));
    }
    let watcher = watch_dirs(cfg, &base, wake_tx.clone());
    let settings = tailer::Settings {
        rescan: cfg.rescan_interval.get(),
        max_open_files: cfg.max_open_files,
        positions_file,
        sync_period: cfg.positions.sync_period.get(),
        first_start,
        since,
        node_name: env.node_name.clone(),
    };
    let stage_stops = jobs.iter().map(|j| j.pipeline.stop.clone()).collect();
    let t = tailer::Tailer::new(
        jobs,
        clients,
        positions,
        settings,
        logs_metrics,
        control.clone(),
        wake_rx,
        pods,
    );
    let thread = std::thread::Builder::new()
        .name("log-tailer".to_owned())
        .spawn(move || {
            let _watcher = watcher;
            t.run();
        })
        .context("starting the log tailer")?;
    Ok(Logs {
        control,
        thread: Some(thread),
        queues,
        tasks,
        stage_stops,
        fingerprint,
    })
}

/// Targets of discovered pods: `relabel_configs` applied, `__path__` taken, `__` labels and
/// `filename` left out of stream labels (as Promtail's Helm chart config does).
fn targets_of_groups(job: usize, rules: &[crate::relabel::Rule], groups: &[TargetGroup]) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for g in groups {
        for t in &g.targets {
            let mut l = g.labels.clone();
            l.extend_from(t);
            if !crate::relabel::process(&mut l, rules) {
                continue;
            }
            let Some(path) = l.get("__path__").filter(|p| !p.is_empty()).map(str::to_owned) else {
                continue;
            };
            let labels: BTreeMap<String, String> = l
                .iter()
                .filter(|(k, v)| !k.starts_with("__") && *k != "filename" && !v.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let t = Target {
                job,
                path,
                labels,
                filename_label: false,
                kubernetes_pods: false,
            };
            // One target per (path, labels): pods with several ports give the same one.
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

/// Watches the directories the targets live in; create/remove/rename events ask for a rescan
/// (`true`), writes only wake the reader (`false`). None when notify cannot start (the
/// rescan and the 1 s poll still work).
fn watch_dirs(
    cfg: &LogsConfig,
    base: &Path,
    wake: crossbeam_channel::Sender<bool>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let mut dirs: Vec<PathBuf> = Vec::new();
    for sc in &cfg.scrape_configs {
        if let Some(kp) = &sc.kubernetes_pods {
            dirs.push(crate::http::resolve(base, &kp.root));
        }
        for st in &sc.static_configs {
            if let Some(p) = st.labels.get("__path__") {
                let p = crate::http::resolve(base, p);
                let fixed: PathBuf = p
                    .components()
                    .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[', '{']))
                    .collect();
                let dir = if fixed == p {
                    fixed.parent().map(Path::to_path_buf).unwrap_or(fixed)
                } else {
                    fixed
                };
                dirs.push(dir);
            }
        }
        if !sc.kubernetes_sd_configs.is_empty() {
            dirs.push(PathBuf::from("/var/log/pods"));
        }
    }
    dirs.sort();
    dirs.dedup();
    let mut w = match notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let structural = matches!(
                ev.kind,
                EventKind::Create(_) | EventKind::Remove(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
            );
            let _ = wake.try_send(structural);
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "File notifications unavailable; log files are polled.");
            return None;
        }
    };
    for d in dirs {
        if let Err(e) = w.watch(&d, RecursiveMode::Recursive) {
            tracing::warn!(dir = %d.display(), error = %e, "Cannot watch a log directory; it is polled.");
        }
    }
    Some(w)
}

fn open_queue(
    dir: &Path,
    sc: SenderConfig,
    opts: &WalOptions,
    handle: &tokio::runtime::Handle,
    metrics: &Arc<Metrics>,
    queues: &Arc<Mutex<Vec<LogQueue>>>,
) -> std::io::Result<Arc<Wal>> {
    let name = sc.name.clone();
    {
        let q = queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = q.iter().find(|q| q.name == name) {
            return Ok(existing.wal.clone());
        }
    }
    let wal = Arc::new(Wal::open(dir, opts.clone())?);
    let _g = handle.enter();
    metrics.init_remote(&name, sc.protocol.rejection_reasons(), &crate::sender::Unknown::REASONS);
    let sender = SenderHandle::start(sc, wal.clone(), metrics.clone());
    let syncer = match opts.fsync {
        crate::wal::FsyncPolicy::Interval(every) => {
            let w = wal.clone();
            Some(handle.spawn(async move {
                let mut t = tokio::time::interval(every);
                loop {
                    t.tick().await;
                    let w = w.clone();
                    let _ = tokio::task::spawn_blocking(move || w.sync()).await;
                }
            }))
        }
        _ => None,
    };
    queues.lock().unwrap_or_else(|p| p.into_inner()).push(LogQueue {
        name,
        wal: wal.clone(),
        sender: Some(sender),
        syncer,
    });
    Ok(wal)
}

impl Logs {
    /// The files tailed, for the status page.
    pub fn status(&self) -> Vec<FileStatus> {
        self.control.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// WAL sizes of the clients' queues (name, bytes, segments, records not yet acked).
    pub fn wal_stats(&self) -> Vec<(String, crate::wal::WalStats)> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|q| (q.name.clone(), q.wal.stats()))
            .collect()
    }

    /// Stops reading at a line boundary, saves positions, then stops the senders: what Loki
    /// takes within `timeout` is sent, the rest stays in the WAL.
    pub async fn stop(mut self, timeout: Duration) {
        // One deadline for the tailer and the senders together.
        let deadline = tokio::time::Instant::now() + timeout;
        self.control.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for f in &self.stage_stops {
            f.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = self.control.wake.try_send(false);
        if let Some(t) = self.thread.take() {
            // Bounded: a stage that waits (a `limit` without `drop`) notices the stop within
            // 0.2 s; past the timeout the thread is left to end (its positions are not
            // saved, the WAL has its lines: nothing is lost, some may be read twice).
            let join = tokio::task::spawn_blocking(move || t.join());
            if tokio::time::timeout(timeout.clamp(Duration::from_secs(1), Duration::from_secs(5)), join)
                .await
                .is_err()
            {
                tracing::error!("The log tailer did not stop in time; leaving it.");
            }
        }
        for t in &self.tasks {
            t.abort();
        }
        let qs: Vec<LogQueue> = std::mem::take(&mut *self.queues.lock().unwrap_or_else(|p| p.into_inner()));
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        futures::future::join_all(qs.into_iter().map(|mut q| async move {
            if let Some(s) = q.sender.take() {
                s.shutdown(left).await;
            }
            if let Some(s) = q.syncer.take() {
                s.abort();
            }
            let w = q.wal.clone();
            let _ = tokio::task::spawn_blocking(move || w.sync()).await;
        }))
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Labels;

    #[test]
    fn tenant_directory_names_round_trip() {
        for t in ["team-a", "a b/c", "ünï", "%41", ""] {
            let d = tenant_dir(t);
            assert!(
                d.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.%".contains(&b)),
                "{d}"
            );
            assert_eq!(tenant_of_dir(&d).as_deref(), Some(t));
        }
        assert_eq!(tenant_of_dir("%4"), None);
    }

    /// Promtail's Helm chart rules build `__path__` from the pod uid and container name.
    #[test]
    fn discovered_pods_become_targets_with_promtail_rules() {
        let text = "\
- source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_name, __meta_kubernetes_pod_label_app, __meta_kubernetes_pod_name]
  regex: ^;*([^;]+)(;.*)?$
  target_label: app
- source_labels: [__meta_kubernetes_namespace]
  target_label: namespace
- source_labels: [__meta_kubernetes_pod_name]
  target_label: pod
- source_labels: [__meta_kubernetes_pod_container_name]
  target_label: container
- replacement: /var/log/pods/*$1/*.log
  separator: /
  source_labels: [__meta_kubernetes_pod_uid, __meta_kubernetes_pod_container_name]
  target_label: __path__
- source_labels: [__meta_kubernetes_pod_label_skip]
  regex: 'true'
  action: drop
";
        let cfgs: Vec<config::agent::RelabelConfig> =
            config::from_str(text, "r.yml", &|_| None, &|_, _| false).unwrap().value;
        let rules = crate::relabel::compile(&cfgs).unwrap();
        let pod = |name: &str, uid: &str, extra: &[(&str, &str)]| {
            let mut l = Labels::from_pairs([
                ("__address__", "10.0.0.1:8080"),
                ("__meta_kubernetes_namespace", "shop"),
                ("__meta_kubernetes_pod_name", name),
                ("__meta_kubernetes_pod_uid", uid),
                ("__meta_kubernetes_pod_container_name", "app"),
                ("__meta_kubernetes_pod_label_app", "web"),
                ("filename", "x"),
            ]);
            for (k, v) in extra {
                l.set(k, v);
            }
            l
        };
        let groups = vec![TargetGroup {
            source: "pod/shop/web-0".into(),
            // Two ports of one container: one target.
            targets: vec![
                pod("web-0", "u-1", &[]),
                pod("web-0", "u-1", &[("__address__", "10.0.0.1:9090")]),
                pod("batch-0", "u-2", &[("__meta_kubernetes_pod_label_skip", "true")]),
            ],
            labels: Labels::new(),
        }];
        let t = targets_of_groups(3, &rules, &groups);
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].job, 3);
        assert_eq!(t[0].path, "/var/log/pods/*u-1/app/*.log");
        let want: BTreeMap<String, String> = [
            ("app", "web"),
            ("container", "app"),
            ("namespace", "shop"),
            ("pod", "web-0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(t[0].labels, want, "no __ labels, no filename");
    }
}
