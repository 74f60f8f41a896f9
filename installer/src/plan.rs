//! The ordered steps of `up` and `down`, built from the lab file alone: `plan` and
//! `up --dry-run` print them, `up` runs them. Nothing here runs anything.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use config::lab::{LabConfig, Provider};
use md5::{Digest, Md5};
use serde::Serialize;

use crate::runner::Cmd;
use crate::state::Paths;
use crate::values::{self, CiliumPhase, MONITORING_NS};

/// The agent's manifests (kustomize `deploy/overlays/lab`, rendered by scripts/render-deploy.sh).
pub const AGENT_MANIFESTS: &str = include_str!("../../deploy/rendered/lab.yaml");
/// The agent without eBPF capabilities (`deploy/overlays/no-ebpf`).
pub const AGENT_MANIFESTS_NO_EBPF: &str = include_str!("../../deploy/rendered/no-ebpf.yaml");
/// The sample workload (`deploy/sample-app`).
pub const SAMPLE_APP_MANIFESTS: &str = include_str!("../../deploy/rendered/sample-app.yaml");

/// Helm repositories of the charts.
pub mod repos {
    /// Cilium.
    pub const CILIUM: &str = "https://helm.cilium.io";
    /// prometheus-community.
    pub const PROMETHEUS_COMMUNITY: &str = "https://prometheus-community.github.io/helm-charts";
    /// grafana-community (Loki's OSS chart since March 2026).
    pub const GRAFANA_COMMUNITY: &str = "https://grafana-community.github.io/helm-charts";
    /// containeroo (local-path-provisioner).
    pub const CONTAINEROO: &str = "https://charts.containeroo.ch";
    /// Traefik.
    pub const TRAEFIK: &str = "https://traefik.github.io/charts";
    /// MetalLB.
    pub const METALLB: &str = "https://metallb.github.io/metallb";
}

/// The lab registry's port on the host.
pub const REGISTRY_PORT: u16 = 5005;
/// The lab registry's address on the Talos in Docker network (outside MetalLB's default pool).
pub const REGISTRY_DOCKER_IP: &str = "10.5.0.254";
/// The registry image.
pub const REGISTRY_IMAGE: &str = "registry:2.8.3";
/// The registry the installer runs when it builds the agent image itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRegistry {
    /// Container name.
    pub container: String,
    /// `host:port` the Talos nodes pull from (the lab network's gateway).
    pub node_host: String,
    /// The image as pushed from this host.
    pub push_ref: String,
    /// The image as the nodes pull it.
    pub pull_ref: String,
}

/// The lab registry, when the agent image is built here (no `agent_image`, Talos in
/// Docker or QEMU): nodes reach the host at the lab network's gateway, 10.5.0.1.
pub fn local_registry(lab: &LabConfig) -> Option<LocalRegistry> {
    if !lab.addons.agent || !lab.agent_image.is_empty() || lab.provider == Provider::Nodes {
        return None;
    }
    // Talos in Docker: the registry joins the cluster's Docker network at a fixed address
    // (Docker drops traffic between its bridges, so a port published on another bridge would
    // not do). QEMU: the nodes reach the host at the bridge's gateway.
    let node_host = match lab.provider {
        Provider::Docker => format!("{REGISTRY_DOCKER_IP}:5000"),
        _ => format!("10.5.0.1:{REGISTRY_PORT}"),
    };
    let path = format!("sre-lab/agent:{}", env!("CARGO_PKG_VERSION"));
    Some(LocalRegistry {
        container: format!("{}-registry", lab.cluster_name),
        push_ref: format!("127.0.0.1:{REGISTRY_PORT}/{path}"),
        pull_ref: format!("{node_host}/{path}"),
        node_host,
    })
}

/// Where the agent image is built from: this checkout when the binary runs from it, else
/// the working directory.
pub fn build_context() -> PathBuf {
    let checkout = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if checkout.join("Dockerfile").exists() {
        checkout.canonicalize().unwrap_or(checkout)
    } else {
        PathBuf::from(".")
    }
}

/// How long Helm waits for a release's resources.
const HELM_TIMEOUT: &str = "10m";

/// One thing a step does.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// Writes a generated file (values, patch).
    Write {
        /// Destination.
        path: PathBuf,
        /// Contents.
        contents: String,
    },
    /// Runs an external tool.
    Run {
        /// The command.
        cmd: Cmd,
    },
    /// Runs a command and keeps what `pattern`'s first group matches in its output as `var`;
    /// later manifests use it as `{{var}}`.
    RunCapture {
        /// The command.
        cmd: Cmd,
        /// The variable.
        var: String,
        /// A regex with one group.
        pattern: String,
    },
    /// Server-side applies multi-document YAML with kube-rs.
    Apply {
        /// What it is, for output.
        what: String,
        /// The manifests.
        manifests: String,
    },
    /// Waits with a kube-rs watcher until a workload is rolled out.
    WaitRollout {
        /// `DaemonSet` or `Deployment`.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// How long to wait.
        timeout_secs: u64,
    },
    /// Generates the Grafana admin password once (kept in the state directory, 0600) and
    /// applies it as a Secret.
    GrafanaSecret {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
    },
    /// Removes the contexts `installer kubeconfig --merge` added to other kubeconfigs and the
    /// state directory; with `keep_config`, kubeconfig, talosconfig and secrets stay.
    Cleanup {
        /// The state directory.
        dir: PathBuf,
        /// Keep the cluster's configs.
        keep_config: bool,
    },
    /// Makes a file private (kubeconfig, talosconfig).
    Private {
        /// The file.
        path: PathBuf,
    },
}

