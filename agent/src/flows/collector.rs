//! The flows collector: a source like a scrape target. It loads and attaches the programs,
//! follows the interfaces matching `flows.interfaces` as they come and go, and every
//! `flows.interval` drains the kernel's tables into Hubble's counters ([`Aggregator`]) and
//! appends them through the same series cache as scraped series (an [`Appender`] for a
//! target `job="sre-lab-agent-flows"`, without the report series): the remote_write queues'
//! write relabeling, external labels and staleness apply as to any target, and nothing of it
//! reaches the agent's own `/metrics`.
//!
//! It runs on its own thread: every step is a syscall on the maps or a WAL append.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use config::flows::FlowsConfig;
use tokio::sync::watch;

use super::aggregate::{Aggregator, PodInfo, Resolve, Settings};
use super::Programs;
use crate::labels::Labels;
use crate::remote_write::Outputs;
use crate::scrape::appender::Appender;
use crate::scrape::parse::Format;
use crate::scrape::scrape_loop::ScrapeSettings;
use crate::telemetry::Metrics;

/// The `job` label of every flow series: the lab's Cilium exports the same metric names, and
/// dashboards and `installer validate` select the agent's by it.
pub const JOB: &str = "sre-lab-agent-flows";

/// What the collector needs from the agent.
pub struct Env<'a> {
    /// The config file (relative paths).
    pub config_path: &'a Path,
    /// Self metrics.
    pub metrics: &'a Arc<Metrics>,
    /// Shared pod caches.
    pub caches: &'a crate::pods::PodCaches,
    /// `$NODE_NAME`.
    pub node_name: Option<String>,
    /// The outputs the scrape loops write to, replaced at reloads.
    pub outputs: watch::Receiver<Arc<Outputs>>,
}

