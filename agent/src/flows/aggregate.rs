//! From the kernel's flow and drop tables to Hubble's counters.
//!
//! Every interval the collector hands the tables as they are now ([`Aggregator::add`]); the
//! aggregator keeps what it read last time per flow, adds the difference to the counters of
//! the flow's label sets, and names the flows idle for longer than `idle_timeout` so that the
//! collector removes them from the kernel's table. [`Aggregator::render`] gives the counters
//! as exposition text, which the collector appends through the series cache like a scrape:
//! a label set not counted for `idle_timeout` leaves the text and gets its staleness marker.
//!
//! Metric and label names are Hubble's (`pkg/hubble/metrics/*` in Cilium), so Hubble
//! dashboards work. What differs, because these are per-packet counts without Cilium's
//! datapath: every packet is one flow event (Hubble with monitor aggregation off); the verdict
//! is `FORWARDED` for what crossed an interface; drops come node-wide from `skb:kfree_skb`
//! with the kernel's reason and the packet's network protocol, without source/destination;
//! a flow is a reply (left out of the port distribution) when its source port is outside the
//! node's ephemeral range and its destination port inside it, or when it is an ICMP reply or
//! error.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;

use rustc_hash::FxHashMap;

use super::maps::{FlowKey, FlowValue};

/// `hubble_flows_processed_total`.
pub const FLOWS_PROCESSED: &str = "hubble_flows_processed_total";
/// `hubble_tcp_flags_total`.
pub const TCP_FLAGS: &str = "hubble_tcp_flags_total";
/// `hubble_port_distribution_total`.
pub const PORT_DISTRIBUTION: &str = "hubble_port_distribution_total";
/// `hubble_drop_total`.
pub const DROP: &str = "hubble_drop_total";
/// `hubble_icmp_total`.
pub const ICMP: &str = "hubble_icmp_total";

/// One of Hubble's label contexts (`sourceContext` / `destinationContext` options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// The pod's namespace.
    Namespace,
    /// `namespace/pod`.
    Pod,
    /// The pod's name.
    PodName,
    /// The pod's name without its ReplicaSet/pod hash suffixes.
    PodShort,
    /// `namespace/workload` of the pod's controlling workload (a ReplicaSet's Deployment).
    Workload,
    /// The workload's name alone.
    WorkloadName,
    /// `app.kubernetes.io/name`, `k8s-app` or `app` label.
    App,
    /// The address.
    Ip,
    /// `reserved:host` for this node's addresses, `reserved:world` for any other address that
    /// is no known pod.
    ReservedIdentity,
}

impl Context {
    /// Parses a config name (see `config::flows::CONTEXTS`).
    pub fn parse(name: &str) -> Option<Context> {
        Some(match name {
            "namespace" => Context::Namespace,
            "pod" => Context::Pod,
            "pod-name" => Context::PodName,
            "pod-short" => Context::PodShort,
            "workload" => Context::Workload,
            "workload-name" => Context::WorkloadName,
            "app" => Context::App,
            "ip" => Context::Ip,
            "reserved-identity" => Context::ReservedIdentity,
            _ => return None,
        })
    }
}

/// What the aggregator knows of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Controlling workload's name, if any.
    pub workload: Option<String>,
    /// App label, if any.
    pub app: Option<String>,
}

/// Resolves addresses: the shared pod cache's IP index in the agent, a map in tests.
pub trait Resolve {
    /// The pod owning `ip`.
    fn pod(&self, ip: IpAddr) -> Option<PodInfo>;
    /// Whether `ip` is one of this node's own addresses.
    fn is_host(&self, ip: IpAddr) -> bool;
}

