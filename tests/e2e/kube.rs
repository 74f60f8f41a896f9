//! Kubernetes discovery against a real kube-apiserver v1.36 + etcd (`../shared/kube/`), with
//! deploy/'s own agent config and RBAC: the agent runs with the token of the `sre-lab-agent`
//! ServiceAccount bound to deploy/'s ClusterRole, as on a node. No kubelet: pods are bound with
//! `spec.nodeName` and their status (phase, pod IP 127.0.0.1) is written through the status
//! subresource; each "pod" serves its metrics from a test server on its annotated port.
//!
//! Skipped, saying so, where the binaries are not built; `SRE_LAB_REQUIRE_PEERS=1` fails instead.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use sre_lab_tests::{free_port, http_post, poll, targets, Agent, KubeApi, TinyServer};

const NODE: &str = "node-a";

/// A metrics page naming the pod it belongs to.
fn pod_server(name: &'static str) -> Result<TinyServer> {
    TinyServer::start(move |_| {
        (
            200,
            vec![],
            format!("kube_test_pod_up{{served_by=\"{name}\"}} 1\n").into_bytes(),
        )
    })
}

fn port_of(server: &TinyServer) -> &str {
    server.addr.rsplit(':').next().unwrap_or_default()
}

/// The namespace, the ServiceAccount and deploy/'s RBAC; returns a kubeconfig with the
/// ServiceAccount's token.
fn agent_identity(kube: &KubeApi, dir: &Path) -> Result<std::path::PathBuf> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base");
    kube.kubectl(&["create", "namespace", "monitoring"])?;
    let sa = std::fs::read_to_string(deploy.join("serviceaccount.yaml"))?;
    kube.kubectl(&[
        "-n",
        "monitoring",
        "apply",
        "--validate=false",
        "-f",
        &write(dir, "sa.yaml", &sa)?,
    ])?;
    kube.apply(&std::fs::read_to_string(deploy.join("rbac.yaml"))?)?;
    let token = kube.kubectl(&["-n", "monitoring", "create", "token", "sre-lab-agent", "--duration=1h"])?;
    let kubeconfig = dir.join("sa.kubeconfig");
    kube.token_kubeconfig(token.trim(), &kubeconfig)?;
    Ok(kubeconfig)
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let p = dir.join(name);
    std::fs::write(&p, text)?;
    Ok(p.display().to_string())
}

