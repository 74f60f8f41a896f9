//! The flows path: loads `agent-ebpf`'s programs with aya, attaches the tc classifier to
//! interfaces (tcx on kernels that have it, clsact otherwise) or the cgroup_skb programs to
//! the cgroup v2 root, and reads the flow and drop tables ([`Programs`]); [`collector`]
//! drains them every interval into Hubble's metrics ([`aggregate`]) through the series cache.

pub mod aggregate;
pub mod collector;
pub mod maps;

use anyhow::{anyhow, Context};
use aya::maps::HashMap as BpfHashMap;
use aya::programs::links::CgroupAttachMode;
use aya::programs::{tc, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType, TracePoint};

pub use maps::{FlowKey, FlowValue};

/// The embedded eBPF object, when it was built (`scripts/build-ebpf.sh`).
#[cfg(sre_lab_ebpf)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("SRE_LAB_EBPF_OBJ")));
#[cfg(not(sre_lab_ebpf))]
static OBJECT: Option<&[u8]> = None;

/// The embedded eBPF object (tests load its `sre_lab_test_drop_icmp` program themselves).
pub fn object() -> Option<&'static [u8]> {
    OBJECT
}

/// Whether this binary carries the eBPF programs.
pub fn built_with_programs() -> bool {
    OBJECT.is_some()
}

/// The loaded programs and their maps.
pub struct Programs {
    bpf: aya::Ebpf,
    /// tc links by interface name: (ifindex, [(program, link)]).
    links: std::collections::HashMap<String, (u32, Vec<TcLink>)>,
    /// Buffers of the batch reads, kept between drains (no page faults for every read).
    batch: (Vec<u8>, Vec<u8>),
}