/// A running collector.
pub struct Flows {
    /// The settings it runs with: a reload that keeps them keeps the collector.
    pub fingerprint: String,
    stop: std::sync::mpsc::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The settings a collector depends on.
pub fn fingerprint(cfg: &Option<FlowsConfig>, node_name: Option<&str>) -> String {
    format!("{cfg:?}|{node_name:?}")
}

impl Flows {
    /// Stops the collector. `gone`: flows were switched off or changed by a reload, so the
    /// series end with staleness markers; at shutdown they are left as they are.
    pub async fn stop(mut self, gone: bool) {
        let _ = self.stop.send(gone);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Why the programs could not start: the `reason` label of `sre_agent_flows_off`. A verifier
/// rejection also fails with EACCES, so privileges are judged by the capabilities held.
fn off_reason(_e: &anyhow::Error) -> &'static str {
    if !super::built_with_programs() {
        "not-built"
    } else if !has_capabilities() {
        "no-privileges"
    } else {
        "unsupported"
    }
}

/// Whether this process holds what loading and attaching need: CAP_BPF (or CAP_SYS_ADMIN),
/// CAP_PERFMON (or CAP_SYS_ADMIN) and CAP_NET_ADMIN, from `CapEff` in /proc/self/status.
fn has_capabilities() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    else {
        return false;
    };
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    const NET_ADMIN: u32 = 12;
    const SYS_ADMIN: u32 = 21;
    const PERFMON: u32 = 38;
    const BPF: u32 = 39;
    has(NET_ADMIN) && (has(BPF) || has(SYS_ADMIN)) && (has(PERFMON) || has(SYS_ADMIN))
}

/// The end of an error's text: a verifier rejection carries the whole verifier log, whose
/// last lines say what failed.
fn tail(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    const MAX: usize = 2000;
    if text.len() <= MAX {
        return text;
    }
    let mut cut = text.len() - MAX;
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    format!("…{}", &text[cut..])
}

/// Starts the collector for `cfg`, or says (once, at warn) why flows are off and sets
/// `sre_agent_flows_off{reason}`; the agent runs on either way.
pub fn start(cfg: &Option<FlowsConfig>, env: &Env<'_>) -> Option<Flows> {
    let m = &env.metrics.flows;
    let Some(cfg) = cfg.as_ref().filter(|c| c.enabled) else {
        m.set_off(Some("disabled"));
        return None;
    };
    let fail = |what: &str, e: anyhow::Error, reason: &'static str| {
        let hint = match reason {
            "not-built" => "build the programs with scripts/build-ebpf.sh and rebuild the agent",
            "no-privileges" => "the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or root), and the host network namespace for interfaces",
            _ => "the kernel refused the programs (verifier, or a missing feature); see README's kernel table",
        };
        tracing::warn!(error = %tail(&e), reason, hint, "Flows are off: {what}. The agent runs without them.");
        m.set_off(Some(reason));
    };
    let mut progs = match Programs::load(cfg.max_flows, cfg.cgroup.is_some()) {
        Ok(p) => p,
        Err(e) => {
            let reason = off_reason(&e);
            fail("the eBPF programs could not be loaded", e, reason);
            return None;
        }
    };
    if let Some(cg) = &cfg.cgroup {
        if let Err(e) = progs.attach_cgroup(Path::new(cg)) {
            let reason = match off_reason(&e) {
                "unsupported" => "attach-failed",
                r => r,
            };
            fail("the cgroup programs could not be attached", e, reason);
            return None;
        }
    }
    if cfg.metrics.iter().any(|x| x == "drop") {
        match progs.attach_drops() {
            Ok(()) => {
                m.drops_active.set(1);
            }
            Err(e) => {
                m.drops_active.set(0);
                tracing::warn!(error = %format!("{e:#}"), "Drops are not counted (hubble_drop_total is left out): the skb:kfree_skb tracepoint could not be attached.");
            }
        }
    } else {
        m.drops_active.set(0);
    }
    m.set_off(None);
    let resolver = PodResolver {
        cache: pod_cache(cfg, env),
        host: HashSet::new(),
    };
    let instance = env.node_name.clone().unwrap_or_else(hostname);
    let (tx, rx) = std::sync::mpsc::channel();
    let state = Collector {
        patterns: cfg
            .effective_interfaces()
            .iter()
            .filter_map(|p| glob::Pattern::new(p).ok())
            .collect(),
        interval: cfg.interval.get(),
        aggregator: Aggregator::new(Settings::from_config(cfg), super::drop_reason_names()),
        progs,
        resolver,
        metrics: env.metrics.clone(),
        outputs: env.outputs.clone(),
        instance,
        failed: HashSet::new(),
        stats: [0; 3],
        dropped_sets: HashMap::new(),
        table: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name("flows".into())
        .spawn(move || state.run(rx))
        .map_err(|e| tracing::error!(error = %e, "Could not start the flows thread."))
        .ok()?;
    tracing::info!(
        mode = if cfg.cgroup.is_some() { "cgroup_skb" } else { "tc" },
        interfaces = ?cfg.effective_interfaces(),
        interval = ?cfg.interval.get(),
        "Flows are counted."
    );
    Some(Flows {
        fingerprint: fingerprint(&Some(cfg.clone()), env.node_name.as_deref()),
        stop: tx,
        thread: Some(thread),
    })
}

/// The pod cache the collector resolves addresses with: this node's pods, or the cluster's
/// with `cluster_wide_pods`; none without an API server.
fn pod_cache(cfg: &FlowsConfig, env: &Env<'_>) -> Option<Arc<crate::pods::PodCache>> {
    let available = cfg.api_server.is_some()
        || cfg.kubeconfig_file.is_some()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some();
    if !available {
        tracing::info!("No Kubernetes API server configured; flow sources and destinations resolve by address only.");
        return None;
    }
    let base = env.config_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let k = config::agent::KubernetesSdConfig {
        role: "pod".to_owned(),
        api_server: cfg.api_server.clone(),
        kubeconfig_file: cfg
            .kubeconfig_file
            .as_deref()
            .map(|f| crate::http::resolve(&base, f).display().to_string()),
        ..Default::default()
    };
    let node = if cfg.cluster_wide_pods {
        None
    } else {
        env.node_name.as_deref()
    };
    match crate::pods::Subscription::new(&k, node) {
        Ok(sub) => Some(env.caches.get(&sub)),
        Err(e) => {
            tracing::error!(error = %e, "The flows pod lookup cannot start; sources and destinations resolve by address only.");
            None
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

/// Addresses through the shared pod cache's IP index; this node's own addresses for
/// `reserved:host`.
struct PodResolver {
    cache: Option<Arc<crate::pods::PodCache>>,
    host: HashSet<IpAddr>,
}

impl Resolve for PodResolver {
    fn pod(&self, ip: IpAddr) -> Option<PodInfo> {
        let pod = self.cache.as_ref()?.by_ip(ip)?;
        Some(pod_info(&pod))
    }

    fn is_host(&self, ip: IpAddr) -> bool {
        self.host.contains(&ip)
    }
}

/// What the labels need of a pod.
pub fn pod_info(pod: &k8s_openapi::api::core::v1::Pod) -> PodInfo {
    let md = &pod.metadata;
    let labels = md.labels.as_ref();
    let workload = md
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| {
            if o.kind == "ReplicaSet" {
                // A Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`.
                let hash = labels.and_then(|l| l.get("pod-template-hash"));
                match hash.and_then(|h| o.name.strip_suffix(&format!("-{h}"))) {
                    Some(d) => d.to_owned(),
                    None => o.name.clone(),
                }
            } else {
                o.name.clone()
            }
        });
    let app = labels.and_then(|l| {
        ["app.kubernetes.io/name", "k8s-app", "app"]
            .iter()
            .find_map(|k| l.get(*k).cloned())
    });
    PodInfo {
        namespace: md.namespace.clone().unwrap_or_default(),
        name: md.name.clone().unwrap_or_default(),
        workload,
        app,
    }
}

/// This node's addresses (`reserved:host`), from the kernel's interface list.
fn host_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    // IPv4: /proc/net/fib_trie lists local addresses under `/32 host LOCAL`.
    if let Ok(t) = std::fs::read_to_string("/proc/net/fib_trie") {
        let mut last: Option<IpAddr> = None;
        for line in t.lines() {
            let l = line.trim();
            if let Some(a) = l.strip_prefix("|-- ") {
                last = a.parse().ok();
            } else if l.contains("/32 host LOCAL") {
                if let Some(a) = last {
                    out.insert(a);
                }
            }
        }
    }
    // IPv6: /proc/net/if_inet6, one address per line as 32 hex digits.
    if let Ok(t) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in t.lines() {
            let Some(hex) = line.split_whitespace().next() else {
                continue;
            };
            if hex.len() != 32 {
                continue;
            }
            let mut b = [0u8; 16];
            let ok = (0..16).all(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map(|v| b[i] = v).is_ok());
            if ok {
                out.insert(IpAddr::from(b));
            }
        }
    }
    out
}

/// Monotonic clock (ns), the clock of the programs' `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Interfaces in this network namespace: name → index.
fn interfaces() -> HashMap<String, u32> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let idx = std::fs::read_to_string(e.path().join("ifindex"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(i) = idx {
            out.insert(name, i);
        }
    }
    out
}

struct Collector {
    patterns: Vec<glob::Pattern>,
    interval: Duration,
    aggregator: Aggregator,
    progs: Programs,
    resolver: PodResolver,
    metrics: Arc<Metrics>,
    outputs: watch::Receiver<Arc<Outputs>>,
    instance: String,
    /// Interfaces (name, index) an attach failed on: tried again at each rescan, said once.
    failed: HashSet<(String, u32)>,
    /// The programs' `STATS` at the last drain.
    stats: [u64; 3],
    /// Dropped label sets already added to the metrics, by metric.
    dropped_sets: HashMap<&'static str, u64>,
    /// The flow table as last read (its buffer is reused).
    table: Vec<(super::FlowKey, super::FlowValue)>,
}

impl Collector {
    fn settings(&self) -> Arc<ScrapeSettings> {
        Arc::new(ScrapeSettings {
            job: JOB.to_owned(),
            client: crate::http::build_client(Path::new("."), None, false)
                .unwrap_or_else(|_| unreachable!("a client without TLS files cannot fail")),
            auth: crate::http::Auth::None,
            honor_labels: true,
            honor_timestamps: false,
            sample_limit: 0,
            label_limit: 0,
            label_name_length_limit: 0,
            label_value_length_limit: 0,
            body_size_limit: 0,
            metric_relabel: Vec::new(),
            follow_redirects: false,
            report_series: false,
        })
    }