/// Creates a pod bound to `node`, then marks it Running with IP 127.0.0.1.
fn create_pod(kube: &KubeApi, ns: &str, name: &str, node: &str, annotations: Value, labels: Value) -> Result<()> {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations, "labels": labels},
        "spec": {"nodeName": node, "automountServiceAccountToken": false, "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    });
    kube.apply(&pod.to_string())?;
    let status = json!({"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "hostIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    kube.kubectl(&[
        "-n",
        ns,
        "patch",
        "pod",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ])?;
    Ok(())
}

/// A namespace with its `default` ServiceAccount (made here when no kube-controller-manager
/// runs to make it; `apply` leaves one it made alone).
fn create_namespace(kube: &KubeApi, ns: &str) -> Result<()> {
    kube.kubectl(&["create", "namespace", ns])?;
    kube.apply(&format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: {ns}\n"
    ))?;
    Ok(())
}

fn delete_pod(kube: &KubeApi, ns: &str, name: &str) -> Result<()> {
    kube.kubectl(&[
        "-n",
        ns,
        "delete",
        "pod",
        name,
        "--grace-period=0",
        "--force",
        "--wait=false",
    ])?;
    Ok(())
}

fn scrape_annotations(port: &str) -> Value {
    json!({"prometheus.io/scrape": "true", "prometheus.io/port": port})
}

/// deploy/'s agent config, scraping every second, with a file sink.
fn deploy_config(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/agent.yml");
    let sink = dir.join("sink.txt");
    let text = std::fs::read_to_string(deploy)?
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("scrape_timeout: 10s", "scrape_timeout: 1s");
    let text = format!("{text}\nfile_sink:\n  path: {}\n", sink.display());
    let config = dir.join("agent.yml");
    std::fs::write(&config, text)?;
    Ok((config, sink))
}

fn start_agent(dir: &Path, kubeconfig: &Path) -> Result<(Agent, std::path::PathBuf)> {
    let (config, sink) = deploy_config(dir)?;
    let receiver = TinyServer::start(|_| (204, vec![], Vec::new()))?;
    let rw = format!("http://{}/api/v1/write", receiver.addr);
    std::mem::forget(receiver); // answers until the test process ends
    let agent = Agent::start_env(
        dir,
        config,
        dir.join("agent-data"),
        free_port(),
        &[
            ("NODE_NAME", NODE),
            ("KUBECONFIG", &kubeconfig.display().to_string()),
            ("REMOTE_WRITE_URL", &rw),
        ],
    )?;
    Ok((agent, sink))
}

/// `(pod, address, health)` of the agent's kubernetes-pods targets, sorted.
fn pod_targets(agent: &Agent) -> Result<Vec<(String, String, String)>> {
    let mut out: Vec<(String, String, String)> = targets(agent)?
        .into_iter()
        .filter(|t| t["job"] == "kubernetes-pods" && !matches!(t["health"].as_str(), Some("dropped" | "invalid")))
        .map(|t| {
            let label = |name: &str| {
                let pairs = t["labels"].as_array().cloned().unwrap_or_default();
                let pair = pairs.into_iter().find(|p| p[0] == name);
                pair.and_then(|p| p[1].as_str().map(str::to_owned)).unwrap_or_default()
            };
            (
                label("pod"),
                label("instance"),
                t["health"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Waits until the targets are exactly `want` (pod, address) and every one was scraped up.
fn wait_targets(agent: &Agent, want: &[(&str, String)]) -> Result<()> {
    poll(&format!("targets {want:?}"), Duration::from_secs(30), || {
        let got = pod_targets(agent)?;
        let pairs: Vec<(&str, &str)> = got.iter().map(|(p, a, _)| (p.as_str(), a.as_str())).collect();
        let wanted: Vec<(&str, &str)> = want.iter().map(|(p, a)| (*p, a.as_str())).collect();
        Ok((pairs == wanted && got.iter().all(|(_, _, h)| h == "up")).then_some(()))
    })
    .map_err(|e| {
        e.context(format!(
            "targets now: {:?}\n{}",
            pod_targets(agent),
            agent.proc.log_text()
        ))
    })
}

fn can_i(kube: &KubeApi, kubeconfig: &Path, args: &[&str]) -> Result<bool> {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["auth", "can-i"])
        .args(args)
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match answer.as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => bail!(
            "kubectl auth can-i {args:?} on {}: {answer} {}",
            kube.url,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn kube_rbac_allows_reading_pods_and_nothing_more() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(kube) = KubeApi::start(dir.path(), "")? else {
        return Ok(());
    };
    let sa = agent_identity(&kube, dir.path())?;
    for verb in ["get", "list", "watch"] {
        assert!(can_i(&kube, &sa, &[verb, "pods", "--all-namespaces"])?, "{verb} pods");
    }
    for args in [
        &["create", "pods"][..],
        &["delete", "pods"],
        &["patch", "pods"],
        &["get", "pods", "--subresource=log"],
        &["get", "secrets"],
        &["list", "configmaps"],
        &["list", "nodes"],
        &["list", "services"],
        &["list", "endpointslices.discovery.k8s.io"],
    ] {
        assert!(!can_i(&kube, &sa, args)?, "the agent's token must not {args:?}");
    }
    // And the API says so, not only the review: listing secrets is forbidden.
    let err = kube.kubectl_as(&sa, &["get", "secrets", "-A"]).unwrap_err().to_string();
    assert!(err.contains("Forbidden") || err.contains("forbidden"), "{err}");
    Ok(())
}

#[test]
fn kube_discovery_follows_this_nodes_pods_added_relabelled_deleted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(kube) = KubeApi::start(dir.path(), "")? else {
        return Ok(());
    };
    let sa = agent_identity(&kube, dir.path())?;
    create_namespace(&kube, "shop")?;
    let (web, other, web2, web_moved) = (
        pod_server("web")?,
        pod_server("other-node")?,
        pod_server("web2")?,
        pod_server("web-moved")?,
    );
    create_pod(
        &kube,
        "shop",
        "web",
        NODE,
        scrape_annotations(port_of(&web)),
        json!({"app": "web"}),
    )?;
    create_pod(
        &kube,
        "shop",
        "web-b",
        "node-b",
        scrape_annotations(port_of(&other)),
        json!({"app": "web"}),
    )?;
    create_pod(&kube, "shop", "quiet", NODE, json!({}), json!({"app": "quiet"}))?;

    let (agent, sink) = start_agent(dir.path(), &sa)?;
    wait_targets(&agent, &[("web", web.addr.clone())])?;
    // The cache holds this node's two pods only; the other node's pod never reached it.
    poll("pod cache of this node", Duration::from_secs(10), || {
        Ok((agent.metric("sre_agent_pod_cache_pods", "")? == 2.0).then_some(()))
    })?;
    let served = std::fs::read_to_string(&sink)?;
    assert!(!served.contains("other-node"), "a pod of another node was scraped");
    assert!(
        served.contains("app=\"web\""),
        "pod labels mapped by deploy's labelmap rule"
    );

    // Added.
    create_pod(
        &kube,
        "shop",
        "web2",
        NODE,
        scrape_annotations(port_of(&web2)),
        json!({"app": "web2"}),
    )?;
    wait_targets(&agent, &[("web", web.addr.clone()), ("web2", web2.addr.clone())])?;
    // Relabelled: a new port annotation moves the target.
    kube.kubectl(&[
        "-n",
        "shop",
        "annotate",
        "--overwrite",
        "pod",
        "web",
        &format!("prometheus.io/port={}", port_of(&web_moved)),
    ])?;
    wait_targets(&agent, &[("web", web_moved.addr.clone()), ("web2", web2.addr.clone())])?;
    // Deleted: the target goes and its series get staleness markers.
    delete_pod(&kube, "shop", "web2")?;
    wait_targets(&agent, &[("web", web_moved.addr.clone())])?;
    poll("staleness marker of the deleted pod", Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&sink)?;
        Ok(text
            .lines()
            .any(|l| l.starts_with("kube_test_pod_up{") && l.contains("pod=\"web2\"") && l.contains(" NaN "))
            .then_some(()))
    })?;
    assert_eq!(agent.metric("sre_agent_pod_cache_watch_errors_total", "")?, 0.0);

    // A reload adding a second job with the same connection settings and its own label
    // selector: one watch still serves both (none started), and the selector applies. The
    // unchanged job keeps its discovery running: it publishes nothing new at the reload (a
    // restarted provider would publish its first list again). Its updates are reported every
    // 5 s, so the count is read after a full period on each side of the reload.
    let updates = || agent.metric("sre_agent_discovery_updates_total", "job=\"kubernetes-pods\"");
    std::thread::sleep(Duration::from_secs(6));
    let updates_before = updates()?;
    let text = std::fs::read_to_string(&agent.config)?;
    let second = "scrape_configs:\n  - job_name: web-only\n    scrape_interval: 1s\n    kubernetes_sd_configs:\n      - role: pod\n        selectors:\n          - role: pod\n            label: app in (web)\n";
    std::fs::write(&agent.config, text.replacen("scrape_configs:\n", second, 1))?;
    let (code, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(code, 200, "{body}");
    poll("the web-only job's target", Duration::from_secs(20), || {
        let t = targets(&agent)?;
        let web_only: Vec<&Value> = t.iter().filter(|t| t["job"] == "web-only").collect();
        let pod_of = |t: &Value| {
            let pairs = t["discovered_labels"].as_array().cloned().unwrap_or_default();
            let p = pairs.into_iter().find(|p| p[0] == "__meta_kubernetes_pod_name");
            p.and_then(|p| p[1].as_str().map(str::to_owned))
        };
        Ok((web_only.len() == 1 && pod_of(web_only[0]).as_deref() == Some("web")).then_some(()))
    })?;
    assert_eq!(agent.metric("sre_agent_pod_cache_watches_started_total", "")?, 1.0);
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        updates()?,
        updates_before,
        "the unchanged job's pod discovery was restarted"
    );
    wait_targets(&agent, &[("web", web_moved.addr.clone())])?;
    Ok(())
}

/// etcd's JSON gateway takes keys and values base64-encoded.
fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn kube_apiserver_restarts_and_an_expired_watch_relists_without_duplicate_targets() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Some(kube) = KubeApi::start(dir.path(), "")? else {
        return Ok(());
    };
    let sa = agent_identity(&kube, dir.path())?;
    create_namespace(&kube, "shop")?;
    let (a, b, c) = (pod_server("a")?, pod_server("b")?, pod_server("c")?);
    create_pod(&kube, "shop", "a", NODE, scrape_annotations(port_of(&a)), json!({}))?;
    create_pod(&kube, "shop", "b", NODE, scrape_annotations(port_of(&b)), json!({}))?;
    let (agent, _sink) = start_agent(dir.path(), &sa)?;
    let both = [("a", a.addr.clone()), ("b", b.addr.clone())];
    wait_targets(&agent, &both)?;

    // 1. The API server goes away and comes back: targets stay while it is gone (the cache
    //    keeps what it knew), errors are counted, and changes after it returns are followed.
    let args = kube.stop_apiserver()?;
    poll("a failed watch counted", Duration::from_secs(30), || {
        Ok((agent.metric("sre_agent_pod_cache_watch_errors_total", "")? >= 1.0).then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    wait_targets(&agent, &both)?;
    kube.start_apiserver_again(&args)?;
    create_pod(&kube, "shop", "c", NODE, scrape_annotations(port_of(&c)), json!({}))?;
    let all = [("a", a.addr.clone()), ("b", b.addr.clone()), ("c", c.addr.clone())];
    wait_targets(&agent, &all)?;

    // 2. While the API server is down again, pod b is deleted and etcd moves on and compacts:
    //    the agent's resource version is gone, its watch gets 410 Gone, and it must relist —
    //    dropping b, which no watch event will ever report — without doubling a, c.
    let relists_before = agent.metric("sre_agent_pod_cache_relists_total", "")?;
    let args = kube.stop_apiserver()?;
    kube.etcd_call("/v3/kv/deleterange", &json!({"key": b64("/registry/pods/shop/b")}))?;
    let mut revision = 0u64;
    for i in 0..20 {
        let put = kube.etcd_call(
            "/v3/kv/put",
            &json!({"key": b64(&format!("/test/churn/{i}")), "value": b64("x")}),
        )?;
        revision = put["header"]["revision"].as_str().context("etcd revision")?.parse()?;
    }
    kube.etcd_call(
        "/v3/kv/compaction",
        &json!({"revision": revision.to_string(), "physical": true}),
    )?;
    kube.start_apiserver_again(&args)?;
    let after = [("a", a.addr.clone()), ("c", c.addr.clone())];
    wait_targets(&agent, &after)?;
    poll("a relist counted", Duration::from_secs(30), || {
        Ok((agent.metric("sre_agent_pod_cache_relists_total", "")? > relists_before).then_some(()))
    })?;
    let log = agent.proc.log_text();
    let expired: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Pod watch failed") && (l.contains("410") || l.contains("too old")))
        .collect();
    assert!(!expired.is_empty(), "the watch should have expired (410 Gone):\n{log}");
    eprintln!("expired watch, as the agent logged it: {}", expired[0]);
    // Each pod once, however many lists and watches it was seen in.
    let t = pod_targets(&agent)?;
    assert_eq!(t.len(), 2, "{t:?}");
    assert_eq!(agent.metric("sre_agent_pod_cache_pods", "")?, 2.0);
    Ok(())
}

/// The logs path's `kubernetes_pods` shortcut with the shared pod cache: lines of a pod the API
/// server knows get `app`, `job` and `node_name` from it; a pod it does not know keeps the labels
/// its path gives, and none of its lines are held back.
#[test]
fn pod_log_labels_come_from_the_pod_cache_and_the_path() -> Result<()> {
    use crate::logs::{append, cri_time, Loki};
    let dir = tempfile::tempdir()?;
    let Some(kube) = KubeApi::start(dir.path(), "")? else {
        return Ok(());
    };
    let sa = agent_identity(&kube, dir.path())?;
    create_namespace(&kube, "shop")?;
    create_pod(
        &kube,
        "shop",
        "web-0",
        NODE,
        json!({}),
        json!({"app.kubernetes.io/name": "web", "app": "ignored"}),
    )?;
    let uid = kube.kubectl(&["-n", "shop", "get", "pod", "web-0", "-o", "jsonpath={.metadata.uid}"])?;
    let root = dir.path().join("pods");
    let web = root.join(format!("shop_web-0_{}", uid.trim())).join("app");
    let ghost = root.join("other_ghost-0_0000-1111").join("side");
    std::fs::create_dir_all(&web)?;
    std::fs::create_dir_all(&ghost)?;
    let (t, _) = cri_time(1);
    append(&ghost.join("0.log"), &format!("{t} stdout F ghost line\n"));
    let loki = Loki::start()?;
    let config = format!(
        "logs:\n  clients: [{{url: {}, batchwait: 100ms}}]\n  scrape_configs:\n    - job_name: pods\n      kubernetes_pods: {{root: {}, kubeconfig_file: {}}}\n",
        loki.url(),
        root.display(),
        sa.display()
    );
    std::fs::write(dir.path().join("agent.yml"), config)?;
    let agent = Agent::start_env(
        dir.path(),
        dir.path().join("agent.yml"),
        dir.path().join("agent-data"),
        free_port(),
        &[("NODE_NAME", NODE)],
    )?;
    let ghost_line = poll("the unknown pod's line", Duration::from_secs(30), || {
        Ok(loki.entries().into_iter().find(|g| g.line == "ghost line"))
    })?;
    assert_eq!(ghost_line.labels["namespace"], "other");
    assert_eq!(ghost_line.labels["pod"], "ghost-0");
    assert_eq!(ghost_line.labels["container"], "side");
    assert_eq!(ghost_line.labels["node_name"], NODE);
    assert!(!ghost_line.labels.contains_key("app"));
    let mut n = 0;
    let known = poll("a line with the pod cache's labels", Duration::from_secs(30), || {
        n += 1;
        append(&web.join("0.log"), &format!("{t} stdout F web line {n}\n"));
        std::thread::sleep(Duration::from_millis(200));
        Ok(loki
            .entries()
            .into_iter()
            .find(|g| g.line.starts_with("web line") && g.labels.contains_key("app")))
    })?;
    assert_eq!(known.labels["app"], "web", "app.kubernetes.io/name wins over app");
    assert_eq!(known.labels["job"], "shop/web");
    assert_eq!(known.labels["node_name"], NODE);
    assert_eq!(known.labels["namespace"], "shop");
    assert_eq!(known.labels["pod"], "web-0");
    // Every web line arrived, whether before or after the cache knew the pod.
    poll("every web line", Duration::from_secs(30), || {
        let got = loki.entries().iter().filter(|g| g.line.starts_with("web line")).count();
        Ok((got == n).then_some(()))
    })?;
    drop(agent);
    Ok(())
}