/// A classifier's link on an interface: the program's name and the link.
type TcLink = (&'static str, aya::programs::tc::SchedClassifierLinkId);

/// The classifiers for the host side's ingress (packets leaving the endpoint) and egress.
const TC_PROGRAMS: [&str; 2] = ["flows_tc_in", "flows_tc_out"];

/// `STATS` slots (`agent-ebpf`).
pub const STAT_FLOWS_FULL: u32 = 0;
/// A new drop key found the drop table full.
pub const STAT_DROPS_FULL: u32 = 1;
/// Packets that were not IPv4/IPv6 or too short.
pub const STAT_UNPARSED: u32 = 2;

impl Programs {
    /// Loads the programs with a flow table of `max_flows` entries (the verifier runs here);
    /// `cgroup`: the cgroup_skb programs instead of the tc classifier.
    pub fn load(max_flows: u32, cgroup: bool) -> anyhow::Result<Programs> {
        let obj =
            OBJECT.ok_or_else(|| anyhow!("this agent was built without its eBPF programs (scripts/build-ebpf.sh)"))?;
        let mut bpf = aya::EbpfLoader::new()
            .set_max_entries("FLOWS", max_flows)
            .load(obj)
            .context("loading the eBPF object")?;
        if cgroup {
            for name in ["flows_cgroup_ingress", "flows_cgroup_egress"] {
                let prog: &mut CgroupSkb = bpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("no {name} program in the eBPF object"))?
                    .try_into()?;
                prog.load().with_context(|| format!("loading {name} (verifier)"))?;
            }
        } else {
            for name in TC_PROGRAMS {
                let prog: &mut SchedClassifier = bpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("no {name} program in the eBPF object"))?
                    .try_into()?;
                prog.load().with_context(|| format!("loading {name} (verifier)"))?;
            }
        }
        Ok(Programs {
            bpf,
            links: Default::default(),
            batch: Default::default(),
        })
    }

    /// Attaches the cgroup_skb programs to the cgroup v2 directory `path` (ingress and
    /// egress, beside other programs there).
    pub fn attach_cgroup(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        for (name, t) in [
            ("flows_cgroup_ingress", CgroupSkbAttachType::Ingress),
            ("flows_cgroup_egress", CgroupSkbAttachType::Egress),
        ] {
            let dir = std::fs::File::open(path).with_context(|| format!("opening cgroup {}", path.display()))?;
            let prog: &mut CgroupSkb = self
                .bpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("no {name} program"))?
                .try_into()?;
            // A BPF link (kernels ≥ 5.7) takes no flags and never displaces other programs.
            prog.attach(dir, t, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to cgroup {}", path.display()))?;
        }
        Ok(())
    }

    /// A counter of the programs themselves (`STAT_*`).
    pub fn stat(&self, i: u32) -> anyhow::Result<u64> {
        let a: aya::maps::Array<_, u64> =
            aya::maps::Array::try_from(self.bpf.map("STATS").ok_or_else(|| anyhow!("no STATS map"))?)?;
        Ok(a.get(&i, 0)?)
    }

    /// Removes flows from the table (idle ones); returns those removed or already gone (a
    /// flow whose removal failed otherwise stays, and is tried again at the next drain).
    pub fn remove_flows(&mut self, keys: &[FlowKey]) -> anyhow::Result<Vec<FlowKey>> {
        let mut map: BpfHashMap<_, FlowKey, FlowValue> =
            BpfHashMap::try_from(self.bpf.map_mut("FLOWS").ok_or_else(|| anyhow!("no FLOWS map"))?)?;
        Ok(keys
            .iter()
            .filter(|k| match map.remove(k) {
                Ok(()) => true,
                Err(aya::maps::MapError::KeyNotFound) => true,
                Err(aya::maps::MapError::SyscallError(e)) => e.io_error.raw_os_error() == Some(libc::ENOENT),
                Err(_) => false,
            })
            .copied()
            .collect())
    }

    /// Interfaces attached to, by name, with their index.
    pub fn attached(&self) -> impl Iterator<Item = (&str, u32)> {
        self.links.iter().map(|(n, (i, _))| (n.as_str(), *i))
    }

    /// Detaches from `iface` (gone or renamed); the links of a deleted interface are gone
    /// with it, so errors are ignored.
    pub fn detach(&mut self, iface: &str) {
        let Some((_, ids)) = self.links.remove(iface) else {
            return;
        };
        for (name, id) in ids {
            let Some(prog) = self.bpf.program_mut(name) else {
                continue;
            };
            let Ok(prog): Result<&mut SchedClassifier, _> = prog.try_into() else {
                continue;
            };
            let _ = prog.detach(id);
        }
    }

    /// Loads and attaches the `skb:kfree_skb` program counting drops by reason, giving it the
    /// tracepoint's field offsets on this kernel.
    pub fn attach_drops(&mut self) -> anyhow::Result<()> {
        let (protocol, reason) = kfree_skb_offsets()?;
        let mut config: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(self.bpf.map_mut("CONFIG").ok_or_else(|| anyhow!("no CONFIG map"))?)?;
        config.set(0, protocol, 0)?;
        config.set(1, reason, 0)?;
        let prog: &mut TracePoint = self
            .bpf
            .program_mut("drops")
            .ok_or_else(|| anyhow!("no drops program"))?
            .try_into()?;
        prog.load().context("loading drops (verifier)")?;
        prog.attach("skb", "kfree_skb").context("attaching to skb:kfree_skb")?;
        Ok(())
    }

    /// Drops counted so far: (reason, EtherType) → packets.
    pub fn drops(&self) -> anyhow::Result<Vec<((u32, u16), u64)>> {
        let map: BpfHashMap<_, maps::DropKey, u64> =
            BpfHashMap::try_from(self.bpf.map("DROPS").ok_or_else(|| anyhow!("no DROPS map"))?)?;
        map.iter()
            .map(|r| r.map(|(k, v)| ((k.reason, k.protocol), v)).map_err(anyhow::Error::from))
            .collect()
    }

    /// Attaches the classifiers to `iface` (index `ifindex`) at ingress and egress. With tcx
    /// they go first in the interface's chain: a program before them returning a verdict
    /// (Cilium's return `TC_ACT_OK` or redirect) would end the chain before they count, while
    /// theirs (`TC_ACT_UNSPEC`) lets every later program run. With clsact (kernels < 6.6) they
    /// are added with the kernel's next free priority, after filters already there.
    pub fn attach(&mut self, iface: &str, ifindex: u32) -> anyhow::Result<()> {
        self.detach(iface);
        let tcx = aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            // Kernels without tcx need the clsact qdisc (an existing one is fine).
            let _ = tc::qdisc_add_clsact(iface);
        }
        let mut ids: Vec<TcLink> = Vec::new();
        let mut failed = None;
        for (name, t) in TC_PROGRAMS
            .into_iter()
            .zip([TcAttachType::Ingress, TcAttachType::Egress])
        {
            let Some(prog) = self.bpf.program_mut(name) else {
                failed = Some(anyhow!("no {name} program"));
                break;
            };
            let prog: &mut SchedClassifier = match prog.try_into() {
                Ok(p) => p,
                Err(e) => {
                    failed = Some(anyhow::Error::from(e));
                    break;
                }
            };
            let attached = if tcx {
                prog.attach_with_options(
                    iface,
                    t,
                    tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::first()),
                )
            } else {
                prog.attach(iface, t)
            };
            match attached {
                Ok(id) => ids.push((name, id)),
                Err(e) => {
                    failed = Some(anyhow::Error::from(e).context(format!("attaching to {iface} ({t:?})")));
                    break;
                }
            }
        }
        self.links.insert(iface.to_owned(), (ifindex, ids));
        if let Some(e) = failed {
            self.detach(iface);
            return Err(e);
        }
        Ok(())
    }

    /// Every flow in the table with what was counted for it.
    pub fn flows(&mut self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        let mut out = Vec::new();
        self.flows_into(&mut out)?;
        Ok(out)
    }

    /// Every flow in the table into `out` (cleared first): read in batches
    /// (`BPF_MAP_LOOKUP_BATCH`, kernels ≥ 5.6; a few syscalls for the whole table), else one
    /// entry at a time (two syscalls each).
    pub fn flows_into(&mut self, out: &mut Vec<(FlowKey, FlowValue)>) -> anyhow::Result<()> {
        out.clear();
        let map = self.bpf.map("FLOWS").ok_or_else(|| anyhow!("no FLOWS map"))?;
        if let aya::maps::Map::HashMap(data) = map {
            use std::os::fd::{AsFd, AsRawFd};
            match lookup_batch::<FlowKey, FlowValue>(data.fd().as_fd().as_raw_fd(), &mut self.batch, out) {
                Ok(()) => return Ok(()),
                // Kernels without batch operations: EINVAL, or ENOTSUPP (524, the kernel's own).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => out.clear(),
                Err(e) => return Err(anyhow::Error::from(e).context("reading the flow table")),
            }
        }
        let map: BpfHashMap<_, FlowKey, FlowValue> = BpfHashMap::try_from(map)?;
        for r in map.iter() {
            out.push(r?);
        }
        Ok(())
    }
}

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every entry of the hash map `fd` with `BPF_MAP_LOOKUP_BATCH`, 4096 entries per call. Not a
/// snapshot (neither is one-by-one iteration): entries added meanwhile may be missed until
/// the next read.
fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    fd: i32,
    (keys, values): &mut (Vec<u8>, Vec<u8>),
    out: &mut Vec<(K, V)>,
) -> std::io::Result<()> {
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut chunk = (keys.len() / ks).max(4096);
    keys.resize(chunk * ks, 0);
    values.resize(chunk * vs, 0);
    // Hash maps' batch token is a bucket index (u32); room for more does no harm.
    let (mut token_in, mut token_out) = ([0u8; 64], [0u8; 64]);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points at buffers of `count` keys and values and two tokens, all
        // alive for the call; the kernel writes at most that much.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (r < 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(chunk);
        for i in 0..n {
            // SAFETY: the kernel filled `n` keys and values; `Pod` types are valid for any
            // bytes, read unaligned from the byte buffers.
            let k = unsafe { std::ptr::read_unaligned(keys[i * ks..].as_ptr().cast::<K>()) };
            let v = unsafe { std::ptr::read_unaligned(values[i * vs..].as_ptr().cast::<V>()) };
            out.push((k, v));
        }
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            // A bucket holds more entries than fit: again, from the same place, with more room.
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 && chunk < 1 << 20 => {
                chunk *= 4;
                keys.resize(chunk * ks, 0);
                values.resize(chunk * vs, 0);
                continue;
            }
            Some(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}

/// The `skb:kfree_skb` tracepoint's `format` file: its path and text.
fn kfree_skb_format() -> anyhow::Result<(String, String)> {
    let path = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(|d| format!("{d}/events/skb/kfree_skb/format"))
        .find(|p| std::path::Path::new(p).exists())
        .ok_or_else(|| anyhow!("no skb:kfree_skb tracepoint format (tracefs not mounted?)"))?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok((path, text))
}

/// Offsets of `protocol` and `reason` in the `skb:kfree_skb` record on this kernel (they moved
/// when `rx_sk` was added), from the tracepoint's `format` file.
pub fn kfree_skb_offsets() -> anyhow::Result<(u32, u32)> {
    let (path, text) = kfree_skb_format()?;
    parse_offsets(&text).ok_or_else(|| anyhow!("{path} has no protocol and reason fields"))
}

/// This kernel's drop reason names by number (`enum skb_drop_reason` differs between
/// kernels), from the tracepoint's print format (`{ 3, "NO_SOCKET" }, …`).
pub fn drop_reason_names() -> std::collections::HashMap<u32, String> {
    kfree_skb_format()
        .map(|(_, text)| parse_reasons(&text))
        .unwrap_or_default()
}

fn parse_reasons(format: &str) -> std::collections::HashMap<u32, String> {
    let Some(sym) = format.find("__print_symbolic(REC->reason") else {
        return Default::default();
    };
    let mut out = std::collections::HashMap::new();
    let mut rest = &format[sym..];
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else { break };
        let item = &rest[open + 1..open + close];
        rest = &rest[open + close + 1..];
        let Some((n, name)) = item.split_once(',') else {
            continue;
        };
        if let Ok(n) = n.trim().parse::<u32>() {
            out.insert(n, name.trim().trim_matches('"').to_owned());
        }
    }
    out
}

