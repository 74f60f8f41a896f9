//! The installer's own kube-rs code (`installer::kube`) against a real kube-apiserver + etcd
//! (`../shared/kube/`): the server-side applies `up` makes (namespaces, the Grafana Secret,
//! deploy/'s objects with the ServiceMonitor once the operator's CRD is there), taken from
//! `installer plan` so they are exactly what `up` sends; field-manager conflicts on re-apply;
//! the readiness watch, with statuses written through the status subresource since no kubelet
//! or DaemonSet controller runs; and `port-forward`'s answer when no pod is ready.
//!
//! Skipped, saying so, where the binaries are not built; `SRE_LAB_REQUIRE_PEERS=1` fails instead.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use installer::kube as ik;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, DynamicObject, GroupVersionKind};
use serde_json::{json, Value};
use sre_lab_tests::{free_port, workspace_bin, KubeApi};

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The manifests of `up`'s apply actions, by what they are, from `installer plan -o json`,
/// with the agent image's digest (captured from `docker push` in a real run) filled in.
fn planned_applies(dir: &Path) -> Result<Vec<(String, String)>> {
    let out = Command::new(workspace_bin("installer"))
        .args(["plan", "-o", "json"])
        .env("SRE_LAB_HOME", dir)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout)?;
    let digest = format!("sha256:{}", "ab".repeat(32));
    let mut applies = Vec::new();
    for step in plan["steps"].as_array().context("steps")? {
        for a in step["actions"].as_array().context("actions")? {
            if a["type"] == "apply" {
                applies.push((
                    a["what"].as_str().unwrap_or_default().to_owned(),
                    a["manifests"]
                        .as_str()
                        .unwrap_or_default()
                        .replace("{{agent_digest}}", &digest),
                ));
            }
        }
    }
    Ok(applies)
}

fn planned(applies: &[(String, String)], what: &str) -> String {
    applies
        .iter()
        .find(|(w, _)| w == what)
        .map(|(_, m)| m.clone())
        .unwrap_or_else(|| panic!("no {what:?} apply in the plan"))
}

/// The field managers of an object and whether each applied (`Apply`) or updated.
fn managers(obj: &kube::api::ObjectMeta) -> Vec<(String, String)> {
    obj.managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect()
}

fn start(dir: &Path) -> Result<Option<(KubeApi, tokio::runtime::Runtime, kube::Client)>> {
    let Some(kube) = KubeApi::start(dir, "")? else {
        return Ok(None);
    };
    let rt = tokio::runtime::Runtime::new()?;
    let client = rt.block_on(ik::client(&kube.kubeconfig))?;
    Ok(Some((kube, rt, client)))
}

