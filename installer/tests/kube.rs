//! The installer's kube-rs code against the fake API server: server-side apply of mixed
//! documents, rollout watching (done and timing out), Service → ready pod → target port for
//! port-forward, and the Grafana password from its Secret.

mod common;

use std::time::Duration;

use common::FakeApi;
use serde_json::json;

async fn client(api: &FakeApi) -> kube::Client {
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: '{}'}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user: {{token: t}}\n",
            api.url
        ),
    )
    .unwrap();
    installer::kube::client(&kc).await.unwrap()
}

#[tokio::test]
async fn apply_sends_each_document_to_its_resource_path() {
    let api = FakeApi::start();
    let c = client(&api).await;
    let applied = installer::kube::apply(
        &c,
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: monitoring}\n---\napiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: p, namespace: metallb-system}\nspec: {addresses: [10.5.0.200-10.5.0.250]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}}\n",
    )
    .await
    .unwrap();
    assert_eq!(
        applied,
        [
            "Namespace monitoring",
            "IPAddressPool metallb-system/p",
            "NetworkPolicy default/np"
        ]
    );
    assert_eq!(
        api.requests(),
        [
            "PATCH /api/v1/namespaces/monitoring",
            "PATCH /apis/metallb.io/v1beta1/namespaces/metallb-system/ipaddresspools/p",
            "PATCH /apis/networking.k8s.io/v1/namespaces/default/networkpolicies/np",
        ]
    );
    let err = installer::kube::apply(&c, "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("without metadata.name"), "{err}");
}

#[tokio::test]
async fn rollouts_are_awaited_and_time_out_with_a_reason() {
    let api = FakeApi::start();
    let c = client(&api).await;
    installer::kube::apply(
        &c,
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: a, namespace: m}\nspec: {}\n",
    )
    .await
    .unwrap();
    installer::kube::wait_rollout(&c, "DaemonSet", "m", "a", Duration::from_secs(10))
        .await
        .unwrap();

    // Scheduled on 3 nodes, available on 1: not rolled out.
    api.insert(
        "/apis/apps/v1/namespaces/m/daemonsets/slow",
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "slow", "namespace": "m", "generation": 2, "resourceVersion": "5"},
               "status": {"currentNumberScheduled": 3, "desiredNumberScheduled": 3, "numberMisscheduled": 0, "numberReady": 1, "numberAvailable": 1, "updatedNumberScheduled": 3, "observedGeneration": 2}}),
    );
    let err = installer::kube::wait_rollout(&c, "DaemonSet", "m", "slow", Duration::from_millis(800))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("DaemonSet m/slow was not rolled out within"),
        "{err}"
    );
    // An old generation observed: not rolled out either.
    api.insert(
        "/apis/apps/v1/namespaces/m/deployments/d",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "m", "generation": 3, "resourceVersion": "5"}, "spec": {"replicas": 1, "selector": {}, "template": {}},
               "status": {"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1, "observedGeneration": 2}}),
    );
    assert!(
        installer::kube::wait_rollout(&c, "Deployment", "m", "d", Duration::from_millis(800))
            .await
            .is_err()
    );

    // Not ready when the wait starts, ready 700 ms later: the watcher sees the change.
    let ready_later = json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "slow", "namespace": "m", "generation": 2, "resourceVersion": "999999"},
           "status": {"currentNumberScheduled": 3, "desiredNumberScheduled": 3, "numberMisscheduled": 0, "numberReady": 3, "numberAvailable": 3, "updatedNumberScheduled": 3, "observedGeneration": 2}});
    let objects = api.objects.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        objects
            .lock()
            .unwrap()
            .insert("/apis/apps/v1/namespaces/m/daemonsets/slow".into(), ready_later);
    });
    let started = std::time::Instant::now();
    installer::kube::wait_rollout(&c, "DaemonSet", "m", "slow", Duration::from_secs(15))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    writer.join().unwrap();
    // It came through the watch.
    assert!(
        api.requests()
            .iter()
            .any(|r| r == "WATCH /apis/apps/v1/namespaces/m/daemonsets"),
        "{:#?}",
        api.requests()
    );
}

#[tokio::test]
async fn port_forward_targets_a_ready_pod_and_resolves_named_ports() {
    let api = FakeApi::start();
    let c = client(&api).await;
    api.insert(
        "/api/v1/namespaces/monitoring/services/kube-prometheus-stack-grafana",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-prometheus-stack-grafana", "namespace": "monitoring"},
               "spec": {"selector": {"app.kubernetes.io/name": "grafana"}, "ports": [{"name": "http-web", "port": 80, "targetPort": "grafana"}]}}),
    );
    let pod = |name: &str, ready: &str| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "monitoring", "labels": {"app.kubernetes.io/name": "grafana"}},
               "spec": {"containers": [{"name": "grafana", "ports": [{"name": "grafana", "containerPort": 3000}]}]},
               "status": {"conditions": [{"type": "Ready", "status": ready}]}})
    };
    api.insert(
        "/api/v1/namespaces/monitoring/pods/grafana-old",
        pod("grafana-old", "False"),
    );
    api.insert(
        "/api/v1/namespaces/monitoring/pods/grafana-new",
        pod("grafana-new", "True"),
    );
    let f = installer::kube::forwardable("grafana").unwrap();
    let (pod, port) = installer::kube::resolve_service(&c, f.namespace, f.service, f.port)
        .await
        .unwrap();
    assert_eq!((pod.as_str(), port), ("grafana-new", 3000));
    assert!(api
        .requests()
        .iter()
        .any(|r| r == "GET /api/v1/namespaces/monitoring/pods"));

    let err = installer::kube::resolve_service(&c, "monitoring", "loki", 3100)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("is the add-on installed?"), "{err:#}");
    let err = installer::kube::resolve_service(&c, f.namespace, f.service, 9999)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("has no port 9999"), "{err}");
}

#[tokio::test]
async fn the_grafana_password_round_trips_through_its_secret() {
    let api = FakeApi::start();
    let c = client(&api).await;
    installer::kube::apply(
        &c,
        &installer::kube::grafana_secret_manifest("monitoring", "grafana-admin", "s3cret-Pa55"),
    )
    .await
    .unwrap();
    let pw = installer::kube::grafana_password(&c, "monitoring", "grafana-admin")
        .await
        .unwrap();
    assert_eq!(pw, "s3cret-Pa55");
}
