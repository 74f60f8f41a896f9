//! `check-deps`: the tools the lab needs and their versions, the Docker daemon, CPU, memory
//! and disk headroom, and the ports and subnet Talos in Docker takes — each failure with
//! the fix.

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

use config::lab::{LabConfig, Provider};
use serde::Serialize;

use crate::runner::{Cmd, Runner};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth knowing.
    Warn,
    /// `up` would fail.
    Fail,
}

/// One check.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when fine).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// Minimum versions.
pub const MIN_TALOSCTL: (u32, u32) = (1, 13);
/// The oldest Helm the installer accepts: older 3.x releases no longer get fixes (Helm patches
/// only the latest minor) and the lab's command lines were written against 3.17 and 4.
pub const MIN_HELM: (u32, u32) = (3, 17);

/// The first `vX.Y` (or `X.Y`) version in `text`.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let re = regex::Regex::new(r"v?(\d+)\.(\d+)(?:\.(\d+))?").expect("static regex");
    let c = re.captures(text)?;
    let n = |i: usize| c.get(i).and_then(|m| m.as_str().parse().ok()).unwrap_or(0);
    Some((n(1), n(2), n(3)))
}

async fn tool_version(runner: &Runner, tool: &str, args: &[&str], min: Option<(u32, u32)>, install: &str) -> Check {
    let Some(path) = runner.which(tool) else {
        return check(
            tool,
            Status::Fail,
            "not found on PATH",
            format!("install it: {install}"),
        );
    };
    let out = runner.run(&Cmd::new(tool, args.iter().copied())).await;
    let text = match out {
        Ok(o) if o.success() => o.stdout,
        Ok(o) => {
            return check(
                tool,
                Status::Fail,
                format!("`{tool} {}` failed: {}", args.join(" "), o.stderr.trim()),
                format!("reinstall it: {install}"),
            )
        }
        Err(e) => return check(tool, Status::Fail, e.to_string(), format!("install it: {install}")),
    };
    let Some(v) = parse_version(&text) else {
        return check(tool, Status::Warn, format!("{} (version unknown)", path.display()), "");
    };
    let shown = format!("{}.{}.{} at {}", v.0, v.1, v.2, path.display());
    match min {
        Some(m) if (v.0, v.1) < m => check(
            tool,
            Status::Fail,
            format!("{shown} is older than {}.{}", m.0, m.1),
            format!("upgrade to {}.{} or newer: {install}", m.0, m.1),
        ),
        _ => check(tool, Status::Ok, shown, ""),
    }
}

const TALOSCTL_INSTALL: &str = "curl -sL https://talos.dev/install | sh";
const HELM_INSTALL: &str = "https://helm.sh/docs/intro/install/";
const DOCKER_INSTALL: &str = "https://docs.docker.com/engine/install/";

async fn talosctl_check(runner: &Runner) -> Check {
    tool_version(
        runner,
        "talosctl",
        &["version", "--client", "--short"],
        Some(MIN_TALOSCTL),
        TALOSCTL_INSTALL,
    )
    .await
}

async fn helm_check(runner: &Runner) -> Check {
    tool_version(runner, "helm", &["version", "--short"], Some(MIN_HELM), HELM_INSTALL).await
}

/// `docker --version` answers without the daemon, which has its own check.
async fn docker_check(runner: &Runner) -> Check {
    tool_version(runner, "docker", &["--version"], None, DOCKER_INSTALL).await
}

/// A failure when the installed talosctl's minor version differs from the Talos image's
/// (`talosctl` generates the machine configs that image must understand).
fn talosctl_matches_image(lab: &LabConfig, talosctl: &Check) -> Option<Check> {
    let tool = talosctl.detail.split(' ').next().and_then(parse_version)?;
    let image = parse_version(&lab.versions.talos)?;
    ((tool.0, tool.1) != (image.0, image.1)).then(|| {
        check(
            "talosctl",
            Status::Fail,
            format!(
                "talosctl {}.{}.{} drives Talos {}; their minor versions must match",
                tool.0, tool.1, tool.2, lab.versions.talos
            ),
            format!(
                "install talosctl {v} (https://github.com/siderolabs/talos/releases/download/{v}/talosctl-linux-amd64, or -darwin-arm64, …) or set versions.talos",
                v = lab.versions.talos
            ),
        )
    })
}

/// QEMU: talosctl makes a bridge and VMs, which takes root.
fn root_check() -> Check {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        check("root", Status::Ok, "running as root", "")
    } else {
        check(
            "root",
            Status::Fail,
            "talosctl needs root to make the QEMU bridge and VMs",
            "run the installer with sudo -E (keeps SRE_LAB_HOME and PATH)",
        )
    }
}

