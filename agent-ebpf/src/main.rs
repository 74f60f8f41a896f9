//! The agent's flow-counting programs (issue 10), loaded by `agent::flows`.
//!
//! - `flows_tc_in` / `flows_tc_out`: tc classifiers (tcx where the kernel has it, else clsact)
//!   for the host side of pod interfaces, attached at ingress and egress. Per flow — addresses, ports (ICMP:
//!   type and code), protocol, direction and interface — it adds packets (a GSO packet as the
//!   `gso_segs` segments it carries), bytes and the TCP flags seen. It never changes a
//!   packet's fate: it returns `TC_ACT_UNSPEC`, so the next program or the default action
//!   decides (Cilium's or any other tc user's programs keep working).
//! - `flows_cgroup_ingress` / `flows_cgroup_egress`: the same counting as cgroup_skb programs
//!   for the cgroup v2 root (`flows.cgroup`), where packets start at their IP header. They
//!   always let the packet pass; attached as BPF links (kernel ≥ 5.7), they run beside
//!   other programs on the same cgroup.
//! - `drops`: the `skb:kfree_skb` tracepoint, counting dropped IPv4/IPv6 packets by the
//!   kernel's drop reason. The field offsets of the tracepoint differ between kernels; user
//!   space reads them from the tracepoint's `format` file and passes them in `CONFIG`.
//!
//! User space reads the maps every interval and keeps the deltas; it deletes flows whose
//! counters did not move for `idle_timeout` (no clock read per packet here).
//! The layouts of `FlowKey`, `FlowValue` and `DropKey` are mirrored in `agent/src/flows/maps.rs`.

#![no_std]
#![no_main]
// Atomic adds: core's atomic types have no read-modify-write methods on the BPF target, the
// intrinsic compiles to the BPF atomic add instruction.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};

/// `*p += v`, atomically (other CPUs may count the same flow).
#[inline(always)]
unsafe fn add<T: Copy>(p: *mut T, v: T) {
    // SAFETY: the caller passes a pointer to a live map value (or a local).
    unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(p, v) };
}

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{cgroup_skb, classifier, map, tracepoint},
    maps::{Array, HashMap},
    programs::{sk_buff::SkBuff, SkBuffContext, TcContext, TracePointContext},
};

/// One flow, in one direction, on one interface.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    /// Source address: IPv4 in the first 4 bytes, or IPv6.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port (host order); ICMP: the type.
    pub sport: u16,
    /// Destination port (host order); ICMP: the code.
    pub dport: u16,
    /// Interface index the program saw the packet on.
    pub ifindex: u32,
    /// IP protocol (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, …).
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// 0: from the endpoint (tc: ingress of the host-side interface; cgroup: egress),
    /// 1: to the endpoint (tc: egress; cgroup: ingress).
    pub dir: u8,
    /// Zero.
    pub pad: u8,
}

/// What was counted for a flow since it was first seen.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowValue {
    /// Packets (GSO segments counted one by one).
    pub packets: u64,
    /// Bytes (`skb->len`).
    pub bytes: u64,
    /// TCP segments with SYN and not ACK.
    pub syn: u32,
    /// TCP segments with SYN and ACK.
    pub synack: u32,
    /// TCP segments with FIN.
    pub fin: u32,
    /// TCP segments with RST.
    pub rst: u32,
}

/// A drop reason and the packet's protocol (EtherType).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DropKey {
    /// `enum skb_drop_reason`.
    pub reason: u32,
    /// EtherType (0x0800 IPv4, 0x86dd IPv6).
    pub protocol: u16,
    /// Zero.
    pub pad: u16,
}

/// Flow table; its size is set at load time (`flows.max_flows`).
#[map]
static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(65536, 0);

/// Drops by reason and protocol.
#[map]
static DROPS: HashMap<DropKey, u64> = HashMap::with_max_entries(1024, 0);

/// Counters of the programs themselves: see `STAT_*`.
#[map]
static STATS: Array<u64> = Array::with_max_entries(4, 0);

/// Settings from user space: `CONFIG_*`.
#[map]
static CONFIG: Array<u32> = Array::with_max_entries(4, 0);

/// A new flow found the flow table full.
const STAT_FLOWS_FULL: u32 = 0;
/// A new drop key found the drop table full.
const STAT_DROPS_FULL: u32 = 1;
/// Packets that are not IPv4/IPv6 or too short to parse (not counted in flows).
const STAT_UNPARSED: u32 = 2;

