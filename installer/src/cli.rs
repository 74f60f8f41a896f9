//! The command line: `installer up`, `down`, `status`, … (see `installer --help`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use config::lab::LabConfig;
use serde_json::json;

use crate::deps::{self, Status};
use crate::exec::{Executor, StepFailed};
use crate::kube::{self, FORWARDS};
use crate::plan::{self, Context};
use crate::runner::Runner;
use crate::state::{MergedContext, Paths, State};
use crate::validate;

/// Stands up the sre-lab lab: Talos Kubernetes with Cilium + Hubble, Prometheus +
/// Alertmanager, Loki, Grafana and the sre-lab agent.
#[derive(Debug, Parser)]
#[command(name = "installer", version, about, long_about = None)]
pub struct Cli {
    /// The lab file [default: ./sre-lab.yaml when present, else built-in defaults].
    #[arg(long, short = 'c', global = true, env = "SRE_LAB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where clusters' state lives [default: $SRE_LAB_HOME, $XDG_STATE_HOME/sre-lab or
    /// ~/.local/state/sre-lab].
    #[arg(long, global = true)]
    pub state_dir: Option<PathBuf>,
    /// Output format of commands that report something.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// Plain timestamped progress lines even on a terminal.
    #[arg(long, global = true)]
    pub plain: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a commented lab file with the defaults.
    Init {
        /// Where [default: ./sre-lab.yaml].
        #[arg(default_value = "sre-lab.yaml")]
        file: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the ordered steps and commands `up` would run; runs nothing.
    Plan,
    /// Stand up the lab (resumes after a failure; reuses an existing cluster).
    Up {
        /// Print the plan and exit, like `plan`.
        #[arg(long)]
        dry_run: bool,
    },
    /// Tear down what `up` made.
    Down {
        /// Keep kubeconfig, talosconfig and the Talos secrets in the state directory.
        #[arg(long)]
        keep_config: bool,
        /// Print the steps and exit.
        #[arg(long)]
        dry_run: bool,
        /// Confirm resetting existing machines (provider `nodes` wipes them).
        #[arg(long)]
        yes: bool,
    },
    /// Nodes and the lab's workloads, and which `up` steps are done.
    Status,
    /// Endpoints, versions and how to reach Grafana.
    Info,
    /// The lab's kubeconfig: its path, its contents, or merged into yours.
    Kubeconfig {
        /// Print the file's contents (it holds credentials).
        #[arg(long, conflicts_with = "merge")]
        raw: bool,
        /// Merge the admin context into this kubeconfig [default: ~/.kube/config].
        #[arg(long, value_name = "FILE")]
        #[allow(clippy::option_option)]
        merge: Option<Option<PathBuf>>,
    },
    /// Forward a local port to a lab service through the API server (no kubectl needed).
    PortForward {
        /// The service.
        #[arg(value_parser = ["grafana", "prometheus", "alertmanager", "loki", "hubble-ui"])]
        service: String,
        /// Local port [default: the service's usual one].
        #[arg(long)]
        local_port: Option<u16>,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        address: String,
    },
    /// Print a password the installer generated (only when asked, here).
    Password {
        /// Whose.
        #[arg(value_parser = ["grafana"])]
        which: String,
    },
    /// Prove the lab end to end: the agent's series in Prometheus, pod logs in Loki, flow
    /// metrics, Grafana's datasources.
    Validate {
        /// Ask this Prometheus instead of port-forwarding to the lab's.
        #[arg(long)]
        prometheus_url: Option<String>,
        /// Ask this Loki instead of port-forwarding.
        #[arg(long)]
        loki_url: Option<String>,
        /// Ask this Grafana instead of port-forwarding.
        #[arg(long)]
        grafana_url: Option<String>,
        /// Grafana admin password [default: from the cluster's Secret].
        #[arg(long, env = "GRAFANA_PASSWORD", hide_env_values = true)]
        grafana_password: Option<String>,
        /// Keep checking until everything passes or this many seconds have passed.
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        wait: u64,
    },
    /// Check tools, versions, the Docker daemon, CPU/RAM/disk, ports and subnet.
    CheckDeps,
}

/// Loads the lab file: `--config`, else ./sre-lab.yaml, else the defaults.
pub fn load_lab(config: Option<&Path>) -> Result<(LabConfig, String), Vec<String>> {
    let path = match config {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from("sre-lab.yaml")).filter(|p| p.exists()),
    };
    match path {
        None => Ok((LabConfig::default(), "built-in defaults".to_owned())),
        Some(p) => match config::load_lab_config(&p) {
            Ok(l) => Ok((l.value, p.display().to_string())),
            Err(errs) => Err(errs.iter().map(ToString::to_string).collect()),
        },
    }
}

