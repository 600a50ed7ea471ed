//! The counting programs: SYN-ACK retransmissions, retransmitted segments and resets, in
//! per-CPU maps that userspace reads; the reset of a connection as an event for
//! `watch --connections`; and the probe's own counters of what it could not do, said through
//! aya-log at most once a second per problem and CPU.

use super::*;

/// `tcp_retransmit_synack(const struct sock *sk, const struct request_sock *req)`: `sk` is
/// the listener; counted by its port.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let port = u16::from_be(read_or_report(
        &ctx,
        sk,
        offset!(inet_sport),
        field::INET_SPORT,
    ));
    if let Some(n) = SYNACK_RETRANSMITS.get_ptr_mut(&port) {
        // SAFETY: this CPU's value of a per-CPU map; preemption is disabled here.
        unsafe { *n += 1 };
    } else if SYNACK_RETRANSMITS.insert(&port, &1, 0).is_err() {
        report(&ctx, counter::SYNACK_PORTS_FULL, u32::from(port));
    }
    0
}

/// `tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb)`, after a successful
/// retransmission (Linux 6.1 to 6.13). See [`count_retransmit`].
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    count_retransmit(&ctx, ctx.arg(0), ctx.arg(1));
    0
}

/// `tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb, int err)`, Linux
/// 6.14+, which fires for failed retransmissions too: only a sent one (`err` 0) counts, as
/// the kernel counts it in `TcpRetransSegs`. Userspace loads this one or
/// [`tcp_retransmit_skb`], whichever the kernel's tracepoint fits.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_err(ctx: BtfTracePointContext) -> i32 {
    let err: i32 = ctx.arg(2);
    if err == 0 {
        count_retransmit(&ctx, ctx.arg(0), ctx.arg(1));
    }
    0
}

/// Counts a retransmitted skb's segments (`tcp_skb_pcount`, as `TcpRetransSegs` and
/// `tcp_sock.total_retrans` count them) under the socket's service port, as its storage
/// keeps it (the remote port for a socket the probe did not see open), and its kind
/// ([`retransmit_kind`]), also on the socket's storage.
#[inline(always)]
fn count_retransmit(ctx: &BtfTracePointContext, sk: *const u8, skb: *const u8) {
    let s = socket_state(sk, false);
    // SAFETY: null or this socket's storage; `skc_dport` is a direct load through the
    // BTF-typed socket, as in inet_sock_set_state.
    let port = match unsafe { s.as_ref() } {
        Some(s) if s.port != 0 => s.port,
        _ => u16::from_be(unsafe { field::<u16>(sk, offset!(skc_dport)) }),
    };
    let segs: u16 = read_or_report(ctx, skb, offset!(skb_gso_segs), field::GSO_SEGS);
    let segs = u64::from(segs.max(1));
    let kind = retransmit_kind(sk);
    // Kept on the socket too, for its records: timeouts, fast retransmits and tail loss
    // probes (the handshake's are taken from `total_retrans` when it is established).
    if let Some(s) = unsafe { s.as_mut() } {
        if usize::from(kind) < retransmit::HANDSHAKE {
            // SAFETY: as above; a socket retransmits under its lock, so no other program
            // writes this counter meanwhile.
            let n = &mut s.retransmits[usize::from(kind)];
            *n = n.wrapping_add(segs as u32);
        }
    }
    let key = u32::from(kind) << 16 | u32::from(port);
    if let Some(n) = RETRANSMITS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of a per-CPU map; preemption is disabled here.
        unsafe { *n += segs };
    } else if RETRANSMITS.insert(&key, &segs, 0).is_err() {
        report(ctx, counter::RETRANSMIT_PORTS_FULL, u32::from(port));
    }
}

