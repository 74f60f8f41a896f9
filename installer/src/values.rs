//! Helm values and Talos machine-config patches. Values are rendered from typed structs, so
//! each chart's keys are spelled once, in one place, with their types (golden tests pin the
//! output). A lab file's `values.<addon>`
//! is merged over the rendered values (maps merge key by key, anything else replaces).

use config::lab::{serde_yaml_value::Value as LabValue, LabConfig, Provider};
use serde::Serialize;
use serde_json::{json, Value};

use crate::yaml;

/// Namespace of the monitoring stack and the agent.
pub const MONITORING_NS: &str = "monitoring";
/// Secret holding the Grafana admin credentials.
pub const GRAFANA_SECRET: &str = "grafana-admin";
/// Loki's in-cluster HTTP address.
pub const LOKI_URL: &str = "http://loki.monitoring.svc:3100";
/// Prometheus's in-cluster address (the operator's governing service).
pub const PROMETHEUS_URL: &str = "http://prometheus-operated.monitoring.svc:9090";
/// Where local-path-provisioner keeps volumes: under /var, the writable part of Talos.
pub const LOCAL_PATH_DIR: &str = "/var/local-path-provisioner";

// ---------- Cilium ----------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CiliumValues {
    ipam: Ipam,
    kube_proxy_replacement: bool,
    k8s_service_host: &'static str,
    k8s_service_port: u16,
    security_context: CiliumSecurity,
    cgroup: Cgroup,
    operator: Operator,
    hubble: Hubble,
    prometheus: Monitored,
    dashboards: Dashboards,
}