    fn appender(&self, settings: &Arc<ScrapeSettings>, outputs: Arc<Outputs>) -> Appender {
        let mut labels = Labels::new();
        labels.set("job", JOB);
        labels.set("instance", &self.instance);
        Appender::new(labels, settings.clone(), outputs, self.metrics.clone())
    }

    fn run(mut self, stop: std::sync::mpsc::Receiver<bool>) {
        let settings = self.settings();
        let mut outputs = self.outputs.borrow().clone();
        let mut appender = self.appender(&settings, outputs.clone());
        let rescan = self.interval.min(Duration::from_secs(1));
        let mut next_drain = Instant::now() + self.interval;
        let gone = loop {
            if !self.patterns.is_empty() {
                self.follow_interfaces();
            }
            if Instant::now() >= next_drain {
                next_drain += self.interval;
                if next_drain < Instant::now() {
                    next_drain = Instant::now() + self.interval;
                }
                // A reload replaced the outputs: a new appender takes the series over.
                let current = self.outputs.borrow().clone();
                if !Arc::ptr_eq(&current, &outputs) {
                    let left = appender.into_leftover();
                    outputs = current;
                    appender = self.appender(&settings, outputs.clone());
                    appender.inherit(left);
                }
                self.drain(&mut appender);
            }
            let wait = rescan.min(next_drain.saturating_duration_since(Instant::now()));
            match stop.recv_timeout(wait) {
                Ok(gone) => break gone,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break false,
            }
        };
        // What was counted since the last drain leaves too.
        self.drain(&mut appender);
        if gone {
            appender.write_stale_all(now_ms());
        }
        for (name, _) in self
            .progs
            .attached()
            .map(|(n, i)| (n.to_owned(), i))
            .collect::<Vec<_>>()
        {
            self.progs.detach(&name);
        }
        self.metrics.flows.interfaces.set(0);
        self.metrics.flows.set_off(Some("disabled"));
    }