fn parse_offsets(format: &str) -> Option<(u32, u32)> {
    let offset = |name: &str| {
        format.lines().find_map(|l| {
            let field = l.trim().strip_prefix("field:")?;
            let (decl, rest) = field.split_once(';')?;
            (decl.split_whitespace().last()? == name).then_some(())?;
            rest.split(';')
                .find_map(|p| p.trim().strip_prefix("offset:"))?
                .parse()
                .ok()
        })
    };
    Some((offset("protocol")?, offset("reason")?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn kfree_skb_offsets_come_from_the_format_text() {
        let v6_18 = "\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;\n\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n";
        assert_eq!(super::parse_offsets(v6_18), Some((32, 36)));
        let v6_1 = "\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;\n\tfield:enum skb_drop_reason reason;\toffset:28;\tsize:4;\tsigned:0;\n";
        assert_eq!(super::parse_offsets(v6_1), Some((24, 28)));
        assert_eq!(super::parse_offsets("nothing"), None);
    }

    #[test]
    fn drop_reason_names_come_from_the_print_format() {
        let f = r#"print fmt: "skbaddr=%p protocol=%u reason: %s", REC->skbaddr, REC->protocol, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, { 118, "MAX" })"#;
        let r = super::parse_reasons(f);
        assert_eq!(r.get(&3).map(String::as_str), Some("NO_SOCKET"));
        assert_eq!(r.get(&118).map(String::as_str), Some("MAX"));
        assert_eq!(r.len(), 3);
        assert!(super::parse_reasons("print fmt: nothing").is_empty());
    }
}
