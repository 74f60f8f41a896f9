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

/// A namespace with a veth pair: `host` in this namespace (10.213.<n>.1), `peer` inside it
/// (10.213.<n>.2). Removed on drop.
struct Netns {
    ns: String,
    host: String,
}

impl Netns {
    fn new() -> Result<Netns> {
        let n = std::process::id() % 250 + 1;
        let ns = format!("srelab-flows-{}", std::process::id());
        let host = format!("srf{}h", std::process::id() % 100_000);
        let peer = format!("srf{}p", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &host]).output();
        ip(&["netns", "add", &ns])?;
        let me = Netns {
            ns: ns.clone(),
            host: host.clone(),
        };
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &ns])?;
        ip(&["addr", "add", &format!("10.213.{n}.1/30"), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("10.213.{n}.2/30"), "dev", &peer])?;
        ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(me)
    }

    fn addr(&self, host: bool) -> IpAddr {
        let n = std::process::id() % 250 + 1;
        format!("10.213.{n}.{}", if host { 1 } else { 2 }).parse().unwrap()
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
    let mut progs = Programs::load(4096)?;
    progs.attach(&net.host)?;
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
    assert!(to.packets >= (1 << 20) / 65536, "{to:?}");
    assert_eq!((to.syn, to.synack), (1, 0), "{to:?}");
    assert_eq!((from.syn, from.synack), (0, 1), "{from:?}");
    assert!(to.fin >= 1 && from.fin >= 1, "{to:?} {from:?}");
    assert_eq!(to.rst + from.rst, 0);
    Ok(())
}

#[test]
fn beside_another_tc_program_that_drops_both_keep_working() -> Result<()> {
    if !can_attach()? {
        return Ok(());
    }
    let obj = agent::flows::object().context("embedded eBPF object")?;
    let net = Netns::new()?;
    // Another tc user, attached first through legacy tc (clsact): a program dropping ICMP
    // that arrives at the host side (the echo replies). The agent's program goes on tcx (or
    // clsact) beside it. (At egress a drop makes ping resend, so ingress keeps counts exact.)
    let mut other = aya::Ebpf::load(obj)?;
    let drop: &mut aya::programs::SchedClassifier = other
        .program_mut("sre_lab_test_drop_icmp")
        .context("test program")?
        .try_into()?;
    drop.load()?;
    let _ = aya::programs::tc::qdisc_add_clsact(&net.host);
    let link = drop.attach_with_options(
        &net.host,
        aya::programs::TcAttachType::Ingress,
        aya::programs::tc::TcAttachOptions::Netlink(aya::programs::tc::NlOptions::default()),
    )?;
    let mut progs = Programs::load(4096)?;
    progs.attach(&net.host)?;
    let (host, peer) = (net.addr(true), net.addr(false));
    let ping = |n: &str| {
        Command::new("ping")
            .args(["-c", n, "-i", "0.05", "-W", "1", &peer.to_string()])
            .output()
            .map(|o| o.status.success())
    };
    // The other program still drops (no reply reaches ping), and ours counted both ways
    // (on this kernel ours is on tcx, which runs before legacy tc programs).
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
    let mut progs = Programs::load(4096)?;
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