/// Runs the command line; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<StepFailed>().is_some() => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Init { file, force } = &cli.command {
        if file.exists() && !force {
            bail!("{} exists (use --force to overwrite)", file.display());
        }
        std::fs::write(file, crate::init::TEMPLATE).with_context(|| format!("writing {}", file.display()))?;
        println!(
            "wrote {}; `installer plan` shows what `installer up` will do",
            file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (lab, source) = match load_lab(cli.config.as_deref()) {
        Ok(l) => l,
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            return Ok(ExitCode::from(2));
        }
    };
    let root = cli.state_dir.clone().unwrap_or_else(Paths::default_root);
    let paths = Paths::new(&root, &lab.cluster_name);
    let runner = Runner::default();
    let ctx = Context {
        lab: &lab,
        paths: &paths,
    };
    let json_out = cli.output == Format::Json;
    let session = Session {
        lab: &lab,
        paths: &paths,
        runner: &runner,
        source: &source,
        plain: cli.plain,
        json_out,
    };

    match cli.command {
        Command::Init { .. } => unreachable!("handled above"),
        Command::Plan | Command::Up { dry_run: true } => {
            print_plan(&plan::up(&ctx), &source, json_out);
            Ok(ExitCode::SUCCESS)
        }
        Command::Up { dry_run: false } => up(&session).await,
        Command::Down {
            keep_config,
            dry_run,
            yes,
        } => down(&session, keep_config, dry_run, yes).await,
        Command::Status => status(&lab, &paths, json_out).await,
        Command::Info => {
            let mut info = info(&lab, &paths);
            info.versions["live"] = live_versions(&lab, &paths, session.runner).await;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info_text(&info));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Kubeconfig { raw, merge } => kubeconfig_cmd(&session, raw, merge),
        Command::PortForward {
            service,
            local_port,
            address,
        } => port_forward(&session, &service, local_port, &address).await,
        Command::Password { .. } => {
            let client = kube::client(&paths.kubeconfig()).await;
            let pw = match client {
                Ok(c) => kube::grafana_password(&c, crate::values::MONITORING_NS, crate::values::GRAFANA_SECRET).await,
                Err(e) => Err(e),
            };
            let pw = match pw {
                Ok(p) => p,
                // The cluster may be unreachable; the installer kept its own copy.
                Err(e) => std::fs::read_to_string(paths.grafana_password())
                    .map(|s| s.trim().to_owned())
                    .map_err(|_| e)?,
            };
            println!("{pw}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate {
            prometheus_url,
            loki_url,
            grafana_url,
            grafana_password,
            wait,
        } => {
            let endpoints = validate::Endpoints {
                prometheus: prometheus_url,
                loki: loki_url,
                grafana: grafana_url,
                grafana_password,
            };
            validate_cmd(&lab, &paths, wait, endpoints, json_out).await
        }
        Command::CheckDeps => {
            let checks = deps::run(&lab, &runner, &root).await;
            let failed = checks.iter().any(|c| c.status == Status::Fail);
            if json_out {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                for c in &checks {
                    let mark = match c.status {
                        Status::Ok => "ok  ",
                        Status::Warn => "warn",
                        Status::Fail => "FAIL",
                    };
                    println!("{mark} {:<22} {}", c.name, c.detail);
                    if !c.fix.is_empty() {
                        println!("     {:<22} fix: {}", "", c.fix);
                    }
                }
            }
            Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
    }
}

/// What every command works with: the lab, its state paths, the tool runner, output flags.
struct Session<'a> {
    lab: &'a LabConfig,
    paths: &'a Paths,
    runner: &'a Runner,
    source: &'a str,
    plain: bool,
    json_out: bool,
}

impl Session<'_> {
    fn ctx(&self) -> Context<'_> {
        Context {
            lab: self.lab,
            paths: self.paths,
        }
    }
}

