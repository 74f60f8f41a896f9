//! Kubernetes service discovery, role `pod`.
//!
//! Pods come from the shared pod cache ([`crate::pods`]): configs with the same connection
//! settings read one watch and apply their label selector client-side. After every change of
//! the cache, its pods that pass the selector are turned into [`TargetGroup`]s by
//! [`pod_target_group`] — the labels Prometheus's `pod` role produces — and the full,
//! source-sorted list is published on a `tokio::sync::watch` channel. A pod that disappeared
//! since the previous publication is published once more as an empty group for its source, so
//! a consumer applying groups incrementally also drops its targets.
//!
//! On a DaemonSet the node name (env `NODE_NAME`) makes the cache list only the pods of its own
//! node (`spec.nodeName=<node>`); an explicit `selectors[].field` for role `pod` is joined to
//! that selector (or replaces it when it names `spec.nodeName`) and gets its own watch.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod};
use kube::ResourceExt;
use tokio::sync::watch;
use tracing::debug;

use crate::discovery::TargetGroup;
use crate::labels::{Labels, ADDRESS};
use crate::pods::{PodCache, Subscription};

const NAMESPACE: &str = "__meta_kubernetes_namespace";
const POD_NAME: &str = "__meta_kubernetes_pod_name";
const POD_IP: &str = "__meta_kubernetes_pod_ip";
const POD_UID: &str = "__meta_kubernetes_pod_uid";
const POD_NODE_NAME: &str = "__meta_kubernetes_pod_node_name";
const POD_HOST_IP: &str = "__meta_kubernetes_pod_host_ip";
const POD_READY: &str = "__meta_kubernetes_pod_ready";
const POD_PHASE: &str = "__meta_kubernetes_pod_phase";
const POD_CONTROLLER_KIND: &str = "__meta_kubernetes_pod_controller_kind";
const POD_CONTROLLER_NAME: &str = "__meta_kubernetes_pod_controller_name";
const POD_LABEL: &str = "__meta_kubernetes_pod_label_";
const POD_LABEL_PRESENT: &str = "__meta_kubernetes_pod_labelpresent_";
const POD_ANNOTATION: &str = "__meta_kubernetes_pod_annotation_";
const POD_ANNOTATION_PRESENT: &str = "__meta_kubernetes_pod_annotationpresent_";
const CONTAINER_NAME: &str = "__meta_kubernetes_pod_container_name";
const CONTAINER_IMAGE: &str = "__meta_kubernetes_pod_container_image";
const CONTAINER_ID: &str = "__meta_kubernetes_pod_container_id";
const CONTAINER_INIT: &str = "__meta_kubernetes_pod_container_init";
const CONTAINER_PORT_NAME: &str = "__meta_kubernetes_pod_container_port_name";
const CONTAINER_PORT_NUMBER: &str = "__meta_kubernetes_pod_container_port_number";
const CONTAINER_PORT_PROTOCOL: &str = "__meta_kubernetes_pod_container_port_protocol";

/// Builds the [`TargetGroup`] Prometheus's `pod` role produces for `pod`.
///
/// Source `pod/<namespace>/<name>`. A pod without an IP yields a group with neither labels nor
/// targets. Otherwise the group labels describe the pod and each declared container port of
/// every container (then every init container) is one target `<podIP>:<port>`; a container
/// without ports is one target `<podIP>`. Empty values are kept.
pub fn pod_target_group(pod: &Pod) -> TargetGroup {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let mut group = TargetGroup {
        source: pod_source(namespace, name),
        ..TargetGroup::default()
    };
    let status = pod.status.as_ref();
    let pod_ip = status.and_then(|s| s.pod_ip.as_deref()).unwrap_or_default();
    if pod_ip.is_empty() {
        return group;
    }
    group.labels = pod_labels(pod, namespace, name, pod_ip);
    let Some(spec) = pod.spec.as_ref() else {
        return group;
    };
    let statuses = status.and_then(|s| s.container_statuses.as_deref());
    for container in &spec.containers {
        push_container_targets(&mut group.targets, container, statuses, pod_ip, false);
    }
    let init_statuses = status.and_then(|s| s.init_container_statuses.as_deref());
    for container in spec.init_containers.iter().flatten() {
        push_container_targets(&mut group.targets, container, init_statuses, pod_ip, true);
    }
    group
}