#[test]
fn up_applies_namespaces_the_grafana_secret_and_deploy_objects_server_side() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Some((kube, rt, client)) = start(dir.path())? else {
        return Ok(());
    };
    let applies = planned_applies(dir.path())?;
    rt.block_on(async {
        // Namespaces with their Pod Security labels.
        let done = ik::apply(&client, &planned(&applies, "namespaces")).await?;
        assert!(done.contains(&"Namespace monitoring".to_owned()), "{done:?}");
        let ns: Api<Namespace> = Api::all(client.clone());
        let monitoring = ns.get("monitoring").await?;
        let labels = monitoring.metadata.labels.clone().unwrap_or_default();
        assert!(
            labels.keys().any(|k| k.starts_with("pod-security.kubernetes.io/")),
            "{labels:?}"
        );
        assert!(
            managers(&monitoring.metadata).contains(&(ik::FIELD_MANAGER.to_owned(), "Apply".to_owned())),
            "{:?}",
            managers(&monitoring.metadata)
        );

        // The Grafana Secret, and the password read back from it.
        ik::apply(
            &client,
            &ik::grafana_secret_manifest("monitoring", "grafana-admin", "s3cret-pw"),
        )
        .await?;
        assert_eq!(
            ik::grafana_password(&client, "monitoring", "grafana-admin").await?,
            "s3cret-pw"
        );
        let secrets: Api<Secret> = Api::namespaced(client.clone(), "monitoring");
        let s = secrets.get("grafana-admin").await?;
        assert!(s.data.unwrap_or_default().contains_key("admin-user"));

        // deploy/'s objects without the ServiceMonitor's CRD: the API server refuses it.
        let agent = planned(&applies, "sre-lab agent");
        let err = format!("{:#}", ik::apply(&client, &agent).await.unwrap_err());
        assert!(
            err.contains("applying ServiceMonitor sre-lab-agent") && err.contains("404"),
            "{err}"
        );

        // With the prometheus-operator's CRD (deploy/testdata) applied the same way, all of them.
        let crd = std::fs::read_to_string(repo().join("deploy/testdata/monitoring.coreos.com_servicemonitors.yaml"))?;
        ik::apply(&client, &crd).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let done = loop {
            match ik::apply(&client, &agent).await {
                Ok(done) => break done,
                // The CRD is established a moment after it is created.
                Err(e) if std::time::Instant::now() < deadline && format!("{e:#}").contains("ServiceMonitor") => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e),
            }
        };
        for obj in [
            "ServiceAccount monitoring/sre-lab-agent",
            "ClusterRole sre-lab-agent",
            "ClusterRoleBinding sre-lab-agent",
            "DaemonSet monitoring/sre-lab-agent",
            "Service monitoring/sre-lab-agent",
            "ServiceMonitor monitoring/sre-lab-agent",
            "ConfigMap monitoring/sre-lab-dashboards",
        ] {
            assert!(done.iter().any(|d| d == obj), "{obj} not in {done:?}");
        }
        let sm_api: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            "monitoring",
            &kube::api::ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
                "servicemonitors",
            ),
        );
        let sm = sm_api.get("sre-lab-agent").await?;
        assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "http-metrics");
        let ds: Api<DaemonSet> = Api::namespaced(client.clone(), "monitoring");
        let d = ds.get("sre-lab-agent").await?;
        let image = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
            .image
            .clone()
            .unwrap_or_default();
        assert!(image.ends_with(&format!("@sha256:{}", "ab".repeat(32))), "{image}");

        // Applying the same manifests again changes nothing (same resourceVersion).
        let before = d.metadata.resource_version.clone();
        ik::apply(&client, &agent).await?;
        assert_eq!(ds.get("sre-lab-agent").await?.metadata.resource_version, before);

        // A later apply with a new config generates a new ConfigMap name; the superseded one goes.
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "monitoring");
        let generated = |list: Vec<ConfigMap>| -> Vec<String> {
            list.into_iter()
                .filter_map(|c| c.metadata.name)
                .filter(|n| n.starts_with("sre-lab-agent-config-"))
                .collect()
        };
        let old = generated(cms.list(&Default::default()).await?.items);
        assert_eq!(old.len(), 1, "{old:?}");
        let renamed = agent.replace(&old[0], "sre-lab-agent-config-bcdfghkmt2");
        ik::apply(&client, &renamed).await?;
        let pruned = ik::prune_generated_configmaps(&client, &renamed).await?;
        assert_eq!(pruned, [format!("ConfigMap monitoring/{}", old[0])]);
        assert_eq!(
            generated(cms.list(&Default::default()).await?.items),
            ["sre-lab-agent-config-bcdfghkmt2"]
        );
        anyhow::Ok(())
    })?;
    drop(kube);
    Ok(())
}

