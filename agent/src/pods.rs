//! The node-local pod cache: one kube-rs reflector per distinct connection and scope, shared by
//! every reader — each `kubernetes_sd_config` (which applies its own selectors client-side), and
//! the logs and flows paths — with indexes by pod uid and by IP and a change broadcast.
//!
//! A cache is identified by a [`CacheKey`]: the connection settings (API server, kubeconfig,
//! credentials, TLS), the namespaces watched and the server-side field selector (this node's
//! `spec.nodeName=<node>` on a DaemonSet, or a config's explicit field selector). Configs with
//! the same key share one watch. [`PodCaches`] holds the caches of the running configuration;
//! a reload keeps those whose key is unchanged, so their watches are not restarted.
//!
//! The IP index covers `status.podIPs` (and `status.podIP`). Pods on the host network share the
//! node's IP and are left out of it; where two pods claim one IP (a finished pod whose IP was
//! reused), the one not in a terminal phase wins, then the newer.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use config::agent::KubernetesSdConfig;
use config::selector::{FieldSelector, LabelSelector};
use futures::stream::{SelectAll, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::kubeapi::{client_for, Error, OWN_NAMESPACE_FILE};
use crate::telemetry::Metrics;

/// What identifies a cache: configs with equal keys share one watch.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

/// Where a cache watches: namespaces (`None`: the whole cluster) and the field selector sent to
/// the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// Namespaces to watch; one `None` is the whole cluster.
    pub namespaces: Vec<Option<String>>,
    /// Field selector sent to the API server.
    pub field: Option<String>,
}

/// What a `kubernetes_sd_config` reads from its cache: the key, the scope, and the selectors it
/// applies client-side.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// The cache to read.
    pub key: CacheKey,
    /// The cache's scope.
    pub scope: Scope,
    /// The config (with resolved paths), for building the client.
    pub connection: KubernetesSdConfig,
    /// Applied to each pod's labels.
    pub label: LabelSelector,
}

impl Subscription {
    /// Validates `cfg` (role `pod`, selectors) and works out its cache. The server-side field
    /// selector is `spec.nodeName=<node_name>` when `node_name` is set, joined with the
    /// config's explicit `field` when set (then the config gets its own watch); a `field`
    /// naming `spec.nodeName` itself replaces the node scope. The label selector is applied
    /// client-side. Reads [`OWN_NAMESPACE_FILE`] when `namespaces.own_namespace` is true.
    pub fn new(cfg: &KubernetesSdConfig, node_name: Option<&str>) -> Result<Self, Error> {
        let own = match &cfg.namespaces {
            Some(ns) if ns.own_namespace => Some(read_own_namespace()?),
            _ => None,
        };
        Self::from_parts(cfg, node_name, own)
    }

