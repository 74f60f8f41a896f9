//! The installer binary end to end against fake tools on PATH and a fake Kubernetes API:
//! the exact command sequences per provider, resuming after a failure, `down`, redaction,
//! file modes, and the read-only commands.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{stderr, stdout, Sandbox};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

const S: &str = "$T/state/sre-lab";

/// What `up` runs first: the version checks of the tools it needs.
fn preflight(docker: bool) -> Vec<String> {
    let mut v = vec![
        "talosctl version --client --short".to_owned(),
        "helm version --short".to_owned(),
    ];
    if docker {
        v.push("docker --version".to_owned());
    }
    v
}

const CLUSTER_PROBE: &str = "docker container inspect --format {{.Name}} sre-lab-controlplane-1";
const CILIUM_PROBE: &str =
    "helm status cilium --namespace kube-system --output json --kubeconfig $T/state/sre-lab/kubeconfig";
const REGISTRY_PROBE: &str = "docker container inspect --format {{.Name}} sre-lab-registry";

fn docker_up_commands() -> Vec<String> {
    let mut v = preflight(true);
    v.extend([
        CLUSTER_PROBE.to_owned(),
        format!("talosctl cluster create docker --name sre-lab --state {S}/clusters --talosconfig-destination {S}/talosconfig --image ghcr.io/siderolabs/talos:v1.13.9 --workers 2 --cpus-controlplanes 2.0 --cpus-workers 2.0 --memory-controlplanes 4096MiB --memory-workers 4096MiB --kubernetes-version 1.33.12 --config-patch @{S}/rendered/talos-patch.yaml"),
        CILIUM_PROBE.to_owned(),
        format!("helm upgrade --install cilium cilium --repo https://helm.cilium.io --version 1.18.12 --namespace kube-system --create-namespace --values {S}/rendered/cilium-values.yaml --wait --timeout 10m --kubeconfig {S}/kubeconfig"),
        format!("talosctl --talosconfig {S}/talosconfig --nodes 10.5.0.2 health --wait-timeout 10m"),
        REGISTRY_PROBE.to_owned(),
        "docker run --detach --restart=always --name sre-lab-registry --publish 127.0.0.1:5005:5000 registry:2.8.3".to_owned(),
        "docker network connect --ip 10.5.0.254 sre-lab sre-lab-registry".to_owned(),
        format!("docker build --file {ctx}/Dockerfile --tag 127.0.0.1:5005/sre-lab/agent:0.1.0 {ctx}", ctx = checkout()),
        "docker push 127.0.0.1:5005/sre-lab/agent:0.1.0".to_owned(),
        format!("helm upgrade --install local-path-provisioner local-path-provisioner --repo https://charts.containeroo.ch --version 0.0.37 --namespace local-path-storage --create-namespace --values {S}/rendered/local-path-values.yaml --wait --timeout 10m --kubeconfig {S}/kubeconfig"),
        format!("helm upgrade --install kube-prometheus-stack kube-prometheus-stack --repo https://prometheus-community.github.io/helm-charts --version 88.5.3 --namespace monitoring --create-namespace --values {S}/rendered/kube-prometheus-stack-values.yaml --wait --timeout 10m --kubeconfig {S}/kubeconfig"),
        format!("helm upgrade --install cilium cilium --repo https://helm.cilium.io --version 1.18.12 --namespace kube-system --create-namespace --values {S}/rendered/cilium-helm-values.yaml --wait --timeout 10m --kubeconfig {S}/kubeconfig"),
        format!("helm upgrade --install loki loki --repo https://grafana-community.github.io/helm-charts --version 18.11.0 --namespace monitoring --create-namespace --values {S}/rendered/loki-values.yaml --wait --timeout 10m --kubeconfig {S}/kubeconfig"),
    ]);
    v
}

/// The agent image's build and push.
fn image_build() -> Vec<String> {
    vec![
        format!(
            "docker build --file {ctx}/Dockerfile --tag 127.0.0.1:5005/sre-lab/agent:0.1.0 {ctx}",
            ctx = checkout()
        ),
        "docker push 127.0.0.1:5005/sre-lab/agent:0.1.0".to_owned(),
    ]
}

