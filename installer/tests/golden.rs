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

/// A pinned chart's own `values.yaml` (tests/data/charts, with its source and sha256 in the
/// README there): its default values, and every key path it documents — set, or commented
/// out as charts do for optional keys (`# hostNamespaceOnly: false`), which its templates
/// read all the same.
struct ChartValues {
    values: serde_json::Value,
    documented: std::collections::BTreeSet<String>,
}

fn chart_values(file: &str) -> ChartValues {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/charts");
    let path = dir.join(file);
    // The copy is the one the README names: same sha256.
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with(&format!("| `{file}`")))
        .unwrap_or_else(|| panic!("{file} has no row in tests/data/charts/README.md"));
    let out = std::process::Command::new("sha256sum").arg(&path).output().unwrap();
    let sum = String::from_utf8_lossy(&out.stdout);
    let sum = sum.split_whitespace().next().unwrap_or_default();
    assert!(
        out.status.success() && row.contains(&format!("`{sum}`")),
        "{file}: sha256 {sum} is not the one its README row gives:\n{row}"
    );
    let text = std::fs::read_to_string(&path).unwrap();
    ChartValues {
        values: installer::yaml::documents(&text).unwrap().remove(0),
        documented: documented_keys(&text),
    }
}

/// Key paths of a values.yaml, by indentation: its keys, and the commented-out keys under them
/// (`#` and one space taken away, the rest of the indentation kept).
fn documented_keys(text: &str) -> std::collections::BTreeSet<String> {
    let key = regex::Regex::new(r#"^( *)(# ?)?( *)([A-Za-z_][A-Za-z0-9_.-]*|"[^"]+"):(\s|$)"#).unwrap();
    let block = regex::Regex::new(r"^\s*[^#\s][^#]*:\s*[|>][-+0-9]*\s*(#.*)?$").unwrap();
    let mut keys = std::collections::BTreeSet::new();
    // (indent, key) of the real keys enclosing the line, and of the commented ones since the
    // last real key.
    let mut real: Vec<(usize, String)> = Vec::new();
    let mut commented: Vec<(usize, String)> = Vec::new();
    // Inside a block scalar (`key: |`) until a line indented no deeper than its key.
    let mut scalar_of: Option<usize> = None;
    for line in text.lines() {
        let indent_of_line = line.len() - line.trim_start().len();
        if let Some(i) = scalar_of {
            if line.trim().is_empty() || indent_of_line > i {
                continue;
            }
            scalar_of = None;
        }
        let Some(c) = key.captures(line) else { continue };
        let is_comment = c.get(2).is_some();
        let indent = c[1].len() + c[3].len();
        let name = c[4].trim_matches('"').to_owned();
        if !is_comment && !c[3].is_empty() {
            continue;
        }
        let path = |stack: &[(usize, String)]| {
            let mut p: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
            p.push(&name);
            p.join(".")
        };
        if is_comment {
            commented.retain(|(i, _)| *i < indent);
            // A commented block hangs from the real keys indented less than its first line.
            let root = commented.first().map_or(indent, |(i, _)| *i);
            let mut stack: Vec<(usize, String)> = real.iter().filter(|(i, _)| *i < root).cloned().collect();
            stack.extend(commented.iter().cloned());
            keys.insert(path(&stack));
            commented.push((indent, name.clone()));
        } else {
            commented.clear();
            real.retain(|(i, _)| *i < indent);
            keys.insert(path(&real));
            real.push((indent, name.clone()));
            if block.is_match(line) {
                scalar_of = Some(indent);
            }
        }
    }
    keys
}

/// Keys under which a chart takes any map, by dotted path from the chart's root (`*` matches
/// one key), and why.
const FREE_FORM: &[(&str, &str)] = &[
    ("dashboards.annotations", "annotations of Cilium's dashboard ConfigMap"),
    (
        "*.dashboards.annotations",
        "annotations of Cilium's dashboard ConfigMaps",
    ),
    (
        "*.*.dashboards.annotations",
        "annotations of Hubble's dashboard ConfigMap",
    ),
    (
        "prometheus.prometheusSpec.resources",
        "a Kubernetes ResourceRequirements",
    ),
    (
        "loki.limits_config",
        "Loki's own limits_config, passed through to its config file",
    ),
    (
        "loki.schemaConfig",
        "Loki's own schema_config, passed through to its config file",
    ),
    (
        "grafana.additionalDataSources",
        "Grafana's datasource provisioning entries, passed through to its provisioning file",
    ),
];

/// Whether dotted `path` matches `pattern` (`*` for one key).
fn matches(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = path.split('.').collect();
    p.len() == k.len() && p.iter().zip(&k).all(|(p, k)| *p == "*" || p == k)
}

fn free_form(path: &str) -> bool {
    FREE_FORM.iter().any(|(pattern, _)| matches(pattern, path))
}

/// The keys the installer writes (`written`) that the chart neither sets nor documents, and the
/// maps it writes where the chart has no keys to compare with (free-form, or another type).
fn unknown_keys(
    written: &serde_json::Value,
    chart: &ChartValues,
    defaults: Option<&serde_json::Value>,
    path: &str,
    out: &mut Vec<String>,
) {
    let Some(map) = written.as_object() else { return };
    for (k, v) in map {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if free_form(&p) {
            continue;
        }
        let default = defaults.and_then(|d| d.get(k));
        let below = format!("{p}.");
        let documented_below = chart
            .documented
            .range(below.clone()..)
            .next()
            .is_some_and(|d| d.starts_with(&below));
        if default.is_none() && !chart.documented.contains(&p) {
            out.push(format!("{p}: not a key of the chart"));
            continue;
        }
        let default_map = default.and_then(|d| d.as_object()).filter(|m| !m.is_empty());
        if v.is_object() {
            if default_map.is_some() || documented_below {
                unknown_keys(v, chart, default, &p, out);
            } else {
                out.push(format!(
                    "{p}: a map written where the chart has {} (free-form? then FREE_FORM, with why)",
                    default.map_or("only a comment".to_owned(), |d| d.to_string())
                ));
            }
        } else if default_map.is_some() {
            out.push(format!("{p}: {v} written where the chart has a map"));
        } else if default.is_some_and(serde_json::Value::is_array) && !v.is_array() {
            out.push(format!("{p}: {v} written where the chart has a list"));
        } else if let (Some(items), Some(serde_json::Value::Array(theirs))) = (v.as_array(), default) {
            // A list of maps the chart gives examples of: each item's keys are among theirs.
            let mut keys = serde_json::Map::new();
            for t in theirs.iter().filter_map(|t| t.as_object()) {
                keys.extend(t.clone());
            }
            if !keys.is_empty() {
                let keys = serde_json::Value::Object(keys);
                for item in items {
                    unknown_keys(item, chart, Some(&keys), &format!("{p}[]"), out);
                }
            } else if items.iter().any(serde_json::Value::is_object) {
                out.push(format!(
                    "{p}: a list of maps where the chart has no example item (free-form? then FREE_FORM, with why)"
                ));
            }
        }
    }
}

/// `chart`'s values with a subchart's under `name`, as Helm merges them (the parent's win).
fn with_subchart(mut chart: ChartValues, name: &str, sub: ChartValues) -> ChartValues {
    fn merge(into: &mut serde_json::Value, from: &serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    match a.get_mut(k) {
                        Some(mine) => merge(mine, v),
                        None => {
                            a.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            (into, from) if into.is_null() => *into = from.clone(),
            _ => {}
        }
    }
    let mut parent_side = chart.values[name].take();
    merge(&mut parent_side, &sub.values);
    chart.values[name] = parent_side;
    chart
        .documented
        .extend(sub.documented.iter().map(|k| format!("{name}.{k}")));
    chart
}

#[test]
fn values_keys_exist_in_the_pinned_charts() {
    let lab = LabConfig::default();
    assert_eq!(
        (lab.charts.cilium.as_str(), lab.charts.kube_prometheus_stack.as_str()),
        ("1.18.12", "88.5.3"),
        "a new pin needs its values.yaml (and kube-prometheus-stack's grafana subchart's) in tests/data/charts"
    );
    let mut no_hubble = LabConfig::default();
    no_hubble.addons.hubble = false;
    let nodes = nodes_lab();
    let charts = &lab.charts;
    let cilium = format!("cilium-{}", charts.cilium);
    let kps = format!("kube-prometheus-stack-{}", charts.kube_prometheus_stack);
    let cases: Vec<(&str, &str, serde_json::Value)> = vec![
        (&cilium, "network", values::cilium(&lab, CiliumPhase::Network)),
        (&cilium, "monitoring", values::cilium(&lab, CiliumPhase::Monitoring)),
        (
            &cilium,
            "no hubble",
            values::cilium(&no_hubble, CiliumPhase::Monitoring),
        ),
        (&kps, "default", values::kube_prometheus_stack(&lab)),
        (&kps, "existing machines", values::kube_prometheus_stack(&nodes)),
        ("loki", "default", values::loki(&lab)),
        ("local-path-provisioner", "default", values::local_path(&lab)),
        ("traefik", "existing machines", values::traefik(&nodes)),
        ("metallb", "existing machines", values::metallb(&nodes)),
    ];
    let file = |chart: &str| {
        let version = match chart {
            "loki" => charts.loki.clone(),
            "local-path-provisioner" => charts.local_path.clone(),
            "traefik" => charts.traefik.clone(),
            "metallb" => charts.metallb.clone(),
            _ => return format!("{chart}.values.yaml"),
        };
        format!("{chart}-{version}.values.yaml")
    };
    let mut problems = Vec::new();
    for (chart, lab_name, written) in &cases {
        let mut theirs = chart_values(&file(chart));
        if *chart == kps {
            theirs = with_subchart(theirs, "grafana", chart_values("grafana-12.11.1.values.yaml"));
        }
        let mut out = Vec::new();
        unknown_keys(written, &theirs, Some(&theirs.values), "", &mut out);
        problems.extend(out.into_iter().map(|p| format!("{chart} ({lab_name}): {p}")));
    }
    // Every entry of FREE_FORM is still needed.
    for (pattern, why) in FREE_FORM {
        let used = cases
            .iter()
            .any(|(_, _, w)| paths(w, "").iter().any(|p| matches(pattern, p)));
        assert!(used, "FREE_FORM {pattern} ({why}) matches nothing the installer writes");
    }
    // Every chart `up` installs, for either lab, is covered.
    let state = tempfile::tempdir().unwrap();
    let mut installed = std::collections::BTreeSet::new();
    for lab in [&lab, &nodes] {
        let paths = installer::state::Paths::new(state.path(), "sre-lab");
        let ctx = installer::plan::Context { lab, paths: &paths };
        for step in installer::plan::up(&ctx) {
            for action in &step.actions {
                if let installer::plan::Action::Run { cmd } = action {
                    if cmd.program == "helm" && cmd.args.starts_with(&["upgrade".to_owned(), "--install".to_owned()]) {
                        installed.insert(cmd.args[3].clone());
                    }
                }
            }
        }
    }
    assert_eq!(installed.len(), 6, "{installed:?}");
    for chart in &installed {
        assert!(
            cases.iter().any(|(c, _, _)| c.starts_with(chart.as_str())),
            "{chart} is not checked"
        );
    }
    assert!(
        problems.is_empty(),
        "values keys the pinned charts do not read:\n{}",
        problems.join("\n")
    );
}

fn paths(v: &serde_json::Value, path: &str) -> Vec<String> {
    let Some(map) = v.as_object() else { return Vec::new() };
    map.iter()
        .flat_map(|(k, v)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            let mut out = paths(v, &p);
            out.push(p);
            out
        })
        .collect()
}

#[test]
fn a_key_the_chart_no_longer_reads_is_caught() {
    // Traefik's Service type moved to `service.spec.type` in chart v40.
    let traefik = chart_values(&format!("traefik-{}.values.yaml", LabConfig::default().charts.traefik));
    let mut out = Vec::new();
    let written = serde_json::json!({ "service": { "type": "NodePort", "spec": { "type": "NodePort" } } });
    unknown_keys(&written, &traefik, Some(&traefik.values), "", &mut out);
    assert_eq!(out, ["service.type: not a key of the chart"]);
    // A map where the chart has a scalar is caught too, and a scalar where it has a list.
    let mut out = Vec::new();
    let written = serde_json::json!({ "service": { "enabled": { "x": 1 } }, "tolerations": "all" });
    unknown_keys(&written, &traefik, Some(&traefik.values), "", &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
    // Items of a list of maps the chart gives examples of are checked against those.
    let chart = ChartValues {
        values: serde_json::json!({ "ports": [{ "name": "web", "port": 80 }] }),
        documented: Default::default(),
    };
    let mut out = Vec::new();
    let written = serde_json::json!({ "ports": [{ "name": "x", "prot": 81 }] });
    unknown_keys(&written, &chart, Some(&chart.values), "", &mut out);
    assert_eq!(out, ["ports[].prot: not a key of the chart"]);
}

#[test]
fn commented_out_keys_count_as_documented() {
    let keys = documented_keys(
        "socketLB:\n  enabled: false\n  # -- Disable socket lb for non-root ns.\n  # hostNamespaceOnly: false\n# resources:\n#   limits:\n#     cpu: 100m\nimage:\n  # Note: about tags\n  tag: \"\"\n  template: |\n    not: a key\n",
    );
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "image",
            "image.Note",
            "image.tag",
            "image.template",
            "resources",
            "resources.limits",
            "resources.limits.cpu",
            "socketLB",
            "socketLB.enabled",
            "socketLB.hostNamespaceOnly",
        ]
    );
}
