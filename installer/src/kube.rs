//! Everything the installer does to the Kubernetes API, through kube-rs: server-side apply of
//! manifests, watching rollouts, the Grafana Secret, status, and port-forwarding.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::await_condition;
use kube::{Client, Config};
use serde_json::Value;

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "sre-lab-installer";

/// A client for the cluster in `kubeconfig`.
pub async fn client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {} (run `installer up` first)", kubeconfig.display()))?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("using {}", kubeconfig.display()))?;
    Ok(Client::try_from(cfg)?)
}

/// Kinds that are not namespaced, among those the lab applies.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "StorageClass",
    "PriorityClass",
];

fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if lower.ends_with("ss") || lower.ends_with('x') {
        format!("{lower}es")
    } else if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else {
        format!("{lower}s")
    }
}

/// The API resource and namespace a manifest document addresses.
pub fn resource_of(doc: &Value) -> anyhow::Result<(ApiResource, Option<String>, String)> {
    let api_version = doc["apiVersion"]
        .as_str()
        .ok_or_else(|| anyhow!("document without apiVersion"))?;
    let kind = doc["kind"].as_str().ok_or_else(|| anyhow!("document without kind"))?;
    let name = doc["metadata"]["name"]
        .as_str()
        .ok_or_else(|| anyhow!("{kind} without metadata.name"))?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let ar = ApiResource::from_gvk_with_plural(&gvk, &plural(kind));
    let ns = if CLUSTER_SCOPED.contains(&kind) {
        None
    } else {
        Some(doc["metadata"]["namespace"].as_str().unwrap_or("default").to_owned())
    };
    Ok((ar, ns, name.to_owned()))
}

/// Server-side applies every document of `manifests` (forcing ownership of conflicting
/// fields, as `kubectl apply --server-side --force-conflicts`). Returns `Kind ns/name` lines.
pub async fn apply(client: &Client, manifests: &str) -> anyhow::Result<Vec<String>> {
    apply_waiting_for_webhooks(client, manifests, Duration::ZERO).await
}

/// Whether `name` is a kustomize-generated name: `<base>-<hash>`, the hash 10 characters of
/// kustomize's alphabet (no vowels, no look-alikes).
fn generated_base(name: &str) -> Option<&str> {
    let (base, hash) = name.rsplit_once('-')?;
    let alphabet = |c: char| "bcdfghkmt2456789".contains(c);
    (hash.len() == 10 && hash.chars().all(alphabet) && !base.is_empty()).then_some(base)
}

/// Deletes the ConfigMaps an earlier apply generated that the one just made replaced: for each
/// applied ConfigMap named `<base>-<hash>`, the others of its namespace with the same labels
/// and a name `<base>-<other hash>`. Returns what was deleted.
pub async fn prune_generated_configmaps(client: &Client, manifests: &str) -> anyhow::Result<Vec<String>> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let docs = crate::yaml::documents(manifests).map_err(|e| anyhow!("manifests: {e}"))?;
    let mut deleted = Vec::new();
    for doc in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
        let (Some(name), Some(ns)) = (doc["metadata"]["name"].as_str(), doc["metadata"]["namespace"].as_str()) else {
            continue;
        };
        let Some(base) = generated_base(name) else { continue };
        let Some(labels) = doc["metadata"]["labels"].as_object().filter(|l| !l.is_empty()) else {
            continue;
        };
        let selector: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let list = api
            .list(&kube::api::ListParams::default().labels(&selector.join(",")))
            .await
            .with_context(|| format!("listing ConfigMaps in {ns}"))?;
        for cm in list.items {
            let Some(other) = cm.metadata.name.as_deref() else {
                continue;
            };
            if other != name && generated_base(other) == Some(base) {
                api.delete(other, &Default::default())
                    .await
                    .with_context(|| format!("deleting ConfigMap {ns}/{other}"))?;
                deleted.push(format!("ConfigMap {ns}/{other}"));
            }
        }
    }
    Ok(deleted)
}

