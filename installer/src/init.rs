//! `installer init`: a commented lab file holding the defaults.

/// The commented default lab file; parsing it gives `LabConfig::default()` (tested).
pub const TEMPLATE: &str = r#"# sre-lab lab file. Every key is optional: what is written here are the defaults.
# `installer plan` shows what `installer up` would do with it.

# Cluster name: the Talos cluster, the kube context (admin@NAME) and the state directory.
cluster_name: sre-lab

# Where the nodes come from:
#   docker - Talos in Docker containers (`talosctl cluster create docker`; Talos >= v1.13)
#   qemu   - Talos in QEMU/KVM VMs (`talosctl cluster create qemu`; needs root and /dev/kvm)
#   nodes  - existing Talos machines booted from the Talos ISO (VirtualBox, Proxmox, bare
#            metal), given by IP under `machines`
provider: docker

# Node counts and sizes (docker and qemu).
nodes:
  control_planes: 1   # docker makes exactly one
  workers: 2
  cpus: 2.0
  memory_mib: 4096

# Existing machines (provider: nodes).
machines:
  control_planes: []   # e.g. [192.168.56.10]
  workers: []          # e.g. [192.168.56.11, 192.168.56.12]
  install_disk: ""     # e.g. /dev/sda

versions:
  talos: v1.13.9          # 1.13.x: 1.14 moved the settings patched here
  kubernetes: 1.33.12     # Talos v1.13 runs 1.31-1.36, Cilium 1.18 is tested on 1.30-1.33

# Helm chart versions, pinned so that a re-run installs the same thing.
charts:
  cilium: 1.18.12        # 1.19 + kube-proxy replacement broke Talos host networking
  kube_prometheus_stack: 88.5.3
  loki: 18.11.0           # grafana-community/loki
  local_path: 0.0.37      # containeroo/local-path-provisioner
  traefik: 41.3.0
  metallb: 0.16.1

addons:
  cilium: true        # the CNI (Talos is created with `cni: none` and no kube-proxy)
  hubble: true        # Hubble relay, UI and flow metrics
  prometheus: true    # kube-prometheus-stack's Prometheus, remote-write receiver on
  alertmanager: true
  loki: true          # single binary on the filesystem
  grafana: true       # datasources and dashboards provisioned
  local_path: true    # local-path-provisioner, the default StorageClass
  traefik: false
  metallb: false
  agent: true         # the sre-lab agent DaemonSet
  sample_app: true    # a workload `installer validate` uses to prove the agent's paths

# The agent's image. Empty: built from this checkout's Dockerfile and pushed to a registry the
# installer runs for the lab (docker, qemu). Provider `nodes` needs one its machines can pull.
agent_image: ""

# MetalLB's address range; empty = 10.5.0.200-10.5.0.250 in the Talos in Docker subnet.
metallb_pool: ""

# Helm values merged over the rendered ones, per add-on (cilium, kube_prometheus_stack,
# loki, local_path, traefik, metallb). Maps merge key by key; lists and scalars replace.
values: {}
#  kube_prometheus_stack:
#    prometheus:
#      prometheusSpec:
#        retention: 30d
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_the_defaults() {
        let lab = config::lab_config_from_str(TEMPLATE, "sre-lab.yaml", &|_| None)
            .unwrap()
            .value;
        assert_eq!(lab, config::lab::LabConfig::default());
    }
}