    /// Attaches to matching interfaces that appeared (or were re-created), forgets gone ones.
    fn follow_interfaces(&mut self) {
        let now = interfaces();
        let gone: Vec<String> = self
            .progs
            .attached()
            .filter(|(n, i)| now.get(*n) != Some(i))
            .map(|(n, _)| n.to_owned())
            .collect();
        for name in gone {
            self.progs.detach(&name);
            tracing::debug!(interface = %name, "Interface gone; detached.");
        }
        let attached: HashMap<String, u32> = self.progs.attached().map(|(n, i)| (n.to_owned(), i)).collect();
        for (name, idx) in &now {
            if attached.get(name) == Some(idx) || !self.patterns.iter().any(|p| p.matches(name)) {
                continue;
            }
            match self.progs.attach(name, *idx) {
                Ok(()) => {
                    self.failed.remove(&(name.clone(), *idx));
                    tracing::info!(interface = %name, "Counting flows on the interface.");
                }
                Err(e) => {
                    if self.failed.insert((name.clone(), *idx)) {
                        self.metrics.flows.attach_errors.inc();
                        tracing::warn!(interface = %name, error = %format!("{e:#}"), "Could not attach to the interface; its flows are not counted.");
                    }
                }
            }
        }
        self.failed.retain(|(n, i)| now.get(n) == Some(i));
        self.metrics.flows.interfaces.set(self.progs.attached().count() as i64);
    }

    /// Reads the tables, counts, removes idle flows and appends the counters.
    fn drain(&mut self, appender: &mut Appender) {
        let m = self.metrics.flows.clone();
        let started = Instant::now();
        let mut flows = std::mem::take(&mut self.table);
        let read = self.progs.flows_into(&mut flows);
        let (flows, drops) = match (read.map(|()| flows), self.progs.drops()) {
            (Ok(f), Ok(d)) => (f, d),
            (Err(e), _) | (_, Err(e)) => {
                m.drain_errors.inc();
                tracing::warn!(error = %format!("{e:#}"), "Reading the flow tables failed; trying again next interval.");
                return;
            }
        };
        self.resolver.host = host_addresses();
        let now = monotonic_ns();
        let added = self.aggregator.add(&flows, &drops, now, &self.resolver);
        let mut removed = 0;
        if !added.idle.is_empty() {
            match self.progs.remove_flows(&added.idle) {
                Ok(gone) => {
                    removed = gone.len();
                    let removed = gone;
                    m.evicted.inc_by(removed.len() as u64);
                    // Forgotten only once out of the table: a flow still there would be counted
                    // again from zero.
                    self.aggregator.forget(&removed);
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "Removing idle flows failed."),
            }
        }
        m.packets.inc_by(added.packets);
        m.table_entries.set(added.flows.saturating_sub(removed) as i64);
        for (i, c) in [
            (super::STAT_FLOWS_FULL, &m.table_full),
            (super::STAT_DROPS_FULL, &m.drops_table_full),
            (super::STAT_UNPARSED, &m.unparsed),
        ] {
            if let Ok(v) = self.progs.stat(i) {
                let slot = &mut self.stats[i as usize];
                c.inc_by(v.saturating_sub(*slot));
                *slot = v;
            }
        }
        for (metric, &total) in self.aggregator.dropped_label_sets() {
            let seen = self.dropped_sets.entry(metric).or_default();
            if total > *seen {
                m.label_sets_dropped(metric, total - *seen);
                *seen = total;
            }
        }
        self.table = flows;
        let text = self.aggregator.render(now);
        m.label_sets.set(self.aggregator.label_sets() as i64);
        let ts = now_ms();
        appender.begin();
        let result = appender.append_body(text.as_bytes(), Format::Text, ts);
        if let Err(e) = &result {
            tracing::error!(error = %e, "The flow counters could not be appended.");
        }
        appender.finish(result.as_ref().copied(), ts, started.elapsed());
        m.drains.inc();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The cgroup v2 mount point, for `flows.cgroup` examples and tests (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(dir))
    })
}