impl serde::Serialize for Cmd {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.shell_line())
    }
}

/// What makes a step unnecessary, checked before running it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Probe {
    /// The command exits 0 (e.g. the cluster's first container exists).
    Succeeds {
        /// The command.
        cmd: Cmd,
    },
    /// The command fails (e.g. there is no such container to remove).
    Fails {
        /// The command.
        cmd: Cmd,
    },
    /// Every one of these holds.
    All {
        /// The probes.
        probes: Vec<Probe>,
    },
    /// The command exits 0 and prints `text`.
    Prints {
        /// The command.
        cmd: Cmd,
        /// What its output holds.
        text: String,
    },
    /// The file exists.
    Exists {
        /// The file.
        path: PathBuf,
    },
}

/// One step of `up` or `down`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    /// Stable identifier (recorded in the state file).
    pub id: String,
    /// What it does, for humans.
    pub title: String,
    /// Its actions, in order.
    pub actions: Vec<Action>,
    /// When set, checked first: a true probe skips the step, whatever the state file says;
    /// when the step does run, later steps' records are cleared (a new cluster).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_if: Option<Probe>,
    /// Failed commands are retried until this many seconds have passed (Talos nodes reboot
    /// after install, so bootstrap and kubeconfig retry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_secs: Option<u64>,
    /// What to try when the step fails.
    pub hint: String,
    /// Steps this one also accomplishes when it runs (creating a cluster applies the patch
    /// `machine-config` would): they are recorded done with it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also_done: Vec<String>,
    /// Runs on every `up`, whatever the state file says (its inputs are not in the plan:
    /// the agent image is built from the checkout as it is now; `docker build` caches).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub always: bool,
    /// When its probe fails the thing is made anew (a cluster, a secrets bundle), so what
    /// later steps recorded no longer holds.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resets_later: bool,
    /// Said after the step's line when it ran (not part of what makes the step done).
    #[serde(skip)]
    pub notice: Option<String>,
}

impl Step {
    fn new(id: &str, title: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            id: id.to_owned(),
            title: title.into(),
            actions: Vec::new(),
            skip_if: None,
            retry_secs: None,
            hint: hint.into(),
            also_done: Vec::new(),
            always: false,
            resets_later: false,
            notice: None,
        }
    }

    fn act(mut self, a: Action) -> Self {
        self.actions.push(a);
        self
    }

    fn run(self, cmd: Cmd) -> Self {
        self.act(Action::Run { cmd })
    }

    /// A digest of the step's actions: a step whose commands or files changed runs again.
    pub fn fingerprint(&self) -> String {
        let text = serde_json::to_string(&self.actions).expect("serializable");
        let digest = Md5::digest(text.as_bytes());
        digest.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// The retry budget as a duration.
    pub fn retry(&self) -> Option<Duration> {
        self.retry_secs.map(Duration::from_secs)
    }
}

/// Everything the steps need to know besides the lab file.
#[derive(Clone, Debug)]
pub struct Context<'a> {
    /// The lab file.
    pub lab: &'a LabConfig,
    /// The cluster's state directory.
    pub paths: &'a Paths,
}

/// Every node's address: control planes first (Talos in Docker/QEMU numbers nodes from .2).
pub fn all_node_ips(lab: &LabConfig) -> Vec<String> {
    match lab.provider {
        Provider::Docker | Provider::Qemu => (0..lab.nodes.control_planes + lab.nodes.workers)
            .map(|i| format!("10.5.0.{}", 2 + i))
            .collect(),
        Provider::Nodes => lab
            .machines
            .control_planes
            .iter()
            .chain(&lab.machines.workers)
            .cloned()
            .collect(),
    }
}

/// The first control plane's address: Talos in Docker/QEMU numbers nodes from .2 of its subnet.
pub fn first_control_plane(lab: &LabConfig) -> String {
    match lab.provider {
        Provider::Docker | Provider::Qemu => "10.5.0.2".to_owned(),
        Provider::Nodes => lab.machines.control_planes.first().cloned().unwrap_or_default(),
    }
}

fn talosctl(ctx: &Context<'_>, args: &[&str]) -> Cmd {
    let t = ctx.paths.talosconfig();
    let mut c = Cmd::new("talosctl", ["--talosconfig".to_owned(), t.display().to_string()]);
    c.args.extend(args.iter().map(|s| (*s).to_owned()));
    c
}

/// A chart the lab installs; the release is named after it.
struct Release<'a> {
    chart: &'a str,
    repo: &'a str,
    version: &'a str,
    namespace: &'a str,
}

fn helm_install(ctx: &Context<'_>, r: &Release<'_>, values: &str) -> Cmd {
    let kubeconfig = ctx.paths.kubeconfig().display().to_string();
    let mut cmd = Cmd::new("helm", ["upgrade", "--install", r.chart, r.chart]);
    cmd.args.extend(
        [
            "--repo",
            r.repo,
            "--version",
            r.version,
            "--namespace",
            r.namespace,
            "--create-namespace",
            "--values",
            values,
            "--wait",
            "--timeout",
            HELM_TIMEOUT,
            "--kubeconfig",
            &kubeconfig,
        ]
        .map(String::from),
    );
    cmd
}

