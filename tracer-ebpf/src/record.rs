//! Writing an event: reserving it in this CPU's ring, each field in place (the socket, its
//! stamps from storage, what a close carries), and submitting it.

use super::*;

/// Writes what the socket's storage tells into the event's head: the owner, cgroup, namespace,
/// service port, since when it is in its state, the flags and the accept wait (all 0 where
/// there is no storage).
///
/// # Safety
/// `t` must point at a reserved ring buffer record of at least `HEAD_BYTES` and `s` be null
/// or a socket's storage.
#[inline(always)]
pub(crate) unsafe fn write_stamps(t: *mut Transition, s: *const SocketState, skipped: bool) {
    let comm = addr_of_mut!((*t).comm);
    if s.is_null() {
        // Volatile stores: adjacent plain ones become a call to a byte-wise memset.
        zero16(comm);
        addr_of_mut!((*t).pid).write_volatile(0);
        addr_of_mut!((*t).netns).write_volatile(0);
        addr_of_mut!((*t).cgroup).write_volatile(0);
        addr_of_mut!((*t).since_ns).write_volatile(0);
        addr_of_mut!((*t).port).write_volatile(0);
        addr_of_mut!((*t).socket_flags).write_volatile(0);
        addr_of_mut!((*t).reset_reason).write_volatile(0);
        addr_of_mut!((*t).accept_wait_us).write_volatile(0);
    } else {
        let (from, to) = (addr_of!((*s).comm) as *const u64, comm as *mut u64);
        to.write(from.read());
        to.add(1).write(from.add(1).read());
        addr_of_mut!((*t).pid).write((*s).pid);
        addr_of_mut!((*t).netns).write((*s).netns);
        addr_of_mut!((*t).cgroup).write((*s).cgroup);
        addr_of_mut!((*t).since_ns).write((*s).since_ns);
        addr_of_mut!((*t).port).write((*s).port);
        let skipped = if skipped { socket::SKIPPED } else { 0 };
        addr_of_mut!((*t).socket_flags).write((*s).flags | skipped);
        addr_of_mut!((*t).reset_reason).write((*s).reset_reason);
        addr_of_mut!((*t).accept_wait_us).write((*s).accept_wait_us);
    }
}

/// Writes the head every event carries, but for what a close fills: the socket, its stamps
/// from storage `s` (null: none), its ports, family and the two states (for an event that is
/// not a state change, the socket's state and the event's kind).
///
/// # Safety
/// `t` must point at a reserved ring buffer record of at least `HEAD_BYTES`, `sk` be a
/// tracepoint's full socket and `s` null or its storage.
#[inline(always)]
pub(crate) unsafe fn write_head(
    ctx: &impl EbpfContext,
    t: *mut Transition,
    sk: *const u8,
    s: *const SocketState,
    skipped: bool,
    (family, sport, dport, oldstate, newstate, now): (u16, u16, u16, u8, u8, u64),
) {
    write_socket(ctx, t, sk, family, now);
    write_stamps(t, s, skipped);
    addr_of_mut!((*t).sport).write(sport);
    addr_of_mut!((*t).dport).write(dport);
    addr_of_mut!((*t).family).write(family);
    addr_of_mut!((*t).oldstate).write(oldstate);
    addr_of_mut!((*t).newstate).write(newstate);
}

/// Writes the head's fields that only some transitions fill (0 elsewhere): the handshake's
/// RTT sample at SYN_RECV -> ESTABLISHED, no error and no close flags.
///
/// # Safety
/// `t` must point at a reserved ring buffer record of at least `HEAD_BYTES`.
#[inline(always)]
pub(crate) unsafe fn write_no_close(t: *mut Transition, srtt_us: u32) {
    addr_of_mut!((*t).srtt_us).write(srtt_us);
    addr_of_mut!((*t).sk_err).write(0);
    addr_of_mut!((*t).close_flags).write(0);
}