/// What `up` checks before it starts: the tools it needs are there and new enough, and the
/// talosctl minor version is the one of the Talos image. Returns the failures.
pub async fn preflight(lab: &LabConfig, runner: &Runner) -> Vec<Check> {
    let mut out = vec![talosctl_check(runner).await, helm_check(runner).await];
    if lab.provider == Provider::Docker || crate::plan::local_registry(lab).is_some() {
        out.push(docker_check(runner).await);
    }
    if let Some(c) = talosctl_matches_image(lab, &out[0]) {
        out.push(c);
    }
    if lab.provider == Provider::Qemu {
        out.push(root_check());
    }
    out.retain(|c| c.status == Status::Fail);
    out
}

/// Runs every check for `lab`.
pub async fn run(lab: &LabConfig, runner: &Runner, state_root: &Path) -> Vec<Check> {
    let talosctl = talosctl_check(runner).await;
    let mismatch = talosctl_matches_image(lab, &talosctl);
    let mut out = vec![talosctl];
    out.extend(mismatch);
    out.push(helm_check(runner).await);
    let mut kubectl = tool_version(
        runner,
        "kubectl",
        &["version", "--client"],
        None,
        "https://kubernetes.io/docs/tasks/tools/",
    )
    .await;
    if kubectl.status == Status::Fail {
        kubectl.status = Status::Warn;
        kubectl.detail = format!(
            "{} — not needed by the installer (it talks to the API itself), handy for you",
            kubectl.detail
        );
    }
    out.push(kubectl);

    // Docker: the provider itself, or (QEMU) what builds the agent image and runs the registry.
    if lab.provider == Provider::Docker || crate::plan::local_registry(lab).is_some() {
        let docker = docker_check(runner).await;
        let have_docker = docker.status != Status::Fail;
        out.push(docker);
        if have_docker {
            out.push(match runner.run(&Cmd::new("docker", ["info", "--format", "{{.ServerVersion}}"])).await {
                Ok(o) if o.success() && !o.stdout.trim().is_empty() => {
                    check("docker daemon", Status::Ok, format!("server {}", o.stdout.trim()), "")
                }
                Ok(o) => check(
                    "docker daemon",
                    Status::Fail,
                    format!("not reachable: {}", o.stderr.lines().next().unwrap_or("no answer")),
                    "start it (`sudo systemctl start docker`) and make sure your user may use it (`sudo usermod -aG docker $USER`, then log in again)",
                ),
                Err(e) => check("docker daemon", Status::Fail, e.to_string(), "install Docker Engine"),
            });
        }
    }
    match lab.provider {
        Provider::Docker => {}
        Provider::Qemu => {
            out.push(
                tool_version(
                    runner,
                    "qemu-system-x86_64",
                    &["--version"],
                    None,
                    "apt-get install qemu-system-x86 (and run the installer as root for the bridge)",
                )
                .await,
            );
            out.push(root_check());
            out.push(if Path::new("/dev/kvm").exists() {
                check("kvm", Status::Ok, "/dev/kvm present", "")
            } else {
                check(
                    "kvm",
                    Status::Fail,
                    "/dev/kvm is missing",
                    "enable virtualization in the firmware and load kvm_intel/kvm_amd",
                )
            });
        }
        Provider::Nodes => {}
    }

    if lab.provider != Provider::Nodes {
        let nodes = lab.nodes.control_planes + lab.nodes.workers;
        let cpus_needed = lab.nodes.cpus * nodes as f32;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        out.push(if (cpus as f32) + 0.01 >= cpus_needed {
            check(
                "cpu",
                Status::Ok,
                format!("{cpus} CPUs for {cpus_needed} requested by {nodes} nodes"),
                "",
            )
        } else {
            check(
                "cpu",
                Status::Warn,
                format!("{cpus} CPUs for {cpus_needed} requested by {nodes} nodes (overcommitted; slower)"),
                "lower nodes.cpus or nodes.workers in the lab file",
            )
        });
        let need_mib = u64::from(lab.nodes.memory_mib) * u64::from(nodes) + 1024;
        out.push(match mem_available_mib() {
            Some(have) if have >= need_mib => check(
                "memory",
                Status::Ok,
                format!("{have} MiB available, {need_mib} MiB needed"),
                "",
            ),
            Some(have) => check(
                "memory",
                Status::Fail,
                format!(
                    "{have} MiB available, {need_mib} MiB needed ({nodes} nodes × {} MiB + 1 GiB)",
                    lab.nodes.memory_mib
                ),
                "close other work, or lower nodes.memory_mib / nodes.workers in the lab file",
            ),
            None => check("memory", Status::Warn, "cannot read /proc/meminfo", ""),
        });
    }
    let disk_path = if lab.provider == Provider::Docker && Path::new("/var/lib/docker").exists() {
        Path::new("/var/lib/docker").to_path_buf()
    } else {
        existing_ancestor(state_root)
    };
    const NEED_GIB: u64 = 20;
    out.push(match free_gib(&disk_path) {
        Some(g) if g >= NEED_GIB => check(
            "disk",
            Status::Ok,
            format!("{g} GiB free on {}", disk_path.display()),
            "",
        ),
        Some(g) => check(
            "disk",
            Status::Fail,
            format!(
                "{g} GiB free on {}, {NEED_GIB} GiB needed (images, etcd, Loki, Prometheus)",
                disk_path.display()
            ),
            "free space (`docker system prune` removes unused images)",
        ),
        None => check("disk", Status::Warn, format!("cannot stat {}", disk_path.display()), ""),
    });

    if lab.provider != Provider::Nodes {
        out.push(subnet_check(Ipv4Addr::new(10, 5, 0, 0), 24));
    }
    if crate::plan::local_registry(lab).is_some() {
        out.push(port_check(
            crate::plan::REGISTRY_PORT,
            Status::Warn,
            "fine if it is this lab's registry (a running lab holds it); else free it, or set agent_image to a pushed image",
        ));
    }
    for f in crate::kube::FORWARDS {
        out.push(port_check(
            f.local_port,
            Status::Warn,
            "port-forward picks another port with --local-port",
        ));
    }
    out
}