/// Which metrics, which contexts, which limits.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Export `hubble_flows_processed_total`.
    pub flows_processed: bool,
    /// Export `hubble_tcp_flags_total`.
    pub tcp: bool,
    /// Export `hubble_port_distribution_total`.
    pub port_distribution: bool,
    /// Export `hubble_drop_total`.
    pub drop: bool,
    /// Export `hubble_icmp_total`.
    pub icmp: bool,
    /// `source` label alternatives (empty: no label).
    pub source: Vec<Context>,
    /// `destination` label alternatives.
    pub destination: Vec<Context>,
    /// Distinct ports in the port distribution; more are counted as port `other`.
    pub max_ports: usize,
    /// Label sets per metric; more are not counted ([`Aggregator::dropped_label_sets`]).
    pub max_label_sets: usize,
    /// Flows and label sets without packets for this long are forgotten (ns).
    pub idle_ns: u64,
    /// The node's ephemeral port range (`net.ipv4.ip_local_port_range`).
    pub ephemeral: (u16, u16),
}

impl Settings {
    /// From the `flows:` section (already checked by `config`).
    pub fn from_config(cfg: &config::flows::FlowsConfig) -> Settings {
        let has = |m: &str| cfg.metrics.iter().any(|x| x == m);
        let ctx = |list: &[String]| {
            config::flows::FlowsConfig::contexts(list)
                .iter()
                .filter_map(|c| Context::parse(c))
                .collect()
        };
        Settings {
            flows_processed: has("flows-processed"),
            tcp: has("tcp"),
            port_distribution: has("port-distribution"),
            drop: has("drop"),
            icmp: has("icmp"),
            source: ctx(&cfg.source_context),
            destination: ctx(&cfg.destination_context),
            max_ports: cfg.max_ports,
            max_label_sets: cfg.max_label_sets,
            idle_ns: cfg.idle_timeout.get().as_nanos().min(u128::from(u64::MAX)) as u64,
            ephemeral: ephemeral_range(),
        }
    }
}

/// `net.ipv4.ip_local_port_range` (Linux's default when unreadable).
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u16>());
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .unwrap_or((32768, 60999))
}

struct Cell {
    metric: &'static str,
    value: u64,
    /// Monotonic time of the last increment (ns).
    touched: u64,
}

/// Cumulative Hubble counters built from the kernel's tables.
pub struct Aggregator {
    settings: Settings,
    /// What each flow's counters were at the last read, and when they last moved (the
    /// programs read no clock per packet; idleness is seen here).
    last: FxHashMap<FlowKey, Last>,
    /// Counts drains (marks the flows each one saw).
    generation: u64,
    drops_last: HashMap<(u32, u16), u64>,
    /// `name{labels}` → counter, sorted so the text is stable.
    series: BTreeMap<String, Cell>,
    per_metric: HashMap<&'static str, usize>,
    /// Ports of the port distribution, with when they were last counted (forgotten after
    /// `idle_timeout`, so the limit bounds the ports in use, not all ever seen).
    ports: FxHashMap<(u8, u16), u64>,
    reasons: HashMap<u32, String>,
    dropped: HashMap<&'static str, u64>,
    scratch: String,
}

/// What one [`Aggregator::add`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Added {
    /// Flows idle for longer than `idle_timeout`: the collector removes them from the table.
    pub idle: Vec<FlowKey>,
    /// Flows in the table.
    pub flows: usize,
    /// Packets counted since the last read.
    pub packets: u64,
}

impl Aggregator {
    /// An empty aggregator; `reasons` names the kernel's drop reasons by number.
    pub fn new(settings: Settings, reasons: HashMap<u32, String>) -> Self {
        Self {
            settings,
            last: FxHashMap::default(),
            generation: 0,
            drops_last: HashMap::new(),
            series: BTreeMap::new(),
            per_metric: HashMap::new(),
            ports: FxHashMap::default(),
            reasons,
            dropped: HashMap::new(),
            scratch: String::new(),
        }
    }

