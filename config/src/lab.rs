//! The installer's lab file (`sre-lab.yaml`): which cluster to stand up, where, and with which
//! add-ons. Every field has a default, so an empty file — or no file — is the seeds' lab:
//! Talos in Docker, one control plane and two workers, every default add-on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole lab file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabConfig {
    /// Cluster name; also the talosctl/kubectl context name.
    pub cluster_name: String,
    /// Where the nodes come from.
    pub provider: Provider,
    /// Node counts and sizes (docker and qemu providers).
    pub nodes: NodeSpec,
    /// Existing machines by IP (provider `nodes`).
    pub machines: Machines,
    /// Talos and Kubernetes versions.
    pub versions: Versions,
    /// Pinned chart versions.
    pub charts: Charts,
    /// Which add-ons to install.
    pub addons: Addons,
    /// Helm values merged over the rendered values, per add-on name.
    pub values: BTreeMap<String, serde_yaml_value::Value>,
    /// The agent's container image. Empty: built from this checkout (the Dockerfile) and
    /// pushed to a registry the installer runs next to Talos in Docker/QEMU; provider `nodes`
    /// needs an image its machines can pull.
    pub agent_image: String,
    /// Addresses MetalLB hands out (`FIRST-LAST` or a CIDR). Empty: the top of the Talos
    /// in Docker/QEMU subnet (10.5.0.200-10.5.0.250); required for provider `nodes`.
    pub metallb_pool: String,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            cluster_name: "sre-lab".to_owned(),
            provider: Provider::Docker,
            nodes: NodeSpec::default(),
            machines: Machines::default(),
            versions: Versions::default(),
            charts: Charts::default(),
            addons: Addons::default(),
            values: BTreeMap::new(),
            agent_image: String::new(),
            metallb_pool: String::new(),
        }
    }
}

/// The add-ons whose Helm values a lab file may override under `values`.
pub const VALUES_FOR: &[&str] = &[
    "cilium",
    "kube_prometheus_stack",
    "loki",
    "local_path",
    "traefik",
    "metallb",
];

/// The agent image the manifests in deploy/ name (replaced by the installer).
pub const DEFAULT_AGENT_IMAGE: &str = "ghcr.io/sre-lab/agent:0.1.0";

/// Where the nodes come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Talos in Docker (`talosctl cluster create docker`).
    #[default]
    Docker,
    /// Talos in QEMU VMs (`talosctl cluster create qemu`).
    Qemu,
    /// Existing Talos machines (VirtualBox, Proxmox, bare metal) given by IP.
    Nodes,
}

/// Node counts and sizes for the docker and qemu providers.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSpec {
    /// Control-plane nodes.
    pub control_planes: u32,
    /// Worker nodes.
    pub workers: u32,
    /// CPUs per node.
    pub cpus: f32,
    /// Memory per node in MiB.
    pub memory_mib: u32,
}

impl Default for NodeSpec {
    fn default() -> Self {
        Self {
            control_planes: 1,
            workers: 2,
            cpus: 2.0,
            memory_mib: 4096,
        }
    }
}

/// Existing machines (provider `nodes`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Machines {
    /// Control-plane IPs.
    pub control_planes: Vec<String>,
    /// Worker IPs.
    pub workers: Vec<String>,
    /// Disk Talos installs to.
    pub install_disk: String,
}

/// Versions of the cluster's software.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Versions {
    /// Talos version (≥ 1.13 for the docker provider with `cni: none`).
    pub talos: String,
    /// Kubernetes version. The default, 1.33, is the newest minor both Talos v1.13 (1.31–1.36)
    /// and the pinned Cilium 1.18 (tested on 1.30–1.33) support.
    pub kubernetes: String,
}

impl Default for Versions {
    fn default() -> Self {
        Self {
            talos: "v1.13.9".to_owned(),
            // Talos v1.13 runs 1.31–1.36; Cilium 1.18 is tested on 1.30–1.33: 1.33, its last
            // patch release.
            kubernetes: "1.33.12".to_owned(),
        }
    }
}