    pub(crate) fn from_parts(
        cfg: &KubernetesSdConfig,
        node_name: Option<&str>,
        own_namespace: Option<String>,
    ) -> Result<Self, Error> {
        if cfg.role != "pod" {
            return Err(Error::UnsupportedRole(cfg.role.clone()));
        }
        if let Some(other) = cfg.selectors.iter().find(|s| s.role != "pod") {
            return Err(Error::SelectorRole(other.role.clone()));
        }
        if cfg.api_server.is_some() && cfg.kubeconfig_file.is_some() {
            return Err(Error::ConflictingServer);
        }
        if cfg.attach_metadata.as_ref().is_some_and(|m| m.node) {
            warn!("attach_metadata.node is not supported; node labels will not be attached.");
        }
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let selector = cfg.selectors.first();
        let explicit_field = selector.and_then(|s| non_empty(&s.field));
        let label = selector.and_then(|s| non_empty(&s.label)).unwrap_or_default();
        let label = LabelSelector::parse(&label).map_err(|e| Error::Selector(e.0))?;
        let node = node_name
            .filter(|n| !n.is_empty())
            .map(|n| format!("spec.nodeName={n}"));
        let field = match (explicit_field, node) {
            (Some(f), node) => {
                let parsed = FieldSelector::parse(&f).map_err(|e| Error::Selector(e.0))?;
                // On a DaemonSet the node scope stays unless the selector names a node itself.
                let names_node = parsed.0.iter().any(|r| r.field == "spec.nodeName");
                match node {
                    Some(node) if !names_node => Some(format!("{node},{f}")),
                    _ => Some(f),
                }
            }
            (None, node) => node,
        };
        let names = cfg.namespaces.iter().flat_map(|n| n.names.iter().cloned());
        let names: BTreeSet<String> = names.chain(own_namespace).collect();
        let namespaces = if names.is_empty() {
            vec![None]
        } else {
            names.into_iter().map(Some).collect()
        };
        let scope = Scope { namespaces, field };
        let mut connection = cfg.clone();
        connection.selectors.clear();
        connection.namespaces = None;
        connection.attach_metadata = None;
        let key = CacheKey(format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
            connection.api_server,
            connection.kubeconfig_file,
            connection.basic_auth,
            connection.authorization,
            connection.bearer_token_file,
            connection.tls_config,
            connection.enable_http2,
            scope.namespaces,
            scope.field,
        ));
        Ok(Self {
            key,
            scope,
            connection,
            label,
        })
    }

    /// Whether `pod` passes this subscription's client-side selectors.
    pub fn matches(&self, pod: &Pod) -> bool {
        self.label.matches(pod.labels())
    }
}

fn read_own_namespace() -> Result<String, Error> {
    match std::fs::read_to_string(OWN_NAMESPACE_FILE) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(source) => Err(Error::ReadFile {
            what: "own namespace",
            path: OWN_NAMESPACE_FILE.into(),
            source,
        }),
    }
}

/// A change seen by a cache, broadcast to readers that follow pods one by one.
#[derive(Clone, Debug)]
pub enum PodEvent {
    /// A pod was added or changed.
    Applied(Arc<Pod>),
    /// A pod was deleted.
    Deleted(Arc<Pod>),
    /// The cache relisted; read [`PodCache::pods`] again.
    Resynced,
}

/// Counters of one cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Failed lists/watches (each retried after a backoff).
    pub watch_errors: AtomicU64,
    /// Completed lists after the first (410 Gone, reconnects).
    pub relists: AtomicU64,
    /// Pod events applied.
    pub events: AtomicU64,
}

#[derive(Default)]
struct Indexes {
    by_uid: HashMap<String, Arc<Pod>>,
    by_ip: HashMap<IpAddr, Vec<String>>,
}

impl Indexes {
    fn insert(&mut self, pod: Arc<Pod>) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        self.remove(&uid);
        for ip in pod_ips(&pod) {
            self.by_ip.entry(ip).or_default().push(uid.clone());
        }
        self.by_uid.insert(uid, pod);
    }

    fn remove(&mut self, uid: &str) {
        let Some(old) = self.by_uid.remove(uid) else {
            return;
        };
        for ip in pod_ips(&old) {
            if let Some(uids) = self.by_ip.get_mut(&ip) {
                uids.retain(|u| u != uid);
                if uids.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    fn by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        let uids = self.by_ip.get(&ip)?;
        let pods = uids.iter().filter_map(|u| self.by_uid.get(u));
        pods.max_by_key(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            let live = !matches!(phase, Some("Succeeded" | "Failed"));
            (live, p.metadata.creation_timestamp.clone())
        })
        .cloned()
    }
}

/// IPs a pod owns: `status.podIPs` and `status.podIP`, none for host-network pods.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    if pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
        return Vec::new();
    }
    let status = pod.status.as_ref();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str());
    let single = status.and_then(|s| s.pod_ip.as_deref());
    let mut ips: Vec<IpAddr> = listed.chain(single).filter_map(|s| s.parse().ok()).collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// One shared watch of pods and its indexes.