fn pod_source(namespace: &str, name: &str) -> String {
    format!("pod/{namespace}/{name}")
}

fn pod_labels(pod: &Pod, namespace: &str, name: &str, pod_ip: &str) -> Labels {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let text = |v: Option<&String>| v.cloned().unwrap_or_default();
    let mut labels = Labels::from_pairs([
        (NAMESPACE, namespace.to_owned()),
        (POD_NAME, name.to_owned()),
        (POD_IP, pod_ip.to_owned()),
        (POD_UID, text(pod.metadata.uid.as_ref())),
        (POD_NODE_NAME, text(spec.and_then(|s| s.node_name.as_ref()))),
        (POD_HOST_IP, text(status.and_then(|s| s.host_ip.as_ref()))),
        (POD_READY, pod_ready(pod)),
        (POD_PHASE, text(status.and_then(|s| s.phase.as_ref()))),
    ]);
    let controller = pod.owner_references().iter().find(|o| o.controller == Some(true));
    if let Some(owner) = controller {
        if !owner.kind.is_empty() {
            labels.insert(POD_CONTROLLER_KIND.to_owned(), owner.kind.clone());
        }
        if !owner.name.is_empty() {
            labels.insert(POD_CONTROLLER_NAME.to_owned(), owner.name.clone());
        }
    }
    for (key, value) in pod.labels() {
        let key = sanitize_label_name(key);
        labels.insert(format!("{POD_LABEL}{key}"), value.clone());
        labels.insert(format!("{POD_LABEL_PRESENT}{key}"), "true".to_owned());
    }
    for (key, value) in pod.annotations() {
        let key = sanitize_label_name(key);
        labels.insert(format!("{POD_ANNOTATION}{key}"), value.clone());
        labels.insert(format!("{POD_ANNOTATION_PRESENT}{key}"), "true".to_owned());
    }
    labels
}

/// The `Ready` condition's status lower-cased, or `unknown` without one.
fn pod_ready(pod: &Pod) -> String {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref());
    conditions
        .unwrap_or_default()
        .iter()
        .find(|c| c.type_ == "Ready")
        .map_or_else(|| "unknown".to_owned(), |c| c.status.to_ascii_lowercase())
}

fn push_container_targets(
    targets: &mut Vec<Labels>,
    container: &Container,
    statuses: Option<&[ContainerStatus]>,
    pod_ip: &str,
    init: bool,
) {
    let id = statuses
        .unwrap_or_default()
        .iter()
        .find(|s| s.name == container.name)
        .and_then(|s| s.container_id.clone())
        .unwrap_or_default();
    let base = Labels::from_pairs([
        (CONTAINER_NAME, container.name.clone()),
        (CONTAINER_IMAGE, container.image.clone().unwrap_or_default()),
        (CONTAINER_ID, id),
        (CONTAINER_INIT, init.to_string()),
    ]);
    let ports = container.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        let mut target = base;
        target.insert(ADDRESS.to_owned(), pod_ip.to_owned());
        targets.push(target);
        return;
    }
    for port in ports {
        let number = port.container_port.to_string();
        let mut target = base.clone();
        target.insert(ADDRESS.to_owned(), join_host_port(pod_ip, &number));
        target.insert(CONTAINER_PORT_NAME.to_owned(), port.name.clone().unwrap_or_default());
        target.insert(CONTAINER_PORT_NUMBER.to_owned(), number);
        let protocol = port.protocol.clone().unwrap_or_default();
        target.insert(CONTAINER_PORT_PROTOCOL.to_owned(), protocol);
        targets.push(target);
    }
}