/// Writes what only a transition to CLOSE carries: in the head, the socket's error, its close
/// flags and RTT; in the rest, the times from its storage `s` (0 where it is null) and the
/// connection's counters.
///
/// # Safety
/// `t` must point at a reserved ring buffer record of a whole `Transition`, `sk` be the
/// tracepoint's socket, `tp` the same socket as a BTF-typed `struct tcp_sock *`, and `s` null
/// or the socket's storage.
#[inline(always)]
pub(crate) unsafe fn write_close(
    t: *mut Transition,
    sk: *const u8,
    tp: *const u8,
    s: *const SocketState,
    old: u8,
) {
    if s.is_null() {
        addr_of_mut!((*t).opened_ns).write_volatile(0);
        addr_of_mut!((*t).established_ns).write_volatile(0);
        addr_of_mut!((*t).teardown_ns).write_volatile(0);
        let kinds = addr_of_mut!((*t).retransmits) as *mut u64;
        kinds.write_volatile(0);
        kinds.add(1).write_volatile(0);
    } else {
        addr_of_mut!((*t).opened_ns).write((*s).opened_ns);
        addr_of_mut!((*t).established_ns).write((*s).established_ns);
        addr_of_mut!((*t).teardown_ns).write((*s).teardown_ns);
        // Four u32 counters, 8-byte aligned in both: two stores.
        let (from, to) = (
            addr_of!((*s).retransmits) as *const u64,
            addr_of_mut!((*t).retransmits) as *mut u64,
        );
        to.write(from.read());
        to.add(1).write(from.add(1).read());
    }
    let mut flags = 0u8;
    // `sk_err` is an `int` of `struct sock`, loaded directly as above.
    let sk_err = field::<i32>(sk, offset!(sk_err)) as u8;
    if field::<u64>(sk, offset!(sk_flags)) & (1 << SOCK_DONE) != 0 {
        flags |= close_flags::PEER_FIN;
    }
    let sent_fin = matches!(
        old,
        state::FIN_WAIT1 | state::FIN_WAIT2 | state::CLOSING | state::LAST_ACK
    );
    let all_acked = field::<u32>(tp, offset!(snd_una)) == field::<u32>(tp, offset!(write_seq));
    if sent_fin && all_acked {
        flags |= close_flags::FIN_ACKED;
    }
    addr_of_mut!((*t).close_flags).write(flags);
    addr_of_mut!((*t).sk_err).write(sk_err);
    // The connection's story, for its close record: direct loads of `tcp_sock` fields.
    addr_of_mut!((*t).srtt_us).write(field::<u32>(tp, offset!(srtt_us)));
    addr_of_mut!((*t).total_retrans).write(field::<u32>(tp, offset!(total_retrans)));
    addr_of_mut!((*t).bytes_acked).write(field::<u64>(tp, offset!(bytes_acked)));
    addr_of_mut!((*t).bytes_received).write(field::<u64>(tp, offset!(bytes_received)));
    addr_of_mut!((*t).rtt_min_us).write(field::<u32>(tp, offset!(rtt_min)));
    addr_of_mut!((*t).dsack_dups).write(field::<u32>(tp, offset!(dsack_dups)));
    addr_of_mut!((*t).chrono_jiffies).write(chrono_jiffies(tp));
}

/// The socket's time with data to send, by what limited it, in jiffies: `chrono_stat` with
/// the stretch under way (`chrono_type`, since `chrono_start`) added, as the kernel's
/// `tcp_get_info_chrono_stats` does.
///
/// # Safety
/// `tp` must be a BTF-typed `struct tcp_sock *`.
#[inline(always)]
unsafe fn chrono_jiffies(tp: *const u8) -> [u32; 3] {
    let stat = offset!(chrono_stat);
    let mut out = [
        field::<u32>(tp, stat),
        field::<u32>(tp, stat + 4),
        field::<u32>(tp, stat + 8),
    ];
    let kind = (field::<u8>(tp, offset!(chrono_type)) >> offset!(chrono_type_shift))
        & offset!(chrono_type_mask) as u8;
    // `tcp_jiffies32` is the low 32 bits of jiffies; the stretch wraps as the kernel's does.
    let now = gen::bpf_jiffies64() as u32;
    let running = now.wrapping_sub(field::<u32>(tp, offset!(chrono_start)));
    match kind {
        1 => out[0] = out[0].wrapping_add(running),
        2 => out[1] = out[1].wrapping_add(running),
        3 => out[2] = out[2].wrapping_add(running),
        _ => {}
    }
    out
}