pub struct PodCache {
    name: String,
    indexes: RwLock<Indexes>,
    stores: RwLock<Vec<Store<Pod>>>,
    generation: watch::Sender<u64>,
    events: broadcast::Sender<PodEvent>,
    synced: AtomicBool,
    stats: CacheStats,
    metrics: Option<Arc<Metrics>>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for PodCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCache")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for PodCache {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}

impl PodCache {
    fn new(name: String, metrics: Option<Arc<Metrics>>) -> Arc<Self> {
        if let Some(m) = &metrics {
            m.pod_cache.started(&name);
        }
        Arc::new(Self {
            name,
            indexes: RwLock::default(),
            stores: RwLock::default(),
            generation: watch::channel(0).0,
            events: broadcast::channel(1024).0,
            synced: AtomicBool::new(false),
            stats: CacheStats::default(),
            metrics,
            task: std::sync::Mutex::new(None),
        })
    }

    /// Starts watching `scope` with `client`. The watch runs until the last handle is dropped;
    /// errors are logged, counted and retried with kube's default backoff.
    pub fn start(name: String, client: Client, scope: &Scope) -> Arc<Self> {
        let cache = Self::new(name, None);
        let weak = Arc::downgrade(&cache);
        let scope = scope.clone();
        let task = tokio::spawn(async move { run_watch(weak, client, scope).await });
        *cache.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        cache
    }

    /// Starts a cache whose client is built from `connection` first (reading kubeconfig or
    /// token files); a client that cannot be built is logged and counted as a watch error,
    /// and the cache stays empty.
    pub fn start_with(
        name: String,
        connection: KubernetesSdConfig,
        scope: &Scope,
        metrics: Option<Arc<Metrics>>,
    ) -> Arc<Self> {
        let cache = Self::new(name, metrics);
        let weak = Arc::downgrade(&cache);
        let scope = scope.clone();
        let task = tokio::spawn(async move {
            match client_for(&connection).await {
                Ok(client) => run_watch(weak, client, scope).await,
                Err(e) => {
                    if let Some(c) = weak.upgrade() {
                        c.watch_error();
                        tracing::error!(cache = %c.name, error = %e, "Kubernetes pod watch cannot start; no pods from it.");
                    }
                }
            }
        });
        *cache.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        cache
    }

    /// The cache's name in logs and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every pod in the cache.
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        let idx = self.indexes.read().unwrap_or_else(|p| p.into_inner());
        idx.by_uid.values().cloned().collect()
    }

    /// The pod with this uid.
    pub fn by_uid(&self, uid: &str) -> Option<Arc<Pod>> {
        let idx = self.indexes.read().unwrap_or_else(|p| p.into_inner());
        idx.by_uid.get(uid).cloned()
    }

    /// The pod owning `ip` (never a host-network pod).
    pub fn by_ip(&self, ip: IpAddr) -> Option<Arc<Pod>> {
        self.indexes.read().unwrap_or_else(|p| p.into_inner()).by_ip(ip)
    }

    /// A receiver that changes after every applied change (coalesced: readers that rebuild
    /// from [`PodCache::pods`] never lag).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Every change, one by one; a reader that lags gets `Lagged` and should resync.
    pub fn events(&self) -> broadcast::Receiver<PodEvent> {
        self.events.subscribe()
    }

    /// Whether the first list has completed.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Waits until the first list has completed.
    pub async fn wait_synced(&self) {
        let mut rx = self.changes();
        while !self.synced() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The cache's counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    fn watch_error(&self) {
        self.stats.watch_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.pod_cache.watch_error(&self.name);
        }
    }

    fn applied(&self) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            let n = self.indexes.read().unwrap_or_else(|p| p.into_inner()).by_uid.len();
            m.pod_cache.event(&self.name, n);
        }
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    fn rebuild(&self) {
        let stores = self.stores.read().unwrap_or_else(|p| p.into_inner());
        let mut idx = Indexes::default();
        for pod in stores.iter().flat_map(Store::state) {
            idx.insert(pod);
        }
        *self.indexes.write().unwrap_or_else(|p| p.into_inner()) = idx;
    }
}