    /// Label sets not counted because their metric had `max_label_sets`, by metric (totals).
    pub fn dropped_label_sets(&self) -> &HashMap<&'static str, u64> {
        &self.dropped
    }

    /// Forgets flows removed from the kernel's table (a flow seen again starts from zero).
    pub fn forget(&mut self, removed: &[FlowKey]) {
        for k in removed {
            self.last.remove(k);
        }
    }

    /// Label sets held.
    pub fn label_sets(&self) -> usize {
        self.series.len()
    }

    /// Adds what grew since the last call. `flows` and `drops` are the tables as they are now;
    /// `now` is a monotonic clock (ns).
    ///
    /// Flows are first summed by what their label sets depend on (addresses resolved once,
    /// protocol, direction, port class), so a label set is touched once per drain however
    /// many flows feed it.
    pub fn add(
        &mut self,
        flows: &[(FlowKey, FlowValue)],
        drops: &[((u32, u16), u64)],
        now: u64,
        resolve: &dyn Resolve,
    ) -> Added {
        let mut out = Added {
            flows: flows.len(),
            ..Default::default()
        };
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let mut ips: FxHashMap<IpAddr, u32> = FxHashMap::default();
        let mut names: Vec<(String, String)> = Vec::new();
        let mut groups: FxHashMap<Group, Delta> = FxHashMap::default();
        for (key, cur) in flows {
            let slot = self.last.entry(*key).or_insert(Last {
                value: FlowValue::default(),
                moved: now,
                generation,
            });
            let prev = slot.value;
            // A counter below the last read: the flow was removed and counted anew.
            let d = |c: u64, p: u64| if c >= p { c - p } else { c };
            let d32 = |c: u32, p: u32| u64::from(if c >= p { c - p } else { c });
            let delta = Delta {
                packets: d(cur.packets, prev.packets),
                syn: d32(cur.syn, prev.syn),
                synack: d32(cur.synack, prev.synack),
                fin: d32(cur.fin, prev.fin),
                rst: d32(cur.rst, prev.rst),
            };
            let changed = delta.packets + delta.syn + delta.synack + delta.fin + delta.rst > 0;
            if changed {
                slot.moved = now;
            }
            slot.value = *cur;
            slot.generation = generation;
            if now.saturating_sub(slot.moved) > self.settings.idle_ns {
                // Named until the collector has removed it ([`Aggregator::forget`]).
                out.idle.push(*key);
            }
            if !changed {
                continue;
            }
            out.packets += delta.packets;
            let mut intern = |ip: IpAddr| -> u32 {
                *ips.entry(ip).or_insert_with(|| {
                    let pod = resolve.pod(ip);
                    let host = pod.is_none() && resolve.is_host(ip);
                    let s = label(&self.settings.source, ip, pod.as_ref(), host);
                    let t = label(&self.settings.destination, ip, pod.as_ref(), host);
                    names.push((s, t));
                    (names.len() - 1) as u32
                })
            };
            let (src, dst) = (intern(key.source()), intern(key.destination()));
            let reply = self.is_reply(key);
            let port = match key.proto {
                // A later fragment: no ports.
                6 | 17 | 132 if key.sport == 0 && key.dport == 0 => Port::None,
                6 | 17 | 132 if !reply => {
                    let k = (key.proto, key.dport);
                    if self.ports.contains_key(&k) || self.ports.len() < self.settings.max_ports {
                        self.ports.insert(k, now);
                        Port::Number(key.dport)
                    } else {
                        Port::Other
                    }
                }
                1 | 58 => Port::Icmp(key.sport as u8, key.dport as u8),
                _ => Port::None,
            };
            let g = Group {
                proto: key.proto,
                family: key.family,
                dir: key.dir,
                src,
                dst,
                reply,
                port,
            };
            let e = groups.entry(g).or_default();
            e.packets += delta.packets;
            e.syn += delta.syn;
            e.synack += delta.synack;
            e.fin += delta.fin;
            e.rst += delta.rst;
        }
        // Flows gone from the table (removed here, or by a reload of the programs).
        self.last.retain(|_, l| l.generation == generation);
        for (g, d) in &groups {
            let (source, destination) = (&names[g.src as usize].0, &names[g.dst as usize].1);
            self.count_group(g, d, source, destination, now);
        }
        if self.settings.drop {
            for &((reason, protocol), cur) in drops {
                let prev = self.drops_last.insert((reason, protocol), cur).unwrap_or(0);
                let delta = if cur >= prev { cur - prev } else { cur };
                if delta == 0 {
                    continue;
                }
                let reason = self
                    .reasons
                    .get(&reason)
                    .cloned()
                    .unwrap_or_else(|| format!("REASON_{reason}"));
                let protocol = match protocol {
                    0x0800 => "IPv4",
                    0x86dd => "IPv6",
                    _ => "Unknown",
                };
                self.bump(DROP, &[("protocol", protocol), ("reason", &reason)], delta, now);
            }
        }
        out
    }

    fn count_group(&mut self, g: &Group, d: &Delta, source: &str, destination: &str, now: u64) {
        let s = &self.settings;
        let (src_ctx, dst_ctx) = (!s.source.is_empty(), !s.destination.is_empty());
        let (flows_processed, tcp, port_distribution, icmp) = (s.flows_processed, s.tcp, s.port_distribution, s.icmp);
        let ctx = |l: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
            let mut out: Vec<(&'static str, String)> = l.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
            if src_ctx {
                out.push(("source", source.to_owned()));
            }
            if dst_ctx {
                out.push(("destination", destination.to_owned()));
            }
            out
        };
        let protocol = protocol_name(g.proto, g.family);
        let family = if g.family == 4 { "IPv4" } else { "IPv6" };
        if flows_processed && d.packets > 0 {
            let subtype = if g.dir == 0 { "to-stack" } else { "to-endpoint" };
            let l = ctx(&[
                ("protocol", protocol),
                ("subtype", subtype),
                ("type", "Trace"),
                ("verdict", "FORWARDED"),
            ]);
            self.bump_owned(FLOWS_PROCESSED, &l, d.packets, now);
        }
        if tcp && g.proto == 6 {
            for (flag, n) in [("SYN", d.syn), ("SYN-ACK", d.synack), ("FIN", d.fin), ("RST", d.rst)] {
                if n > 0 {
                    let l = ctx(&[("family", family), ("flag", flag)]);
                    self.bump_owned(TCP_FLAGS, &l, n, now);
                }
            }
        }
        if port_distribution && d.packets > 0 && !g.reply {
            let port = match g.port {
                Port::Number(p) => Some(p.to_string()),
                Port::Other => Some("other".to_owned()),
                Port::Icmp(..) => Some("0".to_owned()),
                Port::None => None,
            };
            if let Some(port) = port {
                let l = ctx(&[("port", &port), ("protocol", protocol)]);
                self.bump_owned(PORT_DISTRIBUTION, &l, d.packets, now);
            }
        }
        if let (true, Port::Icmp(t, code)) = (icmp && d.packets > 0, g.port) {
            let name = icmp_type_name(g.proto, t, code);
            let l = ctx(&[("family", family), ("type", &name)]);
            self.bump_owned(ICMP, &l, d.packets, now);
        }
    }

    /// A reply by ports (see the module's text) or an ICMP reply type.
    fn is_reply(&self, key: &FlowKey) -> bool {
        let (lo, hi) = self.settings.ephemeral;
        let eph = |p: u16| (lo..=hi).contains(&p);
        match key.proto {
            6 | 17 | 132 => !eph(key.sport) && eph(key.dport),
            // Echo, timestamp, information and mask replies, and the errors (unreachable,
            // source quench, redirect, time exceeded, parameter problem) answer something.
            1 => matches!(key.sport, 0 | 3 | 4 | 5 | 11 | 12 | 14 | 16 | 18),
            // Errors (1–4) and echo replies.
            58 => matches!(key.sport, 1..=4 | 129),
            _ => false,
        }
    }

    fn bump_owned(&mut self, metric: &'static str, labels: &[(&'static str, String)], n: u64, now: u64) {
        let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.bump(metric, &l, n, now);
    }

    /// Adds `n` to the series of `metric` with `labels` (any order).
    fn bump(&mut self, metric: &'static str, labels: &[(&str, &str)], n: u64, now: u64) {
        let mut sorted: Vec<&(&str, &str)> = labels.iter().collect();
        sorted.sort_by_key(|(k, _)| *k);
        let key = &mut self.scratch;
        key.clear();
        key.push_str(metric);
        key.push('{');
        for (i, (k, v)) in sorted.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            key.push_str(k);
            key.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => key.push_str("\\\\"),
                    '"' => key.push_str("\\\""),
                    '\n' => key.push_str("\\n"),
                    c => key.push(c),
                }
            }
            key.push('"');
        }
        key.push('}');
        if let Some(cell) = self.series.get_mut(key.as_str()) {
            cell.value += n;
            cell.touched = now;
            return;
        }
        let count = self.per_metric.entry(metric).or_default();
        if *count >= self.settings.max_label_sets {
            *self.dropped.entry(metric).or_default() += 1;
            return;
        }
        *count += 1;
        self.series.insert(
            key.clone(),
            Cell {
                metric,
                value: n,
                touched: now,
            },
        );
    }

    /// The counters as exposition text, after forgetting label sets not counted for
    /// `idle_timeout` (their series end with a staleness marker).
    pub fn render(&mut self, now: u64) -> String {
        let idle = self.settings.idle_ns;
        self.ports.retain(|_, t| now.saturating_sub(*t) <= idle);
        let per_metric = &mut self.per_metric;
        self.series.retain(|_, c| {
            let keep = now.saturating_sub(c.touched) <= idle;
            if !keep {
                if let Some(n) = per_metric.get_mut(c.metric) {
                    *n = n.saturating_sub(1);
                }
            }
            keep
        });
        let mut out = String::with_capacity(self.series.len() * 128);
        for (k, c) in &self.series {
            let _ = writeln!(out, "{k} {}", c.value);
        }
        out
    }
}