/// Writes a chart's values and installs or upgrades its release.
fn helm_step(ctx: &Context<'_>, id: &str, title: &str, r: Release<'_>, file: &str, values: String) -> Step {
    let (w, path) = write_values(ctx, file, values);
    let kubeconfig = ctx.paths.kubeconfig().display().to_string();
    let (release, ns) = (r.chart, r.namespace);
    Step::new(
        id,
        title,
        format!("`helm status {release} -n {ns} --kubeconfig {kubeconfig}` and the pods in {ns} say why; re-run `installer up` to continue"),
    )
    .act(w)
    .run(helm_install(ctx, &r, &path))
}

fn write_values(ctx: &Context<'_>, file: &str, contents: String) -> (Action, String) {
    let path = ctx.paths.rendered(file);
    let shown = path.display().to_string();
    (Action::Write { path, contents }, shown)
}

/// The namespaces the lab's privileged workloads run in (hostPath, hostNetwork): labelled
/// for Pod Security admission, which Talos enforces at `baseline` by default.
pub fn namespaces(lab: &LabConfig) -> String {
    let mut names = vec![MONITORING_NS];
    if lab.addons.local_path {
        names.push("local-path-storage");
    }
    if lab.addons.metallb {
        names.push("metallb-system");
    }
    if lab.addons.sample_app {
        names.push("sre-lab-sample");
    }
    let mut out = String::new();
    for n in names {
        let level = if n == "sre-lab-sample" {
            "restricted"
        } else {
            "privileged"
        };
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {n}\n  labels:\n    app.kubernetes.io/managed-by: sre-lab-installer\n    pod-security.kubernetes.io/enforce: {level}\n    pod-security.kubernetes.io/audit: {level}\n    pod-security.kubernetes.io/warn: {level}\n"
        );
    }
    out
}

/// `--endpoints` for node-targeted talosctl commands: Talos in Docker/QEMU talosconfigs
/// already point at the host-mapped API endpoint; existing machines are reached directly.
fn node_args(lab: &LabConfig, ip: &str) -> Vec<String> {
    let mut v = vec!["--nodes".to_owned(), ip.to_owned()];
    if lab.provider == Provider::Nodes {
        v.extend(["--endpoints".to_owned(), ip.to_owned()]);
    }
    v
}

fn talosctl_on(ctx: &Context<'_>, ip: &str, args: &[&str]) -> Cmd {
    let mut c = talosctl(ctx, &[]);
    c.args.extend(node_args(ctx.lab, ip));
    c.args.extend(args.iter().map(|s| (*s).to_owned()));
    c
}

/// The agent's manifests for this lab: the rendered overlay (without eBPF capabilities
/// when Cilium is off) with the image the nodes pull, `CLUSTER_NAME` (the agent's
/// `cluster` external label) set to the lab's name, and no ServiceMonitor without the
/// Prometheus operator.
pub fn agent_manifests(lab: &LabConfig) -> String {
    let base = if lab.addons.cilium {
        AGENT_MANIFESTS
    } else {
        AGENT_MANIFESTS_NO_EBPF
    };
    // The image built here is pulled by digest (known once pushed): a rebuild rolls the
    // DaemonSet, an unchanged one leaves it be.
    let image = match local_registry(lab) {
        Some(reg) => format!(
            "{}@{{{{agent_digest}}}}",
            reg.pull_ref
                .rsplit_once(':')
                .map_or(reg.pull_ref.as_str(), |(repo, _)| repo)
        ),
        None => lab.agent_image.clone(),
    };
    let docs = crate::yaml::documents(base).expect("the embedded manifests are valid YAML (tested)");
    let mut out = String::new();
    for mut d in docs {
        if d["kind"] == "ServiceMonitor" && !lab.addons.prometheus {
            continue;
        }
        if d["kind"] == "DaemonSet" {
            if let Some(containers) = d["spec"]["template"]["spec"]["containers"].as_array_mut() {
                for c in containers.iter_mut().filter(|c| c["name"] == "agent") {
                    c["image"] = serde_json::json!(image);

                    if let Some(env) = c["env"].as_array_mut() {
                        env.retain(|e| e["name"] != "CLUSTER_NAME");
                        env.push(serde_json::json!({"name": "CLUSTER_NAME", "value": lab.cluster_name}));
                    }
                }
            }
        }
        out.push_str("---\n");
        out.push_str(&crate::yaml::to_string(&d));
    }
    out
}

/// Where `up` records the etcd arguments the last machine-config patch that had any set (a
/// later patch without them leaves them on the nodes).
const ETCD_APPLIED: &str = "talos-etcd-applied.yaml";

/// The etcd settings (`cluster.etcd`) of a machine-config patch, if it has any.
fn etcd_args(patch: &str) -> Option<serde_json::Value> {
    crate::yaml::documents(patch)
        .ok()
        .and_then(|d| d.into_iter().next())
        .map(|d| d["cluster"]["etcd"].clone())
        .filter(|v| !v.is_null())
}

/// Records `etcd` as the settings the nodes run ([`ETCD_APPLIED`]; `null` for none).
fn etcd_record(ctx: &Context<'_>, etcd: Option<serde_json::Value>) -> Action {
    Action::Write {
        path: ctx.paths.rendered(ETCD_APPLIED),
        contents: crate::yaml::to_string(&serde_json::json!({ "cluster": { "etcd": etcd } })),
    }
}

/// Made nodes run the etcd settings of the creation patch.
fn etcd_record_of_creation(ctx: &Context<'_>) -> Action {
    etcd_record(ctx, etcd_args(&values::talos_patch(ctx.lab)))
}

