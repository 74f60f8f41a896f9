//! The agent's `flows:` section (issue 10): eBPF flow counting with Hubble's metric names.
//!
//! ```yaml
//! flows:
//!   enabled: true
//!   interfaces: ['lxc*', 'veth*']   # host-side interfaces, matched as they appear
//!   # cgroup: /sys/fs/cgroup        # or the cgroup v2 root instead
//!   interval: 5s
//! ```

use serde::{Deserialize, Serialize};

use crate::units::Duration;

/// Hubble metrics the agent can export.
pub const METRICS: &[&str] = &["flows-processed", "tcp", "port-distribution", "drop", "icmp"];

/// Hubble's label contexts the agent supports for sources and destinations (`workload` is
/// `namespace/workload`, `workload-name` the workload's name alone).
pub const CONTEXTS: &[&str] = &[
    "namespace",
    "pod",
    "pod-name",
    "pod-short",
    "workload",
    "workload-name",
    "app",
    "ip",
    "reserved-identity",
];

/// `flows:` — what to attach to and what to export.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsConfig {
    /// Off by default: attaching needs privileges (`CAP_BPF`, `CAP_NET_ADMIN`, `CAP_PERFMON`).
    pub enabled: bool,
    /// Glob patterns of host-side interfaces to attach to (ingress and egress), including
    /// ones that appear later (default, without `cgroup`: `lxc*` and `veth*`, Cilium's and
    /// other CNIs' pod interfaces). Exclusive with `cgroup`.
    pub interfaces: Vec<String>,
    /// Attach at this cgroup v2 root instead of interfaces.
    pub cgroup: Option<String>,
    /// How often the flow table is read and aggregated.
    pub interval: Duration,
    /// Entries of the kernel's flow table; a new flow finding it full is counted.
    pub max_flows: u32,
    /// Flows without packets for this long are removed from the table.
    pub idle_timeout: Duration,
    /// Which Hubble metrics to export (default: all of [`METRICS`]).
    pub metrics: Vec<String>,
    /// What the `source` label says (Hubble's `sourceContext`): alternatives tried in order,
    /// the first that resolves wins (Hubble's `pod|reserved-identity` is `[pod,
    /// reserved-identity]`; an entry may also hold `|`). Empty: no `source` label.
    pub source_context: Vec<String>,
    /// What the `destination` label says (Hubble's `destinationContext`).
    pub destination_context: Vec<String>,
    /// Most distinct ports in `hubble_port_distribution_total`; more are counted as `other`.
    pub max_ports: usize,
    /// Most label sets per metric; more are dropped and counted.
    pub max_label_sets: usize,
    /// Watch every pod of the cluster (not only this node's) so remote peers get names.
    pub cluster_wide_pods: bool,
    /// API server for the pod lookup (default: in-cluster, or `$KUBECONFIG`; without any,
    /// sources and destinations resolve by IP and reserved identity only).
    pub api_server: Option<String>,
    /// Kubeconfig for the pod lookup.
    pub kubeconfig_file: Option<String>,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interfaces: Vec::new(),
            cgroup: None,
            interval: Duration::from_secs(5),
            max_flows: 65_536,
            idle_timeout: Duration::from_secs(60),
            metrics: METRICS.iter().map(|m| (*m).to_owned()).collect(),
            source_context: vec!["pod".to_owned(), "reserved-identity".to_owned()],
            destination_context: vec!["pod".to_owned(), "reserved-identity".to_owned()],
            max_ports: 100,
            max_label_sets: 10_000,
            cluster_wide_pods: false,
            api_server: None,
            kubeconfig_file: None,
        }
    }
}

impl FlowsConfig {
    /// The interface patterns attached to: the configured ones, else `lxc*` and `veth*`
    /// unless `cgroup` is set.
    pub fn effective_interfaces(&self) -> Vec<String> {
        match (&self.cgroup, self.interfaces.is_empty()) {
            (None, true) => vec!["lxc*".to_owned(), "veth*".to_owned()],
            _ => self.interfaces.clone(),
        }
    }

    /// A context list with `a|b` entries split: the alternatives in order.
    pub fn contexts(list: &[String]) -> Vec<String> {
        list.iter()
            .flat_map(|c| c.split('|'))
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect()
    }
}