/// What a flow's label sets depend on: flows equal in these are summed before counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Group {
    proto: u8,
    family: u8,
    dir: u8,
    /// Index of the source address's names.
    src: u32,
    /// Index of the destination address's names.
    dst: u32,
    reply: bool,
    port: Port,
}

/// The port class of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Port {
    /// TCP/UDP/SCTP destination port (not a reply).
    Number(u16),
    /// Over `max_ports`.
    Other,
    /// ICMP type and code.
    Icmp(u8, u8),
    /// A reply, or no ports.
    None,
}

/// A flow's counters as last read, when they last moved, and the drain that saw it.
#[derive(Clone, Copy)]
struct Last {
    value: FlowValue,
    moved: u64,
    generation: u64,
}

#[derive(Default)]
struct Delta {
    packets: u64,
    syn: u64,
    synack: u64,
    fin: u64,
    rst: u64,
}

/// The first context that resolves for `ip` (Hubble's alternatives), or "".
fn label(ctx: &[Context], ip: IpAddr, pod: Option<&PodInfo>, host: bool) -> String {
    for c in ctx {
        let v = match (c, pod) {
            (Context::Namespace, Some(p)) => Some(p.namespace.clone()),
            (Context::Pod, Some(p)) => Some(format!("{}/{}", p.namespace, p.name)),
            (Context::PodName, Some(p)) => Some(p.name.clone()),
            (Context::PodShort, Some(p)) => Some(format!("{}/{}", p.namespace, short_pod_name(&p.name))),
            (Context::Workload, Some(p)) => p.workload.as_ref().map(|w| format!("{}/{w}", p.namespace)),
            (Context::WorkloadName, Some(p)) => p.workload.clone(),
            (Context::App, Some(p)) => p.app.clone(),
            (Context::Ip, _) => Some(ip.to_string()),
            (Context::ReservedIdentity, None) => Some(if host { "reserved:host" } else { "reserved:world" }.to_owned()),
            _ => None,
        };
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            return v;
        }
    }
    String::new()
}