/// `host:port`, with IPv6 hosts in brackets.
fn join_host_port(host: &str, port: &str) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Replaces every character outside `[a-zA-Z0-9_]` with `_`.
fn sanitize_label_name(name: &str) -> String {
    let keep = |c: char| c.is_ascii_alphanumeric() || c == '_';
    name.chars().map(|c| if keep(c) { c } else { '_' }).collect()
}

/// Counters of one `kubernetes_sd_config`'s discovery, readable while it runs.
#[derive(Debug, Default)]
pub struct PodDiscoveryStats {
    updates: AtomicU64,
}

impl PodDiscoveryStats {
    /// Publications of a changed group list so far.
    pub fn updates(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }
}

/// Publishes the target groups of the pods of `cache` that pass `sub`'s selectors on `out`:
/// once the cache has listed, then after every change (unchanged lists are not re-sent).
/// Returns once every receiver of `out` is gone. The watch itself (errors, retries, relists)
/// belongs to the shared cache.
pub async fn run(
    cache: Arc<PodCache>,
    sub: Subscription,
    out: watch::Sender<Vec<TargetGroup>>,
    stats: Arc<PodDiscoveryStats>,
) {
    let mut changes = cache.changes();
    let mut published = BTreeSet::new();
    let mut first = true;
    loop {
        if cache.synced() {
            let pods = cache.pods();
            let groups = snapshot(pods.iter().filter(|p| sub.matches(p)).map(|p| &**p), &mut published);
            // The first list is always sent (even empty): the job learns it is complete.
            if first {
                out.send_replace(groups);
                stats.updates.fetch_add(1, Ordering::Relaxed);
                first = false;
            } else if out.send_if_modified(|current| replace_if_changed(current, groups)) {
                stats.updates.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::select! {
            () = out.closed() => {
                debug!("Target group receivers gone; stopping pod discovery.");
                return;
            }
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

fn replace_if_changed(current: &mut Vec<TargetGroup>, new: Vec<TargetGroup>) -> bool {
    if *current == new {
        return false;
    }
    *current = new;
    true
}

/// Groups of `pods`, sorted by source, plus an empty group for each source present in
/// `published` but gone now; `published` becomes the current set of sources.
fn snapshot<'a>(pods: impl Iterator<Item = &'a Pod>, published: &mut BTreeSet<String>) -> Vec<TargetGroup> {
    let mut groups: Vec<TargetGroup> = pods.map(pod_target_group).collect();
    groups.sort_by(|a, b| a.source.cmp(&b.source));
    groups.dedup_by(|a, b| a.source == b.source);
    let current: BTreeSet<String> = groups.iter().map(|g| g.source.clone()).collect();
    let gone = published.difference(&current).map(|source| TargetGroup {
        source: source.clone(),
        ..TargetGroup::default()
    });
    groups.extend(gone);
    groups.sort_by(|a, b| a.source.cmp(&b.source));
    *published = current;
    groups
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use config::agent::{KubernetesSdConfig, NamespaceDiscovery, Selector};
    use http::{Request, Response};
    use kube::client::Body;
    use kube::Client;
    use serde_json::{json, Value};
    use tokio::time::timeout;
    use tower_test::mock;

    use super::*;
    use crate::kubeapi::Error;

    const DEADLINE: Duration = Duration::from_secs(10);

    type Handle = mock::Handle<Request<Body>, Response<Body>>;
    type Respond = mock::SendResponse<Response<Body>>;
    type Groups = Vec<TargetGroup>;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("valid pod")
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_pairs(pairs.iter().copied())
    }

    fn realistic_pod() -> Pod {
        pod(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-0",
                "namespace": "shop",
                "uid": "7d3c0e2a-uid",
                "labels": { "app.kubernetes.io/name": "web", "pod-template-hash": "5f8d" },
                "annotations": { "prometheus.io/scrape": "true", "example.com/empty": "" },
                "ownerReferences": [
                    { "apiVersion": "v1", "kind": "Helper", "name": "not-the-controller", "uid": "u1" },
                    { "apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "u2",
                      "controller": true }
                ]
            },
            "spec": {
                "nodeName": "node-a",
                "initContainers": [{ "name": "migrate", "image": "migrate:3" }],
                "containers": [
                    { "name": "app", "image": "web:1.2", "ports": [
                        { "name": "http", "containerPort": 8080, "protocol": "TCP" },
                        { "containerPort": 9090, "protocol": "UDP" }
                    ] },
                    { "name": "sidecar", "image": "proxy:2" }
                ]
            },
            "status": {
                "phase": "Running",
                "podIP": "10.1.2.3",
                "hostIP": "192.168.0.10",
                "conditions": [
                    { "type": "Initialized", "status": "True" },
                    { "type": "Ready", "status": "True" }
                ],
                "containerStatuses": [{ "name": "app", "containerID": "containerd://aaa",
                    "image": "web:1.2", "imageID": "", "ready": true, "restartCount": 0 }],
                "initContainerStatuses": [{ "name": "migrate", "containerID": "containerd://iii",
                    "image": "migrate:3", "imageID": "", "ready": false, "restartCount": 0 }]
            }
        }))
    }

    #[test]
    fn realistic_pod_has_prometheus_labels() {
        let group = pod_target_group(&realistic_pod());
        assert_eq!(group.source, "pod/shop/web-0");
        let expected_group = labels(&[
            ("__meta_kubernetes_namespace", "shop"),
            ("__meta_kubernetes_pod_name", "web-0"),
            ("__meta_kubernetes_pod_ip", "10.1.2.3"),
            ("__meta_kubernetes_pod_uid", "7d3c0e2a-uid"),
            ("__meta_kubernetes_pod_node_name", "node-a"),
            ("__meta_kubernetes_pod_host_ip", "192.168.0.10"),
            ("__meta_kubernetes_pod_ready", "true"),
            ("__meta_kubernetes_pod_phase", "Running"),
            ("__meta_kubernetes_pod_controller_kind", "StatefulSet"),
            ("__meta_kubernetes_pod_controller_name", "web"),
            ("__meta_kubernetes_pod_label_app_kubernetes_io_name", "web"),
            ("__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name", "true"),
            ("__meta_kubernetes_pod_label_pod_template_hash", "5f8d"),
            ("__meta_kubernetes_pod_labelpresent_pod_template_hash", "true"),
            ("__meta_kubernetes_pod_annotation_prometheus_io_scrape", "true"),
            ("__meta_kubernetes_pod_annotationpresent_prometheus_io_scrape", "true"),
            ("__meta_kubernetes_pod_annotation_example_com_empty", ""),
            ("__meta_kubernetes_pod_annotationpresent_example_com_empty", "true"),
        ]);
        assert_eq!(group.labels, expected_group);
        let port = |addr, name, number, protocol| {
            labels(&[
                ("__address__", addr),
                ("__meta_kubernetes_pod_container_name", "app"),
                ("__meta_kubernetes_pod_container_image", "web:1.2"),
                ("__meta_kubernetes_pod_container_id", "containerd://aaa"),
                ("__meta_kubernetes_pod_container_init", "false"),
                ("__meta_kubernetes_pod_container_port_name", name),
                ("__meta_kubernetes_pod_container_port_number", number),
                ("__meta_kubernetes_pod_container_port_protocol", protocol),
            ])
        };
        let expected_targets = vec![
            port("10.1.2.3:8080", "http", "8080", "TCP"),
            port("10.1.2.3:9090", "", "9090", "UDP"),
            labels(&[
                ("__address__", "10.1.2.3"),
                ("__meta_kubernetes_pod_container_name", "sidecar"),
                ("__meta_kubernetes_pod_container_image", "proxy:2"),
                ("__meta_kubernetes_pod_container_id", ""),
                ("__meta_kubernetes_pod_container_init", "false"),
            ]),
            labels(&[
                ("__address__", "10.1.2.3"),
                ("__meta_kubernetes_pod_container_name", "migrate"),
                ("__meta_kubernetes_pod_container_image", "migrate:3"),
                ("__meta_kubernetes_pod_container_id", "containerd://iii"),
                ("__meta_kubernetes_pod_container_init", "true"),
            ]),
        ];
        assert_eq!(group.targets, expected_targets);
    }

    #[test]
    fn pod_without_ip_has_no_targets_or_labels() {
        let mut p = realistic_pod();
        p.status.as_mut().unwrap().pod_ip = None;
        let expected = TargetGroup {
            source: "pod/shop/web-0".into(),
            ..TargetGroup::default()
        };
        assert_eq!(pod_target_group(&p), expected);
    }

    #[test]
    fn ready_unknown_without_condition_and_ipv6_in_brackets() {
        let mut p = realistic_pod();
        let status = p.status.as_mut().unwrap();
        status.conditions = None;
        status.pod_ip = Some("fd00::7".into());
        let group = pod_target_group(&p);
        assert_eq!(group.labels.get("__meta_kubernetes_pod_ready"), Some("unknown"));
        assert_eq!(group.targets[0].get("__address__"), Some("[fd00::7]:8080"));
        assert_eq!(group.targets[2].get("__address__"), Some("fd00::7"));
        assert_eq!(sanitize_label_name("a.b/c-d_é9"), "a_b_c_d__9");
    }

    fn pod_cfg() -> KubernetesSdConfig {
        KubernetesSdConfig {
            role: "pod".into(),
            ..KubernetesSdConfig::default()
        }
    }

    #[test]
    fn config_selectors_and_namespaces() {
        let d = Subscription::from_parts(&pod_cfg(), Some("node-a"), None).unwrap();
        assert_eq!(d.scope.field.as_deref(), Some("spec.nodeName=node-a"));
        assert_eq!(d.scope.namespaces, vec![None]);
        let d = Subscription::from_parts(&pod_cfg(), Some(""), None).unwrap();
        assert_eq!(d.scope.field, None);

        let mut cfg = pod_cfg();
        cfg.namespaces = Some(NamespaceDiscovery {
            own_namespace: true,
            names: vec!["b".into(), "a".into()],
        });
        let d = Subscription::from_parts(&cfg, None, Some("a".into())).unwrap();
        assert_eq!(d.scope.namespaces, vec![Some("a".into()), Some("b".into())]);

        cfg.role = "endpoints".into();
        assert!(matches!(
            Subscription::from_parts(&cfg, None, None),
            Err(Error::UnsupportedRole(_))
        ));
        let mut cfg = pod_cfg();
        cfg.selectors = vec![Selector {
            role: "node".into(),
            ..Selector::default()
        }];
        assert!(matches!(
            Subscription::from_parts(&cfg, None, None),
            Err(Error::SelectorRole(_))
        ));
    }

    fn small_pod(name: &str, resource_version: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"),
                          "resourceVersion": resource_version },
            "spec": { "nodeName": "node-a", "containers": [{ "name": "c", "image": "i",
                      "ports": [{ "containerPort": 8080, "protocol": "TCP" }] }] },
            "status": { "podIP": format!("10.0.0.{}", name.len()), "phase": "Running" }
        })
    }

    #[test]
    fn snapshot_publishes_a_tombstone_once() {
        let (a, b) = (pod(small_pod("a", "1")), pod(small_pod("b", "2")));
        let mut published = BTreeSet::new();
        let all = vec![pod_target_group(&a), pod_target_group(&b)];
        assert_eq!(snapshot([&b, &a].into_iter(), &mut published), all);
        let tombstone = TargetGroup {
            source: "pod/default/a".into(),
            ..TargetGroup::default()
        };
        let b_only = vec![pod_target_group(&b)];
        assert_eq!(
            snapshot([&b].into_iter(), &mut published),
            vec![tombstone, b_only[0].clone()]
        );
        assert_eq!(snapshot([&b].into_iter(), &mut published), b_only);
    }

    async fn next_request(handle: &mut Handle) -> (Request<Body>, Respond) {
        timeout(DEADLINE, handle.next_request())
            .await
            .expect("timed out waiting for an API request")
            .expect("client dropped")
    }

    fn json_response(value: &Value) -> Response<Body> {
        Response::new(Body::from(serde_json::to_vec(value).unwrap()))
    }

    fn pod_list(resource_version: &str, items: Vec<Value>) -> Response<Body> {
        json_response(&json!({
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": { "resourceVersion": resource_version },
            "items": items,
        }))
    }

    /// A watch response body: one JSON event per line.
    fn watch_events(events: &[(&str, Value)]) -> Response<Body> {
        let mut body = Vec::new();
        for (kind, object) in events {
            serde_json::to_writer(&mut body, &json!({ "type": kind, "object": object })).unwrap();
            body.push(b'\n');
        }
        Response::new(Body::from(body))
    }

    fn query(request: &Request<Body>) -> String {
        request.uri().query().unwrap_or_default().to_owned()
    }

    async fn wait_for(rx: &mut watch::Receiver<Groups>, what: impl FnMut(&Groups) -> bool) -> Groups {
        let seen = timeout(DEADLINE, rx.wait_for(what)).await;
        seen.expect("timed out waiting for target groups")
            .expect("sender gone")
            .clone()
    }

    fn sources(groups: &Groups) -> Vec<&str> {
        groups.iter().map(|g| g.source.as_str()).collect()
    }

    #[tokio::test]
    async fn watch_publishes_list_added_and_deleted() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (cache, stats, mut rx, task) = start(&pod_cfg(), Some("node-a"), service);

        let (request, respond) = next_request(&mut handle).await;
        let q = query(&request);
        assert_eq!(request.uri().path(), "/api/v1/pods");
        assert!(
            q.contains("fieldSelector=spec.nodeName%3Dnode-a") && !q.contains("watch"),
            "{q}"
        );
        respond.send_response(pod_list("100", vec![small_pod("b", "91"), small_pod("a", "90")]));
        let groups = wait_for(&mut rx, |g| !g.is_empty()).await;
        assert_eq!(sources(&groups), ["pod/default/a", "pod/default/b"]);
        assert_eq!(groups[0].targets[0].get("__address__"), Some("10.0.0.1:8080"));

        let (request, respond) = next_request(&mut handle).await;
        let q = query(&request);
        assert!(q.contains("watch=true") && q.contains("resourceVersion=100"), "{q}");
        assert!(q.contains("fieldSelector=spec.nodeName%3Dnode-a"), "{q}");
        respond.send_response(watch_events(&[("ADDED", small_pod("c", "101"))]));
        let groups = wait_for(&mut rx, |g| g.len() == 3).await;
        assert_eq!(sources(&groups), ["pod/default/a", "pod/default/b", "pod/default/c"]);

        // The body ended, so the watcher resumes from the last resource version.
        let (request, respond) = next_request(&mut handle).await;
        assert!(query(&request).contains("resourceVersion=101"), "{}", query(&request));
        respond.send_response(watch_events(&[("DELETED", small_pod("a", "102"))]));
        let groups = wait_for(&mut rx, |g| g[0].targets.is_empty()).await;
        let tombstone = TargetGroup {
            source: "pod/default/a".into(),
            ..TargetGroup::default()
        };
        let expected = vec![
            tombstone,
            pod_target_group(&pod(small_pod("b", "91"))),
            pod_target_group(&pod(small_pod("c", "101"))),
        ];
        assert_eq!(groups, expected);
        assert_eq!(stats.updates(), 3);
        assert_eq!(cache.stats().watch_errors.load(Ordering::Relaxed), 0);
        // a, b and c share 10.0.0.1 in this fixture; a is gone from both indexes.
        let by_ip = cache.by_ip("10.0.0.1".parse().unwrap()).expect("b or c by IP");
        assert_ne!(by_ip.metadata.name.as_deref(), Some("a"));
        assert!(cache.by_uid("uid-a").is_none());
        assert_eq!(
            cache.by_uid("uid-c").and_then(|c| c.metadata.name.clone()).as_deref(),
            Some("c")
        );

        drop(rx);
        timeout(DEADLINE, task)
            .await
            .expect("run stops without receivers")
            .unwrap();
    }

    #[tokio::test]
    async fn list_error_is_counted_and_retried() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (cache, _stats, mut rx, task) = start(&pod_cfg(), None, service);

        let (_, respond) = next_request(&mut handle).await;
        let status = json!({ "apiVersion": "v1", "kind": "Status", "metadata": {},
            "status": "Failure", "message": "etcd unavailable", "reason": "InternalError", "code": 500 });
        let mut response = json_response(&status);
        *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        respond.send_response(response);

        // The retry comes after kube's default backoff (about a second).
        let (request, respond) = next_request(&mut handle).await;
        assert!(!query(&request).contains("watch"), "{}", request.uri());
        assert_eq!(cache.stats().watch_errors.load(Ordering::Relaxed), 1);
        respond.send_response(pod_list("5", vec![small_pod("a", "4")]));
        let groups = wait_for(&mut rx, |g| !g.is_empty()).await;
        assert_eq!(sources(&groups), ["pod/default/a"]);
        task.abort();
    }

    #[tokio::test]
    async fn explicit_field_selector_joins_the_node_scope_and_labels_select_client_side() {
        let mut cfg = pod_cfg();
        cfg.selectors = vec![Selector {
            role: "pod".into(),
            label: Some("app=web".into()),
            field: Some("status.phase=Running".into()),
        }];
        cfg.namespaces = Some(NamespaceDiscovery {
            own_namespace: false,
            names: vec!["ns2".into(), "ns1".into()],
        });
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (_cache, _stats, mut rx, task) = start(&cfg, Some("node-a"), service);

        let mut paths = Vec::new();
        for _ in 0..2 {
            let (request, respond) = next_request(&mut handle).await;
            let q = query(&request);
            assert!(
                q.contains("fieldSelector=spec.nodeName%3Dnode-a%2Cstatus.phase%3DRunning"),
                "the node scope stays: {q}"
            );
            assert!(!q.contains("labelSelector"), "{q}");
            paths.push(request.uri().path().to_owned());
            let mut web = small_pod(&format!("web{}", paths.len()), "1");
            web["metadata"]["labels"] = json!({"app": "web"});
            let mut other = small_pod(&format!("other{}", paths.len()), "1");
            other["metadata"]["labels"] = json!({"app": "db"});
            respond.send_response(pod_list("2", vec![web, other]));
        }
        paths.sort();
        assert_eq!(paths, ["/api/v1/namespaces/ns1/pods", "/api/v1/namespaces/ns2/pods"]);
        let groups = wait_for(&mut rx, |g| g.len() == 2).await;
        assert_eq!(sources(&groups), ["pod/default/web1", "pod/default/web2"]);
        task.abort();
    }

    /// A cache over the mocked API and discovery for `cfg` reading it.
    fn start(
        cfg: &KubernetesSdConfig,
        node: Option<&str>,
        service: mock::Mock<Request<Body>, Response<Body>>,
    ) -> (
        Arc<PodCache>,
        Arc<PodDiscoveryStats>,
        watch::Receiver<Groups>,
        tokio::task::JoinHandle<()>,
    ) {
        let sub = Subscription::from_parts(cfg, node, None).unwrap();
        let cache = PodCache::start("test".into(), Client::new(service, "default"), &sub.scope);
        let stats = Arc::new(PodDiscoveryStats::default());
        let (tx, rx) = watch::channel(Vec::new());
        let task = tokio::spawn(run(cache.clone(), sub, tx, stats.clone()));
        (cache, stats, rx, task)
    }
}