/// Whether an apply failed because an admission webhook does not answer yet: its Service has
/// no ready endpoint right after the chart installed it (metallb/metallb#1597), its serving
/// certificate is not injected yet, or the API server's proxy to it is not ready
/// (metallb/metallb#1612).
fn webhook_not_ready(e: &kube::Error) -> bool {
    let text = e.to_string();
    text.contains("failed calling webhook")
        && [
            "connection refused",
            "no endpoints available",
            "context deadline exceeded",
            "i/o timeout",
            "EOF",
            "x509: certificate signed by unknown authority",
            "Service Unavailable",
            "no route to host",
        ]
        .iter()
        .any(|m| text.contains(m))
}

/// [`apply`], retrying an object while an admission webhook it goes through does not answer
/// yet, for up to `wait` (1 s apart, then up to 5 s).
pub async fn apply_waiting_for_webhooks(
    client: &Client,
    manifests: &str,
    wait: Duration,
) -> anyhow::Result<Vec<String>> {
    let docs = crate::yaml::documents(manifests).map_err(|e| anyhow!("manifests: {e}"))?;
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut applied = Vec::new();
    for doc in docs {
        let (ar, ns, name) = resource_of(&doc)?;
        let api: Api<DynamicObject> = match &ns {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_secs(1);
        loop {
            match api.patch(&name, &pp, &Patch::Apply(&doc)).await {
                Ok(_) => break,
                Err(e) if webhook_not_ready(&e) && tokio::time::Instant::now() + pause <= deadline => {
                    drop(e);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e)).with_context(|| format!("applying {} {}", ar.kind, name));
                }
            }
        }
        applied.push(match ns {
            Some(ns) => format!("{} {ns}/{name}", ar.kind),
            None => format!("{} {name}", ar.kind),
        });
    }
    Ok(applied)
}

/// Whether a DaemonSet's current generation is scheduled, updated and available everywhere.
pub fn daemonset_ready(ds: &DaemonSet) -> bool {
    let Some(st) = &ds.status else { return false };
    let generation = ds.metadata.generation.unwrap_or(0);
    st.observed_generation.unwrap_or(0) >= generation
        && st.desired_number_scheduled > 0
        && st.updated_number_scheduled.unwrap_or(0) == st.desired_number_scheduled
        && st.number_available.unwrap_or(0) == st.desired_number_scheduled
}

/// Whether a Deployment's current generation has all replicas updated and available.
pub fn deployment_ready(d: &Deployment) -> bool {
    let Some(st) = &d.status else { return false };
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0)
        && st.updated_replicas.unwrap_or(0) == want
        && st.available_replicas.unwrap_or(0) == want
}

/// Watches `kind` `ns/name` until it is rolled out, or fails after `timeout`. A watch that
/// breaks (API server restart, expired resource version) is started again; the last such
/// error is part of the timeout's message.
pub async fn wait_rollout(client: &Client, kind: &str, ns: &str, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error: Option<String> = None;
    loop {
        let watch = async {
            match kind {
                "DaemonSet" => {
                    let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
                    await_condition(api, name, |o: Option<&DaemonSet>| o.is_some_and(daemonset_ready))
                        .await
                        .map(|_| ())
                }
                "Deployment" => {
                    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
                    await_condition(api, name, |o: Option<&Deployment>| o.is_some_and(deployment_ready))
                        .await
                        .map(|_| ())
                }
                _ => Ok(()),
            }
        };
        if !matches!(kind, "DaemonSet" | "Deployment") {
            bail!("cannot wait for a {kind}");
        }
        match tokio::time::timeout_at(deadline, watch).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => {
                last_error = Some(e.to_string());
                tokio::time::sleep_until((tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline))
                    .await;
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    match last_error {
        Some(e) => bail!(
            "{kind} {ns}/{name} was not rolled out within {}s (last watch error: {e})",
            timeout.as_secs()
        ),
        None => bail!("{kind} {ns}/{name} was not rolled out within {}s", timeout.as_secs()),
    }
}

/// The Grafana admin Secret (user `admin`), applied server-side.
pub fn grafana_secret_manifest(ns: &str, name: &str, password: &str) -> String {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": { "app.kubernetes.io/managed-by": FIELD_MANAGER },
        },
        "type": "Opaque",
        "stringData": { "admin-user": "admin", "admin-password": password },
    });
    crate::yaml::to_string(&doc)
}