async fn run_watch(cache: std::sync::Weak<PodCache>, client: Client, scope: Scope) {
    let mut events = SelectAll::new();
    {
        let Some(c) = cache.upgrade() else { return };
        let mut stores = c.stores.write().unwrap_or_else(|p| p.into_inner());
        for (index, namespace) in scope.namespaces.iter().enumerate() {
            let api: Api<Pod> = match namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let mut config = watcher::Config::default();
            if let Some(field) = &scope.field {
                config = config.fields(field);
            }
            let (store, writer) = reflector::store();
            stores.push(store);
            let stream = watcher(api, config)
                .modify(|pod| pod.managed_fields_mut().clear())
                .default_backoff()
                .reflect(writer)
                .map(move |event| (index, event));
            events.push(stream.boxed());
        }
    }
    let mut initial_lists = vec![false; scope.namespaces.len()];
    while let Some((index, event)) = events.next().await {
        let Some(c) = cache.upgrade() else { return };
        match event {
            Ok(watcher::Event::Apply(pod)) => {
                let pod = Arc::new(pod);
                c.indexes.write().unwrap_or_else(|p| p.into_inner()).insert(pod.clone());
                c.applied();
                let _ = c.events.send(PodEvent::Applied(pod));
                c.bump();
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    c.indexes.write().unwrap_or_else(|p| p.into_inner()).remove(uid);
                }
                c.applied();
                let _ = c.events.send(PodEvent::Deleted(Arc::new(pod)));
                c.bump();
            }
            Ok(watcher::Event::InitDone) => {
                // The reflector swapped in the new list; deletions missed during a gap are gone.
                c.rebuild();
                if let Some(m) = &c.metrics {
                    m.pod_cache.set_pods(
                        &c.name,
                        c.indexes.read().unwrap_or_else(|p| p.into_inner()).by_uid.len(),
                    );
                }
                if initial_lists[index] {
                    c.stats.relists.fetch_add(1, Ordering::Relaxed);
                    if let Some(m) = &c.metrics {
                        m.pod_cache.relist(&c.name);
                    }
                    info!(cache = %c.name, "Pod watch relisted.");
                }
                initial_lists[index] = true;
                if initial_lists.iter().all(|d| *d) {
                    c.synced.store(true, Ordering::Release);
                }
                let _ = c.events.send(PodEvent::Resynced);
                c.bump();
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(error) => {
                c.watch_error();
                let namespace = scope.namespaces[index].as_deref().unwrap_or("<all>");
                warn!(cache = %c.name, namespace, %error, "Pod watch failed; retrying after backoff.");
            }
        }
    }
}

/// The caches of the running configuration, by key. A reload takes over the caches whose key
/// is unchanged; the others stop when their last reader goes.
#[derive(Default)]
pub struct PodCaches {
    live: std::sync::Mutex<HashMap<CacheKey, Arc<PodCache>>>,
    started: AtomicU64,
    metrics: Option<Arc<Metrics>>,
}

