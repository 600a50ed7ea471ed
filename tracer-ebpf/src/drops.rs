//! Packets the kernel dropped, by its reason (`skb/kfree_skb`, whose `enum skb_drop_reason`
//! argument exists since Linux 5.17): TCP ones only, by service port and, where the kernel
//! names the socket a packet was for (its `rx_sk` argument, Linux 6.11+), by that socket's
//! cgroup (so its pod), in a per-CPU map that userspace reads each second.

use super::*;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason)`, Linux 5.17
/// to 6.10: no socket. Userspace loads this one or [`kfree_skb_sk`], whichever the kernel's
/// tracepoint fits.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    count_drop(&ctx, ctx.arg(0), ctx.arg(2), core::ptr::null());
    0
}

/// `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock
/// *rx_sk)`, Linux 6.11+: `rx_sk` is the socket a received packet was for, where the kernel
/// had found it (null before the socket lookup: a firewall's drop, no socket).
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_sk(ctx: BtfTracePointContext) -> i32 {
    count_drop(&ctx, ctx.arg(0), ctx.arg(2), ctx.arg(3));
    0
}

/// Counts a dropped TCP packet under its reason, service port and its socket's cgroup (from
/// the probe's storage on `sk`; 0 where there is no socket or no storage).
#[inline(always)]
fn count_drop(ctx: &BtfTracePointContext, skb: *const u8, reason: u32, sk: *const u8) {
    let Some(port) = tcp_service_port(skb) else {
        return;
    };
    let cgroup = if sk.is_null() {
        0
    } else {
        // SAFETY: null or this socket's storage (null too for what is not a full socket:
        // request and TIME-WAIT sockets).
        unsafe { socket_state(sk, false).as_ref() }.map_or(0, |s| s.cgroup)
    };
    let key = DropKey {
        cgroup,
        reason: reason.min(0xffff) as u16,
        port,
        _pad: 0,
    };
    if let Some(n) = DROPS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of a per-CPU map; preemption is disabled here.
        unsafe { *n += 1 };
    } else if DROPS.insert(&key, &1, 0).is_err() {
        report(ctx, counter::DROP_PORTS_FULL, u32::from(port));
    }
}

/// The service port of a TCP packet (None for anything else): of its two ports, the one
/// outside the ephemeral range, else the lower.
#[inline(always)]
fn tcp_service_port(skb: *const u8) -> Option<u16> {
    // SAFETY: direct loads through the BTF-typed `struct sk_buff *` at offsets of its fields.
    let (protocol, head, network, transport) = unsafe {
        (
            u16::from_be(field::<u16>(skb, offset!(skb_protocol))),
            field::<u64>(skb, offset!(skb_head)) as *const u8,
            field::<u16>(skb, offset!(skb_network_header)),
            field::<u16>(skb, offset!(skb_transport_header)),
        )
    };
    if network == u16::MAX || transport == u16::MAX || head.is_null() {
        return None;
    }
    // The IP header's protocol (IPv4) or next header (IPv6, no extension headers).
    let next = match protocol {
        ETH_P_IP => 9,
        ETH_P_IPV6 => 6,
        _ => return None,
    };
    // SAFETY: `head` is the skb's buffer; the helper checks the address.
    let ip_protocol: u8 = read(unsafe { head.add(usize::from(network)) }, next).ok()?;
    if ip_protocol != IPPROTO_TCP as u8 {
        return None;
    }
    // SAFETY: as above; the TCP header starts with the source and destination ports.
    let ports: [u16; 2] = read(unsafe { head.add(usize::from(transport)) }, 0).ok()?;
    let (a, b) = (u16::from_be(ports[0]), u16::from_be(ports[1]));
    // SAFETY: read-only global, volatile for the same reason as OFFSETS.
    let [lo, hi] = unsafe { core::ptr::read_volatile(&EPHEMERAL_PORTS) };
    let ephemeral = |p: u16| p >= lo && p <= hi;
    Some(match (ephemeral(a), ephemeral(b)) {
        (true, false) => b,
        (false, true) => a,
        _ => a.min(b),
    })
}