/// Reads the Grafana admin password from its Secret.
pub async fn grafana_password(client: &Client, ns: &str, name: &str) -> anyhow::Result<String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api
        .get(name)
        .await
        .with_context(|| format!("reading Secret {ns}/{name}"))?;
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get("admin-password"))
        .ok_or_else(|| anyhow!("Secret {ns}/{name} has no admin-password"))?;
    Ok(String::from_utf8_lossy(&bytes.0).into_owned())
}

/// A service `port-forward` can reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwardable {
    /// Name on the command line.
    pub name: &'static str,
    /// Namespace.
    pub namespace: &'static str,
    /// Service.
    pub service: &'static str,
    /// Service port.
    pub port: u16,
    /// Default local port.
    pub local_port: u16,
    /// Path to open in a browser.
    pub path: &'static str,
}

/// Services `port-forward` knows.
pub const FORWARDS: &[Forwardable] = &[
    Forwardable {
        name: "grafana",
        namespace: "monitoring",
        service: "kube-prometheus-stack-grafana",
        port: 80,
        local_port: 3000,
        path: "/",
    },
    Forwardable {
        name: "prometheus",
        namespace: "monitoring",
        service: "kube-prometheus-stack-prometheus",
        port: 9090,
        local_port: 9090,
        path: "/",
    },
    Forwardable {
        name: "alertmanager",
        namespace: "monitoring",
        service: "kube-prometheus-stack-alertmanager",
        port: 9093,
        local_port: 9093,
        path: "/",
    },
    Forwardable {
        name: "loki",
        namespace: "monitoring",
        service: "loki",
        port: 3100,
        local_port: 3100,
        path: "/ready",
    },
    Forwardable {
        name: "hubble-ui",
        namespace: "kube-system",
        service: "hubble-ui",
        port: 80,
        local_port: 12000,
        path: "/",
    },
];

/// The forwardable service called `name`.
pub fn forwardable(name: &str) -> Option<&'static Forwardable> {
    FORWARDS.iter().find(|f| f.name == name)
}

/// A ready pod behind `svc` and the container port its `port` maps to.
pub async fn resolve_service(client: &Client, ns: &str, svc: &str, port: u16) -> anyhow::Result<(String, u16)> {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let s = services
        .get(svc)
        .await
        .with_context(|| format!("Service {ns}/{svc} (is the add-on installed?)"))?;
    let spec = s.spec.ok_or_else(|| anyhow!("Service {ns}/{svc} has no spec"))?;
    let selector = spec.selector.unwrap_or_default();
    if selector.is_empty() {
        bail!("Service {ns}/{svc} has no selector");
    }
    let sp = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.port == i32::from(port))
        .ok_or_else(|| anyhow!("Service {ns}/{svc} has no port {port}"))?;
    let label_selector = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&ListParams::default().labels(&label_selector)).await?;
    let pod = list
        .items
        .into_iter()
        .find(pod_ready)
        .ok_or_else(|| anyhow!("no ready pod behind Service {ns}/{svc}"))?;
    let target = match sp.target_port {
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p)) => p,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) => pod
            .spec
            .as_ref()
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .ok_or_else(|| anyhow!("no container port named {name:?} behind Service {ns}/{svc}"))?,
        None => sp.port,
    };
    let name = pod.metadata.name.unwrap_or_default();
    Ok((name, u16::try_from(target)?))
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Forwards connections to `local` (a bound listener) to `pod:port` through the API server,
/// one port-forward stream per connection, until the task is dropped.
pub async fn forward(
    client: Client,
    ns: String,
    pod: String,
    port: u16,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    loop {
        let (mut conn, _) = listener.accept().await?;
        let pods = pods.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let result: anyhow::Result<()> = async {
                let mut pf = pods.portforward(&pod, &[port]).await?;
                let mut upstream = pf.take_stream(port).ok_or_else(|| anyhow!("no stream"))?;
                tokio::io::copy_bidirectional(&mut conn, &mut upstream).await?;
                drop(upstream);
                pf.join().await?;
                Ok(())
            }
            .await;
            if let Err(e) = result {
                crate::progress::line(&format!("port-forward connection ended: {e:#}"));
            }
        });
    }
}