/// The steps of `up`, in order.
pub fn up(ctx: &Context<'_>) -> Vec<Step> {
    let lab = ctx.lab;
    let paths = ctx.paths;
    let mut steps = Vec::new();

    let (patch_action, patch_file) = write_values(ctx, "talos-patch.yaml", values::talos_patch(lab));
    let patch_arg = format!("@{patch_file}");
    let cp = first_control_plane(lab);
    let kubeconfig = paths.kubeconfig().display().to_string();

    node_steps(ctx, &mut steps, patch_action, &patch_arg);

    // The patch also reaches nodes that already exist: a changed lab file (add-ons, the
    // registry mirror) is applied to them; unchanged, the step is skipped by its fingerprint,
    // and making the nodes counts as applying it. Talos merges lists in a patch by appending,
    // so this one leaves out the kubelet mount list (set when the nodes are made).
    let (patch_again, again_file) = write_values(ctx, "talos-patch-update.yaml", values::talos_update_patch(lab));
    let mut patch_cmd = talosctl(ctx, &["--nodes", &all_node_ips(lab).join(",")]);
    patch_cmd.args.extend([
        "patch".into(),
        "machineconfig".into(),
        "--patch".into(),
        format!("@{again_file}"),
    ]);
    let mut mc = Step::new(
        "machine-config",
        "Apply the lab's machine-config patch to every node (a no-op when unchanged)",
        "`talosctl get machineconfig` on the node shows what it runs; a patch Talos refuses is reported above",
    )
    .act(patch_again)
    .run(patch_cmd);
    // Freshly installed machines reboot first.
    mc.retry_secs = Some(300);
    // Talos applies etcd's extra arguments to a running control plane at its next boot only.
    // A patch merges: leaving the arguments out removes nothing, so the nodes run the last
    // arguments a patch set — recorded after each patch that sets them, else the creation
    // patch's.
    let read = |f: &str| std::fs::read_to_string(ctx.paths.rendered(f)).ok();
    let made = read("talos-patch.yaml");
    let before = read(ETCD_APPLIED)
        .as_deref()
        .and_then(etcd_args)
        .or_else(|| made.as_deref().and_then(etcd_args));
    let wanted = etcd_args(&values::talos_update_patch(lab));
    if wanted.is_some() {
        mc = mc.act(etcd_record(ctx, wanted.clone()));
    }
    if let (Some(_), Some(wanted)) = (&made, wanted) {
        if before.as_ref() != Some(&wanted) {
            let cps = match lab.provider {
                Provider::Nodes => lab.machines.control_planes.clone(),
                _ => all_node_ips(lab)
                    .into_iter()
                    .take(lab.nodes.control_planes as usize)
                    .collect(),
            };
            mc.notice = Some(format!(
                "etcd's metrics listener changed: running control planes use it after a reboot — `talosctl --nodes <ip> reboot`, one at a time ({})",
                cps.join(", ")
            ));
        }
    }
    steps.push(mc);

    let mut kc = Step::new(
        "kubeconfig",
        "Fetch the admin kubeconfig (mode 0600)",
        "the API server may still be starting; re-run `installer up`",
    )
    .run(talosctl_on(
        ctx,
        &cp,
        &["kubeconfig", "--merge=false", "--force", &kubeconfig],
    ))
    .act(Action::Private {
        path: paths.kubeconfig(),
    });
    kc.skip_if = Some(Probe::Exists {
        path: paths.kubeconfig(),
    });
    kc.retry_secs = Some(300);
    steps.push(kc);

    if lab.addons.cilium {
        // The nodes come up with no CNI (`cni: none`): Cilium goes in with Helm once the API
        // answers. Talos's cluster checks (those `cluster create` runs, too) skip node
        // readiness and CoreDNS while the CNI is `none` (Talos >= v1.13.0), so nothing has to
        // be there before the nodes are made.
        let mut c = helm_step(
            ctx,
            "cilium-bootstrap",
            &format!(
                "Install Cilium {}{}",
                lab.charts.cilium,
                if lab.addons.hubble { " with Hubble" } else { "" }
            ),
            Release {
                chart: "cilium",
                repo: repos::CILIUM,
                version: &lab.charts.cilium,
                namespace: "kube-system",
            },
            "cilium-values.yaml",
            values::render(lab, "cilium", values::cilium(lab, CiliumPhase::Network)),
        );
        c.retry_secs = Some(300);
        // Once the release exists, the `cilium` step below owns its values: a later change
        // is one upgrade to the full values, not a round through the network-only ones.
        // Only a deployed release counts (not a failed or interrupted install); when the step
        // runs anyway on a running lab (an API that did not answer the probe), the later steps
        // run again too, so the full values come back after it.
        c.skip_if = Some(Probe::Prints {
            cmd: Cmd::new(
                "helm",
                [
                    "status",
                    "cilium",
                    "--namespace",
                    "kube-system",
                    "--output",
                    "json",
                    "--kubeconfig",
                    &kubeconfig,
                ],
            ),
            text: r#""status":"deployed""#.into(),
        });
        c.resets_later = true;
        steps.push(c);
    }
    steps.push(
        Step::new(
            "health",
            "Wait for the cluster to be healthy (etcd, API server, nodes Ready)",
            "`talosctl health` prints which check fails; if `talosctl cluster create` was interrupted, `installer down` then `installer up` starts clean",
        )
        .run(talosctl_on(ctx, &cp, &["health", "--wait-timeout", "10m"])),
    );
    let mut ns = Step::new(
        "namespaces",
        "Create the lab's namespaces with their Pod Security levels",
        "is the API server up? `installer status`",
    )
    .act(Action::Apply {
        what: "namespaces".into(),
        manifests: namespaces(lab),
    });
    ns.retry_secs = Some(120);
    steps.push(ns);

    registry_steps(ctx, &mut steps);
    addon_steps(ctx, &mut steps);
    // Fresh machines get the patch in their configs, as a created cluster does: bootstrapping
    // them counts as applying it (regenerating the configs does not: running machines only
    // get a changed patch from the machine-config step).
    if let Some(s) = steps.iter_mut().find(|s| s.id == "bootstrap") {
        s.also_done = vec!["machine-config".into()];
    }
    steps
}

