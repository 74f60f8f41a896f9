//! The flows path (issue 10, in progress): loads `agent-ebpf`'s programs with aya, attaches
//! the tc classifier to interfaces (tcx on kernels that have it, clsact otherwise — aya picks)
//! and reads the flow table. Aggregation into Hubble's metrics, the pod cache lookup and the
//! series cache come next; see the closing note.

pub mod maps;

use anyhow::{anyhow, Context};
use aya::maps::HashMap as BpfHashMap;
use aya::programs::{tc, SchedClassifier, TcAttachType};

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