/// One line per node and per not-ready pod, for `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ClusterStatus {
    /// `name: Ready|NotReady (kubelet version)`.
    pub nodes: Vec<NodeStatus>,
    /// Workloads of the lab and whether they are ready.
    pub workloads: Vec<WorkloadStatus>,
}

/// A node.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStatus {
    /// Name.
    pub name: String,
    /// Ready condition.
    pub ready: bool,
    /// Kubelet version.
    pub version: String,
}

/// A workload.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkloadStatus {
    /// `DaemonSet monitoring/sre-lab-agent`.
    pub name: String,
    /// Rolled out and available.
    pub ready: bool,
    /// `3/3`.
    pub detail: String,
}

/// Nodes and the lab's DaemonSets and Deployments.
pub async fn status(client: &Client) -> anyhow::Result<ClusterStatus> {
    let mut out = ClusterStatus::default();
    let nodes: Api<Node> = Api::all(client.clone());
    for n in nodes.list(&ListParams::default()).await?.items {
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let version = n
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.kubelet_version.clone())
            .unwrap_or_default();
        out.nodes.push(NodeStatus {
            name: n.metadata.name.unwrap_or_default(),
            ready,
            version,
        });
    }
    for ns in ["kube-system", "monitoring", "local-path-storage", "sre-lab-sample"] {
        let ds: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
        for d in ds.list(&ListParams::default()).await?.items {
            let st = d.status.clone().unwrap_or_default();
            out.workloads.push(WorkloadStatus {
                name: format!("DaemonSet {ns}/{}", d.metadata.name.clone().unwrap_or_default()),
                ready: daemonset_ready(&d),
                detail: format!("{}/{}", st.number_available.unwrap_or(0), st.desired_number_scheduled),
            });
        }
        let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
        for d in deps.list(&ListParams::default()).await?.items {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let have = d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
            out.workloads.push(WorkloadStatus {
                name: format!("Deployment {ns}/{}", d.metadata.name.clone().unwrap_or_default()),
                ready: deployment_ready(&d),
                detail: format!("{have}/{want}"),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_and_scopes() {
        let doc = serde_json::json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "a", "namespace": "monitoring"}});
        let (ar, ns, name) = resource_of(&doc).unwrap();
        assert_eq!(
            (ar.group.as_str(), ar.version.as_str(), ar.plural.as_str()),
            ("monitoring.coreos.com", "v1", "servicemonitors")
        );
        assert_eq!((ns.as_deref(), name.as_str()), (Some("monitoring"), "a"));
        let doc = serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "r"}});
        let (ar, ns, _) = resource_of(&doc).unwrap();
        assert_eq!((ar.plural.as_str(), ns), ("clusterroles", None));
        let doc = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}});
        assert_eq!(resource_of(&doc).unwrap().0.api_version, "v1");
        assert_eq!(plural("IPAddressPool"), "ipaddresspools");
        assert_eq!(plural("Ingress"), "ingresses");
        assert_eq!(plural("NetworkPolicy"), "networkpolicies");
    }
}