/// Making the nodes, by provider: `talosctl cluster create` for Docker and QEMU; for existing
/// machines, the secrets bundle, machine configs, `apply-config`, bootstrap.
fn node_steps(ctx: &Context<'_>, steps: &mut Vec<Step>, patch_action: Action, patch_arg: &str) {
    let lab = ctx.lab;
    let paths = ctx.paths;
    let name = lab.cluster_name.as_str();
    let cp = first_control_plane(lab);
    let kubeconfig = paths.kubeconfig().display().to_string();
    match lab.provider {
        Provider::Docker | Provider::Qemu => {
            let provisioner = if lab.provider == Provider::Docker {
                "docker"
            } else {
                "qemu"
            };
            let cpus = format!("{:.1}", lab.nodes.cpus);
            let memory = format!("{}MiB", lab.nodes.memory_mib);
            let mut create = Cmd::new(
                "talosctl",
                [
                    "cluster",
                    "create",
                    provisioner,
                    "--name",
                    name,
                    "--state",
                    &paths.talos_state().display().to_string(),
                    "--talosconfig-destination",
                    &paths.talosconfig().display().to_string(),
                ],
            );
            if lab.provider == Provider::Qemu {
                create
                    .args
                    .extend(["--controlplanes".to_owned(), lab.nodes.control_planes.to_string()]);
                create
                    .args
                    .extend(["--talos-version".to_owned(), lab.versions.talos.clone()]);
            } else {
                create.args.extend([
                    "--image".to_owned(),
                    format!("ghcr.io/siderolabs/talos:{}", lab.versions.talos),
                ]);
            }
            for (flag, value) in [
                ("--workers", lab.nodes.workers.to_string()),
                ("--cpus-controlplanes", cpus.clone()),
                ("--cpus-workers", cpus),
                ("--memory-controlplanes", memory.clone()),
                ("--memory-workers", memory),
                ("--kubernetes-version", lab.versions.kubernetes.clone()),
                ("--config-patch", patch_arg.to_owned()),
            ] {
                create.args.extend([flag.to_owned(), value]);
            }
            // talosctl merges the admin kubeconfig (API server mapped to 127.0.0.1) into the
            // single file $KUBECONFIG names: make that the lab's own.
            let create = create.env("KUBECONFIG", kubeconfig.clone());
            // Made, and made to the end: `cluster create` writes the kubeconfig last. Containers
            // without it are a create that failed half-way; the step then runs (and talosctl
            // says the cluster exists: the hint says to `installer down` first).
            let made = if lab.provider == Provider::Docker {
                Probe::Succeeds {
                    cmd: Cmd::new(
                        "docker",
                        [
                            "container",
                            "inspect",
                            "--format",
                            "{{.Name}}",
                            &format!("{name}-controlplane-1"),
                        ],
                    ),
                }
            } else {
                Probe::Exists {
                    path: paths.talos_state().join(name),
                }
            };
            let probe = Probe::All {
                probes: vec![
                    made,
                    Probe::Exists {
                        path: paths.kubeconfig(),
                    },
                ],
            };
            let s = Step::new(
                "cluster",
                format!("Create Talos {} cluster {name:?} in {provisioner} ({} control plane, {} workers)", lab.versions.talos, lab.nodes.control_planes, lab.nodes.workers),
                "`installer check-deps` says what is missing; a create that failed half-way leaves containers behind: `installer down`, then `installer up`".to_owned(),
            )
            .act(patch_action);
            let mut s = s
                .run(create)
                .act(etcd_record_of_creation(ctx))
                .act(Action::Private {
                    path: paths.talosconfig(),
                })
                .act(Action::Private {
                    path: paths.kubeconfig(),
                });
            s.skip_if = Some(probe);
            s.also_done = vec!["machine-config".into()];
            s.resets_later = true;
            steps.push(s);
        }
        Provider::Nodes => {
            let m = &lab.machines;
            let mut secrets = Step::new(
                "secrets",
                "Generate the Talos secrets bundle (kept for idempotent re-runs)",
                "talosctl must be installed; see `installer check-deps`",
            )
            .run(Cmd::new(
                "talosctl",
                [
                    "gen",
                    "secrets",
                    "--output-file",
                    &paths.secrets().display().to_string(),
                ],
            ))
            .act(Action::Private { path: paths.secrets() });
            secrets.skip_if = Some(Probe::Exists { path: paths.secrets() });
            secrets.resets_later = true;
            steps.push(secrets);

            let out_dir = paths.machine_configs();
            let mut gen = Cmd::new(
                "talosctl",
                [
                    "gen",
                    "config",
                    name,
                    &format!("https://{cp}:6443"),
                    "--with-secrets",
                    &paths.secrets().display().to_string(),
                    "--install-disk",
                    &m.install_disk,
                    "--talos-version",
                    &lab.versions.talos,
                    "--kubernetes-version",
                    &lab.versions.kubernetes,
                    "--config-patch",
                    patch_arg,
                ],
            );
            gen.args.extend([
                "--output".to_owned(),
                out_dir.display().to_string(),
                "--force".to_owned(),
            ]);
            let mut endpoints = talosctl(ctx, &["config", "endpoint"]);
            endpoints.args.extend(m.control_planes.iter().cloned());
            let mut nodes = talosctl(ctx, &["config", "node"]);
            nodes.args.push(cp.clone());
            steps.push(
                Step::new(
                    "machine-configs",
                    "Generate machine configs from the secrets bundle",
                    "check the lab file's machines section",
                )
                .act(patch_action)
                .run(gen)
                .act(Action::Private {
                    path: out_dir.join("controlplane.yaml"),
                })
                .act(Action::Private {
                    path: out_dir.join("worker.yaml"),
                })
                .run(Cmd::new(
                    "cp",
                    [
                        out_dir.join("talosconfig").display().to_string(),
                        paths.talosconfig().display().to_string(),
                    ],
                ))
                .act(Action::Private {
                    path: paths.talosconfig(),
                })
                .run(endpoints)
                .run(nodes),
            );
            for (role, ips, file) in [
                ("control-plane", &m.control_planes, "controlplane.yaml"),
                ("worker", &m.workers, "worker.yaml"),
            ] {
                for ip in ips {
                    let mut s = Step::new(
                        &format!("apply-config-{ip}"),
                        format!("Apply the {role} config to {ip} (maintenance mode)"),
                        format!("is {ip} booted from the Talos ISO and reachable on port 50000? `talosctl --nodes {ip} get disks --insecure` lists its disks"),
                    )
                    .run(Cmd::new("talosctl", ["apply-config", "--insecure", "--nodes", ip, "--file", &out_dir.join(file).display().to_string()]));
                    // A configured node answers on its authenticated API: nothing to apply.
                    s.skip_if = Some(Probe::Succeeds {
                        cmd: talosctl_on(ctx, ip, &["version"]),
                    });
                    steps.push(s);
                }
            }
            let mut boot = Step::new(
                "bootstrap",
                format!("Bootstrap etcd on {cp} (once)"),
                "the node reboots after installing; if this keeps failing, `talosctl dmesg` on it says why",
            )
            .run(talosctl_on(ctx, &cp, &["bootstrap"]))
            .act(etcd_record_of_creation(ctx));
            boot.skip_if = Some(Probe::Succeeds {
                cmd: talosctl_on(ctx, &cp, &["etcd", "status"]),
            });
            boot.retry_secs = Some(600);
            steps.push(boot);
        }
    }
}