impl PodCaches {
    /// An empty registry whose caches report to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    /// The cache for `sub`, started if no running configuration has it.
    pub fn get(&self, sub: &Subscription) -> Arc<PodCache> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = live.get(&sub.key) {
            return c.clone();
        }
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let name = match &sub.scope.field {
            Some(f) if n == 0 => f.clone(),
            Some(f) => format!("{n}:{f}"),
            None => format!("{n}:cluster"),
        };
        let cache = PodCache::start_with(name, sub.connection.clone(), &sub.scope, self.metrics.clone());
        live.insert(sub.key.clone(), cache.clone());
        cache
    }

    /// Keeps only the caches in `keep` (the running configuration's); the others are dropped
    /// here and stop once no reader holds them.
    pub fn retain(&self, keep: &BTreeSet<CacheKey>) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|k, _| keep.contains(k));
    }

    /// Every live cache (for telemetry).
    pub fn all(&self) -> Vec<Arc<PodCache>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.values().cloned().collect()
    }

    /// How many watches were started in this process (a reload that keeps them starts none).
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str, ip: &str, phase: &str, created: &str, host: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": uid, "namespace": "d", "uid": uid, "creationTimestamp": created},
                "spec": {"containers": [], "hostNetwork": host},
                "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}, {"ip": "fd00::1"}]},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn ip_index_prefers_live_then_newer_and_skips_host_network() {
        let mut idx = Indexes::default();
        idx.insert(pod("old", "10.0.0.5", "Succeeded", "2026-01-01T00:00:00Z", false));
        idx.insert(pod("new", "10.0.0.5", "Running", "2025-01-01T00:00:00Z", false));
        idx.insert(pod("host", "192.168.1.1", "Running", "2026-01-01T00:00:00Z", true));
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(idx.by_ip(ip).unwrap().metadata.uid.as_deref(), Some("new"));
        assert!(idx.by_ip("192.168.1.1".parse().unwrap()).is_none());
        assert!(idx.by_ip("fd00::1".parse().unwrap()).is_some(), "podIPs are indexed");
        idx.remove("new");
        assert_eq!(idx.by_ip(ip).unwrap().metadata.uid.as_deref(), Some("old"));
        idx.remove("old");
        assert!(idx.by_ip(ip).is_none());
        assert!(idx.by_ip("fd00::1".parse().unwrap()).is_none());
    }

    fn sd(v: serde_json::Value) -> KubernetesSdConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn configs_with_same_connection_share_a_key_and_differ_by_selector_only() {
        let a = Subscription::from_parts(
            &sd(json!({"role": "pod", "selectors": [{"role": "pod", "label": "app=a"}]})),
            Some("n1"),
            None,
        )
        .unwrap();
        let b = Subscription::from_parts(
            &sd(json!({"role": "pod", "selectors": [{"role": "pod", "label": "app=b"}]})),
            Some("n1"),
            None,
        )
        .unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(a.scope.field.as_deref(), Some("spec.nodeName=n1"));
        let own_ns = Subscription::from_parts(
            &sd(json!({"role": "pod", "namespaces": {"names": ["x"]}})),
            Some("n1"),
            None,
        )
        .unwrap();
        assert_ne!(a.key, own_ns.key);
        let server = Subscription::from_parts(
            &sd(json!({"role": "pod", "api_server": "https://k:6443"})),
            Some("n1"),
            None,
        )
        .unwrap();
        assert_ne!(a.key, server.key);
        let field = Subscription::from_parts(
            &sd(json!({"role": "pod", "selectors": [{"role": "pod", "field": "status.phase=Running"}]})),
            Some("n1"),
            None,
        )
        .unwrap();
        assert_ne!(a.key, field.key);
        assert_eq!(
            field.scope.field.as_deref(),
            Some("spec.nodeName=n1,status.phase=Running")
        );
        let other_node = Subscription::from_parts(
            &sd(json!({"role": "pod", "selectors": [{"role": "pod", "field": "spec.nodeName=n2"}]})),
            Some("n1"),
            None,
        )
        .unwrap();
        assert_eq!(other_node.scope.field.as_deref(), Some("spec.nodeName=n2"));
        let p = |labels: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p", "labels": labels}})).unwrap()
        };
        assert!(a.matches(&p(json!({"app": "a"}))));
        assert!(!a.matches(&p(json!({"app": "b"}))));
        assert!(b.matches(&p(json!({"app": "b"}))));
        let bad = Subscription::from_parts(
            &sd(json!({"role": "pod", "selectors": [{"role": "pod", "label": "a in x"}]})),
            None,
            None,
        );
        assert!(matches!(bad, Err(Error::Selector(_))));
    }
}