fn port_check(port: u16, status_if_busy: Status, fix: &str) -> Check {
    let name = format!("port {port}");
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => check(name, Status::Ok, "free", ""),
        Err(e) => check(name, status_if_busy, format!("in use ({e})"), fix),
    }
}

/// Whether a route on this host already covers `net/prefix` (Talos in Docker makes a bridge
/// there; an existing one from another network would clash).
fn subnet_check(net: Ipv4Addr, prefix: u32) -> Check {
    let name = format!("subnet {net}/{prefix}");
    let Ok(table) = std::fs::read_to_string("/proc/net/route") else {
        return check(name, Status::Warn, "cannot read /proc/net/route", "");
    };
    match overlapping_route(&table, net, prefix) {
        Some(iface) => check(
            name,
            Status::Warn,
            format!("already routed via {iface}"),
            "Talos in Docker makes its network there: if it is not an earlier sre-lab cluster, remove that network (`docker network ls`, `ip route`)",
        ),
        None => check(name, Status::Ok, "free", ""),
    }
}

/// The interface of a route in `/proc/net/route` text overlapping `net/prefix`, if any.
pub fn overlapping_route(table: &str, net: Ipv4Addr, prefix: u32) -> Option<String> {
    let mask = |p: u32| if p == 0 { 0 } else { u32::MAX << (32 - p) };
    let want = u32::from(net) & mask(prefix);
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dest), Ok(m)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16)) else {
            continue;
        };
        // The kernel prints the network-order word as a native integer.
        let (dest, m) = (
            u32::from_be_bytes(dest.to_ne_bytes()),
            u32::from_be_bytes(m.to_ne_bytes()),
        );
        if m == 0 {
            continue; // the default route covers everything; not a clash
        }
        let common = m & mask(prefix);
        if dest & common == want & common {
            return Some(f[0].to_owned());
        }
    }
    None
}

fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn existing_ancestor(p: &Path) -> std::path::PathBuf {
    let mut p = p.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return std::path::PathBuf::from("/");
        }
    }
    p
}

fn free_gib(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        return None;
    }
    Some((s.f_bavail as u64 * s.f_frsize as u64) >> 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_tool_output() {
        assert_eq!(parse_version("Client:\n\tTag:         v1.13.2\n"), Some((1, 13, 2)));
        assert_eq!(parse_version("v3.16.2+g13654a5"), Some((3, 16, 2)));
        assert_eq!(parse_version("Client Version: v1.32.4-dispatcher"), Some((1, 32, 4)));
        assert_eq!(parse_version("none"), None);
    }

    #[test]
    fn routes_overlapping_the_talos_subnet_are_found() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
br-1\t0000050A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            overlapping_route(table, Ipv4Addr::new(10, 5, 0, 0), 24).as_deref(),
            Some("br-1")
        );
        assert_eq!(overlapping_route(table, Ipv4Addr::new(10, 6, 0, 0), 24), None);
        // 10.0.0.0/8 covers 10.5.0.0/24.
        let wide =
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n vpn\t0000000A\t0\t1\t0\t0\t0\t000000FF\n";
        assert_eq!(
            overlapping_route(wide, Ipv4Addr::new(10, 5, 0, 0), 24).as_deref(),
            Some("vpn")
        );
    }
}