#[test]
fn a_reapply_takes_back_fields_another_manager_changed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Some((kube, rt, client)) = start(dir.path())? else {
        return Ok(());
    };
    let applies = planned_applies(dir.path())?;
    rt.block_on(async {
        ik::apply(&client, &planned(&applies, "namespaces")).await?;
        ik::apply(
            &client,
            &ik::grafana_secret_manifest("monitoring", "grafana-admin", "first"),
        )
        .await?;
        anyhow::Ok(())
    })?;

    // Someone else takes a field the installer owns, with kubectl's server-side apply: without
    // --force-conflicts the API server reports the conflict with the installer's manager.
    let other = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: monitoring\n  labels:\n    pod-security.kubernetes.io/enforce: restricted\n";
    let file = dir.path().join("other.yaml");
    std::fs::write(&file, other)?;
    let file = file.display().to_string();
    let err = kube
        .kubectl(&["apply", "--server-side", "--field-manager=someone-else", "-f", &file])
        .unwrap_err();
    assert!(
        err.to_string().contains("conflict") && err.to_string().contains(ik::FIELD_MANAGER),
        "{err:#}"
    );
    kube.kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=someone-else",
        "-f",
        &file,
    ])?;
    // And a plain update (kubectl edit, a controller) changes the Secret.
    kube.kubectl(&[
        "-n",
        "monitoring",
        "patch",
        "secret",
        "grafana-admin",
        "--type=merge",
        "-p",
        r#"{"stringData":{"admin-password":"changed-by-hand"}}"#,
    ])?;

    rt.block_on(async {
        let ns: Api<Namespace> = Api::all(client.clone());
        let label = |n: Namespace| n.metadata.labels.unwrap_or_default()["pod-security.kubernetes.io/enforce"].clone();
        assert_eq!(label(ns.get("monitoring").await?), "restricted");
        assert_eq!(
            ik::grafana_password(&client, "monitoring", "grafana-admin").await?,
            "changed-by-hand"
        );

        // `up` again: the installer's applies force their fields back and own them again.
        let wanted = installer::yaml::documents(&planned(&applies, "namespaces")).unwrap();
        let want = wanted.iter().find(|d| d["metadata"]["name"] == "monitoring").unwrap()["metadata"]["labels"]
            ["pod-security.kubernetes.io/enforce"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(want, "restricted");
        ik::apply(&client, &planned(&applies, "namespaces")).await?;
        ik::apply(
            &client,
            &ik::grafana_secret_manifest("monitoring", "grafana-admin", "first"),
        )
        .await?;
        let monitoring = ns.get("monitoring").await?;
        let owners: Vec<String> = monitoring
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|m| {
                m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.to_string().contains("pod-security.kubernetes.io/enforce"))
            })
            .filter_map(|m| m.manager.clone())
            .collect();
        assert_eq!(label(monitoring), want);
        assert_eq!(owners, [ik::FIELD_MANAGER], "the label has one owner again");
        assert_eq!(
            ik::grafana_password(&client, "monitoring", "grafana-admin").await?,
            "first"
        );
        anyhow::Ok(())
    })?;
    drop(kube);
    Ok(())
}