/// Offset of `protocol` in the `skb:kfree_skb` record.
const CONFIG_DROP_PROTOCOL_OFF: u32 = 0;
/// Offset of `reason` in the `skb:kfree_skb` record.
const CONFIG_DROP_REASON_OFF: u32 = 1;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Reads a `T` at `off` from the packet: directly when it lies in the linear data (the usual
/// case for headers, and much cheaper than a helper call), else with `bpf_skb_load_bytes`.
#[inline(always)]
fn rd<T: Copy>(skb: &SkBuff, off: usize) -> Option<T> {
    // SAFETY: the program's context; `data`/`data_end` bound the linear packet data, and the
    // read happens only after the bounds check the verifier also sees.
    unsafe {
        let data = (*skb.skb).data as usize;
        let end = (*skb.skb).data_end as usize;
        let p = data + off;
        // At least 2 bytes: LLVM turns `p + 1 <= end` into `p < end`, a form the verifier
        // draws no packet range from. A 1-byte read at the very end of a packet takes the
        // helper instead.
        let need = if core::mem::size_of::<T>() < 2 { 2 } else { core::mem::size_of::<T>() };
        if p + need <= end {
            return Some((p as *const T).read_unaligned());
        }
    }
    skb.load::<T>(off).ok()
}

#[inline(always)]
fn stat(i: u32) {
    if let Some(p) = STATS.get_ptr_mut(i) {
        // SAFETY: an Array value is valid for the map's lifetime; atomic add on a u64 slot.
        unsafe { add(p, 1u64) };
    }
}

/// At the host side's ingress: packets leaving the endpoint (direction 0). The direction comes
/// from the hook, not from `skb->ingress_ifindex`, which a forwarded packet still carries at
/// egress.
#[classifier]
pub fn flows_tc_in(ctx: TcContext) -> i32 {
    count_tc(&ctx, 0);
    TC_ACT_UNSPEC
}

/// At the host side's egress: packets toward the endpoint (direction 1).
#[classifier]
pub fn flows_tc_out(ctx: TcContext) -> i32 {
    count_tc(&ctx, 1);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn count_tc(ctx: &TcContext, dir: u8) {
    let Some(ethertype) = rd::<u16>(&ctx.skb, 12) else {
        stat(STAT_UNPARSED);
        return;
    };
    count(&ctx.skb, u16::from_be(ethertype), ETH_HLEN, dir);
}

/// The cgroup mode (`flows.cgroup`), attached at the cgroup v2 root: packets a socket of the
/// cgroup's processes receives. The packet starts at its IP header. Always lets it pass.
#[cgroup_skb(ingress)]
pub fn flows_cgroup_ingress(ctx: SkBuffContext) -> i32 {
    count_cgroup(&ctx.skb, 1);
    1
}

/// Packets the cgroup's sockets send.
#[cgroup_skb(egress)]
pub fn flows_cgroup_egress(ctx: SkBuffContext) -> i32 {
    count_cgroup(&ctx.skb, 0);
    1
}

#[inline(always)]
fn count_cgroup(skb: &SkBuff, dir: u8) {
    // The IP version nibble (`skb->protocol` may not be set yet on the egress path).
    let ethertype = match rd::<u8>(skb, 0).map(|b| b >> 4) {
        Some(4) => ETH_P_IP,
        Some(6) => ETH_P_IPV6,
        _ => {
            stat(STAT_UNPARSED);
            return;
        }
    };
    count(skb, ethertype, 0, dir);
}

/// Not attached by the agent: the tests attach it (through legacy tc, clsact) to stand for
/// another tc user on the same interface — it drops ICMP and passes the rest.
#[classifier]
pub fn sre_lab_test_drop_icmp(ctx: TcContext) -> i32 {
    let ipv4 = ctx.load::<u16>(12).is_ok_and(|t| u16::from_be(t) == ETH_P_IP);
    if ipv4 && ctx.load::<u8>(ETH_HLEN + 9).is_ok_and(|p| p == 1) {
        aya_ebpf::bindings::TC_ACT_SHOT
    } else {
        TC_ACT_UNSPEC
    }
}

/// Counts a packet whose IP header starts at `l3` and has this EtherType.
#[inline(always)]
fn count(ctx: &SkBuff, ethertype: u16, l3: usize, dir: u8) {
    let Some(mut key) = parse(ctx, ethertype, l3) else {
        stat(STAT_UNPARSED);
        return;
    };
    // SAFETY: `skb` is the program's context (`__sk_buff`), valid for its run.
    let (ifindex, gso_segs, len) = unsafe {
        let skb = &*ctx.skb;
        (skb.ifindex, skb.gso_segs, skb.len)
    };
    key.ifindex = ifindex;
    key.dir = dir;
    let packets = u64::from(if gso_segs > 1 { gso_segs } else { 1 });
    let flags = tcp_flags(ctx, &key, l3);
    key.pad = 0;
    if let Some(v) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: a hash map value stays valid while the program runs; fields are updated
        // atomically since other CPUs may count the same flow.
        unsafe {
            add(&raw mut (*v).packets, packets);
            add(&raw mut (*v).bytes, u64::from(len));
            add_flags(v, flags);
        }
        return;
    }
    let mut v = FlowValue {
        packets,
        bytes: u64::from(len),
        syn: 0,
        synack: 0,
        fin: 0,
        rst: 0,
    };
    // SAFETY: a local.
    unsafe { add_flags(&mut v, flags) };
    // BPF_NOEXIST: another CPU may have inserted it meanwhile; then add to that one.
    if FLOWS.insert(&key, &v, 1).is_err() {
        if let Some(p) = FLOWS.get_ptr_mut(&key) {
            unsafe {
                add(&raw mut (*p).packets, packets);
                add(&raw mut (*p).bytes, u64::from(len));
                add_flags(p, flags);
            }
        } else {
            stat(STAT_FLOWS_FULL);
        }
    }
}

/// SYN, SYN-ACK, FIN, RST bits of a TCP segment (0 otherwise).
#[inline(always)]
fn tcp_flags(ctx: &SkBuff, key: &FlowKey, l3: usize) -> u8 {
    if key.proto != 6 || key.pad == 0 {
        return 0;
    }
    // The L4 offset was stashed in `pad` by `parse`; read the flags byte (offset 13).
    let l4 = l3 + usize::from(key.pad) * 4;
    rd::<u8>(ctx, l4 + 13).unwrap_or(0)
}

#[inline(always)]
unsafe fn add_flags(v: *mut FlowValue, flags: u8) {
    let (fin, syn, rst, ack) = (
        flags & 0x01 != 0,
        flags & 0x02 != 0,
        flags & 0x04 != 0,
        flags & 0x10 != 0,
    );
    // SAFETY: `v` points at a live map value or a local.
    unsafe {
        if syn && !ack {
            add(&raw mut (*v).syn, 1u32);
        }
        if syn && ack {
            add(&raw mut (*v).synack, 1u32);
        }
        if fin {
            add(&raw mut (*v).fin, 1u32);
        }
        if rst {
            add(&raw mut (*v).rst, 1u32);
        }
    }
}

/// The flow key of an IPv4 or IPv6 packet whose IP header starts at `l3` (ports for
/// TCP/UDP/SCTP, type and code for ICMP). `pad` holds the IP header length in 32-bit words,
/// for `tcp_flags`; `count` clears it.
#[inline(always)]
fn parse(ctx: &SkBuff, ethertype: u16, l3: usize) -> Option<FlowKey> {
    let mut key = FlowKey {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        ifindex: 0,
        proto: 0,
        family: 0,
        dir: 0,
        pad: 0,
    };
    let l4 = match ethertype {
        ETH_P_IP => {
            let vihl = rd::<u8>(ctx, l3)?;
            let ihl = usize::from(vihl & 0x0f);
            if ihl < 5 {
                return None;
            }
            key.family = 4;
            key.proto = rd::<u8>(ctx, l3 + 9)?;
            let s: [u8; 4] = rd(ctx, l3 + 12)?;
            let d: [u8; 4] = rd(ctx, l3 + 16)?;
            key.src[..4].copy_from_slice(&s);
            key.dst[..4].copy_from_slice(&d);
            key.pad = ihl as u8;
            // Only the first fragment has the ports (and TCP flags): later ones count
            // without them (`pad` 0 tells `tcp_flags` there is no L4 header).
            let frag = u16::from_be(rd::<u16>(ctx, l3 + 6)?) & 0x1fff;
            if frag != 0 {
                key.pad = 0;
                return Some(key);
            }
            l3 + ihl * 4
        }
        ETH_P_IPV6 => {
            key.family = 6;
            key.proto = rd::<u8>(ctx, l3 + 6)?;
            key.src = rd(ctx, l3 + 8)?;
            key.dst = rd(ctx, l3 + 24)?;
            // Extension headers are not followed: such packets count without ports.
            key.pad = 10;
            l3 + 40
        }
        _ => return None,
    };
    match key.proto {
        6 | 17 | 132 => {
            key.sport = u16::from_be(rd::<u16>(ctx, l4)?);
            key.dport = u16::from_be(rd::<u16>(ctx, l4 + 2)?);
        }
        1 | 58 => {
            key.sport = u16::from(rd::<u8>(ctx, l4)?);
            key.dport = u16::from(rd::<u8>(ctx, l4 + 1)?);
        }
        _ => {}
    }
    Some(key)
}

#[tracepoint]
pub fn drops(ctx: TracePointContext) -> u32 {
    let (Some(p_off), Some(r_off)) = (CONFIG.get(CONFIG_DROP_PROTOCOL_OFF), CONFIG.get(CONFIG_DROP_REASON_OFF)) else {
        return 0;
    };
    if *p_off == 0 || *r_off == 0 {
        return 0;
    }
    // SAFETY: offsets come from the tracepoint's own format description.
    let (protocol, reason) = unsafe {
        (
            ctx.read_at::<u16>(*p_off as usize).unwrap_or(0),
            ctx.read_at::<u32>(*r_off as usize).unwrap_or(0),
        )
    };
    if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
        return 0;
    }
    let key = DropKey {
        reason,
        protocol,
        pad: 0,
    };
    if let Some(p) = DROPS.get_ptr_mut(&key) {
        // SAFETY: a live map value.
        unsafe { add(p, 1u64) };
    } else if DROPS.insert(&key, &1, 1).is_err() {
        if let Some(p) = DROPS.get_ptr_mut(&key) {
            unsafe { add(p, 1u64) };
        } else {
            stat(STAT_DROPS_FULL);
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