/// The lab's image registry and the agent image pushed to it (Talos in Docker/QEMU without
/// an `agent_image`).
fn registry_steps(ctx: &Context<'_>, steps: &mut Vec<Step>) {
    let lab = ctx.lab;
    if let Some(reg) = local_registry(lab) {
        let mut run = Step::new(
            "registry",
            format!("Run the lab's image registry ({} for the nodes)", reg.node_host),
            "`docker logs` of the registry container says why; port 5005 must be free",
        )
        .run({
            let mut run = Cmd::new(
                "docker",
                [
                    "run",
                    "--detach",
                    "--restart=always",
                    "--name",
                    &reg.container,
                    "--publish",
                    &format!("127.0.0.1:{REGISTRY_PORT}:5000"),
                ],
            );
            if lab.provider == Provider::Qemu {
                run.args
                    .extend(["--publish".to_owned(), format!("{}:5000", reg.node_host)]);
            }
            run.args.push(REGISTRY_IMAGE.to_owned());
            run
        });
        if lab.provider == Provider::Docker {
            // talosctl names the cluster's network after the cluster.
            run = run.run(Cmd::new(
                "docker",
                [
                    "network",
                    "connect",
                    "--ip",
                    REGISTRY_DOCKER_IP,
                    &lab.cluster_name,
                    &reg.container,
                ],
            ));
        }
        run.skip_if = Some(Probe::Succeeds {
            cmd: Cmd::new(
                "docker",
                ["container", "inspect", "--format", "{{.Name}}", &reg.container],
            ),
        });
        steps.push(run);
        let context = build_context();
        let mut image = Step::new(
                "agent-image",
                format!("Build the agent image from {} and push it to the lab's registry", context.display()),
                "run the installer from the sre-lab checkout (the Dockerfile is at its root), or set agent_image in the lab file",
            )
            .run(Cmd::new(
                "docker",
                [
                    "build", "--file", &context.join("Dockerfile").display().to_string(),
                    "--tag", &reg.push_ref, &context.display().to_string(),
                ],
            ))
            .act(Action::RunCapture {
                cmd: Cmd::new("docker", ["push", &reg.push_ref]),
                var: "agent_digest".into(),
                pattern: r"digest: (sha256:[0-9a-f]{64})".into(),
            });
        image.always = true;
        steps.push(image);
    }
}

