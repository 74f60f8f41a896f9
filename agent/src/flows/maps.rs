//! User-space mirrors of the eBPF maps' key and value layouts (`agent-ebpf/src/main.rs`).

use std::net::IpAddr;

/// A flow in one direction on one interface (`FlowKey` in `agent-ebpf`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address: IPv4 in the first 4 bytes, or IPv6.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port; ICMP: the type.
    pub sport: u16,
    /// Destination port; ICMP: the code.
    pub dport: u16,
    /// Interface index.
    pub ifindex: u32,
    /// IP protocol.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// 0: ingress of the interface, 1: egress.
    pub dir: u8,
    /// Zero.
    pub pad: u8,
}

/// Counters of a flow (`FlowValue` in `agent-ebpf`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Packets (GSO segments one by one).
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// SYN without ACK.
    pub syn: u32,
    /// SYN with ACK.
    pub synack: u32,
    /// FIN.
    pub fin: u32,
    /// RST.
    pub rst: u32,
}

/// A drop reason and EtherType (`DropKey` in `agent-ebpf`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropKey {
    /// `enum skb_drop_reason`.
    pub reason: u32,
    /// EtherType.
    pub protocol: u16,
    /// Zero.
    pub pad: u16,
}

// SAFETY: as below.
unsafe impl aya::Pod for DropKey {}

// SAFETY: plain `repr(C)` data without padding holes that matter (every byte is written by the
// program or zero), valid for any bit pattern.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowValue {}

impl FlowKey {
    fn addr(&self, b: &[u8; 16]) -> IpAddr {
        if self.family == 4 {
            IpAddr::from([b[0], b[1], b[2], b[3]])
        } else {
            IpAddr::from(*b)
        }
    }

    /// The source address.
    pub fn source(&self) -> IpAddr {
        self.addr(&self.src)
    }

    /// The destination address.
    pub fn destination(&self) -> IpAddr {
        self.addr(&self.dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_programs() {
        // agent-ebpf's structs: 16+16+2+2+4+1+1+1+1 and 8+8+4*4 bytes.
        assert_eq!(std::mem::size_of::<FlowKey>(), 44);
        assert_eq!(std::mem::size_of::<FlowValue>(), 32);
    }
}
