//! The flows path's eBPF programs on the real kernel: a veth pair into a network namespace the
//! test creates, the tc classifier attached to the host side, known traffic, and the flow
//! table read back (issue 10, first part: the programs and their loader).

use std::net::IpAddr;
use std::process::Command;

use agent::flows::{FlowKey, FlowValue, Programs};
use anyhow::{bail, ensure, Context, Result};

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A /30 of 10.213.0.0/16 claimed by this process (a file created exclusively under /tmp,
/// holding the pid; a claim whose process is gone is taken over), so that concurrent tests
/// never share addresses. Released on drop.
struct Subnet {
    n: u32,
    file: std::path::PathBuf,
}

impl Subnet {
    fn claim() -> Result<Subnet> {
        for k in 0..250 {
            let n = (std::process::id() + k) % 250 + 1;
            let file = std::path::PathBuf::from(format!("/tmp/sre-lab-flows-subnet-{n}"));
            for _ in 0..2 {
                match std::fs::OpenOptions::new().write(true).create_new(true).open(&file) {
                    Ok(mut f) => {
                        std::io::Write::write_all(&mut f, std::process::id().to_string().as_bytes())?;
                        return Ok(Subnet { n, file });
                    }
                    Err(_) => {
                        let owner = std::fs::read_to_string(&file).unwrap_or_default();
                        let alive =
                            !owner.is_empty() && std::path::Path::new(&format!("/proc/{}", owner.trim())).exists();
                        if alive {
                            break;
                        }
                        let _ = std::fs::remove_file(&file);
                    }
                }
            }
        }
        bail!("no free test subnet under 10.213.0.0/16")
    }
}

impl Drop for Subnet {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A namespace with a veth pair: `host` in this namespace (10.213.<n>.1), `peer` inside it
/// (10.213.<n>.2), its default route via the host side. Removed on drop. `i` tells a test's
/// namespaces apart.
struct Netns {
    ns: String,
    host: String,
    subnet: Subnet,
}

impl Netns {
    fn new() -> Result<Netns> {
        Netns::index(0)
    }

    fn index(i: u32) -> Result<Netns> {
        Netns::with(Subnet::claim()?, i)
    }

    fn with(subnet: Subnet, i: u32) -> Result<Netns> {
        let n = subnet.n;
        let pid = std::process::id() % 100_000;
        let ns = format!("srelab-flows-{}-{i}", std::process::id());
        let host = format!("srf{pid}{i}h");
        let peer = format!("srf{pid}{i}p");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &host]).output();
        ip(&["netns", "add", &ns])?;
        let me = Netns {
            ns: ns.clone(),
            host: host.clone(),
            subnet,
        };
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &ns])?;
        ip(&["addr", "add", &format!("10.213.{n}.1/30"), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("10.213.{n}.2/30"), "dev", &peer])?;
        ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", &format!("10.213.{n}.1")])?;
        Ok(me)
    }

    fn ifindex(&self) -> Result<u32> {
        let p = format!("/sys/class/net/{}/ifindex", self.host);
        Ok(std::fs::read_to_string(&p).with_context(|| p.clone())?.trim().parse()?)
    }

    fn addr(&self, host: bool) -> IpAddr {
        format!("10.213.{}.{}", self.subnet.n, if host { 1 } else { 2 })
            .parse()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// False (with a SKIPPED line) when not root; an error when the programs were not built.
fn can_attach() -> Result<bool> {
    if !is_root() {
        eprintln!("SKIPPED: attaching eBPF programs needs root");
        return Ok(false);
    }
    if !agent::flows::built_with_programs() {
        bail!("the agent was built without its eBPF programs: run scripts/build-ebpf.sh before building");
    }
    Ok(true)
}

fn find(flows: &[(FlowKey, FlowValue)], f: impl Fn(&FlowKey) -> bool) -> FlowValue {
    flows
        .iter()
        .filter(|(k, _)| f(k))
        .fold(FlowValue::default(), |mut a, (_, v)| {
            a.packets += v.packets;
            a.bytes += v.bytes;
            a.syn += v.syn;
            a.synack += v.synack;
            a.fin += v.fin;
            a.rst += v.rst;
            a
        })
}

#[test]
fn the_tc_program_counts_icmp_and_tcp_packets_bytes_and_flags_on_a_veth() -> Result<()> {
    if !can_attach()? {
        return Ok(());
    }
    let net = Netns::new()?;
    let mut progs = Programs::load(4096, false)?;
    progs.attach(&net.host, net.ifindex()?)?;
    let (host, peer) = (net.addr(true), net.addr(false));

    // Five echo requests of 56 data bytes: 98-byte frames each way.
    let out = Command::new("ping")
        .args(["-c", "5", "-i", "0.05", "-W", "1", &peer.to_string()])
        .output()
        .context("ping")?;
    ensure!(out.status.success(), "ping: {}", String::from_utf8_lossy(&out.stdout));

    // One TCP connection carrying 1 MiB to a listener in the namespace.
    let listener = Command::new("ip")
        .args(["netns", "exec", &net.ns, "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{peer}',5201))\ns.listen()\nprint('ready',flush=True)\nc,_=s.accept()\nn=0\nwhile True:\n    d=c.recv(65536)\n    if not d: break\n    n+=len(d)\nc.close()\nprint(n,flush=True)"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = std::io::BufReader::new(listener.stdout.context("listener stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line)?;
    ensure!(line.trim() == "ready", "listener: {line}");
    {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect((peer, 5201))?;
        c.write_all(&vec![7u8; 1 << 20])?;
        c.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut c, &mut rest)?;
    }
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line)?;
    ensure!(line.trim() == (1 << 20).to_string(), "listener received {line}");

    let flows = progs.flows()?;
    // Echo requests leave the host side (egress), replies come in (ingress).
    let req = find(&flows, |k| {
        k.proto == 1 && k.source() == host && k.destination() == peer && k.sport == 8
    });
    let rep = find(&flows, |k| {
        k.proto == 1 && k.source() == peer && k.destination() == host && k.sport == 0
    });
    assert_eq!((req.packets, req.bytes), (5, 5 * 98), "echo requests: {req:?}");
    assert_eq!((rep.packets, rep.bytes), (5, 5 * 98), "echo replies: {rep:?}");
    let dirs: Vec<u8> = flows
        .iter()
        .filter(|(k, _)| k.proto == 1 && k.source() == host)
        .map(|(k, _)| k.dir)
        .collect();
    assert_eq!(dirs, [1], "requests counted once, at the host side's egress");
    // TCP: the client's side carries the MiB (GSO packets counted as their segments).
    let to = find(&flows, |k| k.proto == 6 && k.source() == host && k.dport == 5201);
    let from = find(&flows, |k| k.proto == 6 && k.source() == peer && k.sport == 5201);
    assert!(to.bytes >= 1 << 20, "bytes to the listener: {to:?}");
    // GSO: a super-packet counts as the segments it carries, so at least 1 MiB / 1500 B.
    assert!(to.packets >= (1 << 20) / 1500, "{to:?}");
    assert_eq!((to.syn, to.synack), (1, 0), "{to:?}");
    assert_eq!((from.syn, from.synack), (0, 1), "{from:?}");
    assert!(to.fin >= 1 && from.fin >= 1, "{to:?} {from:?}");
    assert_eq!(to.rst + from.rst, 0);
    Ok(())
}

#[test]
fn beside_another_tc_program_that_drops_both_keep_working() -> Result<()> {
    beside_another_program(false)
}

/// Like Cilium on kernels with tcx: the other program is a tcx link attached before the
/// agent's, returning a verdict (here: drop) that ends the chain. The agent's links go first
/// in the chain, so they still count what the other one drops.
#[test]
fn beside_a_tcx_program_attached_before_it_both_keep_working() -> Result<()> {
    if !aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0)) {
        eprintln!("SKIPPED: tcx needs kernel 6.6");
        return Ok(());
    }
    beside_another_program(true)
}

fn beside_another_program(tcx: bool) -> Result<()> {
    if !can_attach()? {
        return Ok(());
    }
    let obj = agent::flows::object().context("embedded eBPF object")?;
    let net = Netns::new()?;
    // Another tc user, attached first — through legacy tc (clsact), or as a tcx link — a
    // program dropping ICMP that arrives at the host side (the echo replies). (At egress a
    // drop makes ping resend, so ingress keeps counts exact.)
    let mut other = aya::Ebpf::load(obj)?;
    let drop: &mut aya::programs::SchedClassifier = other
        .program_mut("sre_lab_test_drop_icmp")
        .context("test program")?
        .try_into()?;
    drop.load()?;
    let options = if tcx {
        aya::programs::tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default())
    } else {
        let _ = aya::programs::tc::qdisc_add_clsact(&net.host);
        aya::programs::tc::TcAttachOptions::Netlink(aya::programs::tc::NlOptions::default())
    };
    let link = drop.attach_with_options(&net.host, aya::programs::TcAttachType::Ingress, options)?;
    let mut progs = Programs::load(4096, false)?;
    progs.attach(&net.host, net.ifindex()?)?;
    let (host, peer) = (net.addr(true), net.addr(false));
    let ping = |n: &str| {
        Command::new("ping")
            .args(["-c", n, "-i", "0.05", "-W", "1", &peer.to_string()])
            .output()
            .map(|o| o.status.success())
    };
    // The other program still drops (no reply reaches ping), and ours counted both ways (ours
    // is first among tcx links, and tcx runs before legacy tc programs).
    assert!(!ping("3")?, "the dropping program kept working");
    let flows = progs.flows()?;
    let req = find(&flows, |k| {
        k.proto == 1 && k.source() == host && k.destination() == peer
    });
    let rep = find(&flows, |k| k.proto == 1 && k.source() == peer);
    assert_eq!(req.packets, 3, "{req:?}");
    assert_eq!(rep.packets, 3, "{rep:?}");
    // TCP passes through both.
    let l = std::net::TcpListener::bind((host, 0))?;
    let port = l.local_addr()?.port();
    let out = Command::new("ip")
        .args(["netns", "exec", &net.ns, "python3", "-c"])
        .arg(format!(
            "import socket; socket.create_connection(('{host}', {port}), 5).close()"
        ))
        .output()?;
    ensure!(
        out.status.success(),
        "TCP through both programs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the other program, ICMP flows again and both directions are counted.
    drop.detach(link)?;
    assert!(ping("2")?, "ping after removing the other program");
    let flows = progs.flows()?;
    let req = find(&flows, |k| {
        k.proto == 1 && k.source() == host && k.destination() == peer
    });
    let rep = find(&flows, |k| k.proto == 1 && k.source() == peer);
    assert_eq!((req.packets, rep.packets), (5, 5));
    let syn = find(&flows, |k| k.proto == 6 && k.source() == peer && k.dport == port);
    assert_eq!(syn.syn, 1, "{syn:?}");
    Ok(())
}

#[test]
fn drops_are_counted_by_the_kernels_reason() -> Result<()> {
    if !can_attach()? {
        return Ok(());
    }
    let net = Netns::new()?;
    let mut progs = Programs::load(4096, false)?;
    progs.attach_drops()?;
    let peer = net.addr(false);
    // SKB_DROP_REASON_NO_SOCKET (3): UDP datagrams to a port nobody listens on in the
    // namespace are freed with that reason.
    let no_socket = |progs: &Programs| -> Result<u64> {
        Ok(progs
            .drops()?
            .iter()
            .filter(|((reason, proto), _)| *reason == 3 && *proto == 0x0800)
            .map(|(_, n)| n)
            .sum())
    };
    let before = no_socket(&progs)?;
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    for _ in 0..5 {
        s.send_to(b"nobody listens", (peer, 9))?;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let n = no_socket(&progs)? - before;
        if n >= 5 {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "NO_SOCKET drops counted: {n} of 5"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// A kube-rs double of the API server for the agent's pod cache: lists `pods` (this node's),
/// answers watches with nothing after a while (the watcher watches again).
fn fake_api_server(pods: serde_json::Value) -> Result<sre_lab_tests::TinyServer> {
    sre_lab_tests::TinyServer::start(move |req| {
        if !req.path.starts_with("/api/v1/pods") {
            return (404, vec![], b"{}".to_vec());
        }
        if req.path.contains("watch=") {
            std::thread::sleep(std::time::Duration::from_secs(5));
            return (
                200,
                vec![("Content-Type".into(), "application/json".into())],
                Vec::new(),
            );
        }
        let list = serde_json::json!({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": "10"},
            "items": pods,
        });
        (
            200,
            vec![("Content-Type".into(), "application/json".into())],
            list.to_string().into_bytes(),
        )
    })
}

fn pod(ns: &str, name: &str, ip: IpAddr, owner: Option<(&str, &str)>, labels: serde_json::Value) -> serde_json::Value {
    let owners: Vec<serde_json::Value> = owner
        .map(|(kind, n)| {
            serde_json::json!({"apiVersion": "apps/v1", "kind": kind, "name": n, "uid": format!("uid-{n}"), "controller": true})
        })
        .into_iter()
        .collect();
    serde_json::json!({
        "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"), "labels": labels,
                     "ownerReferences": owners, "resourceVersion": "5"},
        "spec": {"nodeName": "node-e2e", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]},
    })
}

/// The value of one series in Prometheus (the highest it had in the last 5 minutes: the
/// series may already have ended), or None.
fn stored(prom: &sre_lab_tests::Prometheus, selector: &str) -> Result<Option<f64>> {
    let r = prom.query(&format!("max_over_time({selector}[5m])"))?;
    ensure!(r.len() <= 1, "{selector} matches {} series: {r:?}", r.len());
    Ok(r.first()
        .and_then(|v| v["value"][1].as_str())
        .and_then(|s| s.parse().ok()))
}

/// Waits until every selector of `want` has its value in Prometheus; on timeout, says what
/// each had, with the agent's log.
fn wait_stored(
    prom: &sre_lab_tests::Prometheus,
    want: &[(String, f64)],
    agent: &sre_lab_tests::Agent,
    what: &str,
) -> Result<()> {
    sre_lab_tests::poll(what, std::time::Duration::from_secs(30), || {
        for (sel, v) in want {
            if stored(prom, sel)? != Some(*v) {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .with_context(|| {
        let got: Vec<String> = want
            .iter()
            .map(|(s, v)| format!("{s} want {v} got {:?}", stored(prom, s).ok().flatten()))
            .collect();
        format!("{}\n{}", got.join("\n"), agent.proc.log_text())
    })
}

/// A cgroup of the test's own under the v2 root (the agent attaches at the root itself; a
/// child keeps a test's count to the processes it moves there). Removed on drop.
struct TestCgroup(std::path::PathBuf);

impl TestCgroup {
    /// None (with a SKIPPED line) without a cgroup v2 hierarchy.
    fn new(tag: &str) -> Result<Option<TestCgroup>> {
        let Some(root) = agent::flows::collector::cgroup2_root() else {
            eprintln!("SKIPPED: no cgroup v2 hierarchy mounted");
            return Ok(None);
        };
        let cg = root.join(format!("sre-lab-flows-{tag}{}", std::process::id()));
        let _ = std::fs::remove_dir(&cg);
        std::fs::create_dir(&cg).with_context(|| format!("creating {}", cg.display()))?;
        Ok(Some(TestCgroup(cg)))
    }

    /// A process in the cgroup sends 4 datagrams of 50 bytes to its own socket on
    /// 127.0.0.1:`port` and reads them.
    fn echo_udp(&self, port: u16) -> Result<()> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {} && exec python3 -c \"import socket\nr=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nr.bind(('127.0.0.1',{port}))\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(4): s.sendto(b'x'*50,('127.0.0.1',{port}))\nfor i in range(4): r.recv(100)\"",
                self.0.join("cgroup.procs").display()
            ))
            .output()?;
        ensure!(out.status.success(), "sender: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Starts a listener in the namespace: TCP on 5201 (reads to EOF) and UDP on 5300 (reads
/// `datagrams`), printing `ready` and then what each received.
fn listeners(
    net: &Netns,
    peer: IpAddr,
    datagrams: usize,
) -> Result<(std::process::Child, std::io::BufReader<std::process::ChildStdout>)> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &net.ns, "python3", "-c"])
        .arg(format!(
            "import socket\nu=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nu.bind(('{peer}',5300))\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{peer}',5201))\ns.listen()\nprint('ready',flush=True)\nc,_=s.accept()\nn=0\nwhile True:\n    d=c.recv(65536)\n    if not d: break\n    n+=len(d)\nc.close()\nprint(n,flush=True)\nfor i in range({datagrams}):\n    u.recv(2048)\nprint('udp',{datagrams},flush=True)"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = std::io::BufReader::new(child.stdout.take().context("listener stdout")?);
    Ok((child, stdout))
}

fn read_line(r: &mut impl std::io::BufRead) -> Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

#[test]
fn the_agent_exports_hubble_metrics_with_pod_labels_through_remote_write_only() -> Result<()> {
    if !can_attach()? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // The addresses the namespace will have (created once the agent runs).
    let subnet = Subnet::claim()?;
    let n = subnet.n;
    let (host, peer): (IpAddr, IpAddr) = (format!("10.213.{n}.1").parse()?, format!("10.213.{n}.2").parse()?);
    // The test pod map: the namespace's end is a Deployment's pod, the host side a
    // StatefulSet's.
    let web = "web-7d4b9c8f5-abcde";
    let api = fake_api_server(serde_json::json!([
        pod(
            "shop",
            web,
            peer,
            Some(("ReplicaSet", "web-7d4b9c8f5")),
            serde_json::json!({"app": "web", "pod-template-hash": "7d4b9c8f5"})
        ),
        pod(
            "shop",
            "db-0",
            host,
            Some(("StatefulSet", "db")),
            serde_json::json!({"app": "db"})
        ),
    ]))?;
    let prom = sre_lab_tests::Prometheus::start(dir.path(), "prom", "global:\n  scrape_interval: 1h\n", true)?;
    let config = dir.path().join("agent.yml");
    std::fs::write(
        &config,
        format!(
            "remote_write:\n  - url: {}/api/v1/write\n    queue_config:\n      batch_send_deadline: 200ms\nflows:\n  enabled: true\n  interfaces: ['srf*h']\n  interval: 1s\n  idle_timeout: 10s\n  api_server: http://{}\n",
            prom.url, api.addr
        ),
    )?;
    let agent = sre_lab_tests::Agent::start_env(
        dir.path(),
        config,
        dir.path().join("data"),
        sre_lab_tests::free_port(),
        &[("NODE_NAME", "node-e2e")],
    )?;
    assert_eq!(agent.metric("sre_agent_flows_active", "")?, 1.0);
    // The pod's interface appears after the agent started: it is attached to as it comes
    // (other tests' `srf*h` interfaces may come and go meanwhile).
    let net = Netns::with(subnet, 0)?;
    ensure!((net.addr(true), net.addr(false)) == (host, peer));
    sre_lab_tests::poll("the classifier attached", std::time::Duration::from_secs(20), || {
        let log = agent.proc.log_text();
        let attached = log
            .lines()
            .any(|l| l.contains("Counting flows on the interface") && l.contains(&net.host));
        Ok((attached && agent.metric("sre_agent_flows_interfaces", "")? >= 1.0).then_some(()))
    })
    .with_context(|| agent.proc.log_text())?;
    // The pod cache has listed the pods before traffic starts.
    sre_lab_tests::poll("pods listed", std::time::Duration::from_secs(20), || {
        Ok((agent.metric("sre_agent_pod_cache_pods", "")? == 2.0).then_some(()))
    })
    .with_context(|| agent.proc.log_text())?;

    // Known traffic from the host side ("db-0") to the namespace ("web-…"): 5 echo requests,
    // one TCP connection carrying 1 MiB, 3 UDP datagrams.
    let (mut child, mut out) = listeners(&net, peer, 3)?;
    ensure!(read_line(&mut out)? == "ready");
    let ping = Command::new("ping")
        .args(["-c", "5", "-i", "0.05", "-W", "1", &peer.to_string()])
        .output()?;
    ensure!(ping.status.success(), "ping: {}", String::from_utf8_lossy(&ping.stdout));
    {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect((peer, 5201))?;
        c.write_all(&vec![7u8; 1 << 20])?;
        c.shutdown(std::net::Shutdown::Write)?;
        std::io::Read::read_to_end(&mut c, &mut Vec::new())?;
    }
    ensure!(read_line(&mut out)? == (1 << 20).to_string());
    let udp = std::net::UdpSocket::bind((host, 0))?;
    for _ in 0..3 {
        udp.send_to(&[1u8; 100], (peer, 5300))?;
    }
    ensure!(read_line(&mut out)? == "udp 3");
    child.wait()?;
    // Refused: a SYN to a closed port gets an RST back; datagrams to a closed port are
    // dropped by the kernel (NO_SOCKET) — in the namespace, which the drop tracepoint sees too.
    let refused = std::net::TcpStream::connect_timeout(&(peer, 5202).into(), std::time::Duration::from_secs(5));
    ensure!(refused.is_err(), "port 5202 should be closed");
    for _ in 0..3 {
        udp.send_to(&[1u8; 100], (peer, 5301))?;
    }

    let job = r#"job="sre-lab-agent-flows",instance="node-e2e""#;
    let (db, web) = ("shop/db-0", format!("shop/{web}"));
    let to_web = format!(r#"{job},source="{db}",destination="{web}""#);
    let to_db = format!(r#"{job},source="{web}",destination="{db}""#);
    let want: Vec<(String, f64)> = vec![
        // Requests leave the host side toward the pod (egress: to-endpoint); replies come in.
        (
            format!(
                r#"hubble_flows_processed_total{{{to_web},protocol="ICMPv4",type="Trace",subtype="to-endpoint",verdict="FORWARDED"}}"#
            ),
            5.0,
        ),
        (
            format!(
                r#"hubble_flows_processed_total{{{to_db},protocol="ICMPv4",type="Trace",subtype="to-stack",verdict="FORWARDED"}}"#
            ),
            // 5 echo replies and 3 port-unreachable errors for the datagrams to 5301.
            8.0,
        ),
        (
            format!(r#"hubble_icmp_total{{{to_db},family="IPv4",type="DestinationUnreachable(Port)"}}"#),
            3.0,
        ),
        (
            format!(r#"hubble_icmp_total{{{to_web},family="IPv4",type="EchoRequest"}}"#),
            5.0,
        ),
        (
            format!(r#"hubble_icmp_total{{{to_db},family="IPv4",type="EchoReply"}}"#),
            5.0,
        ),
        (
            format!(r#"hubble_flows_processed_total{{{to_web},protocol="UDP",subtype="to-endpoint"}}"#),
            6.0,
        ),
        (
            format!(r#"hubble_port_distribution_total{{{to_web},protocol="UDP",port="5301"}}"#),
            3.0,
        ),
        (
            format!(r#"hubble_port_distribution_total{{{to_web},protocol="TCP",port="5202"}}"#),
            1.0,
        ),
        (
            format!(r#"hubble_tcp_flags_total{{{to_db},family="IPv4",flag="RST"}}"#),
            1.0,
        ),
        (
            format!(r#"hubble_port_distribution_total{{{to_web},protocol="UDP",port="5300"}}"#),
            3.0,
        ),
        (
            format!(r#"hubble_tcp_flags_total{{{to_web},family="IPv4",flag="SYN"}}"#),
            2.0,
        ),
        (
            format!(r#"hubble_tcp_flags_total{{{to_db},family="IPv4",flag="SYN-ACK"}}"#),
            1.0,
        ),
        (
            format!(r#"hubble_tcp_flags_total{{{to_web},family="IPv4",flag="FIN"}}"#),
            1.0,
        ),
        (
            format!(r#"hubble_tcp_flags_total{{{to_db},family="IPv4",flag="FIN"}}"#),
            1.0,
        ),
    ];
    wait_stored(&prom, &want, &agent, "the flow counters in Prometheus")?;
    // TCP: the packets toward the listener's port are the connection's packets to it (all
    // TCP packets to web but the refused SYN); no reply (nor the ICMP errors about the closed
    // UDP port) counts in the port distribution.
    let tcp_to_web = stored(
        &prom,
        &format!(r#"hubble_flows_processed_total{{{to_web},protocol="TCP"}}"#),
    )?
    .context("TCP packets to web")?
        - 1.0;
    assert!(tcp_to_web >= ((1 << 20) / 1500) as f64, "{tcp_to_web}");
    assert_eq!(
        stored(
            &prom,
            &format!(r#"hubble_port_distribution_total{{{to_web},protocol="TCP",port="5201"}}"#)
        )?,
        Some(tcp_to_web)
    );
    assert!(prom
        .query(&format!(r#"hubble_port_distribution_total{{{to_db}}}"#))?
        .is_empty());
    assert!(prom
        .query(&format!(r#"hubble_tcp_flags_total{{{to_web},flag="RST"}}"#))?
        .is_empty());
    // The datagrams to the closed port were dropped by the kernel and counted with its reason
    // (node-wide: other tests' drops may add to it).
    sre_lab_tests::poll(
        "NO_SOCKET drops in Prometheus",
        std::time::Duration::from_secs(20),
        || {
            let n = stored(
                &prom,
                &format!(r#"hubble_drop_total{{{job},reason="NO_SOCKET",protocol="IPv4"}}"#),
            )?;
            Ok(n.filter(|n| *n >= 3.0).map(|_| ()))
        },
    )?;
    assert_eq!(agent.metric("sre_agent_flows_drops_active", "")?, 1.0);
    // Remote write only: nothing of it on the agent's own /metrics.
    let own = sre_lab_tests::http_get(&format!("{}/metrics", agent.url))?;
    assert!(!own.contains("hubble_"), "hubble series on /metrics");
    assert!(agent.metric("sre_agent_flows_packets_total", "")? >= 13.0 + tcp_to_web);

    // The flows go idle: removed from the kernel's table, and their series end (staleness
    // markers), so an instant query no longer finds them.
    sre_lab_tests::poll(
        "idle flows removed and their series stale",
        std::time::Duration::from_secs(40),
        || {
            let evicted = agent.metric("sre_agent_flows_evicted_total", "")?;
            let live = prom.query(&format!(r#"hubble_icmp_total{{{to_web}}}"#))?;
            Ok((evicted >= 4.0 && live.is_empty()).then_some(()))
        },
    )
    .with_context(|| agent.proc.log_text())?;
    // The pod goes: its interface is deleted, and the agent lets go of it.
    let host_if = net.host.clone();
    drop(net);
    sre_lab_tests::poll(
        "the gone interface detached",
        std::time::Duration::from_secs(10),
        || {
            let log = agent.proc.log_text();
            Ok(log
                .lines()
                .any(|l| l.contains("Interface gone; detached") && l.contains(&host_if))
                .then_some(()))
        },
    )
    .with_context(|| agent.proc.log_text())?;
    Ok(())
}

#[test]
fn without_privileges_the_agent_runs_with_flows_off_and_says_so_once() -> Result<()> {
    if !can_attach()? {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // The unprivileged user must be able to write its storage and read its config.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let config = dir.path().join("agent.yml");
    std::fs::write(&config, "flows:\n  enabled: true\n  interval: 1s\n")?;
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let bin = sre_lab_tests::workspace_bin("agent");
    let port = sre_lab_tests::free_port();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ])
    .arg(&bin)
    .arg("--config")
    .arg(&config)
    .arg("--listen-address")
    .arg(format!("127.0.0.1:{port}"))
    .arg("--storage-path")
    .arg(dir.path().join("data"));
    let mut proc = sre_lab_tests::Proc::spawn("agent", cmd, dir.path().join("agent.log"))?;
    let url = format!("http://127.0.0.1:{port}");
    sre_lab_tests::poll("agent ready", std::time::Duration::from_secs(30), || {
        Ok(sre_lab_tests::http_get(&format!("{url}/readyz")).ok().map(|_| ()))
    })
    .with_context(|| proc.log_text())?;
    let metrics = sre_lab_tests::http_get(&format!("{url}/metrics"))?;
    assert!(metrics.contains("sre_agent_flows_active 0"), "{metrics}");
    assert!(
        metrics.contains(r#"sre_agent_flows_off{reason="no-privileges"} 1"#),
        "{metrics}"
    );
    // A reload with the same settings does not try (and say it) again.
    let (code, body) = sre_lab_tests::http_post(&format!("{url}/-/reload"))?;
    assert_eq!(code, 200, "{body}");
    let log = proc.log_text();
    assert!(log.contains("Configuration reloaded"), "{log}");
    assert_eq!(log.matches("Flows are off").count(), 1, "{log}");
    assert!(log.contains("CAP_BPF"), "{log}");
    proc.signal("TERM")?;
    Ok(())
}

#[test]
fn the_cgroup_programs_count_what_the_cgroups_processes_send_and_receive() -> Result<()> {
    if !can_attach()? {
        return Ok(());
    }
    let Some(cg) = TestCgroup::new("")? else { return Ok(()) };
    let mut progs = Programs::load(4096, true)?;
    progs.attach_cgroup(&cg.0)?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    cg.echo_udp(port)?;
    let flows = progs.flows()?;
    // Sent (egress, dir 0: from the endpoint) and received (ingress, dir 1) by the cgroup's
    // sockets; each datagram is 20 + 8 + 50 bytes.
    let of = |dir: u8| find(&flows, |k| k.proto == 17 && k.dport == port && k.dir == dir);
    assert_eq!((of(0).packets, of(0).bytes), (4, 4 * 78), "sent: {flows:?}");
    assert_eq!((of(1).packets, of(1).bytes), (4, 4 * 78), "received: {flows:?}");
    Ok(())
}

#[test]
fn routed_traffic_between_two_namespaces_gets_its_direction_from_the_hook() -> Result<()> {
    if !can_attach()? {
        return Ok(());
    }
    // a ⇄ host ⇄ b: a packet from a to b enters at a's host side (ingress: from the endpoint)
    // and leaves at b's (egress: toward the endpoint), where it still carries the index of the
    // interface it came in by.
    let (a, b) = (Netns::index(0)?, Netns::index(1)?);
    struct Forward(String);
    impl Drop for Forward {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", &self.0);
        }
    }
    let _forward = Forward(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?
            .trim()
            .to_owned(),
    );
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    let mut progs = Programs::load(4096, false)?;
    progs.attach(&a.host, a.ifindex()?)?;
    progs.attach(&b.host, b.ifindex()?)?;
    let (pa, pb) = (a.addr(false), b.addr(false));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a.ns,
            "ping",
            "-c",
            "4",
            "-i",
            "0.05",
            "-W",
            "1",
            &pb.to_string(),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "ping a → b: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let flows = progs.flows()?;
    let at = |ifindex: u32, src: IpAddr, dst: IpAddr| -> Vec<(u8, u64)> {
        flows
            .iter()
            .filter(|(k, _)| k.proto == 1 && k.ifindex == ifindex && k.source() == src && k.destination() == dst)
            .map(|(k, v)| (k.dir, v.packets))
            .collect()
    };
    assert_eq!(at(a.ifindex()?, pa, pb), [(0, 4)], "requests leaving a");
    assert_eq!(at(b.ifindex()?, pa, pb), [(1, 4)], "requests entering b");
    assert_eq!(at(b.ifindex()?, pb, pa), [(0, 4)], "replies leaving b");
    assert_eq!(at(a.ifindex()?, pb, pa), [(1, 4)], "replies entering a");
    Ok(())
}

#[test]
fn the_agent_counts_in_cgroup_mode() -> Result<()> {
    if !can_attach()? {
        return Ok(());
    }
    // `flows.cgroup` at a cgroup of the test's own (in production: the v2 root), so that only
    // the process the test moves there is counted.
    let Some(cg) = TestCgroup::new("agent-")? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let prom = sre_lab_tests::Prometheus::start(dir.path(), "prom", "global:\n  scrape_interval: 1h\n", true)?;
    let agent = sre_lab_tests::Agent::start(
        dir.path(),
        &format!(
            "remote_write:\n  - url: {}/api/v1/write\n    queue_config:\n      batch_send_deadline: 200ms\nflows:\n  enabled: true\n  cgroup: {}\n  interval: 1s\n  source_context: [ip]\n  destination_context: [ip]\n",
            prom.url,
            cg.0.display()
        ),
    )?;
    assert_eq!(
        agent.metric("sre_agent_flows_active", "")?,
        1.0,
        "{}",
        agent.proc.log_text()
    );
    assert_eq!(agent.metric("sre_agent_flows_interfaces", "")?, 0.0);
    // A process in the cgroup sends 4 datagrams to its own socket on 127.0.0.1.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    cg.echo_udp(port)?;
    let job = r#"job="sre-lab-agent-flows",source="127.0.0.1",destination="127.0.0.1",protocol="UDP""#;
    let want = [
        // Sent by the cgroup's socket (to-stack) and received by it (to-endpoint).
        (
            format!(r#"hubble_flows_processed_total{{{job},subtype="to-stack"}}"#),
            4.0,
        ),
        (
            format!(r#"hubble_flows_processed_total{{{job},subtype="to-endpoint"}}"#),
            4.0,
        ),
        // Both directions are requests to the port (neither end is a well-known port).
        (format!(r#"hubble_port_distribution_total{{{job},port="{port}"}}"#), 8.0),
    ];
    wait_stored(&prom, &want, &agent, "cgroup flows in Prometheus")?;
    Ok(())
}