/// `up`: preflight, then the plan, with progress; prints how to reach the lab.
async fn up(session: &Session<'_>) -> anyhow::Result<ExitCode> {
    let (lab, paths, runner, source, json_out) = (
        session.lab,
        session.paths,
        session.runner,
        session.source,
        session.json_out,
    );
    let ctx = session.ctx();
    preflight(lab, runner).await?;
    let steps = plan::up(&ctx);
    let mut ex = Executor::new(runner, paths);
    ex.plain = session.plain;
    if let Some(s) = std::env::var("SRE_LAB_RETRY_PAUSE_MS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        ex.retry_pause = std::time::Duration::from_millis(s);
    }
    crate::progress::line(&format!(
        "lab {:?} from {source}; state in {}",
        lab.cluster_name,
        paths.dir.display()
    ));
    let took = ex.run(&steps).await?;
    let info = info(lab, paths);
    if json_out {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("\nThe lab is up ({:.0}s).\n{}", took.as_secs_f64(), info_text(&info));
    }
    Ok(ExitCode::SUCCESS)
}

/// `down`: the teardown plan (printed with `--dry-run`); machines are reset only with `--yes`.
async fn down(session: &Session<'_>, keep_config: bool, dry_run: bool, yes: bool) -> anyhow::Result<ExitCode> {
    let (lab, paths, runner, source, json_out) = (
        session.lab,
        session.paths,
        session.runner,
        session.source,
        session.json_out,
    );
    let ctx = session.ctx();
    let steps = plan::down(&ctx, keep_config);
    if dry_run {
        print_plan(&steps, source, json_out);
        return Ok(ExitCode::SUCCESS);
    }
    if lab.provider == config::lab::Provider::Nodes && !yes {
        bail!(
            "`down` resets the machines {:?} (wiping Talos); add --yes to confirm",
            lab.machines
                .control_planes
                .iter()
                .chain(&lab.machines.workers)
                .collect::<Vec<_>>()
        );
    }
    let mut ex = Executor::new(runner, paths);
    ex.plain = session.plain;
    ex.record = false;
    let took = ex.run(&steps).await?;
    println!("The lab {:?} is down ({:.0}s).", lab.cluster_name, took.as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// `kubeconfig`: export lines, the raw file, or the context merged into the user's.
fn kubeconfig_cmd(session: &Session<'_>, raw: bool, merge: Option<Option<PathBuf>>) -> anyhow::Result<ExitCode> {
    let (lab, paths, json_out) = (session.lab, session.paths, session.json_out);
    let kc = paths.kubeconfig();
    if !kc.exists() {
        bail!("no kubeconfig at {} yet (run `installer up`)", kc.display());
    }
    if raw {
        std::io::stdout().write_all(&std::fs::read(&kc)?)?;
    } else if let Some(into) = merge {
        let into = into.unwrap_or_else(default_user_kubeconfig);
        // Recorded absolute, so `down` finds it from any directory.
        let into = std::path::absolute(&into).unwrap_or(into);
        let context = format!("admin@{}", lab.cluster_name);
        crate::kubeconfig::merge(&kc, &into, &context)?;
        let into = into.canonicalize().unwrap_or(into);
        let mut st = State::load(paths)?;
        let m = MergedContext {
            file: into.clone(),
            context: context.clone(),
        };
        if !st.merged_contexts.contains(&m) {
            st.merged_contexts.push(m);
        }
        st.save(paths)?;
        println!(
            "merged context {context} into {} (current); `installer down` removes it",
            into.display()
        );
    } else if json_out {
        println!("{}", json!({"kubeconfig": kc, "talosconfig": paths.talosconfig()}));
    } else {
        println!("export KUBECONFIG={}", kc.display());
        println!("export TALOSCONFIG={}", paths.talosconfig().display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `port-forward`: a local listener forwarded to the service's pod through the API server.
async fn port_forward(
    session: &Session<'_>,
    service: &str,
    local_port: Option<u16>,
    address: &str,
) -> anyhow::Result<ExitCode> {
    let paths = session.paths;
    let f = kube::forwardable(service).ok_or_else(|| anyhow!("unknown service {service}"))?;
    let client = kube::client(&paths.kubeconfig()).await?;
    let (pod, port) = kube::resolve_service(&client, f.namespace, f.service, f.port).await?;
    let listener = tokio::net::TcpListener::bind((address, local_port.unwrap_or(f.local_port)))
        .await
        .with_context(|| {
            format!(
                "listening on {address}:{} (try --local-port)",
                local_port.unwrap_or(f.local_port)
            )
        })?;
    let local = listener.local_addr()?;
    println!(
        "Forwarding http://{local}{} -> {}/{pod}:{port} (Ctrl-C to stop)",
        f.path, f.namespace
    );
    tokio::select! {
        r = kube::forward(client, f.namespace.to_owned(), pod, port, listener) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn default_user_kubeconfig() -> PathBuf {
    if let Some(first) = std::env::var_os("KUBECONFIG").and_then(|v| std::env::split_paths(&v).next()) {
        return first;
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".kube/config")
}

fn print_plan(steps: &[plan::Step], source: &str, json_out: bool) {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"source": source, "steps": steps})).expect("serializable")
        );
    } else {
        println!("# lab from {source}; nothing is run by this command");
        print!("{}", plan::render_text(steps));
    }
}

/// `up` stops before doing anything when a tool it needs is missing or too old.
async fn preflight(lab: &LabConfig, runner: &Runner) -> anyhow::Result<()> {
    let failed = deps::preflight(lab, runner).await;
    if failed.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = failed
        .iter()
        .map(|c| format!("  {}: {}\n    fix: {}", c.name, c.detail, c.fix))
        .collect();
    bail!(
        "not ready to start:\n{}\n(`installer check-deps` checks everything)",
        lines.join("\n")
    );
}

#[derive(serde::Serialize)]
struct Info {
    cluster: String,
    provider: String,
    state_dir: PathBuf,
    kubeconfig: PathBuf,
    talosconfig: PathBuf,
    versions: serde_json::Value,
    endpoints: Vec<serde_json::Value>,
    grafana: serde_json::Value,
}

fn info(lab: &LabConfig, paths: &Paths) -> Info {
    let a = &lab.addons;
    let enabled = |name: &str| match name {
        "grafana" => a.grafana,
        "prometheus" => a.prometheus,
        "alertmanager" => a.alertmanager,
        "loki" => a.loki,
        "hubble-ui" => a.hubble && a.cilium,
        _ => false,
    };
    let endpoints = FORWARDS
        .iter()
        .filter(|f| enabled(f.name))
        .map(|f| {
            json!({
                "name": f.name,
                "service": format!("{}/{}:{}", f.namespace, f.service, f.port),
                "url": format!("http://127.0.0.1:{}{}", f.local_port, f.path),
                "command": format!("installer port-forward {}", f.name),
            })
        })
        .collect();
    Info {
        cluster: lab.cluster_name.clone(),
        provider: format!("{:?}", lab.provider).to_lowercase(),
        state_dir: paths.dir.clone(),
        kubeconfig: paths.kubeconfig(),
        talosconfig: paths.talosconfig(),
        versions: json!({
            "talos": lab.versions.talos,
            "kubernetes": lab.versions.kubernetes,
            "charts": lab.charts,
            "installer": env!("CARGO_PKG_VERSION"),
        }),
        endpoints,
        grafana: json!({
            "user": "admin",
            "password": "run `installer password grafana`",
            "url": "http://127.0.0.1:3000 after `installer port-forward grafana`",
        }),
    }
}

/// What the live cluster runs, and where it differs from the lab file: Kubernetes from the
/// API server's `/version`, Talos from the first control plane (`talosctl version`), chart
/// releases from `helm list`. Null without a cluster; a part that does not answer is null.
async fn live_versions(lab: &LabConfig, paths: &Paths, runner: &Runner) -> serde_json::Value {
    let kubeconfig = paths.kubeconfig();
    if !kubeconfig.exists() {
        return serde_json::Value::Null;
    }
    let kubernetes = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let c = kube::client(&kubeconfig).await?;
        anyhow::Ok(c.apiserver_version().await?.git_version)
    })
    .await
    .ok()
    .and_then(Result::ok);
    let kc = kubeconfig.display().to_string();
    let helm = crate::runner::Cmd::new(
        "helm",
        ["list", "--all-namespaces", "--output", "json", "--kubeconfig", &kc],
    );
    let mut charts = std::collections::BTreeMap::new();
    // Each tool gets 10 s: `info` reports what it can, it does not hang on a node that is down.
    let limit = std::time::Duration::from_secs(10);
    if let Ok(Ok(out)) = tokio::time::timeout(limit, runner.run(&helm)).await {
        if let (true, Ok(serde_json::Value::Array(releases))) = (out.success(), serde_json::from_str(&out.stdout)) {
            for r in releases {
                let (Some(name), Some(chart)) = (r["name"].as_str(), r["chart"].as_str()) else {
                    continue;
                };
                // `chart` is `<name>-<version>`.
                if let Some((_, version)) = chart.rsplit_once('-') {
                    charts.insert(name.to_owned(), version.to_owned());
                }
            }
        }
    }
    let first_cp = match lab.provider {
        config::lab::Provider::Nodes => lab.machines.control_planes.first().cloned(),
        _ => plan::all_node_ips(lab).into_iter().next(),
    };
    let mut talos = None;
    if let Some(cp) = first_cp {
        let t = paths.talosconfig().display().to_string();
        let cmd = crate::runner::Cmd::new("talosctl", ["--talosconfig", &t, "--nodes", &cp, "version"]);
        if let Ok(Ok(out)) = tokio::time::timeout(limit, runner.run(&cmd)).await {
            talos = server_tag(&out.stdout);
        }
    }
    let mut differs = Vec::new();
    let trim = |v: &str| v.trim_start_matches('v').to_owned();
    if let Some(k) = &kubernetes {
        if trim(k) != trim(&lab.versions.kubernetes) {
            differs.push(format!("Kubernetes: lab file {}, cluster {k}", lab.versions.kubernetes));
        }
    }
    if let Some(t) = &talos {
        if trim(t) != trim(&lab.versions.talos) {
            differs.push(format!("Talos: lab file {}, cluster {t}", lab.versions.talos));
        }
    }
    let c = &lab.charts;
    for (release, pinned) in [
        ("cilium", &c.cilium),
        ("kube-prometheus-stack", &c.kube_prometheus_stack),
        ("loki", &c.loki),
        ("local-path-provisioner", &c.local_path),
        ("traefik", &c.traefik),
        ("metallb", &c.metallb),
    ] {
        if let Some(live) = charts.get(release) {
            if trim(live) != trim(pinned) {
                differs.push(format!("{release}: lab file {pinned}, cluster {live}"));
            }
        }
    }
    json!({"talos": talos, "kubernetes": kubernetes, "charts": charts, "differs": differs})
}