#[derive(Serialize)]
struct Ipam {
    mode: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CiliumSecurity {
    capabilities: Capabilities,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Capabilities {
    cilium_agent: Vec<&'static str>,
    clean_cilium_state: Vec<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Cgroup {
    auto_mount: Enabled,
    host_root: &'static str,
}

#[derive(Serialize)]
struct Enabled {
    enabled: bool,
}

#[derive(Serialize)]
struct Operator {
    replicas: u32,
    prometheus: Monitored,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Monitored {
    enabled: bool,
    service_monitor: ServiceMonitor,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceMonitor {
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<Value>,
}

#[derive(Serialize)]
struct Hubble {
    enabled: bool,
    relay: Enabled,
    ui: Enabled,
    metrics: HubbleMetrics,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HubbleMetrics {
    enabled: Vec<&'static str>,
    enable_open_metrics: bool,
    service_monitor: ServiceMonitor,
    dashboards: Dashboards,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Dashboards {
    enabled: bool,
    namespace: &'static str,
    label: &'static str,
    label_value: &'static str,
}

/// Which phase of the Cilium release: the first install runs before the Prometheus
/// operator's CRDs exist, so ServiceMonitors and dashboards come with a second upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CiliumPhase {
    /// Networking only (plus Hubble), no ServiceMonitors.
    Network,
    /// Also ServiceMonitors and Grafana dashboards.
    Monitoring,
}

/// Cilium's values on Talos: Talos's recommended settings (IPAM from Kubernetes, no
/// kube-proxy, the capability lists without SYS_MODULE, cgroup v2 already mounted at
/// /sys/fs/cgroup, the API server through KubePrism) plus Hubble relay, UI and metrics.
pub fn cilium(lab: &LabConfig, phase: CiliumPhase) -> Value {
    let monitoring = phase == CiliumPhase::Monitoring && lab.addons.prometheus;
    let hubble = lab.addons.hubble;
    let dashboards = phase == CiliumPhase::Monitoring && lab.addons.grafana;
    let sm = |enabled| ServiceMonitor { enabled, labels: None };
    let dash = |enabled| Dashboards {
        enabled,
        namespace: MONITORING_NS,
        label: "grafana_dashboard",
        label_value: "1",
    };
    let v = CiliumValues {
        ipam: Ipam { mode: "kubernetes" },
        kube_proxy_replacement: true,
        k8s_service_host: "localhost",
        k8s_service_port: 7445,
        security_context: CiliumSecurity {
            capabilities: Capabilities {
                cilium_agent: vec![
                    "CHOWN",
                    "KILL",
                    "NET_ADMIN",
                    "NET_RAW",
                    "IPC_LOCK",
                    "SYS_ADMIN",
                    "SYS_RESOURCE",
                    "DAC_OVERRIDE",
                    "FOWNER",
                    "SETGID",
                    "SETUID",
                ],
                clean_cilium_state: vec!["NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"],
            },
        },
        cgroup: Cgroup {
            auto_mount: Enabled { enabled: false },
            host_root: "/sys/fs/cgroup",
        },
        operator: Operator {
            replicas: 1,
            prometheus: Monitored {
                enabled: lab.addons.prometheus,
                service_monitor: sm(monitoring),
            },
        },
        hubble: Hubble {
            enabled: hubble,
            relay: Enabled { enabled: hubble },
            ui: Enabled { enabled: hubble },
            metrics: HubbleMetrics {
                enabled: if hubble {
                    // Namespace context on each, which Hubble's namespace dashboards group by.
                    vec![
                        "dns:labelsContext=source_namespace,destination_namespace",
                        "drop:labelsContext=source_namespace,destination_namespace",
                        "tcp:labelsContext=source_namespace,destination_namespace",
                        "flow:labelsContext=source_namespace,destination_namespace",
                        "port-distribution:labelsContext=source_namespace,destination_namespace",
                        "icmp:labelsContext=source_namespace,destination_namespace",
                        "httpV2:exemplars=true;labelsContext=source_namespace,source_workload,destination_namespace,destination_workload,traffic_direction",
                    ]
                } else {
                    vec![]
                },
                enable_open_metrics: hubble,
                service_monitor: sm(monitoring && hubble),
                dashboards: dash(dashboards && hubble),
            },
        },
        prometheus: Monitored {
            enabled: lab.addons.prometheus,
            service_monitor: sm(monitoring),
        },
        dashboards: dash(dashboards),
    };
    let mut out = serde_json::to_value(v).expect("serializable");
    // Talos forwards kube-dns to the host's DNS (on by default since 1.8, and what Talos in
    // Docker relies on), which does not work with eBPF host routing: route through the host.
    out["bpf"] = json!({ "hostLegacyRouting": true });
    if lab.provider == Provider::Docker {
        // Talos in Docker: the nodes are containers sharing the host's kernel. Keep Cilium's
        // socket-level load balancing to the nodes' own network namespace, so it does not
        // reach into other containers' sockets; pods are load-balanced at tc level instead.
        out["socketLB"] = json!({ "hostNamespaceOnly": true });
    }
    if phase == CiliumPhase::Monitoring && lab.addons.grafana {
        for path in [&["dashboards"][..], &["hubble", "metrics", "dashboards"][..]] {
            let mut slot = &mut out;
            for k in path {
                slot = &mut slot[*k];
            }
            slot["annotations"] = json!({ "grafana_folder": "Cilium" });
        }
        out["operator"]["dashboards"] = json!({
            "enabled": true,
            "namespace": MONITORING_NS,
            "label": "grafana_dashboard",
            "labelValue": "1",
            "annotations": { "grafana_folder": "Cilium" },
        });
    }
    out
}

// ---------- kube-prometheus-stack ----------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KubePrometheusStackValues {
    crds: Enabled,
    prometheus: KpsPrometheus,
    alertmanager: Enabled,
    grafana: KpsGrafana,
    kube_proxy: Enabled,
    kube_etcd: KubeEtcd,
    kube_controller_manager: ComponentScrape,
    kube_scheduler: ComponentScrape,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KpsPrometheus {
    enabled: bool,
    prometheus_spec: PrometheusSpec,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PrometheusSpec {
    enable_remote_write_receiver: bool,
    service_monitor_selector_nil_uses_helm_values: bool,
    pod_monitor_selector_nil_uses_helm_values: bool,
    rule_selector_nil_uses_helm_values: bool,
    probe_selector_nil_uses_helm_values: bool,
    scrape_config_selector_nil_uses_helm_values: bool,
    retention: &'static str,
    resources: Resources,
}

#[derive(Serialize)]
struct Resources {
    requests: Requests,
}

#[derive(Serialize)]
struct Requests {
    cpu: &'static str,
    memory: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KpsGrafana {
    enabled: bool,
    admin: GrafanaAdmin,
    default_dashboards_enabled: bool,
    sidecar: GrafanaSidecar,
    additional_data_sources: Vec<Datasource>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GrafanaAdmin {
    existing_secret: &'static str,
    user_key: &'static str,
    password_key: &'static str,
}

#[derive(Serialize)]
struct GrafanaSidecar {
    dashboards: SidecarDashboards,
    datasources: SidecarDatasources,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SidecarDashboards {
    enabled: bool,
    label: &'static str,
    label_value: &'static str,
    search_namespace: &'static str,
    folder_annotation: &'static str,
    provider: DashboardProvider,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DashboardProvider {
    folders_from_files_structure: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SidecarDatasources {
    enabled: bool,
    default_datasource_enabled: bool,
    uid: &'static str,
}

#[derive(Serialize)]
struct Datasource {
    name: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    uid: &'static str,
    access: &'static str,
    url: &'static str,
}

#[derive(Serialize)]
struct KubeEtcd {
    enabled: bool,
    endpoints: Vec<String>,
    service: ComponentService,
}

#[derive(Serialize)]
struct ComponentScrape {
    service: ComponentService,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ComponentService {
    #[serde(skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    port: u16,
    target_port: u16,
}

/// kube-prometheus-stack: Prometheus with the remote-write receiver (the agent pushes to it)
/// selecting every ServiceMonitor/PodMonitor/rule, Alertmanager, Grafana with its password
/// from our Secret, the dashboard sidecar watching all namespaces, a Loki datasource, and the
/// control-plane scrape targets as Talos exposes them (no kube-proxy with Cilium).
pub fn kube_prometheus_stack(lab: &LabConfig) -> Value {
    let a = &lab.addons;
    let v = KubePrometheusStackValues {
        crds: Enabled { enabled: true },
        prometheus: KpsPrometheus {
            enabled: a.prometheus,
            prometheus_spec: PrometheusSpec {
                enable_remote_write_receiver: true,
                service_monitor_selector_nil_uses_helm_values: false,
                pod_monitor_selector_nil_uses_helm_values: false,
                rule_selector_nil_uses_helm_values: false,
                probe_selector_nil_uses_helm_values: false,
                scrape_config_selector_nil_uses_helm_values: false,
                retention: "7d",
                resources: Resources {
                    requests: Requests {
                        cpu: "200m",
                        memory: "1Gi",
                    },
                },
            },
        },
        alertmanager: Enabled {
            enabled: a.alertmanager,
        },
        grafana: KpsGrafana {
            enabled: a.grafana,
            admin: GrafanaAdmin {
                existing_secret: GRAFANA_SECRET,
                user_key: "admin-user",
                password_key: "admin-password",
            },
            default_dashboards_enabled: true,
            sidecar: GrafanaSidecar {
                dashboards: SidecarDashboards {
                    enabled: true,
                    label: "grafana_dashboard",
                    label_value: "1",
                    search_namespace: "ALL",
                    folder_annotation: "grafana_folder",
                    provider: DashboardProvider {
                        folders_from_files_structure: true,
                    },
                },
                datasources: SidecarDatasources {
                    enabled: true,
                    default_datasource_enabled: true,
                    uid: "prometheus",
                },
            },
            additional_data_sources: if a.loki {
                vec![Datasource {
                    name: "Loki",
                    kind: "loki",
                    uid: "loki",
                    access: "proxy",
                    url: LOKI_URL,
                }]
            } else {
                vec![]
            },
        },
        // Cilium replaces kube-proxy.
        kube_proxy: Enabled { enabled: false },
        // etcd is a Talos service, not a pod: scrape the control planes' metrics listener
        // (opened by the Talos patch).
        kube_etcd: KubeEtcd {
            enabled: true,
            endpoints: control_plane_ips(lab),
            service: ComponentService {
                enabled: Some(true),
                port: 2381,
                target_port: 2381,
            },
        },
        kube_controller_manager: ComponentScrape {
            service: ComponentService {
                enabled: None,
                port: 10257,
                target_port: 10257,
            },
        },
        kube_scheduler: ComponentScrape {
            service: ComponentService {
                enabled: None,
                port: 10259,
                target_port: 10259,
            },
        },
    };
    serde_json::to_value(v).expect("serializable")
}

// ---------- Loki ----------

/// The control planes' IPs (Talos in Docker/QEMU numbers them from 10.5.0.2).
pub fn control_plane_ips(lab: &LabConfig) -> Vec<String> {
    match lab.provider {
        Provider::Docker | Provider::Qemu => (0..lab.nodes.control_planes)
            .map(|i| format!("10.5.0.{}", 2 + i))
            .collect(),
        Provider::Nodes => lab.machines.control_planes.clone(),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LokiValues {
    deployment_mode: &'static str,
    loki: LokiConfig,
    single_binary: SingleBinary,
    read: Replicas,
    write: Replicas,
    backend: Replicas,
    chunks_cache: Enabled,
    results_cache: Enabled,
    gateway: Enabled,
    loki_canary: Enabled,
    test: Enabled,
    minio: Enabled,
}

// The chart passes these through to Loki's own config, whose keys are snake_case.
#[derive(Serialize)]
struct LokiConfig {
    auth_enabled: bool,
    #[serde(rename = "commonConfig")]
    common_config: CommonConfig,
    storage: LokiStorage,
    #[serde(rename = "schemaConfig")]
    schema_config: SchemaConfig,
    limits_config: LimitsConfig,
}

#[derive(Serialize)]
struct CommonConfig {
    replication_factor: u32,
}

#[derive(Serialize)]
struct LokiStorage {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct SchemaConfig {
    configs: Vec<SchemaPeriod>,
}

#[derive(Serialize)]
struct SchemaPeriod {
    from: &'static str,
    store: &'static str,
    object_store: &'static str,
    schema: &'static str,
    index: SchemaIndex,
}

#[derive(Serialize)]
struct SchemaIndex {
    prefix: &'static str,
    period: &'static str,
}

#[derive(Serialize)]
struct LimitsConfig {
    allow_structured_metadata: bool,
    volume_enabled: bool,
}

#[derive(Serialize)]
struct SingleBinary {
    replicas: u32,
    persistence: Persistence,
}

#[derive(Serialize)]
struct Persistence {
    enabled: bool,
    size: &'static str,
}

#[derive(Serialize)]
struct Replicas {
    replicas: u32,
}

/// Loki as one binary on the node's filesystem: replication factor 1, no caches, no gateway,
/// no canary; the TSDB v13 schema.
pub fn loki(_lab: &LabConfig) -> Value {
    let off = || Enabled { enabled: false };
    let v = LokiValues {
        deployment_mode: "Monolithic",
        loki: LokiConfig {
            auth_enabled: false,
            common_config: CommonConfig { replication_factor: 1 },
            storage: LokiStorage { kind: "filesystem" },
            schema_config: SchemaConfig {
                configs: vec![SchemaPeriod {
                    from: "2024-04-01",
                    store: "tsdb",
                    object_store: "filesystem",
                    schema: "v13",
                    index: SchemaIndex {
                        prefix: "loki_index_",
                        period: "24h",
                    },
                }],
            },
            limits_config: LimitsConfig {
                allow_structured_metadata: true,
                volume_enabled: true,
            },
        },
        single_binary: SingleBinary {
            replicas: 1,
            persistence: Persistence {
                enabled: true,
                size: "10Gi",
            },
        },
        read: Replicas { replicas: 0 },
        write: Replicas { replicas: 0 },
        backend: Replicas { replicas: 0 },
        chunks_cache: off(),
        results_cache: off(),
        gateway: off(),
        loki_canary: off(),
        test: off(),
        minio: off(),
    };
    serde_json::to_value(v).expect("serializable")
}

// ---------- local-path-provisioner, Traefik, MetalLB ----------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalPathValues {
    storage_class: StorageClass,
    node_path_map: Vec<NodePath>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StorageClass {
    create: bool,
    default_class: bool,
    name: &'static str,
}

#[derive(Serialize)]
struct NodePath {
    node: &'static str,
    paths: Vec<&'static str>,
}

/// local-path-provisioner writing under /var (writable on Talos), the default StorageClass.
pub fn local_path(_lab: &LabConfig) -> Value {
    let v = LocalPathValues {
        storage_class: StorageClass {
            create: true,
            default_class: true,
            name: "local-path",
        },
        node_path_map: vec![NodePath {
            node: "DEFAULT_PATH_FOR_NON_LISTED_NODES",
            paths: vec![LOCAL_PATH_DIR],
        }],
    };
    serde_json::to_value(v).expect("serializable")
}

#[derive(Serialize)]
struct TraefikValues {
    deployment: Replicas,
    service: TraefikService,
    metrics: TraefikMetrics,
}

/// Since Traefik's chart v40 the Service type is `service.spec.type`; `service.type` is
/// ignored (and the chart's default, LoadBalancer, without MetalLB holds `helm --wait`).
#[derive(Serialize)]
struct TraefikService {
    spec: TraefikServiceSpec,
}

#[derive(Serialize)]
struct TraefikServiceSpec {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct TraefikMetrics {
    prometheus: TraefikPrometheus,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TraefikPrometheus {
    service_monitor: ServiceMonitor,
}

/// Traefik as the ingress controller (a LoadBalancer when MetalLB is on, else a NodePort).
pub fn traefik(lab: &LabConfig) -> Value {
    let v = TraefikValues {
        deployment: Replicas { replicas: 1 },
        service: TraefikService {
            spec: TraefikServiceSpec {
                kind: if lab.addons.metallb { "LoadBalancer" } else { "NodePort" },
            },
        },
        metrics: TraefikMetrics {
            prometheus: TraefikPrometheus {
                service_monitor: ServiceMonitor {
                    enabled: lab.addons.prometheus,
                    labels: None,
                },
            },
        },
    };
    serde_json::to_value(v).expect("serializable")
}

/// MetalLB's chart needs no values; its address pool is applied after it (see [`metallb_pool`]).
pub fn metallb(_lab: &LabConfig) -> Value {
    #[derive(Serialize)]
    struct MetallbValues {}
    serde_json::to_value(MetallbValues {}).expect("serializable")
}

/// The address pool MetalLB announces: the lab file's `metallb_pool`, else the top of the
/// Talos-in-Docker subnet.
pub fn metallb_pool(lab: &LabConfig) -> String {
    let range = if lab.metallb_pool.is_empty() {
        "10.5.0.200-10.5.0.250"
    } else {
        lab.metallb_pool.as_str()
    };
    format!(
        "---\napiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata:\n  name: sre-lab\n  namespace: metallb-system\nspec:\n  addresses:\n    - {range}\n---\napiVersion: metallb.io/v1beta1\nkind: L2Advertisement\nmetadata:\n  name: sre-lab\n  namespace: metallb-system\nspec:\n  ipAddressPools:\n    - sre-lab\n"
    )
}

/// The rendered values for add-on `name`, with the lab file's overrides merged, as YAML.
pub fn render(lab: &LabConfig, name: &str, base: Value) -> String {
    let mut v = base;
    if let Some(over) = lab.values.get(name) {
        merge(&mut v, &to_json(over));
    }
    yaml::to_string(&v)
}

fn to_json(v: &LabValue) -> Value {
    match v {
        LabValue::Bool(b) => json!(b),
        LabValue::Int(i) => json!(i),
        LabValue::Float(f) => json!(f),
        LabValue::String(s) => json!(s),
        LabValue::List(l) => Value::Array(l.iter().map(to_json).collect()),
        LabValue::Map(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
    }
}

/// Deep-merges `over` into `base` the way Helm merges values files.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

// ---------- Talos machine-config patches ----------

/// The Talos patch every node gets: Cilium as the CNI and no kube-proxy (Cilium replaces it), etcd,
/// controller-manager and scheduler metrics reachable by Prometheus, and the local-path
/// directory mounted into the kubelet.
pub fn talos_patch(lab: &LabConfig) -> String {
    let mut out = yaml::to_string(&talos_patch_value(lab));
    if let Some(reg) = crate::plan::local_registry(lab) {
        // The lab registry speaks plain HTTP on the lab network's gateway. A document of its
        // own: `machine.registries.mirrors` is deprecated in Talos v1.13 in favour of
        // `RegistryMirrorConfig` (a document since v1.12; only at creation: re-applied, its
        // endpoint list would grow).
        let doc = json!({
            "apiVersion": "v1alpha1",
            "kind": "RegistryMirrorConfig",
            "name": reg.node_host,
            "endpoints": [{ "url": format!("http://{}", reg.node_host) }],
        });
        out.push_str("---\n");
        out.push_str(&yaml::to_string(&doc));
    }
    out
}

fn talos_patch_value(lab: &LabConfig) -> Value {
    // With Cilium: no CNI (and no kube-proxy, replaced) until `up` installs Cilium with Helm.
    let mut v = if lab.addons.cilium {
        json!({
            "cluster": { "network": { "cni": { "name": "none" } }, "proxy": { "disabled": true } }
        })
    } else {
        json!({ "cluster": {} })
    };
    if lab.addons.prometheus {
        v["cluster"]["etcd"] = json!({ "extraArgs": { "listen-metrics-urls": "http://0.0.0.0:2381" } });
        v["cluster"]["controllerManager"] = json!({ "extraArgs": { "bind-address": "0.0.0.0" } });
        v["cluster"]["scheduler"] = json!({ "extraArgs": { "bind-address": "0.0.0.0" } });
    }
    if lab.addons.local_path {
        v["machine"]["kubelet"] = json!({
            "extraMounts": [{
                "destination": LOCAL_PATH_DIR,
                "type": "bind",
                "source": LOCAL_PATH_DIR,
                "options": ["bind", "rshared", "rw"],
            }]
        });
    }
    v
}

/// What `talosctl patch machineconfig` re-applies to existing nodes when the lab changes:
/// [`talos_patch`] without its lists (Talos appends list items on a merge, so re-applying a
/// mount would add it twice) and without the CNI (chosen once, at bootstrap).
pub fn talos_update_patch(lab: &LabConfig) -> String {
    let mut v = talos_patch_value(lab);
    // The CNI is chosen when the nodes are made.
    if let Some(cluster) = v["cluster"].as_object_mut() {
        cluster.remove("network");
    }
    // The kubelet mounts are a list (the registry mirror is a document of its own, in the
    // creation patch only).
    if let Some(machine) = v["machine"].as_object_mut() {
        machine.remove("kubelet");
    }
    if v["machine"].as_object().is_some_and(|m| m.is_empty()) {
        v.as_object_mut().expect("a map").remove("machine");
    }
    yaml::to_string(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_merge_deeply_and_replace_lists() {
        let mut base = json!({"a": {"b": 1, "c": [1, 2]}, "d": true});
        merge(&mut base, &json!({"a": {"c": [3], "e": "x"}}));
        assert_eq!(base, json!({"a": {"b": 1, "c": [3], "e": "x"}, "d": true}));
    }

    #[test]
    fn monitoring_phase_adds_service_monitors_only_then() {
        let lab = LabConfig::default();
        let net = cilium(&lab, CiliumPhase::Network);
        let mon = cilium(&lab, CiliumPhase::Monitoring);
        assert_eq!(net["prometheus"]["serviceMonitor"]["enabled"], json!(false));
        assert_eq!(mon["prometheus"]["serviceMonitor"]["enabled"], json!(true));
        assert_eq!(mon["hubble"]["metrics"]["serviceMonitor"]["enabled"], json!(true));
        assert_eq!(net["k8sServicePort"], json!(7445));
    }
}