/// Pinned Helm chart versions.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Charts {
    /// cilium/cilium. 1.18 by default: 1.19 with kube-proxy replacement broke host
    /// networking on Talos (cilium/cilium#46010).
    pub cilium: String,
    /// prometheus-community/kube-prometheus-stack.
    pub kube_prometheus_stack: String,
    /// grafana-community/loki (the OSS chart moved there from grafana/loki in March 2026).
    pub loki: String,
    /// containeroo/local-path-provisioner (rancher publishes no Helm repository).
    pub local_path: String,
    /// traefik/traefik.
    pub traefik: String,
    /// metallb/metallb.
    pub metallb: String,
}

impl Default for Charts {
    fn default() -> Self {
        Self {
            cilium: "1.18.12".to_owned(),
            kube_prometheus_stack: "88.5.3".to_owned(),
            loki: "18.11.0".to_owned(),
            local_path: "0.0.37".to_owned(),
            traefik: "41.3.0".to_owned(),
            metallb: "0.16.1".to_owned(),
        }
    }
}

/// Which add-ons to install; the defaults are the seeds' lab.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Addons {
    /// Cilium CNI (required unless another CNI is configured).
    pub cilium: bool,
    /// Hubble relay, UI and metrics.
    pub hubble: bool,
    /// kube-prometheus-stack's Prometheus with the remote-write receiver.
    pub prometheus: bool,
    /// Alertmanager.
    pub alertmanager: bool,
    /// Loki (single binary, filesystem).
    pub loki: bool,
    /// Grafana with datasources and dashboards.
    pub grafana: bool,
    /// local-path-provisioner.
    pub local_path: bool,
    /// Traefik ingress.
    pub traefik: bool,
    /// MetalLB.
    pub metallb: bool,
    /// The sre-lab agent DaemonSet.
    pub agent: bool,
    /// A workload that `validate` uses to prove the agent's paths end to end.
    pub sample_app: bool,
}

impl Default for Addons {
    fn default() -> Self {
        Self {
            cilium: true,
            hubble: true,
            prometheus: true,
            alertmanager: true,
            loki: true,
            grafana: true,
            local_path: true,
            traefik: false,
            metallb: false,
            agent: true,
            sample_app: true,
        }
    }
}

/// Free-form YAML for Helm values overrides.
pub mod serde_yaml_value {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    /// A YAML value as Helm values take it.
    #[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
    #[serde(untagged)]
    pub enum Value {
        /// true/false.
        Bool(bool),
        /// An integer.
        Int(i64),
        /// A float.
        Float(f64),
        /// A string.
        String(String),
        /// A list.
        List(Vec<Value>),
        /// A mapping.
        Map(BTreeMap<String, Value>),
    }
}

/// Checks that fit no type: node counts, IPs for the `nodes` provider, a Talos version that
/// works with `cni: none` in Docker. Returns (YAML path, message) pairs.
pub fn validate(lab: &LabConfig) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if lab.cluster_name.is_empty() || !lab.cluster_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        out.push((
            "cluster_name".into(),
            format!("cluster name {:?} must be letters, digits and `-`", lab.cluster_name),
        ));
    }
    match lab.provider {
        Provider::Docker | Provider::Qemu => {
            if lab.nodes.control_planes == 0 {
                out.push((
                    "nodes.control_planes".into(),
                    "at least one control plane is needed".into(),
                ));
            }
            if lab.provider == Provider::Docker && lab.nodes.control_planes > 1 {
                out.push((
                    "nodes.control_planes".into(),
                    "`talosctl cluster create docker` makes exactly one control plane; use provider qemu or nodes for more"
                        .into(),
                ));
            }
            if lab.nodes.memory_mib < 1024 {
                out.push((
                    "nodes.memory_mib".into(),
                    format!(
                        "{} MiB is too little for a Talos node (at least 1024)",
                        lab.nodes.memory_mib
                    ),
                ));
            }
        }
        Provider::Nodes => {
            if lab.machines.control_planes.is_empty() {
                out.push((
                    "machines.control_planes".into(),
                    "provider `nodes` needs the control planes' IPs".into(),
                ));
            }
            for ip in lab.machines.control_planes.iter().chain(&lab.machines.workers) {
                if ip.parse::<std::net::IpAddr>().is_err() {
                    out.push(("machines".into(), format!("{ip:?} is not an IP address")));
                }
            }
            if lab.machines.install_disk.is_empty() {
                out.push((
                    "machines.install_disk".into(),
                    "provider `nodes` needs install_disk (e.g. /dev/sda)".into(),
                ));
            }
        }
    }
    if lab.addons.metallb && lab.provider == Provider::Nodes && lab.metallb_pool.is_empty() {
        out.push((
            "metallb_pool".into(),
            "MetalLB needs an address range on the machines' network, e.g. 192.168.56.200-192.168.56.250".into(),
        ));
    }
    for name in lab.values.keys() {
        if !VALUES_FOR.contains(&name.as_str()) {
            out.push((
                format!("values.{name}"),
                format!(
                    "no Helm release is called {name:?}; values can be given for {}",
                    VALUES_FOR.join(", ")
                ),
            ));
        }
    }
    if lab.agent_image.contains(char::is_whitespace) {
        out.push((
            "agent_image".into(),
            format!("{:?} is not an image reference", lab.agent_image),
        ));
    }
    if lab.agent_image.is_empty() && lab.addons.agent && lab.provider == Provider::Nodes {
        out.push((
            "agent_image".into(),
            "provider `nodes` needs an agent image the machines can pull (build one with the Dockerfile and push it)"
                .into(),
        ));
    }
    if !talos_below(&lab.versions.talos, 1, 14) {
        out.push((
            "versions.talos".into(),
            format!(
                "Talos {} moves the network, proxy and kubelet settings this installer patches into new config documents; use v1.13.x",
                lab.versions.talos
            ),
        ));
    }
    if lab.provider == Provider::Docker && !talos_at_least(&lab.versions.talos, 1, 13) {
        out.push((
            "versions.talos".into(),
            format!(
                "Talos {} in Docker hangs with `cni: none`; use v1.13.0 or newer",
                lab.versions.talos
            ),
        ));
    }
    out
}