/// Why the kernel is retransmitting on `sk` now (`tracer_common::retransmit`). The socket's
/// state tells SYNs and SYN-ACKs; then its congestion-avoidance state does. The RTO handler
/// enters Loss before it resends (and the slow start after it stays there); fast retransmits
/// are sent in Recovery. The one sender of retransmissions in the other states (Open,
/// Disorder, CWR) is the tail loss probe (`tcp_send_loss_probe`): every other path (a peer
/// that shrank its window, an MTU probe lost) enters Loss first.
#[inline(always)]
fn retransmit_kind(sk: *const u8) -> u16 {
    // SAFETY: a direct load through the BTF-typed socket, as above.
    match unsafe { field::<u8>(sk, offset!(skc_state)) } {
        state::SYN_SENT => return retransmit::SYN,
        state::SYN_RECV => return retransmit::SYNACK,
        _ => {}
    }
    // SAFETY: `sk` is the tracepoint's BTF-typed socket; null for what is not a full TCP
    // socket. Its `inet_connection_sock` fields are then direct loads.
    let tp = unsafe { gen::bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
    if tp.is_null() {
        return retransmit::OTHER;
    }
    // SAFETY: the byte holding the `icsk_ca_state` bitfield of `struct inet_connection_sock`,
    // at the start of `struct tcp_sock`.
    let ca = unsafe {
        (field::<u8>(tp, offset!(icsk_ca_state)) >> offset!(icsk_ca_state_shift))
            & offset!(icsk_ca_state_mask) as u8
    };
    match ca {
        retransmit::TCP_CA_LOSS => retransmit::TIMEOUT,
        retransmit::TCP_CA_RECOVERY => retransmit::FAST,
        _ => retransmit::TAIL_LOSS_PROBE,
    }
}

/// `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb)`, before Linux 6.10,
/// where resets are sent only by sockets and carry no reason. Userspace loads this one or
/// [`tcp_send_reset_reason`], whichever the kernel's tracepoint fits.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    count_reset(RESET_SENT, ctx.arg(0));
    0
}

/// `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, enum sk_rst_reason
/// reason)`, Linux 6.10+; `sk` is NULL for a reset that answers no socket (a SYN to a closed
/// port). Counts the reset by state and by reason and, when userspace asks, reports a
/// connection's reset as a [`SENT_RESET`] event in the same ring as its transitions, so that
/// its close record can say why.
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset_reason(ctx: BtfTracePointContext) -> i32 {
    let (sk, reason): (*const u8, u32) = (ctx.arg(0), ctx.arg(2));
    let state = count_reset(RESET_SENT, sk);
    if let Some(c) = RESET_REASONS.get_ptr_mut(reason.min(RESET_REASONS_LEN - 1)) {
        // SAFETY: this CPU's slot; preemption is disabled here.
        unsafe { *c += 1 };
    }
    // SAFETY: read-only global, volatile for the same reason as OFFSETS.
    let wanted = unsafe { core::ptr::read_volatile(&RESET_EVENTS) } != 0;
    // Only a connection's own socket: listeners, request and TIME-WAIT sockets have no
    // record (and the last two are not a `struct sock`).
    let connection = !sk.is_null()
        && !matches!(
            state,
            state::LISTEN | state::NEW_SYN_RECV | state::TIME_WAIT
        );
    if wanted && connection {
        // Kept on the socket for its close record, when the reset comes before the close.
        let s = socket_state(sk, false);
        if !s.is_null() {
            // SAFETY: this socket's storage.
            unsafe {
                (*s).reset_reason = reason as u16;
                (*s).flags |= socket::RESET_SENT;
            }
        }
        report_reset(&ctx, sk, state, reason as u16);
    }
    0
}

/// `tcp_receive_reset(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    count_reset(RESET_RECEIVED, ctx.arg(0));
    0
}

/// Counts a reset in `RESETS` under the socket's state, which it returns (0: no socket).
pub(crate) fn count_reset(direction: u32, sk: *const u8) -> u8 {
    let state = if sk.is_null() {
        0
    } else {
        read::<u8>(sk, offset!(skc_state)).unwrap_or(0)
    };
    let index = direction * RESET_STATES + (u32::from(state) % RESET_STATES);
    if let Some(c) = RESETS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; preemption is disabled here.
        unsafe { *c += 1 };
    }
    state
}