/// An event that is not a state change, of `kind` ([`SENT_RESET`], [`ACCEPTED`]), for full
/// socket `sk` in `state`: a head-only record, written as a transition names its socket
/// (stamped from `s`, or with zeroes where it is null), then what `finish` adds to the head,
/// and submitted; nothing where the port filter wants neither port.
///
/// # Safety
/// `sk` must be a BTF-typed full socket of `family` with these ports, `s` null or its storage.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn report_event(
    ctx: &impl EbpfContext,
    sk: *const u8,
    s: *const SocketState,
    (family, sport, dport): (u16, u16, u16),
    now: u64,
    state: u8,
    kind: u8,
    finish: impl FnOnce(*mut Transition),
) {
    if !(port_wanted(sport) || port_wanted(dport)) {
        return;
    }
    let Some((ring, mut entry)) = reserve::<HeadRecord>() else {
        return;
    };
    let t = entry.as_mut_ptr() as *mut Transition;
    // `t` points at the reserved head-only record and each write stays inside a head field.
    write_head(
        ctx,
        t,
        sk,
        s,
        false,
        (family, sport, dport, state, kind, now),
    );
    write_no_close(t, 0);
    finish(t);
    submit(ring, entry);
}

/// This CPU's ring.
pub(crate) type Ring = BtfRingBuf<Transition, RING_TEMPLATE_BYTES>;

/// A record of a transition's head only, as it takes a ring (see `tracer_common::HEAD_BYTES`).
#[repr(C, align(8))]
pub(crate) struct HeadRecord([u8; HEAD_BYTES]);

/// A record of a whole transition, padded to keep the ring's records on cache lines (see
/// `tracer_common::WHOLE_RECORD_BYTES`).
#[repr(C, align(8))]
pub(crate) struct WholeRecord([u8; WHOLE_RECORD_BYTES]);

/// Reserves a record of `R` in this CPU's ring; a full ring is counted as a lost event.
#[inline(always)]
pub(crate) fn reserve<R: 'static>() -> Option<(&'static Ring, RingBufEntry<R>)> {
    // SAFETY: a helper with no arguments, callable from any program type.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let reserved = EVENTS
        .get(cpu)
        .and_then(|ring| Some((ring, ring.reserve_untyped::<R>(0)?)));
    if reserved.is_none() {
        count(counter::LOST_RINGBUF_FULL);
    }
    reserved
}

/// Writes what names the socket: the time, its kernel address and cookie, and its local and
/// remote addresses.
///
/// # Safety
/// `t` must point at a reserved ring buffer record and `sk` be a tracepoint's full socket.
#[inline(always)]
pub(crate) unsafe fn write_socket(
    ctx: &impl EbpfContext,
    t: *mut Transition,
    sk: *const u8,
    family: u16,
    now: u64,
) {
    addr_of_mut!((*t).time_ns).write(now);
    addr_of_mut!((*t).skaddr).write(sk as u64);
    // `sk` is the tracepoint's BTF-typed socket, which this helper accepts in tracing programs
    // (Linux 5.12+); it returns the existing cookie or makes one.
    addr_of_mut!((*t).cookie).write(bpf_get_socket_cookie(sk as *mut c_void));
    write_addresses(ctx, t, sk, family);
}

/// Writes the socket's local and remote addresses into `t.saddr` and `t.daddr`.
///
/// # Safety
/// As [`write_socket`].
#[inline(always)]
pub(crate) unsafe fn write_addresses(
    ctx: &impl EbpfContext,
    t: *mut Transition,
    sk: *const u8,
    family: u16,
) {
    let (saddr, daddr) = (addr_of_mut!((*t).saddr), addr_of_mut!((*t).daddr));
    if family == AF_INET6 {
        let read_both = read_into(saddr, sk, offset!(skc_v6_rcv_saddr))
            & read_into(daddr, sk, offset!(skc_v6_daddr));
        if !read_both {
            report(ctx, counter::READ_FAILED, field::IPV6_ADDRESS);
        }
    } else {
        if family != AF_INET {
            report(ctx, counter::UNKNOWN_FAMILY, u32::from(family));
        }
        // Both are `__be32` fields of `struct sock_common`, loaded directly.
        let s: u32 = field(sk, offset!(skc_rcv_saddr));
        let d: u32 = field(sk, offset!(skc_daddr));
        zero16(saddr);
        zero16(daddr);
        (saddr as *mut u32).write(s);
        (daddr as *mut u32).write(d);
    }
}

/// Commits a written record, waking the reader only once a ring holds `WAKEUP_BYTES`.
#[inline(always)]
pub(crate) fn submit<R>(ring: &Ring, entry: RingBufEntry<R>) {
    // SAFETY: read-only global, volatile for the same reason as OFFSETS.
    let wakeup_bytes = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    // SAFETY: `ring` is the ring buffer map this CPU's slot of `EVENTS` refers to.
    let waiting = unsafe {
        gen::bpf_ringbuf_query(ring as *const _ as *mut c_void, BPF_RB_AVAIL_DATA.into())
    };
    let flags = if waiting >= wakeup_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags.into());
}