/// The checkout the agent image is built from.
fn checkout() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn docker_up_runs_the_exact_sequence_and_applies_through_the_api() {
    let sb = Sandbox::new();
    let out = sb.run(&["up"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(sb.take_log(), docker_up_commands());

    // kube-rs did the rest: namespaces, the Grafana Secret, Cilium's ServiceMonitor and
    // dashboard (not its other objects), the agent and the sample app, each awaited.
    let reqs = sb.api.requests();
    let patches: Vec<&String> = reqs.iter().filter(|r| r.starts_with("PATCH")).collect();
    for want in [
        "PATCH /api/v1/namespaces/monitoring",
        "PATCH /api/v1/namespaces/sre-lab-sample",
        "PATCH /api/v1/namespaces/monitoring/secrets/grafana-admin",
        "PATCH /apis/rbac.authorization.k8s.io/v1/clusterroles/sre-lab-agent",
        "PATCH /apis/apps/v1/namespaces/monitoring/daemonsets/sre-lab-agent",
        "PATCH /apis/monitoring.coreos.com/v1/namespaces/monitoring/servicemonitors/sre-lab-agent",
        "PATCH /apps/v1/namespaces/sre-lab-sample/deployments/sample-app",
    ] {
        let want = want.replace("PATCH /apps/", "PATCH /apis/apps/");
        assert!(patches.iter().any(|p| **p == want), "{want} not in {patches:#?}");
    }
    let ds = sb.api.objects.lock().unwrap()["/apis/apps/v1/namespaces/monitoring/daemonsets/sre-lab-agent"].clone();
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"],
        "10.5.0.254:5000/sre-lab/agent@sha256:4c1b8e3a0f0d9a6b5e2c7d1f8a9b0c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3"
    );
    let env = ds["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        env.contains(&serde_json::json!({"name": "CLUSTER_NAME", "value": "sre-lab"})),
        "{env:?}"
    );
    assert!(
        env.iter()
            .any(|e| e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "{env:?}"
    );
    // The nodes pull from the lab registry over plain HTTP, configured with Talos's
    // RegistryMirrorConfig document (machine.registries.mirrors is deprecated).
    let talos_patch = std::fs::read_to_string(sb.state("sre-lab").join("rendered/talos-patch.yaml")).unwrap();
    assert!(
        talos_patch.contains(
            "---\napiVersion: v1alpha1\nendpoints:\n  - url: http://10.5.0.254:5000\nkind: RegistryMirrorConfig\nname: \"10.5.0.254:5000\"\n"
        ) && !talos_patch.contains("registries:"),
        "{talos_patch}"
    );
    // Waited with a watcher: a list filtered to the object.
    assert!(
        reqs.iter()
            .any(|r| r == "GET /apis/apps/v1/namespaces/monitoring/daemonsets"),
        "{reqs:#?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r == "GET /apis/apps/v1/namespaces/sre-lab-sample/deployments"),
        "{reqs:#?}"
    );

    // The nodes were made with no CNI, Cilium then installed by Helm (above, between the
    // create and the health check): no manifest served, no URL in the patch.
    let state = sb.state("sre-lab");
    let patch = std::fs::read_to_string(state.join("rendered/talos-patch.yaml")).unwrap();
    assert!(patch.contains("    cni:\n      name: none\n"), "{patch}");
    assert!(
        !patch.contains("cni:\n      name: custom") && !patch.contains("cilium.yaml"),
        "{patch}"
    );
    assert!(!state.join("rendered/cilium.yaml").exists());

    // Secrets stay private; the password is never printed by `up`.
    for f in [
        "kubeconfig",
        "talosconfig",
        "grafana-admin-password",
        "state.json",
        "rendered/cilium-values.yaml",
    ] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    let password = std::fs::read_to_string(state.join("grafana-admin-password")).unwrap();
    assert_eq!(password.len(), 24);
    let shown = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!shown.contains(&password), "{shown}");
    // Plain progress: timestamped lines with step numbers and timings.
    let re =
        regex::Regex::new(r"(?m)^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[15/15\] Deploy the sample app .* done in \d+\.\ds$")
            .unwrap();
    assert!(re.is_match(&stderr(&out)), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("installer port-forward grafana"),
        "{}",
        stdout(&out)
    );

    // `password grafana` prints it when asked (read back from the Secret through the API).
    let pw = sb.run(&["password", "grafana"], &[]);
    assert!(pw.status.success(), "{}", stderr(&pw));
    assert_eq!(stdout(&pw).trim(), password);

    // A second `up` finds everything done: the probes run, and the agent image is built
    // again from the checkout as it is (docker's cache makes that quick).
    sb.api.clear();
    let again = sb.run(&["up"], &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    let mut expected = preflight(true);
    expected.extend([
        CLUSTER_PROBE.to_owned(),
        CILIUM_PROBE.to_owned(),
        REGISTRY_PROBE.to_owned(),
    ]);
    expected.extend(image_build());
    assert_eq!(sb.take_log(), expected);
    assert!(stderr(&again).contains("skipped"), "{}", stderr(&again));
    // A rebuilt image (another digest) rolls the DaemonSet to it on the next `up`.
    let digest = "sha256:".to_owned() + &"7".repeat(64);
    let rebuilt = sb.run(&["up"], &[("FAKE_DIGEST", &digest[7..])]);
    assert!(rebuilt.status.success(), "{}", stderr(&rebuilt));
    let ds = sb.api.objects.lock().unwrap()["/apis/apps/v1/namespaces/monitoring/daemonsets/sre-lab-agent"].clone();
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("10.5.0.254:5000/sre-lab/agent@{digest}")
    );
}

#[test]
fn a_failed_step_is_reported_redacted_and_up_resumes_there() {
    let sb = Sandbox::new();
    let out = sb.run(&["up"], &[("FAKE_FAIL", "helm upgrade --install loki")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("[13/15] Install Loki 18.11.0 (single binary, filesystem) FAILED"),
        "{err}"
    );
    assert!(err.contains("failed with exit code 1"), "{err}");
    assert!(err.contains("fake helm: failing on demand"), "{err}");
    assert!(
        err.contains("token: <redacted>") && !err.contains("fake-secret-token"),
        "{err}"
    );
    assert!(err.contains("Step \"loki\""), "{err}");
    assert!(err.contains("helm status loki -n monitoring"), "{err}");
    let first = sb.take_log();
    assert_eq!(first, docker_up_commands(), "stopped at loki");
    assert!(
        !sb.api.requests().iter().any(|r| r.contains("sre-lab-agent")),
        "nothing after the failure ran"
    );

    // Re-run: the cluster is found, finished steps are skipped, loki and what follows run.
    sb.api.clear();
    let out = sb.run(&["up"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut expected = preflight(true);
    expected.extend([
        CLUSTER_PROBE.to_owned(),
        CILIUM_PROBE.to_owned(),
        REGISTRY_PROBE.to_owned(),
    ]);
    expected.extend(image_build());
    expected.push(docker_up_commands().last().unwrap().clone());
    assert_eq!(sb.take_log(), expected);
    let reqs = sb.api.requests();
    assert!(
        reqs.iter()
            .any(|r| r == "PATCH /apis/apps/v1/namespaces/monitoring/daemonsets/sre-lab-agent"),
        "{reqs:#?}"
    );
    assert!(
        !reqs.iter().any(|r| r.contains("/secrets/grafana-admin")),
        "done steps are not redone: {reqs:#?}"
    );
}

#[test]
fn opening_etcds_metrics_listener_on_running_control_planes_asks_for_a_reboot() {
    // Made without Prometheus: etcd has no metrics listener.
    let sb = Sandbox::new();
    sb.lab_file("addons:\n  prometheus: false\n");
    assert!(sb.run(&["up"], &[]).status.success());
    // Prometheus on: the patch sets the listener, which etcd takes at its next boot only; `up`
    // says so, naming the control planes.
    sb.lab_file("addons:\n  prometheus: true\n");
    let out = sb.run(&["up"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        said.contains("etcd's metrics listener changed: running control planes use it after a reboot")
            && said.contains("(10.5.0.2)"),
        "{said}"
    );
    // An `up` that changes nothing of it says nothing; nor does Prometheus off and on again
    // (a merged patch never took the listener away). A cluster made anew starts from its own
    // creation patch: made without the listener, turning it on asks for a reboot again.
    for lab in [
        "addons:\n  prometheus: true\n",
        "addons:\n  prometheus: false\n",
        "addons:\n  prometheus: true\n",
    ] {
        sb.lab_file(lab);
        let again = sb.run(&["up"], &[]);
        assert!(again.status.success(), "{}", stderr(&again));
        let said = format!("{}{}", stdout(&again), stderr(&again));
        assert!(!said.contains("etcd's metrics listener"), "{lab}: {said}");
    }
    sb.lab_file("addons:\n  prometheus: false\n");
    std::fs::remove_file(sb.dir.path().join("fake/cluster")).unwrap();
    std::fs::remove_file(sb.state("sre-lab").join("kubeconfig")).unwrap();
    let remade = sb.run(&["up"], &[]);
    assert!(remade.status.success(), "{}", stderr(&remade));
    assert!(sb.take_log().iter().any(|l| l.starts_with("talosctl cluster create")));
    sb.lab_file("addons:\n  prometheus: true\n");
    let on = sb.run(&["up"], &[]);
    let said = format!("{}{}", stdout(&on), stderr(&on));
    assert!(said.contains("etcd's metrics listener changed"), "{said}");
}

/// The Cilium installs and upgrades in a command log.
fn cilium_installs(log: &[String]) -> Vec<&String> {
    log.iter()
        .filter(|l| l.starts_with("helm upgrade --install cilium"))
        .collect()
}

#[test]
fn a_cilium_change_on_a_running_lab_is_one_upgrade_to_the_full_values() {
    let sb = Sandbox::new();
    assert!(sb.run(&["up"], &[]).status.success());
    sb.take_log();
    sb.lab_file("values:\n  cilium:\n    hubble:\n      ui:\n        enabled: false\n");
    let out = sb.run(&["up"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = sb.take_log();
    let cilium = cilium_installs(&log);
    // The release exists (`helm status`), so the network-only bootstrap values are not applied
    // on the way: one upgrade, with the ServiceMonitors and dashboards.
    assert!(log.contains(&CILIUM_PROBE.to_owned()), "{log:#?}");
    assert_eq!(cilium.len(), 1, "{log:#?}");
    assert!(cilium[0].contains("rendered/cilium-helm-values.yaml"), "{log:#?}");

    // A release left failed (an interrupted install) is installed again, and the later steps
    // run again after it, so the full values come back.
    let out = sb.run(&["up"], &[("FAKE_RELEASE_STATUS", "failed")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = sb.take_log();
    let cilium = cilium_installs(&log);
    assert_eq!(cilium.len(), 2, "{log:#?}");
    assert!(cilium[0].contains("rendered/cilium-values.yaml"), "{log:#?}");
    assert!(cilium[1].contains("rendered/cilium-helm-values.yaml"), "{log:#?}");
}

#[test]
fn a_changed_lab_file_reruns_only_the_changed_steps() {
    let sb = Sandbox::new();
    assert!(sb.run(&["up"], &[]).status.success());
    sb.take_log();
    sb.lab_file("values:\n  loki:\n    singleBinary:\n      persistence:\n        size: 20Gi\n");
    let out = sb.run(&["up"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = sb.take_log();
    let mut expected = preflight(true);
    expected.extend([
        CLUSTER_PROBE.to_owned(),
        CILIUM_PROBE.to_owned(),
        REGISTRY_PROBE.to_owned(),
    ]);
    expected.extend(image_build());
    assert_eq!(log[..8], expected[..], "{log:#?}");
    assert_eq!(log.len(), 9, "only Loki runs again: {log:#?}");
    assert!(log[8].starts_with("helm upgrade --install loki"), "{log:#?}");
    let values = std::fs::read_to_string(sb.state("sre-lab").join("rendered/loki-values.yaml")).unwrap();
    assert!(values.contains("size: 20Gi"), "{values}");

    // A change to what the Talos patch holds reaches the existing nodes (here: without
    // Prometheus, the patch leaves out the control plane's metrics listeners).
    sb.lab_file(
        "values:\n  loki:\n    singleBinary:\n      persistence:\n        size: 20Gi\naddons:\n  prometheus: false\n",
    );
    let out = sb.run(&["up"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = sb.take_log();
    assert!(
        log.contains(&format!("talosctl --talosconfig {S}/talosconfig --nodes 10.5.0.2,10.5.0.3,10.5.0.4 patch machineconfig --patch @{S}/rendered/talos-patch-update.yaml")),
        "{log:#?}"
    );
    // A merged patch removes nothing: etcd keeps the listener it has, and no reboot is asked for.
    let said = format!("{}{}", stdout(&out), stderr(&out));
    assert!(!said.contains("etcd's metrics listener"), "{said}");
    assert!(
        !log.iter().any(|l| l.starts_with("talosctl cluster create")),
        "the cluster is reused: {log:#?}"
    );
    let update = std::fs::read_to_string(sb.state("sre-lab").join("rendered/talos-patch-update.yaml")).unwrap();
    assert!(
        !update.contains("registries") && !update.contains("extraMounts") && !update.contains("cni"),
        "no lists: {update}"
    );
    assert!(
        !update.contains("listen-metrics-urls") && update.contains("proxy"),
        "{update}"
    );
}

#[test]
fn nodes_provider_generates_applies_bootstraps_once() {
    let sb = Sandbox::new();
    sb.lab_file(
        "cluster_name: metal\nprovider: nodes\nmachines:\n  control_planes: [192.168.56.10]\n  workers: [192.168.56.11]\n  install_disk: /dev/vda\naddons:\n  sample_app: false\n  agent: false\n",
    );
    let out = sb.run(&["up", "--plain"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = "$T/state/metal";
    let t = format!("talosctl --talosconfig {s}/talosconfig");
    assert_eq!(
        sb.take_log(),
                [
            preflight(false),
            vec![
                        format!("talosctl gen secrets --output-file {s}/secrets.yaml"),
            format!("talosctl gen config metal https://192.168.56.10:6443 --with-secrets {s}/secrets.yaml --install-disk /dev/vda --talos-version v1.13.9 --kubernetes-version 1.33.12 --config-patch @{s}/rendered/talos-patch.yaml --output {s}/talos --force"),
            format!("{t} config endpoint 192.168.56.10"),
            format!("{t} config node 192.168.56.10"),
            format!("{t} --nodes 192.168.56.10 --endpoints 192.168.56.10 version"),
            format!("talosctl apply-config --insecure --nodes 192.168.56.10 --file {s}/talos/controlplane.yaml"),
            format!("{t} --nodes 192.168.56.11 --endpoints 192.168.56.11 version"),
            format!("talosctl apply-config --insecure --nodes 192.168.56.11 --file {s}/talos/worker.yaml"),
            format!("{t} --nodes 192.168.56.10 --endpoints 192.168.56.10 etcd status"),
            format!("{t} --nodes 192.168.56.10 --endpoints 192.168.56.10 bootstrap"),
            format!("{t} --nodes 192.168.56.10 --endpoints 192.168.56.10 kubeconfig --merge=false --force {s}/kubeconfig"),
            format!("helm status cilium --namespace kube-system --output json --kubeconfig {s}/kubeconfig"),
            format!("helm upgrade --install cilium cilium --repo https://helm.cilium.io --version 1.18.12 --namespace kube-system --create-namespace --values {s}/rendered/cilium-values.yaml --wait --timeout 10m --kubeconfig {s}/kubeconfig"),
            format!("{t} --nodes 192.168.56.10 --endpoints 192.168.56.10 health --wait-timeout 10m"),
            format!("helm upgrade --install local-path-provisioner local-path-provisioner --repo https://charts.containeroo.ch --version 0.0.37 --namespace local-path-storage --create-namespace --values {s}/rendered/local-path-values.yaml --wait --timeout 10m --kubeconfig {s}/kubeconfig"),
            format!("helm upgrade --install kube-prometheus-stack kube-prometheus-stack --repo https://prometheus-community.github.io/helm-charts --version 88.5.3 --namespace monitoring --create-namespace --values {s}/rendered/kube-prometheus-stack-values.yaml --wait --timeout 10m --kubeconfig {s}/kubeconfig"),
            format!("helm upgrade --install cilium cilium --repo https://helm.cilium.io --version 1.18.12 --namespace kube-system --create-namespace --values {s}/rendered/cilium-helm-values.yaml --wait --timeout 10m --kubeconfig {s}/kubeconfig"),
            format!("helm upgrade --install loki loki --repo https://grafana-community.github.io/helm-charts --version 18.11.0 --namespace monitoring --create-namespace --values {s}/rendered/loki-values.yaml --wait --timeout 10m --kubeconfig {s}/kubeconfig"),
            ],
        ]
        .concat()
    );
    let state = sb.state("metal");
    assert_eq!(mode(&state.join("secrets.yaml")), 0o600);
    assert_eq!(mode(&state.join("talos/controlplane.yaml")), 0o600);
    let kps = std::fs::read_to_string(state.join("rendered/kube-prometheus-stack-values.yaml")).unwrap();
    assert!(
        kps.contains("kubeEtcd:\n  enabled: true\n  endpoints:\n    - \"192.168.56.10\"\n"),
        "etcd scraped on the control plane: {kps}"
    );

    // Again, with the state file gone: the secrets bundle is kept, configured nodes and the
    // bootstrapped etcd are detected, nothing is applied or bootstrapped twice.
    std::fs::remove_file(state.join("state.json")).unwrap();
    let out = sb.run(&["up", "--plain"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = sb.take_log();
    assert!(
        !log.iter()
            .any(|l| l.contains("apply-config") || l.ends_with(" bootstrap") || l.contains("gen secrets")),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l.ends_with("etcd status")), "{log:#?}");

    // A changed lab file reaches the running machines as a machine-config patch (regenerating
    // their configs is not applying it).
    sb.lab_file(
        "cluster_name: metal\nprovider: nodes\nmachines:\n  control_planes: [192.168.56.10]\n  workers: [192.168.56.11]\n  install_disk: /dev/vda\naddons:\n  sample_app: false\n  agent: false\n  local_path: false\n",
    );
    let out = sb.run(&["up", "--plain"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = sb.take_log();
    assert!(
        log.contains(&format!(
            "{t} --nodes 192.168.56.10,192.168.56.11 patch machineconfig --patch @{s}/rendered/talos-patch-update.yaml"
        )),
        "{log:#?}"
    );
    assert!(!log.iter().any(|l| l.contains("apply-config")), "{log:#?}");
}

#[test]
fn bootstrap_is_retried_while_the_node_reboots() {
    let sb = Sandbox::new();
    sb.lab_file("provider: nodes\nmachines:\n  control_planes: [10.9.0.10]\n  install_disk: /dev/sda\naddons: {cilium: false, prometheus: false, grafana: false, alertmanager: false, loki: false, local_path: false, agent: false, sample_app: false, hubble: false}\n");
    // Fails while a marker exists; the fake tool removes nothing, so make the marker vanish
    // after the first attempt with a wrapper: here, fail exactly the first bootstrap.
    let bin = sb.dir.path().join("bin");
    let real = bin.join("talosctl");
    let wrapped = bin.join("talosctl.real");
    std::fs::rename(&real, &wrapped).unwrap();
    std::fs::write(
        &real,
        format!(
            "#!/bin/bash\nif [[ \"$*\" == *\" bootstrap\" ]] && [ ! -f \"$FAKE_STATE/tried\" ]; then touch \"$FAKE_STATE/tried\"; echo \"talosctl $*\" >> \"$FAKE_LOG\"; echo 'rpc error: connection refused' >&2; exit 1; fi\nexec -a talosctl {} \"$@\"\n",
            wrapped.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = sb.run(&["up"], &[]);
    let log = sb.take_log();
    assert!(out.status.success(), "{}\n{log:#?}", stderr(&out));
    assert_eq!(log.iter().filter(|l| l.ends_with(" bootstrap")).count(), 2, "{log:#?}");
    assert!(stderr(&out).contains("retrying"), "{}", stderr(&out));
}

#[test]
fn down_destroys_the_cluster_and_removes_state_and_merged_contexts() {
    let sb = Sandbox::new();
    assert!(sb.run(&["up"], &[]).status.success());
    sb.take_log();
    let user_kc = sb.dir.path().join("home/.kube/config");
    std::fs::create_dir_all(user_kc.parent().unwrap()).unwrap();
    std::fs::write(&user_kc, "apiVersion: v1\nkind: Config\nclusters:\n- name: prod\n  cluster: {server: 'https://prod:6443'}\nusers:\n- name: prod\n  user: {token: abcdefghijkl}\ncontexts:\n- name: prod\n  context: {cluster: prod, user: prod}\ncurrent-context: prod\n").unwrap();
    let m = sb.run(&["kubeconfig", "--merge"], &[]);
    assert!(m.status.success(), "{}", stderr(&m));
    assert!(std::fs::read_to_string(&user_kc)
        .unwrap()
        .contains("current-context: admin@sre-lab"));

    let plan = sb.run(&["down", "--dry-run"], &[]);
    assert!(plan.status.success());
    assert!(sb.take_log().is_empty(), "dry run runs nothing");

    let out = sb.run(&["down"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        sb.take_log(),
        vec![
            REGISTRY_PROBE.to_owned(),
            "docker rm --force --volumes sre-lab-registry".to_owned(),
            format!("talosctl cluster destroy --name sre-lab --state {S}/clusters"),
        ]
    );
    assert!(!sb.state("sre-lab").exists());
    let kc = std::fs::read_to_string(&user_kc).unwrap();
    assert!(!kc.contains("admin@sre-lab") && kc.contains("name: prod"), "{kc}");
}

#[test]
fn down_keep_config_keeps_kubeconfig_and_talosconfig() {
    let sb = Sandbox::new();
    assert!(sb.run(&["up"], &[]).status.success());
    let out = sb.run(&["down", "--keep-config"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = sb.state("sre-lab");
    assert!(st.join("kubeconfig").exists() && st.join("talosconfig").exists());
    assert!(
        !st.join("state.json").exists() && !st.join("rendered").exists() && !st.join("grafana-admin-password").exists()
    );
    // A later `up` makes a new cluster and runs everything again.
    sb.take_log();
    assert!(sb.run(&["up"], &[]).status.success());
    let log = sb.take_log();
    assert!(
        log.iter().any(|l| l.starts_with("talosctl cluster create docker")),
        "{log:#?}"
    );
}

#[test]
fn merged_contexts_survive_keep_config_and_go_with_the_last_down() {
    let sb = Sandbox::new();
    assert!(sb.run(&["up"], &[]).status.success());
    // A shared directory keeps its mode; the file is written 0600.
    let shared = sb.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = sb.run(&["kubeconfig", "--merge", "../shared/config"], &[]);
    assert!(m.status.success(), "{}", stderr(&m));
    assert_eq!(mode(&shared), 0o755);
    assert_eq!(mode(&shared.join("config")), 0o600);

    assert!(sb.run(&["down", "--keep-config"], &[]).status.success());
    assert!(
        std::fs::read_to_string(shared.join("config"))
            .unwrap()
            .contains("admin@sre-lab"),
        "kept"
    );
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.state("sre-lab").join("state.json")).unwrap()).unwrap();
    assert_eq!(
        st["merged_contexts"][0]["file"],
        shared.join("config").display().to_string(),
        "recorded absolute"
    );

    // The last `down` (from another directory) removes it.
    let out = sb.run(&["--config", "/dev/null", "down"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!std::fs::read_to_string(shared.join("config"))
        .unwrap()
        .contains("admin@sre-lab"));
}

#[test]
fn qemu_with_traefik_and_metallb_runs_their_steps_in_order() {
    let sb = Sandbox::new();
    sb.lab_file("provider: qemu\nnodes:\n  control_planes: 3\n  workers: 1\n  memory_mib: 2048\naddons:\n  traefik: true\n  metallb: true\n  sample_app: false\n");
    // MetalLB's admission webhook does not answer yet right after its chart: the pool's first
    // two applies fail as they do then (no endpoint; the CA not injected yet), and the
    // installer applies it again.
    let pool = "/apis/metallb.io/v1beta1/namespaces/metallb-system/ipaddresspools/sre-lab";
    common::fail_patches(pool, 2);
    let out = sb.run(&["up", "--plain"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = sb.take_log();
    assert_eq!(
        log[..3],
        preflight(true)[..],
        "qemu builds the agent image with docker too"
    );
    assert!(log.contains(&format!("talosctl cluster create qemu --name sre-lab --state {S}/clusters --talosconfig-destination {S}/talosconfig --controlplanes 3 --talos-version v1.13.9 --workers 1 --cpus-controlplanes 2.0 --cpus-workers 2.0 --memory-controlplanes 2048MiB --memory-workers 2048MiB --kubernetes-version 1.33.12 --config-patch @{S}/rendered/talos-patch.yaml")), "{log:#?}");
    assert!(
        !log.iter()
            .any(|l| l.contains("docker container inspect --format {{.Name}} sre-lab-controlplane-1")),
        "qemu probes its state directory: {log:#?}"
    );
    let pos = |prefix: &str| {
        log.iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} in {log:#?}"))
    };
    assert!(pos("helm upgrade --install loki") < pos("helm upgrade --install metallb metallb --repo https://metallb.github.io/metallb --version 0.16.1 --namespace metallb-system"));
    assert!(pos("helm upgrade --install metallb") < pos("helm upgrade --install traefik traefik --repo https://traefik.github.io/charts --version 41.3.0 --namespace traefik"));
    // etcd of all three control planes is scraped.
    let kps = std::fs::read_to_string(sb.state("sre-lab").join("rendered/kube-prometheus-stack-values.yaml")).unwrap();
    assert!(
        kps.contains("    - \"10.5.0.2\"\n    - \"10.5.0.3\"\n    - \"10.5.0.4\"\n"),
        "{kps}"
    );
    // MetalLB's pool went to the API after its chart; Traefik is a LoadBalancer with it.
    let reqs = sb.api.requests();
    assert_eq!(
        reqs.iter().filter(|r| **r == format!("PATCH {pool}")).count(),
        3,
        "two refused by the webhook, then applied: {reqs:#?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r == "PATCH /apis/metallb.io/v1beta1/namespaces/metallb-system/l2advertisements/sre-lab"),
        "{reqs:#?}"
    );
    assert!(
        reqs.iter().any(|r| r == "PATCH /api/v1/namespaces/metallb-system"),
        "{reqs:#?}"
    );
    let traefik = std::fs::read_to_string(sb.state("sre-lab").join("rendered/traefik-values.yaml")).unwrap();
    assert!(traefik.contains("type: LoadBalancer"), "{traefik}");
    // A re-run finds the QEMU cluster by its state directory... which the fake does not make:
    // the probe is a path, shown in the plan.
    let plan = stdout(&sb.run(&["plan"], &[]));
    assert!(
        plan.contains(&format!(
            "skip if {}/state/sre-lab/clusters/sre-lab exists",
            sb.dir.path().display()
        )),
        "{plan}"
    );
}

#[test]
fn down_on_existing_machines_wants_confirmation() {
    let sb = Sandbox::new();
    sb.lab_file(
        "provider: nodes\nagent_image: registry.example/sre-lab/agent:0.1.0\nmachines:\n  control_planes: [10.0.0.10]\n  workers: [10.0.0.11]\n  install_disk: /dev/sda\n",
    );
    let out = sb.run(&["down"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--yes"), "{}", stderr(&out));
    assert!(sb.take_log().is_empty());
    let out = sb.run(&["down", "--yes"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = sb.take_log();
    assert_eq!(log.len(), 2, "{log:#?}");
    assert!(
        log[0].contains("--nodes 10.0.0.11 --endpoints 10.0.0.11 reset --graceful=false --reboot"),
        "{log:#?}"
    );
}

#[test]
fn plan_and_dry_run_need_no_tools_and_run_nothing() {
    let sb = Sandbox::new();
    for args in [&["plan"][..], &["up", "--dry-run"][..]] {
        let out = sb.run(args, &[("PATH", "/nonexistent")]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("[1/15] Create Talos v1.13.9 cluster"), "{text}");
        assert!(text.contains("[4/15] Install Cilium 1.18.12 with Hubble"), "{text}");
        assert!(
            text.contains(
                "$ KUBECONFIG=$T/state/sre-lab/kubeconfig talosctl cluster create docker"
                    .replace("$T", &sb.dir.path().display().to_string())
                    .as_str()
            ),
            "{text}"
        );
        assert!(
            text.contains("server-side apply sre-lab agent: ServiceAccount/sre-lab-agent"),
            "{text}"
        );
    }
    let json = sb.run(&["plan", "-o", "json"], &[("PATH", "/nonexistent")]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let ids: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "cluster",
            "machine-config",
            "kubeconfig",
            "cilium-bootstrap",
            "health",
            "namespaces",
            "registry",
            "agent-image",
            "local-path",
            "grafana-password",
            "kube-prometheus-stack",
            "cilium",
            "loki",
            "agent",
            "sample-app"
        ]
    );
    assert!(!sb.state("sre-lab").exists(), "plan writes nothing");
}

#[test]
fn up_without_tools_says_what_is_missing() {
    let sb = Sandbox::new();
    let out = sb.run(&["up"], &[("PATH", "/usr/bin:/bin")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        [
            "talosctl: not found on PATH",
            "helm: not found on PATH",
            "docker: not found on PATH",
            "fix: install it: https://helm.sh"
        ]
        .iter()
        .all(|w| stderr(&out).contains(w)),
        "{}",
        stderr(&out)
    );
}

#[test]
fn up_refuses_a_talosctl_of_another_minor_than_the_image() {
    let sb = Sandbox::new();
    let out = sb.run(&["up"], &[("FAKE_TALOSCTL_VERSION", "v1.14.1")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("talosctl 1.14.1 drives Talos v1.13.9; their minor versions must match"),
        "{err}"
    );
    assert_eq!(sb.take_log(), preflight(true), "nothing ran after the checks");
    let old_helm = sb.run(&["up"], &[("FAKE_HELM_VERSION", "v3.16.2")]);
    assert!(
        stderr(&old_helm).contains("3.16.2 at") && stderr(&old_helm).contains("older than 3.17"),
        "{}",
        stderr(&old_helm)
    );
}

#[test]
fn bad_lab_files_are_reported_with_positions() {
    let sb = Sandbox::new();
    sb.lab_file(
        "provider: docker\nnodes:\n  control_planes: 3\nversions:\n  talos: v1.12.4\naddons:\n  grafana: yes please\n",
    );
    let out = sb.run(&["plan"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("sre-lab.yaml:7:12:"), "{err}");
    std::fs::write(
        sb.dir.path().join("work/other.yaml"),
        "nodes:\n  control_planes: 3\nversions:\n  talos: v1.12.4\n",
    )
    .unwrap();
    let out = sb.run(&["--config", "other.yaml", "plan"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains(
            "other.yaml:2:19: nodes.control_planes: `talosctl cluster create docker` makes exactly one control plane"
        ),
        "{err}"
    );
    assert!(
        err.contains("other.yaml:4:10: versions.talos: Talos v1.12.4 in Docker hangs"),
        "{err}"
    );
}

#[test]
fn init_writes_the_commented_defaults() {
    let sb = Sandbox::new();
    let out = sb.run(&["init"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(sb.dir.path().join("work/sre-lab.yaml")).unwrap();
    assert!(text.contains("# Where the nodes come from"));
    let again = sb.run(&["init"], &[]);
    assert_eq!(again.status.code(), Some(1), "does not overwrite");
    // The written file drives the plan like the built-in defaults do.
    let a = sb.run(&["plan", "-o", "json"], &[]);
    std::fs::remove_file(sb.dir.path().join("work/sre-lab.yaml")).unwrap();
    let b = sb.run(&["plan", "-o", "json"], &[]);
    let (mut a, mut b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&a.stdout).unwrap(),
        serde_json::from_slice(&b.stdout).unwrap(),
    );
    a["source"] = serde_json::Value::Null;
    b["source"] = serde_json::Value::Null;
    assert_eq!(a, b);
}

#[test]
fn status_reports_steps_nodes_and_workloads() {
    let sb = Sandbox::new();
    let before = sb.run(&["status"], &[]);
    assert_eq!(before.status.code(), Some(1));
    assert!(stdout(&before).contains("0/15 `up` steps done"), "{}", stdout(&before));
    assert!(sb.run(&["up"], &[]).status.success());
    sb.api.insert(
        "/api/v1/nodes/sre-lab-controlplane-1",
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "sre-lab-controlplane-1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}], "nodeInfo": {"kubeletVersion": "v1.33.12", "architecture": "amd64", "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "", "kubeProxyVersion": "", "machineID": "", "operatingSystem": "linux", "osImage": "Talos", "systemUUID": ""}}}),
    );
    let out = sb.run(&["status", "-o", "json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
    assert_eq!(v["healthy"], true, "{v:#}");
    assert_eq!(v["live"]["nodes"][0]["version"], "v1.33.12");
    let names: Vec<&str> = v["live"]["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"DaemonSet monitoring/sre-lab-agent"), "{names:?}");
    assert!(names.contains(&"Deployment sre-lab-sample/sample-app"), "{names:?}");
    assert!(v["steps"].as_array().unwrap().iter().all(|s| s["done"] == true));
}

#[test]
fn info_and_kubeconfig_print_what_scripts_need() {
    let sb = Sandbox::new();
    let out = sb.run(&["info", "-o", "json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["versions"]["talos"], "v1.13.9");
    assert_eq!(v["versions"]["charts"]["kube_prometheus_stack"], "88.5.3");
    let names: Vec<&str> = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["grafana", "prometheus", "alertmanager", "loki", "hubble-ui"]);
    let text = stdout(&sb.run(&["info"], &[]));
    assert!(text.contains("installer password grafana"), "{text}");
    let kc = sb.run(&["kubeconfig"], &[]);
    assert_eq!(kc.status.code(), Some(1), "no cluster yet");
    assert!(v["versions"]["live"].is_null(), "no cluster yet: {v:#}");
    assert!(sb.run(&["up"], &[]).status.success());
    let kc = sb.run(&["kubeconfig"], &[]);
    assert!(stdout(&kc).starts_with("export KUBECONFIG="), "{}", stdout(&kc));
    // With a cluster: what it runs, from the API server, the nodes and Helm.
    let v: serde_json::Value = serde_json::from_slice(&sb.run(&["info", "-o", "json"], &[]).stdout).unwrap();
    let live = &v["versions"]["live"];
    assert_eq!(live["kubernetes"], "v1.33.12", "{v:#}");
    assert_eq!(live["talos"], "v1.13.9", "{v:#}");
    assert_eq!(live["charts"]["cilium"], "1.18.12", "{v:#}");
    assert_eq!(live["differs"], serde_json::json!([]), "{v:#}");
    // A cluster that differs from the lab file is marked.
    common::set_kube_version("v1.35.2");
    let list = r#"[{"name":"loki","namespace":"monitoring","chart":"loki-18.10.0","app_version":"3.5.0"}]"#;
    let out = sb.run(&["info"], &[("FAKE_HELM_LIST", list), ("FAKE_TALOS_SERVER", "v1.13.8")]);
    let text = stdout(&out);
    assert!(
        text.contains("Running      Talos v1.13.8, Kubernetes v1.35.2"),
        "{text}"
    );
    for d in [
        "Differs      Kubernetes: lab file 1.33.12, cluster v1.35.2",
        "Differs      Talos: lab file v1.13.9, cluster v1.13.8",
        "Differs      loki: lab file 18.11.0, cluster 18.10.0",
    ] {
        assert!(text.contains(d), "{d} in {text}");
    }
}

#[test]
fn check_deps_names_each_failure_with_its_fix() {
    let sb = Sandbox::new();
    let out = sb.run(
        &["check-deps", "-o", "json"],
        &[("FAKE_FAIL", "docker info"), ("FAKE_TALOSCTL_VERSION", "v1.12.4")],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |n: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} in {v:#}"))
    };
    assert_eq!(get("talosctl")["status"], "fail");
    assert!(get("talosctl")["fix"].as_str().unwrap().contains("1.13"));
    assert_eq!(get("helm")["status"], "ok");
    assert_eq!(get("docker")["status"], "ok");
    assert_eq!(get("docker daemon")["status"], "fail");
    assert!(get("docker daemon")["fix"]
        .as_str()
        .unwrap()
        .contains("systemctl start docker"));
    for n in ["memory", "disk", "cpu", "port 3000", "subnet 10.5.0.0/24"] {
        let c = get(n);
        assert!(["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap()), "{c}");
    }
    // A busy port-forward port is named, with what to do (a warning: another port will do).
    if let Ok(_busy) = std::net::TcpListener::bind("127.0.0.1:9093") {
        let out = sb.run(&["check-deps", "-o", "json"], &[]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let c = v
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "port 9093")
            .unwrap()
            .clone();
        assert_eq!(c["status"], "warn", "{c}");
        assert!(c["detail"].as_str().unwrap().starts_with("in use"), "{c}");
        assert!(c["fix"].as_str().unwrap().contains("--local-port"), "{c}");
    }
    let text = sb.run(&["check-deps"], &[]);
    assert!(stdout(&text).contains("ok   talosctl"), "{}", stdout(&text));
}

#[test]
fn on_a_terminal_each_step_is_one_line_with_a_spinner_and_its_time() {
    let sb = Sandbox::new();
    let out = sb.run_on_tty(&["up"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let screen = stdout(&out);
    for n in 1..=15 {
        let re = regex::Regex::new(&format!(
            r"(\u{{2713}}|\u{{2013}}) \[{n}/15\] [^\x1b]* (done|skipped) in \d+\.\ds"
        ))
        .unwrap();
        assert!(re.is_match(&screen), "step {n}: {screen}");
    }
    assert!(screen.contains('\u{2801}'), "a spinner frame: {screen}");
    assert!(
        regex::Regex::new(r"\[15/15\] Deploy the sample app .* done in \d+\.\ds")
            .unwrap()
            .is_match(&screen),
        "{screen}"
    );
    // Not the plain format.
    assert!(
        !regex::Regex::new(r"(?m)^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[1/15\]")
            .unwrap()
            .is_match(&screen),
        "{screen}"
    );
    // --plain forces timestamped lines even on a terminal.
    sb.run(&["down"], &[]);
    let out = sb.run_on_tty(&["--plain", "up"]);
    assert!(
        regex::Regex::new(r"(?m)^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[1/15\]")
            .unwrap()
            .is_match(&stdout(&out)),
        "{}",
        stdout(&out)
    );
}

#[test]
fn port_forward_carries_bytes_to_the_pod_through_the_api_server() {
    use std::io::{Read, Write};
    let sb = Sandbox::new();
    assert!(sb.run(&["up"], &[]).status.success());
    sb.api.insert(
        "/api/v1/namespaces/monitoring/services/kube-prometheus-stack-prometheus",
        serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-prometheus-stack-prometheus", "namespace": "monitoring"},
               "spec": {"selector": {"app.kubernetes.io/name": "prometheus"}, "ports": [{"name": "http-web", "port": 9090, "targetPort": 9090}]}}),
    );
    sb.api.insert(
        "/api/v1/namespaces/monitoring/pods/prometheus-0",
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "prometheus-0", "namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}},
               "spec": {"containers": [{"name": "prometheus"}]}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_installer"));
    c.args(["port-forward", "prometheus", "--local-port", &port.to_string()])
        .current_dir(sb.dir.path().join("work"))
        .env_clear()
        .stdout(std::process::Stdio::piped());
    for (k, v) in &sb.env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut conn = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("port-forward never listened: {e}"),
        }
    };
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    conn.write_all(b"GET /-/ready\n").unwrap();
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"pong: GET /-/ready\n");
    drop(conn);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        stdout(&out).contains(&format!(
            "Forwarding http://127.0.0.1:{port}/ -> monitoring/prometheus-0:9090"
        )),
        "{}",
        stdout(&out)
    );
    assert!(
        sb.api
            .requests()
            .iter()
            .any(|r| r == "GET /api/v1/namespaces/monitoring/pods/prometheus-0/portforward"),
        "{:#?}",
        sb.api.requests()
    );
}

/// A Service and one ready pod behind it, as the charts make them.
fn service_with_pod(sb: &Sandbox, ns: &str, svc: &str, port: u16, pod: &str, container_port: u16) {
    sb.api.insert(
        &format!("/api/v1/namespaces/{ns}/services/{svc}"),
        serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc, "namespace": ns},
               "spec": {"selector": {"app": svc}, "ports": [{"port": port, "targetPort": container_port}]}}),
    );
    sb.api.insert(
        &format!("/api/v1/namespaces/{ns}/pods/{pod}"),
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": ns, "labels": {"app": svc}},
               "spec": {"containers": [{"name": "c"}]}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
}

#[test]
fn validate_reaches_prometheus_loki_and_grafana_through_port_forwards() {
    let sb = Sandbox::new();
    assert!(sb.run(&["up"], &[]).status.success());
    service_with_pod(
        &sb,
        "monitoring",
        "kube-prometheus-stack-prometheus",
        9090,
        "prometheus-0",
        9090,
    );
    service_with_pod(&sb, "monitoring", "loki", 3100, "loki-0", 3100);
    service_with_pod(
        &sb,
        "monitoring",
        "kube-prometheus-stack-grafana",
        80,
        "grafana-0",
        3000,
    );
    sb.api.serve_http(
        "prometheus-0",
        "/api/v1/query",
        serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "3"]}]}}),
    );
    sb.api.serve_http(
        "loki-0",
        "/loki/api/v1/query_range",
        serde_json::json!({"status": "success", "data": {"resultType": "streams", "result": [{"stream": {}, "values": [["1", "level=info n=1"]]}]}}),
    );
    sb.api.serve_http("grafana-0", "/api/datasources", serde_json::json!([{"uid": "prometheus", "name": "Prometheus", "type": "prometheus"}, {"uid": "loki", "name": "Loki", "type": "loki"}]));
    sb.api.serve_http(
        "grafana-0",
        "/api/datasources/uid/",
        serde_json::json!({"status": "OK"}),
    );

    let out = sb.run(&["validate", "-o", "json"], &[]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
    assert_eq!(v["ok"], true, "{v:#}\n{}", stderr(&out));
    assert!(out.status.success());
    let reqs = sb.api.pod_requests.lock().unwrap().clone();
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("prometheus-0 GET /api/v1/query?query=count%28sample_app_requests_total%29")),
        "{reqs:#?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("loki-0 GET /loki/api/v1/query_range?query=%7Bnamespace%3D%22sre-lab-sample%22%7D")),
        "{reqs:#?}"
    );
    // Grafana was asked with the password from the lab's Secret.
    let password = std::fs::read_to_string(sb.state("sre-lab").join("grafana-admin-password")).unwrap();
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("admin:{password}"));
    assert!(
        reqs.iter()
            .any(|r| r == &format!("grafana-0 GET /api/datasources Basic {basic}")),
        "{reqs:#?}"
    );
    for pod in ["prometheus-0", "loki-0", "grafana-0"] {
        assert!(
            sb.api
                .requests()
                .contains(&format!("GET /api/v1/namespaces/monitoring/pods/{pod}/portforward")),
            "{pod}"
        );
    }
}

#[test]
fn configmaps_generated_by_earlier_applies_are_pruned() {
    let sb = Sandbox::new();
    assert!(sb.run(&["up"], &[]).status.success());
    let labels = serde_json::json!({
        "app.kubernetes.io/managed-by": "sre-lab-installer",
        "app.kubernetes.io/name": "sre-lab-agent",
        "app.kubernetes.io/part-of": "sre-lab",
    });
    let cm = |name: &str, labels: &serde_json::Value| {
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "monitoring", "labels": labels}, "data": {}})
    };
    let at = |name: &str| format!("/api/v1/namespaces/monitoring/configmaps/{name}");
    // An earlier config's ConfigMap; one of someone else's with the same base; an unrelated one.
    sb.api.insert(
        &at("sre-lab-agent-config-b2c4d5f6g7"),
        cm("sre-lab-agent-config-b2c4d5f6g7", &labels),
    );
    sb.api.insert(
        &at("sre-lab-agent-config-k8m9t2b4c5"),
        cm("sre-lab-agent-config-k8m9t2b4c5", &serde_json::json!({"team": "other"})),
    );
    sb.api
        .insert(&at("sre-lab-agent-notes"), cm("sre-lab-agent-notes", &labels));
    sb.api.clear();
    let out = sb.run(&["up"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reqs = sb.api.requests();
    let deletes: Vec<&String> = reqs.iter().filter(|r| r.starts_with("DELETE ")).collect();
    assert_eq!(
        deletes,
        [&format!("DELETE {}", at("sre-lab-agent-config-b2c4d5f6g7"))],
        "{reqs:#?}"
    );
}
