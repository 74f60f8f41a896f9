//! The flows path (issue 10, in progress): loads `agent-ebpf`'s programs with aya, attaches
//! the tc classifier to interfaces (tcx on kernels that have it, clsact otherwise — aya picks)
//! and reads the flow table. Aggregation into Hubble's metrics, the pod cache lookup and the
//! series cache come next; see the closing note.

pub mod maps;

use anyhow::{anyhow, Context};
use aya::maps::HashMap as BpfHashMap;
use aya::programs::{tc, SchedClassifier, TcAttachType, TracePoint};

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
}

impl Programs {
    /// Loads the programs with a flow table of `max_flows` entries (the verifier runs here).
    pub fn load(max_flows: u32) -> anyhow::Result<Programs> {
        let obj =
            OBJECT.ok_or_else(|| anyhow!("this agent was built without its eBPF programs (scripts/build-ebpf.sh)"))?;
        let mut bpf = aya::EbpfLoader::new()
            .set_max_entries("FLOWS", max_flows)
            .load(obj)
            .context("loading the eBPF object")?;
        let prog: &mut SchedClassifier = bpf
            .program_mut("flows_tc")
            .ok_or_else(|| anyhow!("no flows_tc program in the eBPF object"))?
            .try_into()?;
        prog.load().context("loading flows_tc (verifier)")?;
        Ok(Programs { bpf })
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

    /// Attaches the classifier to `iface` at ingress and egress.
    pub fn attach(&mut self, iface: &str) -> anyhow::Result<()> {
        // Kernels without tcx need the clsact qdisc (an existing one is fine).
        if !aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0)) {
            let _ = tc::qdisc_add_clsact(iface);
        }
        let prog: &mut SchedClassifier = self
            .bpf
            .program_mut("flows_tc")
            .ok_or_else(|| anyhow!("no flows_tc program"))?
            .try_into()?;
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            prog.attach(iface, t)
                .with_context(|| format!("attaching to {iface} ({t:?})"))?;
        }
        Ok(())
    }

    /// Every flow in the table with what was counted for it.
    pub fn flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowValue)>> {
        let map: BpfHashMap<_, FlowKey, FlowValue> =
            BpfHashMap::try_from(self.bpf.map("FLOWS").ok_or_else(|| anyhow!("no FLOWS map"))?)?;
        map.iter().map(|r| r.map_err(anyhow::Error::from)).collect()
    }
}

/// Offsets of `protocol` and `reason` in the `skb:kfree_skb` record on this kernel (they moved
/// when `rx_sk` was added), from the tracepoint's `format` file.
pub fn kfree_skb_offsets() -> anyhow::Result<(u32, u32)> {
    let path = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .map(|d| format!("{d}/events/skb/kfree_skb/format"))
        .find(|p| std::path::Path::new(p).exists())
        .ok_or_else(|| anyhow!("no skb:kfree_skb tracepoint format (tracefs not mounted?)"))?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_offsets(&text).ok_or_else(|| anyhow!("{path} has no protocol and reason fields"))
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
}
