//! Golden tests of everything the installer renders from the lab file: Helm values, Talos
//! patches and the namespaces manifest, for the default lab and for existing machines.
//! `UPDATE_GOLDEN=1 cargo test -p sre-lab-installer --test golden` rewrites them; review the
//! diff like code.

use std::path::PathBuf;

use config::lab::{LabConfig, Provider};
use installer::values::{self, CiliumPhase};

fn check(name: &str, actual: &str) {
    check_docs(name, actual, 1);
}

fn check_docs(name: &str, actual: &str, documents: usize) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{name} differs from the golden file; rendered:\n{actual}"
    );
    // Every golden file is valid YAML with the documents it should have.
    assert_eq!(installer::yaml::documents(actual).unwrap().len(), documents, "{name}");
}

fn nodes_lab() -> LabConfig {
    let mut lab = LabConfig {
        provider: Provider::Nodes,
        ..Default::default()
    };
    lab.machines.control_planes = vec!["192.168.56.10".into(), "192.168.56.11".into(), "192.168.56.12".into()];
    lab.machines.workers = vec!["192.168.56.20".into()];
    lab.machines.install_disk = "/dev/sda".into();
    lab.addons.metallb = true;
    lab.addons.traefik = true;
    lab.metallb_pool = "192.168.56.200-192.168.56.250".into();
    lab.agent_image = "registry.example/sre-lab/agent:0.1.0".into();
    assert!(config::lab::validate(&lab).is_empty());
    lab
}

#[test]
fn default_lab_renders_as_recorded() {
    let lab = LabConfig::default();
    check(
        "cilium-values.yaml",
        &values::render(&lab, "cilium", values::cilium(&lab, CiliumPhase::Network)),
    );
    check(
        "cilium-monitoring-values.yaml",
        &values::render(&lab, "cilium", values::cilium(&lab, CiliumPhase::Monitoring)),
    );
    check(
        "kube-prometheus-stack-values.yaml",
        &values::render(&lab, "kube_prometheus_stack", values::kube_prometheus_stack(&lab)),
    );
    check("loki-values.yaml", &values::render(&lab, "loki", values::loki(&lab)));
    check(
        "local-path-values.yaml",
        &values::render(&lab, "local_path", values::local_path(&lab)),
    );
    // The machine-config patch and the lab registry's RegistryMirrorConfig document.
    check_docs("talos-patch.yaml", &values::talos_patch(&lab), 2);
    check("talos-patch-update.yaml", &values::talos_update_patch(&lab));
    check_docs("namespaces.yaml", &installer::plan::namespaces(&lab), 3);
}

#[test]
fn existing_machines_with_metallb_and_traefik_render_as_recorded() {
    let lab = nodes_lab();
    check(
        "nodes-kube-prometheus-stack-values.yaml",
        &values::render(&lab, "kube_prometheus_stack", values::kube_prometheus_stack(&lab)),
    );
    check(
        "nodes-traefik-values.yaml",
        &values::render(&lab, "traefik", values::traefik(&lab)),
    );
    check_docs("nodes-metallb-pool.yaml", &values::metallb_pool(&lab), 2);
}

#[test]
fn overrides_from_the_lab_file_land_in_the_values() {
    let lab = config::lab_config_from_str(
        "values:\n  loki:\n    singleBinary: {replicas: 1, persistence: {size: 50Gi}}\n    loki: {limits_config: {retention_period: 168h}}\n  cilium:\n    hubble: {ui: {enabled: false}}\n",
        "lab.yaml",
        &|_| None,
    )
    .unwrap()
    .value;
    let loki = installer::yaml::documents(&values::render(&lab, "loki", values::loki(&lab)))
        .unwrap()
        .remove(0);
    assert_eq!(loki["singleBinary"]["persistence"]["size"], "50Gi");
    assert_eq!(loki["singleBinary"]["persistence"]["enabled"], true, "siblings kept");
    assert_eq!(loki["loki"]["limits_config"]["retention_period"], "168h");
    assert_eq!(loki["loki"]["limits_config"]["allow_structured_metadata"], true);
    let cilium = installer::yaml::documents(&values::render(
        &lab,
        "cilium",
        values::cilium(&lab, CiliumPhase::Network),
    ))
    .unwrap()
    .remove(0);
    assert_eq!(cilium["hubble"]["ui"]["enabled"], false);
    assert_eq!(cilium["hubble"]["relay"]["enabled"], true);
}

#[test]
fn the_talos_patch_follows_the_add_ons() {
    let mut lab = LabConfig::default();
    lab.addons.cilium = false;
    lab.addons.prometheus = false;
    lab.addons.local_path = false;
    lab.agent_image = "registry.example/sre-lab/agent:0.1.0".into();
    let patch = installer::yaml::documents(&values::talos_patch(&lab))
        .unwrap()
        .remove(0);
    assert!(
        patch["cluster"]["network"].is_null(),
        "no Cilium: keep Talos's flannel and kube-proxy"
    );
    assert!(patch["machine"].is_null());
    let full = installer::yaml::documents(&values::talos_patch(&LabConfig::default()))
        .unwrap()
        .remove(0);
    let nodes = installer::yaml::documents(&values::talos_patch(&nodes_lab()))
        .unwrap()
        .remove(0);
    assert_eq!(
        nodes["cluster"]["network"]["cni"]["name"], "none",
        "existing machines get Cilium from Helm"
    );
    assert_eq!(full["cluster"]["proxy"]["disabled"], true);
    assert_eq!(
        full["machine"]["kubelet"]["extraMounts"][0]["destination"],
        values::LOCAL_PATH_DIR
    );
}
