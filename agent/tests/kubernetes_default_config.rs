//! The shipped Kubernetes config (`examples/kubernetes.yml`) applied to discovered pods: only
//! annotated pods are kept and `prometheus.io/port|path|scheme` are honoured.

use agent::discovery::kubernetes::pod_target_group;
use agent::relabel;
use agent::scrape::target::{from_groups, JobDefaults};
use k8s_openapi::api::core::v1::Pod;

fn pod(name: &str, annotations: serde_json::Value, ports: &[u16]) -> Pod {
    let ports: Vec<serde_json::Value> = ports
        .iter()
        .map(|p| serde_json::json!({"containerPort": p, "protocol": "TCP"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "apps", "uid": "u-1", "labels": {"app": "web"}, "annotations": annotations},
        "spec": {"nodeName": "node-a", "containers": [{"name": "main", "image": "img", "ports": ports}]},
        "status": {"podIP": "10.1.2.3", "hostIP": "192.0.2.1", "phase": "Running",
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("pod")
}

#[test]
fn annotated_pods_are_scraped_with_their_port_path_and_scheme() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/kubernetes.yml");
    let loaded = config::load_agent_config(std::path::Path::new(path)).expect("shipped config loads");
    let sc = &loaded.value.scrape_configs[0];
    assert_eq!(sc.kubernetes_sd_configs[0].role, "pod");
    let rules = relabel::compile(&sc.relabel_configs).expect("rules compile");
    let job = JobDefaults {
        job: sc.job_name.clone(),
        scheme: "http".into(),
        metrics_path: "/metrics".into(),
        interval: std::time::Duration::from_secs(15),
        timeout: std::time::Duration::from_secs(10),
        params: vec![],
    };
    let groups = vec![
        pod_target_group(&pod(
            "web-0",
            serde_json::json!({"prometheus.io/scrape": "true", "prometheus.io/port": "9102", "prometheus.io/path": "/m", "prometheus.io/scheme": "https"}),
            &[8080, 9102],
        )),
        pod_target_group(&pod(
            "plain",
            serde_json::json!({"prometheus.io/scrape": "true"}),
            &[8080],
        )),
        pod_target_group(&pod("quiet", serde_json::json!({}), &[8080])),
        pod_target_group(&pod(
            "off",
            serde_json::json!({"prometheus.io/scrape": "false"}),
            &[8080],
        )),
    ];
    let (targets, not_scraped) = from_groups(&groups, &job, &rules);
    let urls: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
    // Two container ports of web-0 collapse into the one annotated port.
    assert_eq!(urls, vec!["http://10.1.2.3:8080/metrics", "https://10.1.2.3:9102/m"]);
    let web = &targets[1];
    assert_eq!(web.labels.get("namespace"), Some("apps"));
    assert_eq!(web.labels.get("pod"), Some("web-0"));
    assert_eq!(web.labels.get("node"), Some("node-a"));
    assert_eq!(web.labels.get("app"), Some("web"));
    assert_eq!(web.labels.get("job"), Some("kubernetes-pods"));
    assert_eq!(web.labels.get("instance"), Some("10.1.2.3:9102"));
    assert_eq!(not_scraped.len(), 2, "unannotated and scrape=false pods are dropped");
}