/// The `Tag:` of the `Server:` section of `talosctl version`.
fn server_tag(text: &str) -> Option<String> {
    let server = text.split("Server:").nth(1)?;
    server
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tag:"))
        .map(|t| t.trim().to_owned())
}

fn info_text(i: &Info) -> String {
    let mut s = format!(
        "Cluster      {} ({})\nKubeconfig   export KUBECONFIG={}\nTalosconfig  export TALOSCONFIG={}\nVersions     Talos {}, Kubernetes {}\n\nEndpoints (each through `installer port-forward NAME`):\n",
        i.cluster,
        i.provider,
        i.kubeconfig.display(),
        i.talosconfig.display(),
        i.versions["talos"].as_str().unwrap_or_default(),
        i.versions["kubernetes"].as_str().unwrap_or_default(),
    );
    let live = &i.versions["live"];
    if !live.is_null() {
        let or_unknown = |v: &serde_json::Value| v.as_str().unwrap_or("not answering").to_owned();
        let charts: Vec<String> = live["charts"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        s.insert_str(
            s.find("\n\nEndpoints").unwrap_or(s.len()),
            &format!(
                "\nRunning      Talos {}, Kubernetes {}{}",
                or_unknown(&live["talos"]),
                or_unknown(&live["kubernetes"]),
                if charts.is_empty() {
                    String::new()
                } else {
                    format!("\nReleases     {}", charts.join(", "))
                }
            ),
        );
        for d in live["differs"].as_array().into_iter().flatten() {
            let at = s.find("\n\nEndpoints").unwrap_or(s.len());
            s.insert_str(at, &format!("\nDiffers      {}", d.as_str().unwrap_or("")));
        }
    }
    for e in &i.endpoints {
        s.push_str(&format!(
            "  {:<13} {:<26} {}\n",
            e["name"].as_str().unwrap_or_default(),
            e["url"].as_str().unwrap_or_default(),
            e["service"].as_str().unwrap_or_default()
        ));
    }
    s.push_str("\nGrafana: `installer port-forward grafana`, open http://127.0.0.1:3000, user admin,\n         password from `installer password grafana`.\n");
    s
}

async fn status(lab: &LabConfig, paths: &Paths, json_out: bool) -> anyhow::Result<ExitCode> {
    let st = State::load(paths)?;
    let steps = plan::up(&Context { lab, paths });
    let done: Vec<(&str, bool)> = steps
        .iter()
        .map(|s| (s.id.as_str(), st.done.contains_key(&s.id)))
        .collect();
    let live = if paths.kubeconfig().exists() {
        match kube::client(&paths.kubeconfig()).await {
            Ok(c) => kube::status(&c).await.map_err(|e| format!("{e:#}")),
            Err(e) => Err(format!("{e:#}")),
        }
    } else {
        Err("no kubeconfig yet (run `installer up`)".to_owned())
    };
    let healthy = live
        .as_ref()
        .is_ok_and(|s| !s.nodes.is_empty() && s.nodes.iter().all(|n| n.ready) && s.workloads.iter().all(|w| w.ready));
    if json_out {
        let (cluster, error) = match &live {
            Ok(s) => (serde_json::to_value(s)?, serde_json::Value::Null),
            Err(e) => (serde_json::Value::Null, json!(e)),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "cluster": lab.cluster_name,
                "steps": done.iter().map(|(id, d)| json!({"id": id, "done": d})).collect::<Vec<_>>(),
                "live": cluster,
                "error": error,
                "healthy": healthy,
            }))?
        );
    } else {
        let finished = done.iter().filter(|(_, d)| *d).count();
        println!("Lab {:?}: {finished}/{} `up` steps done", lab.cluster_name, done.len());
        if let Some((id, _)) = done.iter().find(|(_, d)| !d) {
            println!("  next: {id} (`installer up` continues there)");
        }
        match &live {
            Ok(s) => {
                println!("Nodes:");
                for n in &s.nodes {
                    println!(
                        "  {:<28} {:<8} {}",
                        n.name,
                        if n.ready { "Ready" } else { "NotReady" },
                        n.version
                    );
                }
                println!("Workloads:");
                for w in &s.workloads {
                    println!(
                        "  {:<60} {:<8} {}",
                        w.name,
                        if w.ready { "ready" } else { "NOT READY" },
                        w.detail
                    );
                }
            }
            Err(e) => println!("Cluster: unreachable: {e}"),
        }
    }
    Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn validate_cmd(
    lab: &LabConfig,
    paths: &Paths,
    wait: u64,
    mut endpoints: validate::Endpoints,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let mut forwards = Vec::new();
    let which = validate::Applicable::of(lab);
    let need_prometheus = which.agent_series || which.flows;
    let need_cluster = (need_prometheus && endpoints.prometheus.is_none())
        || (which.logs && endpoints.loki.is_none())
        || (which.grafana && (endpoints.grafana.is_none() || endpoints.grafana_password.is_none()));
    if need_cluster {
        let client = kube::client(&paths.kubeconfig()).await?;
        for (name, slot, needed) in [
            ("prometheus", &mut endpoints.prometheus, need_prometheus),
            ("loki", &mut endpoints.loki, which.logs),
            ("grafana", &mut endpoints.grafana, which.grafana),
        ] {
            if slot.is_some() || !needed {
                continue;
            }
            let f = kube::forwardable(name).expect("known service");
            let (pod, port) = kube::resolve_service(&client, f.namespace, f.service, f.port).await?;
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
            *slot = Some(format!("http://{}", listener.local_addr()?));
            forwards.push(tokio::spawn(kube::forward(
                client.clone(),
                f.namespace.to_owned(),
                pod,
                port,
                listener,
            )));
        }
        if which.grafana && endpoints.grafana_password.is_none() {
            endpoints.grafana_password = Some(
                kube::grafana_password(&client, crate::values::MONITORING_NS, crate::values::GRAFANA_SECRET).await?,
            );
        }
    }
    let findings = tokio::task::spawn_blocking(move || {
        validate::run_until(&endpoints, which, std::time::Duration::from_secs(wait))
    })
    .await?;
    for f in forwards {
        f.abort();
    }
    let ok = findings.iter().all(|f| f.ok);
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"ok": ok, "checks": findings}))?
        );
    } else {
        for f in &findings {
            println!("{} {:<30} {}", if f.ok { "ok  " } else { "FAIL" }, f.check, f.detail);
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