/// A pod name without the suffixes its controllers add (`web-7d4b9c8f5-x2x9q` → `web`,
/// `agent-x2x9q` → `agent`).
pub fn short_pod_name(name: &str) -> &str {
    let hashy = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let mut n = name;
    if let Some((head, tail)) = n.rsplit_once('-') {
        if hashy(tail, 5, 5) && !head.is_empty() {
            n = head;
            if let Some((head, tail)) = n.rsplit_once('-') {
                if hashy(tail, 6, 10) && tail.bytes().any(|b| b.is_ascii_digit()) && !head.is_empty() {
                    n = head;
                }
            }
        }
    }
    n
}

/// Hubble's protocol names.
fn protocol_name(proto: u8, family: u8) -> &'static str {
    match proto {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        1 if family == 4 => "ICMPv4",
        58 => "ICMPv6",
        112 => "VRRP",
        2 => "IGMP",
        _ => "Unknown L4",
    }
}

/// gopacket's names of ICMP types (and codes, in parentheses), as Hubble labels them.
fn icmp_type_name(proto: u8, t: u8, code: u8) -> String {
    let name = if proto == 1 {
        match t {
            0 => "EchoReply",
            3 => {
                let c = match code {
                    0 => "Net",
                    1 => "Host",
                    2 => "Protocol",
                    3 => "Port",
                    4 => "FragmentationNeeded",
                    13 => "CommAdminProhibited",
                    _ => "",
                };
                return if c.is_empty() {
                    "DestinationUnreachable".to_owned()
                } else {
                    format!("DestinationUnreachable({c})")
                };
            }
            5 => "Redirect",
            8 => "EchoRequest",
            11 => "TimeExceeded",
            12 => "ParameterProblem",
            13 => "TimestampRequest",
            14 => "TimestampReply",
            _ => return format!("{t}({code})"),
        }
    } else {
        match t {
            1 => "DestinationUnreachable",
            2 => "PacketTooBig",
            3 => "TimeExceeded",
            4 => "ParameterProblem",
            128 => "EchoRequest",
            129 => "EchoReply",
            133 => "RouterSolicitation",
            134 => "RouterAdvertisement",
            135 => "NeighborSolicitation",
            136 => "NeighborAdvertisement",
            143 => "MLDv2MulticastListenerReport",
            _ => return format!("{t}({code})"),
        }
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pods(HashMap<IpAddr, PodInfo>, Vec<IpAddr>);

    impl Resolve for Pods {
        fn pod(&self, ip: IpAddr) -> Option<PodInfo> {
            self.0.get(&ip).cloned()
        }
        fn is_host(&self, ip: IpAddr) -> bool {
            self.1.contains(&ip)
        }
    }

    fn pods() -> Pods {
        let p = |ns: &str, name: &str| PodInfo {
            namespace: ns.into(),
            name: name.into(),
            workload: Some(short_pod_name(name).into()),
            app: None,
        };
        Pods(
            [
                ("10.0.0.2".parse().unwrap(), p("shop", "web-7d4b9c8f5-x2x9q")),
                ("10.0.0.3".parse().unwrap(), p("shop", "db-0")),
            ]
            .into(),
            vec!["192.168.1.10".parse().unwrap()],
        )
    }

    fn settings() -> Settings {
        Settings {
            flows_processed: true,
            tcp: true,
            port_distribution: true,
            drop: true,
            icmp: true,
            source: vec![Context::Pod, Context::ReservedIdentity],
            destination: vec![Context::Pod, Context::ReservedIdentity],
            max_ports: 2,
            max_label_sets: 100,
            idle_ns: 60_000_000_000,
            ephemeral: (32768, 60999),
        }
    }

    fn key(src: &str, dst: &str, proto: u8, sport: u16, dport: u16, dir: u8) -> FlowKey {
        let mut k = FlowKey {
            src: [0; 16],
            dst: [0; 16],
            sport,
            dport,
            ifindex: 7,
            proto,
            family: 4,
            dir,
            pad: 0,
        };
        let (s, d): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (src.parse().unwrap(), dst.parse().unwrap());
        k.src[..4].copy_from_slice(&s.octets());
        k.dst[..4].copy_from_slice(&d.octets());
        k
    }

    fn val(packets: u64, syn: u32, synack: u32, fin: u32, _at: u64) -> FlowValue {
        FlowValue {
            packets,
            bytes: packets * 100,
            syn,
            synack,
            fin,
            rst: 0,
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn deltas_become_hubble_counters_with_pod_labels() {
        let mut a = Aggregator::new(settings(), [(3, "NO_SOCKET".to_owned())].into());
        let req = key("10.0.0.2", "10.0.0.3", 6, 40000, 5432, 0);
        let rep = key("10.0.0.3", "10.0.0.2", 6, 5432, 40000, 1);
        let sec = 1_000_000_000;
        a.add(
            &[(req, val(3, 1, 0, 0, sec)), (rep, val(2, 0, 1, 0, sec))],
            &[((3, 0x0800), 4)],
            sec,
            &pods(),
        );
        // Later: 2 more packets one way with a FIN; the drop count grew by 1.
        let added = a.add(
            &[(req, val(5, 1, 0, 1, 2 * sec)), (rep, val(2, 0, 1, 0, sec))],
            &[((3, 0x0800), 5)],
            2 * sec,
            &pods(),
        );
        assert_eq!(added.packets, 2);
        assert!(added.idle.is_empty());
        let text = a.render(2 * sec);
        let (web, db) = ("shop/web-7d4b9c8f5-x2x9q", "shop/db-0");
        assert_eq!(
            lines(&text),
            vec![
                r#"hubble_drop_total{protocol="IPv4",reason="NO_SOCKET"} 5"#.to_owned(),
                format!(
                    r#"hubble_flows_processed_total{{destination="{db}",protocol="TCP",source="{web}",subtype="to-stack",type="Trace",verdict="FORWARDED"}} 5"#
                ),
                format!(
                    r#"hubble_flows_processed_total{{destination="{web}",protocol="TCP",source="{db}",subtype="to-endpoint",type="Trace",verdict="FORWARDED"}} 2"#
                ),
                format!(
                    r#"hubble_port_distribution_total{{destination="{db}",port="5432",protocol="TCP",source="{web}"}} 5"#
                ),
                format!(r#"hubble_tcp_flags_total{{destination="{db}",family="IPv4",flag="FIN",source="{web}"}} 1"#),
                format!(r#"hubble_tcp_flags_total{{destination="{db}",family="IPv4",flag="SYN",source="{web}"}} 1"#),
                format!(
                    r#"hubble_tcp_flags_total{{destination="{web}",family="IPv4",flag="SYN-ACK",source="{db}"}} 1"#
                ),
            ]
        );
    }

    #[test]
    fn unknown_addresses_are_host_or_world_and_icmp_is_named() {
        let mut a = Aggregator::new(settings(), HashMap::new());
        let ping = key("192.168.1.10", "8.8.8.8", 1, 8, 0, 1);
        let pong = key("8.8.8.8", "192.168.1.10", 1, 0, 0, 0);
        a.add(
            &[(ping, val(5, 0, 0, 0, 1)), (pong, val(5, 0, 0, 0, 1))],
            &[],
            1,
            &pods(),
        );
        let text = a.render(1);
        assert!(text.contains(r#"hubble_icmp_total{destination="reserved:world",family="IPv4",source="reserved:host",type="EchoRequest"} 5"#), "{text}");
        assert!(text.contains(r#"hubble_icmp_total{destination="reserved:host",family="IPv4",source="reserved:world",type="EchoReply"} 5"#), "{text}");
        // Requests count in the port distribution (port 0), replies do not.
        assert!(text.contains(r#"hubble_port_distribution_total{destination="reserved:world",port="0",protocol="ICMPv4",source="reserved:host"} 5"#), "{text}");
        assert_eq!(text.matches("hubble_port_distribution_total").count(), 1, "{text}");
    }

    #[test]
    fn idle_flows_are_named_for_removal_and_their_series_end() {
        let mut a = Aggregator::new(settings(), HashMap::new());
        let sec = 1_000_000_000;
        let k = key("10.0.0.2", "10.0.0.3", 17, 40000, 53, 0);
        a.add(&[(k, val(1, 0, 0, 0, sec))], &[], sec, &pods());
        assert!(a.render(sec).contains("hubble_flows_processed_total"));
        // 61 s later without packets: idle; removed from the table by the collector.
        let added = a.add(&[(k, val(1, 0, 0, 0, sec))], &[], 62 * sec, &pods());
        assert_eq!(added.idle, vec![k]);
        // Not yet removed from the kernel's table: named again, not counted again.
        let again = a.add(&[(k, val(1, 0, 0, 0, sec))], &[], 62 * sec, &pods());
        assert_eq!((&again.idle, again.packets), (&vec![k], 0));
        a.forget(&again.idle);
        assert_eq!(a.render(62 * sec), "");
        assert_eq!(a.label_sets(), 0);
        // The same flow again (a new table entry starting from 1): counted from scratch.
        a.add(&[(k, val(1, 0, 0, 0, 63 * sec))], &[], 63 * sec, &pods());
        assert!(a.render(63 * sec).contains("} 1\n"));
    }

    #[test]
    fn ports_and_label_sets_are_bounded() {
        let mut s = settings();
        s.max_label_sets = 3;
        s.flows_processed = false;
        s.tcp = false;
        let mut a = Aggregator::new(s, HashMap::new());
        let flows: Vec<_> = (1..=4u16)
            .map(|p| (key("10.0.0.2", "10.0.0.3", 17, 40000, p, 0), val(1, 0, 0, 0, 1)))
            .collect();
        a.add(&flows, &[], 1, &pods());
        let text = a.render(1);
        // Ports 1 and 2, then `other` for 3 and 4: three label sets, within the limit.
        assert!(text.contains(r#"port="1""#) && text.contains(r#"port="2""#), "{text}");
        assert!(
            text.contains(r#"port="other",protocol="UDP",source="shop/web-7d4b9c8f5-x2x9q"} 2"#),
            "{text}"
        );
        // Another destination makes a fourth label set: dropped and counted.
        a.add(
            &[(key("10.0.0.2", "10.0.0.9", 17, 40000, 1, 0), val(1, 0, 0, 0, 1))],
            &[],
            1,
            &pods(),
        );
        assert_eq!(a.dropped_label_sets().get(PORT_DISTRIBUTION), Some(&1));
        assert_eq!(a.label_sets(), 3);
    }

    #[test]
    fn workload_is_namespaced_and_workload_name_is_not() {
        let web = pods().0[&"10.0.0.2".parse::<IpAddr>().unwrap()].clone();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(label(&[Context::Workload], ip, Some(&web), false), "shop/web");
        assert_eq!(label(&[Context::WorkloadName], ip, Some(&web), false), "web");
        assert_eq!(label(&[Context::PodShort], ip, Some(&web), false), "shop/web");
        // A pod without a workload falls through to the next alternative.
        let bare = PodInfo { workload: None, ..web };
        assert_eq!(
            label(&[Context::Workload, Context::Ip], ip, Some(&bare), false),
            "10.0.0.2"
        );
    }

    #[test]
    fn short_names_drop_controller_hashes() {
        assert_eq!(short_pod_name("web-7d4b9c8f5-x2x9q"), "web");
        assert_eq!(short_pod_name("agent-x2x9q"), "agent");
        assert_eq!(short_pod_name("db-0"), "db-0");
        assert_eq!(short_pod_name("coredns"), "coredns");
    }
}