#[test]
fn the_rollout_watch_follows_statuses_written_through_the_status_subresource() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Some((kube, rt, client)) = start(dir.path())? else {
        return Ok(());
    };
    let applies = planned_applies(dir.path())?;
    // The agent's objects without the ServiceMonitor (not what this test is about).
    let agent: String = installer::yaml::documents(&planned(&applies, "sre-lab agent"))
        .unwrap()
        .into_iter()
        .filter(|d| d["kind"] != "ServiceMonitor")
        .map(|d| format!("---\n{}", installer::yaml::to_string(&d)))
        .collect();
    rt.block_on(async {
        ik::apply(&client, &planned(&applies, "namespaces")).await?;
        ik::apply(&client, &agent).await?;

        // Nothing writes the DaemonSet's status here: the watch times out and says which.
        let err = ik::wait_rollout(
            &client,
            "DaemonSet",
            "monitoring",
            "sre-lab-agent",
            Duration::from_secs(2),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("DaemonSet monitoring/sre-lab-agent was not rolled out within 2s"),
            "{err:#}"
        );
        anyhow::Ok(())
    })?;

    // Statuses as the DaemonSet controller would write them: first one of two nodes updated,
    // then all done but for an older generation, then the rollout finished. The watch returns
    // only after the last.
    let ds: Value = serde_json::from_str(&kube.kubectl(&[
        "-n",
        "monitoring",
        "get",
        "daemonset",
        "sre-lab-agent",
        "-o",
        "json",
    ])?)?;
    let generation = ds["metadata"]["generation"].as_i64().unwrap();
    let status = |observed: i64, updated: i64, available: i64| {
        json!({ "status": {
            "observedGeneration": observed,
            "desiredNumberScheduled": 2,
            "currentNumberScheduled": 2,
            "numberMisscheduled": 0,
            "numberReady": available,
            "updatedNumberScheduled": updated,
            "numberAvailable": available,
        }})
        .to_string()
    };
    let patch = |body: String| {
        kube.kubectl(&[
            "-n",
            "monitoring",
            "patch",
            "daemonset",
            "sre-lab-agent",
            "--subresource=status",
            "--type=merge",
            "-p",
            &body,
        ])
    };
    patch(status(generation, 1, 1))?;
    let waiter = rt.spawn({
        let client = client.clone();
        async move {
            ik::wait_rollout(
                &client,
                "DaemonSet",
                "monitoring",
                "sre-lab-agent",
                Duration::from_secs(60),
            )
            .await
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!waiter.is_finished(), "one of two nodes updated is not rolled out");
    patch(status(generation - 1, 2, 2))?;
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !waiter.is_finished(),
        "a status of an older generation is not this rollout's"
    );
    patch(status(generation, 2, 2))?;
    let started = std::time::Instant::now();
    rt.block_on(waiter)??;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the watch saw the status, no poll timeout"
    );

    // The sample app's Deployment the same way, through the installer's status command too.
    rt.block_on(async {
        ik::apply(&client, &planned(&applies, "sample app")).await?;
        anyhow::Ok(())
    })?;
    let d: Value = serde_json::from_str(&kube.kubectl(&[
        "-n",
        "sre-lab-sample",
        "get",
        "deployment",
        "sample-app",
        "-o",
        "json",
    ])?)?;
    let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
    kube.kubectl(&[
        "-n",
        "sre-lab-sample",
        "patch",
        "deployment",
        "sample-app",
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({ "status": {
            "observedGeneration": d["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        }})
        .to_string(),
    ])?;
    rt.block_on(ik::wait_rollout(
        &client,
        "Deployment",
        "sre-lab-sample",
        "sample-app",
        Duration::from_secs(30),
    ))?;
    // `installer status`'s view: both rolled out, with their counts.
    let st = rt.block_on(ik::status(&client))?;
    let find = |name: &str| {
        st.workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("{name} not in {st:?}"))
    };
    let agent = find("DaemonSet monitoring/sre-lab-agent");
    assert!(agent.ready && agent.detail.starts_with("2/2"), "{agent:?}");
    let app = find("Deployment sre-lab-sample/sample-app");
    assert!(app.ready, "{app:?}");
    drop(kube);
    Ok(())
}

#[test]
fn port_forward_says_when_no_pod_behind_the_service_is_ready() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let Some((kube, rt, client)) = start(dir.path())? else {
        return Ok(());
    };
    // Grafana's Service and one pod behind it, Pending (no kubelet).
    kube.kubectl(&["create", "namespace", "monitoring"])?;
    kube.apply(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: default, namespace: monitoring}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: kube-prometheus-stack-grafana, namespace: monitoring}\nspec:\n  selector: {app.kubernetes.io/name: grafana}\n  ports: [{name: http-web, port: 80, targetPort: grafana}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: grafana-0, namespace: monitoring, labels: {app.kubernetes.io/name: grafana}}\nspec:\n  nodeName: node-a\n  containers: [{name: grafana, image: grafana/grafana, ports: [{name: grafana, containerPort: 3000}]}]\n",
    )?;
    // The installer's own CLI, with the lab's kubeconfig in its state directory.
    let home = dir.path().join("state");
    std::fs::create_dir_all(home.join("sre-lab"))?;
    std::fs::copy(&kube.kubeconfig, home.join("sre-lab/kubeconfig"))?;
    let port = free_port().to_string();
    let out = Command::new(workspace_bin("installer"))
        .args(["port-forward", "grafana", "--local-port", &port])
        .env("SRE_LAB_HOME", &home)
        .current_dir(dir.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no ready pod behind Service monitoring/kube-prometheus-stack-grafana"),
        "{stderr}"
    );

    // Ready (status subresource): the Service resolves to the pod and its named target port.
    kube.kubectl(&[
        "-n",
        "monitoring",
        "patch",
        "pod",
        "grafana-0",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"127.0.0.1","conditions":[{"type":"Ready","status":"True"}]}}"#,
    ])?;
    let (pod, target) = rt.block_on(ik::resolve_service(
        &client,
        "monitoring",
        "kube-prometheus-stack-grafana",
        80,
    ))?;
    assert_eq!((pod.as_str(), target), ("grafana-0", 3000));
    drop(kube);
    Ok(())
}