/// The add-ons, in dependency order: storage, monitoring CRDs and stack, Cilium upgraded to
/// its full values (ServiceMonitors, dashboards), Loki, MetalLB, Traefik, the agent, the sample app.
fn addon_steps(ctx: &Context<'_>, steps: &mut Vec<Step>) {
    let lab = ctx.lab;
    if lab.addons.local_path {
        steps.push(helm_step(
            ctx,
            "local-path",
            &format!(
                "Install local-path-provisioner {} on {}",
                lab.charts.local_path,
                values::LOCAL_PATH_DIR
            ),
            Release {
                chart: "local-path-provisioner",
                repo: repos::CONTAINEROO,
                version: &lab.charts.local_path,
                namespace: "local-path-storage",
            },
            "local-path-values.yaml",
            values::render(lab, "local_path", values::local_path(lab)),
        ));
    }
    if lab.addons.grafana {
        steps.push(
            Step::new(
                "grafana-password",
                "Store the generated Grafana admin password in a Secret",
                "is the API server up? `installer status`",
            )
            .act(Action::GrafanaSecret {
                namespace: MONITORING_NS.into(),
                name: values::GRAFANA_SECRET.into(),
            }),
        );
    }
    if lab.addons.prometheus || lab.addons.grafana || lab.addons.alertmanager {
        steps.push(helm_step(
            ctx,
            "kube-prometheus-stack",
            &format!(
                "Install kube-prometheus-stack {} (Prometheus, Alertmanager, Grafana)",
                lab.charts.kube_prometheus_stack
            ),
            Release {
                chart: "kube-prometheus-stack",
                repo: repos::PROMETHEUS_COMMUNITY,
                version: &lab.charts.kube_prometheus_stack,
                namespace: MONITORING_NS,
            },
            "kube-prometheus-stack-values.yaml",
            values::render(lab, "kube_prometheus_stack", values::kube_prometheus_stack(lab)),
        ));
    }
    if lab.addons.cilium {
        // The release `cilium-bootstrap` installed, upgraded to the lab's full values: with the
        // Prometheus operator's CRDs now there, its ServiceMonitors and dashboards come along
        // (and go again when the lab turns monitoring off).
        let phase = if lab.addons.prometheus || lab.addons.grafana {
            CiliumPhase::Monitoring
        } else {
            CiliumPhase::Network
        };
        let step = helm_step(
            ctx,
            "cilium",
            &format!(
                "Configure Cilium {}{}",
                lab.charts.cilium,
                if phase == CiliumPhase::Monitoring {
                    " with its ServiceMonitors and dashboards"
                } else {
                    ""
                }
            ),
            Release {
                chart: "cilium",
                repo: repos::CILIUM,
                version: &lab.charts.cilium,
                namespace: "kube-system",
            },
            "cilium-helm-values.yaml",
            values::render(lab, "cilium", values::cilium(lab, phase)),
        );
        steps.push(step);
    }
    if lab.addons.loki {
        steps.push(helm_step(
            ctx,
            "loki",
            &format!("Install Loki {} (single binary, filesystem)", lab.charts.loki),
            Release {
                chart: "loki",
                repo: repos::GRAFANA_COMMUNITY,
                version: &lab.charts.loki,
                namespace: MONITORING_NS,
            },
            "loki-values.yaml",
            values::render(lab, "loki", values::loki(lab)),
        ));
    }
    if lab.addons.metallb {
        steps.push(
            helm_step(
                ctx,
                "metallb",
                &format!("Install MetalLB {}", lab.charts.metallb),
                Release {
                    chart: "metallb",
                    repo: repos::METALLB,
                    version: &lab.charts.metallb,
                    namespace: "metallb-system",
                },
                "metallb-values.yaml",
                values::render(lab, "metallb", values::metallb(lab)),
            )
            .act(Action::Apply {
                what: "MetalLB address pool".into(),
                manifests: values::metallb_pool(lab),
            }),
        );
    }
    if lab.addons.traefik {
        steps.push(helm_step(
            ctx,
            "traefik",
            &format!("Install Traefik {}", lab.charts.traefik),
            Release {
                chart: "traefik",
                repo: repos::TRAEFIK,
                version: &lab.charts.traefik,
                namespace: "traefik",
            },
            "traefik-values.yaml",
            values::render(lab, "traefik", values::traefik(lab)),
        ));
    }
    if lab.addons.agent {
        let manifests = agent_manifests(lab);
        let mut agent = Step::new(
            "agent",
            "Apply the sre-lab agent DaemonSet (server-side apply) and wait for it",
            "`kubectl -n monitoring describe daemonset sre-lab-agent` and the agent's logs say why",
        )
        .act(Action::Apply {
            what: "sre-lab agent".into(),
            manifests,
        })
        .act(Action::WaitRollout {
            kind: "DaemonSet".into(),
            namespace: MONITORING_NS.into(),
            name: "sre-lab-agent".into(),
            timeout_secs: 300,
        });
        // With the image built here, the step runs on every `up` (the digest may have moved);
        // server-side apply of an unchanged DaemonSet changes nothing.
        agent.always = local_registry(lab).is_some();
        steps.push(agent);
    }
    if lab.addons.sample_app {
        steps.push(
            Step::new(
                "sample-app",
                "Deploy the sample app (scraped by annotation, logs to stdout)",
                "`kubectl -n sre-lab-sample describe deployment sample-app`",
            )
            .act(Action::Apply {
                what: "sample app".into(),
                manifests: SAMPLE_APP_MANIFESTS.to_owned(),
            })
            .act(Action::WaitRollout {
                kind: "Deployment".into(),
                namespace: "sre-lab-sample".into(),
                name: "sample-app".into(),
                timeout_secs: 300,
            }),
        );
    }
}