fn talos_below(v: &str, major: u32, minor: u32) -> bool {
    !talos_at_least(v, major, minor)
}

fn talos_at_least(v: &str, major: u32, minor: u32) -> bool {
    let mut parts = v
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_seeds_lab() {
        let lab = crate::from_str::<LabConfig>("", "sre-lab.yaml", &|_| None, &|_, _| false)
            .unwrap()
            .value;
        assert_eq!(lab, LabConfig::default());
        assert_eq!(lab.provider, Provider::Docker);
        assert_eq!((lab.nodes.control_planes, lab.nodes.workers), (1, 2));
        assert!(lab.addons.agent && lab.addons.sample_app && lab.addons.cilium);
        assert!(validate(&lab).is_empty());
    }

    #[test]
    fn values_overrides_take_any_yaml() {
        let text = "values:\n  cilium:\n    hubble: {enabled: true, ui: {replicas: 2}}\n    k8sServicePort: 7445\n    tags: [a, b]\n";
        let lab = crate::from_str::<LabConfig>(text, "lab.yaml", &|_| None, &|_, _| false)
            .unwrap()
            .value;
        let serde_yaml_value::Value::Map(cilium) = &lab.values["cilium"] else {
            panic!("a map")
        };
        assert_eq!(cilium["k8sServicePort"], serde_yaml_value::Value::Int(7445));
        assert!(matches!(&cilium["tags"], serde_yaml_value::Value::List(l) if l.len() == 2));
    }

    #[test]
    fn errors_have_positions_and_rules_hold() {
        let errs = crate::from_str::<LabConfig>(
            "provider: vagrant\nnodes:\n  wokers: 3\n",
            "lab.yaml",
            &|_| None,
            &|_, _| false,
        )
        .unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text.iter()
                .any(|l| l.starts_with("lab.yaml:1:") && l.contains("vagrant")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|l| l.starts_with("lab.yaml:3:") && l.contains("wokers")),
            "{text:?}"
        );

        let mut lab = LabConfig {
            provider: Provider::Nodes,
            ..Default::default()
        };
        lab.machines.control_planes = vec!["10.0.0.10".into(), "nope".into()];
        let v = validate(&lab);
        assert!(v.iter().any(|(_, m)| m.contains("\"nope\"")));
        assert!(v.iter().any(|(p, _)| p == "machines.install_disk"));

        let old = LabConfig {
            versions: Versions {
                talos: "v1.8.3".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(validate(&old)
            .iter()
            .any(|(p, m)| p == "versions.talos" && m.contains("1.13")));
    }
}