/// Writes a [`SENT_RESET`] event for full socket `sk`, in `state`: its addresses, ports and
/// cookie, as a transition names them, and the reason.
pub(crate) fn report_reset(ctx: &BtfTracePointContext, sk: *const u8, state: u8, reason: u16) {
    // SAFETY: direct loads through the BTF-typed `struct sock *`, as in inet_sock_set_state;
    // `sk` is a full socket (its state says so).
    let (family, dport) = unsafe {
        (
            field::<u16>(sk, offset!(skc_family)),
            u16::from_be(field::<u16>(sk, offset!(skc_dport))),
        )
    };
    // `inet_sport` lies in `struct inet_sock`, past `struct sock`, where the verifier allows no
    // direct load through a `struct sock *`: read it with the helper (a rare path).
    let sport = u16::from_be(read_or_report(
        ctx,
        sk,
        offset!(inet_sport),
        field::INET_SPORT,
    ));
    // SAFETY: `sk` is the tracepoint's BTF-typed full socket (not NULL), without storage
    // stamps here; the reason is written into the record `report_event` reserved.
    unsafe {
        report_event(
            ctx,
            sk,
            core::ptr::null(),
            (family, sport, dport),
            bpf_ktime_get_ns(),
            state,
            SENT_RESET,
            |t| addr_of_mut!((*t).reset_reason).write(reason),
        );
    }
}

/// Counts `problem` (a `tracer_common::counter` index) and says what happened through aya-log,
/// at most once a second per problem on this CPU. `detail` is the port, field or family the
/// message names.
///
/// Out of line: the per-event path pays for it only when something went wrong, and a burst
/// of problems costs a map lookup and a clock read each, not a log record.
#[inline(never)]
pub(crate) fn report(ctx: &impl EbpfContext, problem: u32, detail: u32) {
    count(problem);
    let Some(logged_at) = LOGGED_AT.get_ptr_mut(problem) else {
        return;
    };
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot; preemption is disabled here.
    unsafe {
        if *logged_at != 0 && now.wrapping_sub(*logged_at) < LOG_EVERY_NS {
            return;
        }
        *logged_at = now;
    }
    match problem {
        counter::NO_STORAGE => warn!(
            ctx,
            "the kernel gave a socket on port {} no storage (net.core.optmem_max reached, or a dying socket): its events carry no owner, times or service port",
            detail
        ),
        counter::RETRANSMIT_PORTS_FULL => warn!(
            ctx,
            "retransmission table full ({} port and kind pairs): retransmissions on port {} are not counted",
            MAX_RETRANSMIT_PORTS,
            detail
        ),
        counter::SYNACK_PORTS_FULL => warn!(
            ctx,
            "SYN-ACK table full ({} listening ports): retransmissions on port {} are not counted",
            MAX_SYNACK_PORTS,
            detail
        ),
        counter::DROP_PORTS_FULL => warn!(
            ctx,
            "dropped-packet table full ({} reason and port pairs): drops on port {} are not counted",
            MAX_DROP_KEYS,
            detail
        ),
        counter::READ_FAILED => error!(
            ctx,
            "reading {} of a socket failed on this kernel: it is reported as 0",
            field_name(detail)
        ),
        counter::UNKNOWN_FAMILY => error!(
            ctx,
            "a TCP socket of address family {} (neither IPv4 nor IPv6): its addresses are not decoded",
            detail
        ),
        _ => {}
    }
}

/// The kernel's name of a `tracer_common::field`, for log lines.
#[inline(always)]
pub(crate) fn field_name(which: u32) -> &'static str {
    match which {
        field::INET_SPORT => "inet_sock.inet_sport",
        field::NET_INUM => "net.ns.inum",
        field::CGROUP_ID => "sock.sk_cgrp_data.cgroup->kn->id",
        field::GSO_SEGS => "tcp_skb_cb.tcp_gso_segs",
        _ => "sock_common.skc_v6_rcv_saddr/skc_v6_daddr",
    }
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, touched only by this CPU with preemption disabled.
        unsafe { *c += 1 };
    }
}