/// The steps of `down`: destroy what `up` made; the state directory goes too unless
/// `keep_config` (then kubeconfig, talosconfig and secrets stay).
pub fn down(ctx: &Context<'_>, keep_config: bool) -> Vec<Step> {
    let lab = ctx.lab;
    let paths = ctx.paths;
    let name = lab.cluster_name.as_str();
    let mut steps = Vec::new();
    // First: it is attached to the cluster's network, which Docker will not remove while
    // it is.
    if let Some(reg) = local_registry(lab) {
        let mut rm = Step::new(
            "registry",
            "Remove the lab's image registry",
            format!("`docker rm -f {}`", reg.container),
        )
        .run(Cmd::new("docker", ["rm", "--force", "--volumes", &reg.container]));
        rm.skip_if = Some(Probe::Fails {
            cmd: Cmd::new(
                "docker",
                ["container", "inspect", "--format", "{{.Name}}", &reg.container],
            ),
        });
        steps.push(rm);
    }
    match lab.provider {
        Provider::Docker | Provider::Qemu => {
            let provisioner = if lab.provider == Provider::Docker {
                "docker"
            } else {
                "qemu"
            };
            steps.push(
                Step::new(
                    "destroy",
                    format!("Destroy Talos cluster {name:?} ({provisioner})"),
                    "`docker ps -a --filter name={name}-` lists what is left",
                )
                .run(Cmd::new(
                    "talosctl",
                    // The provisioner is inferred from the state directory.
                    [
                        "cluster",
                        "destroy",
                        "--name",
                        name,
                        "--state",
                        &paths.talos_state().display().to_string(),
                    ],
                )),
            );
        }
        Provider::Nodes => {
            let mut s = Step::new(
                "reset",
                "Reset the machines to maintenance mode (wipes STATE and EPHEMERAL)",
                "a machine that does not answer can be reset from its console",
            );
            for ip in lab.machines.workers.iter().chain(&lab.machines.control_planes) {
                s = s.run(talosctl_on(
                    ctx,
                    ip,
                    &[
                        "reset",
                        "--graceful=false",
                        "--reboot",
                        "--system-labels-to-wipe",
                        "STATE",
                        "--system-labels-to-wipe",
                        "EPHEMERAL",
                    ],
                ));
            }
            steps.push(s);
        }
    }
    let cleanup = Step::new(
        "contexts",
        if keep_config {
            "Keep kubeconfig and talosconfig (--keep-config); remove the rest of the state".to_owned()
        } else {
            "Remove the kubeconfig context it merged and the state directory".to_owned()
        },
        format!("remove {} by hand", paths.dir.display()),
    );
    let cleanup = cleanup.act(Action::Cleanup {
        dir: paths.dir.clone(),
        keep_config,
    });
    steps.push(cleanup);
    steps
}

/// The plan as text: one numbered step per line, then its commands indented.
pub fn render_text(steps: &[Step]) -> String {
    let mut out = String::new();
    for (i, s) in steps.iter().enumerate() {
        let _ = writeln!(out, "[{}/{}] {}", i + 1, steps.len(), s.title);
        if let Some(p) = &s.skip_if {
            match p {
                Probe::Succeeds { cmd } => {
                    let _ = writeln!(out, "    skip if this succeeds: {cmd}");
                }
                Probe::Exists { path } => {
                    let _ = writeln!(out, "    skip if {} exists", path.display());
                }
                Probe::Prints { cmd, text } => {
                    let _ = writeln!(out, "    skip if `{cmd}` prints {text}");
                }
                Probe::Fails { cmd } => {
                    let _ = writeln!(out, "    skip if this fails: {cmd}");
                }
                Probe::All { probes } => {
                    let parts: Vec<String> = probes
                        .iter()
                        .map(|p| match p {
                            Probe::Succeeds { cmd } => format!("`{cmd}` succeeds"),
                            Probe::Fails { cmd } => format!("`{cmd}` fails"),
                            Probe::Exists { path } => format!("{} exists", path.display()),
                            Probe::Prints { cmd, text } => format!("`{cmd}` prints {text}"),
                            Probe::All { .. } => "…".to_owned(),
                        })
                        .collect();
                    let _ = writeln!(out, "    skip if {}", parts.join(" and "));
                }
            }
        }
        for a in &s.actions {
            let line = match a {
                Action::Write { path, contents } => {
                    format!("write {} ({} lines)", path.display(), contents.lines().count())
                }
                Action::Run { cmd } => format!("$ {cmd}"),
                Action::RunCapture { cmd, var, .. } => format!("$ {cmd}\n      (keeps {var} from its output)"),
                Action::Apply { what, manifests } => {
                    let kinds: Vec<String> = crate::yaml::documents(manifests)
                        .unwrap_or_default()
                        .iter()
                        .map(|d| {
                            format!(
                                "{}/{}",
                                d["kind"].as_str().unwrap_or("?"),
                                d["metadata"]["name"].as_str().unwrap_or("?")
                            )
                        })
                        .collect();
                    format!("server-side apply {what}: {}", kinds.join(", "))
                }
                Action::WaitRollout {
                    kind,
                    namespace,
                    name,
                    timeout_secs,
                } => {
                    format!("watch {kind} {namespace}/{name} until rolled out (up to {timeout_secs}s)")
                }
                Action::GrafanaSecret { namespace, name } => {
                    format!("server-side apply Secret {namespace}/{name} (password generated once, kept 0600 in the state directory)")
                }
                Action::Private { path } => format!("chmod 0600 {}", path.display()),
                Action::Cleanup { dir, keep_config } => {
                    if *keep_config {
                        format!("remove {} except kubeconfig, talosconfig, secrets.yaml", dir.display())
                    } else {
                        format!("remove merged kubeconfig contexts and {}", dir.display())
                    }
                }
            };
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}
