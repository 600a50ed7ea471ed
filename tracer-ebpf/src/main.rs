//! The kernel side of `tracer`: BTF tracepoint programs.
//!
//! - `inet_sock_set_state` (and its rescue twin, for runs nested in it): for every TCP state
//!   change it names the owning process where it is known, filters by port, and writes a
//!   [`Transition`] into this CPU's ring buffer in `EVENTS`; userspace follows the sockets.
//! - `tcp_retransmit_synack`, `tcp_retransmit_skb`, `tcp_send_reset`, `tcp_receive_reset`:
//!   counted in per-CPU maps that userspace reads (SYN-ACK retransmissions by listening port,
//!   segments retransmitted by service port, resets by state and by reason), and, for
//!   `watch --connections`, a connection's reset as an event in the same ring.
//!
//! What it cannot deliver is counted (`COUNTERS`).
//!
//! What goes wrong on its rare paths (a full map, a field read that fails on a kernel, an
//! address family it does not know) is counted and said through aya-log, at most once a second
//! per problem and CPU ([`report`]); the agent prints it at the level `RUST_LOG` picks.
//!
//! Why a BTF tracepoint (`tp_btf`) rather than the classic tracepoint: it attaches by name
//! through `bpf()` with no tracefs mounted (containers rarely have it), and it receives the
//! kernel's `struct sock *`, whose fields later features read. The fields are read at byte
//! offsets that userspace takes from the running kernel's BTF ([`SockOffsets`]).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_map_type, BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP,
        BPF_RB_NO_WAKEUP, BPF_SK_STORAGE_GET_F_CREATE,
    },
    btf_maps::{ArrayOfMaps, RingBuf as BtfRingBuf},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_probe_read_kernel, generated as gen,
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::{ring_buf::RingBufEntry, Array, PerCpuArray, PerCpuHashMap},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::{error, warn};
use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut};
use tracer_common::{
    close_flags, counter, field, socket, state, SockOffsets, SocketState, Transition, AF_INET,
    AF_INET6, COMM_LEN, IPPROTO_TCP, MAX_RETRANSMIT_PORTS, MAX_SYNACK_PORTS, PORT_FILTER_LEN,
    RESET_REASONS as RESET_REASONS_LEN, RESET_RECEIVED, RESET_SENT, RESET_STATES, SENT_RESET,
    SOCK_DONE,
};

/// Field offsets, set by userspace at load time (see `tracer::btf`).
#[no_mangle]
static OFFSETS: SockOffsets = SockOffsets {
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_family: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    sk_protocol: 0,
    inet_sport: 0,
    skc_state: 0,
    sk_err: 0,
    srtt_us: 0,
    total_retrans: 0,
    net_inum: 0,
    sk_cgroup: 0,
    cgroup_kn: 0,
    kn_id: 0,
    bytes_acked: 0,
    bytes_received: 0,
    rtt_min: 0,
    snd_una: 0,
    write_seq: 0,
    sk_flags: 0,
    skb_gso_segs: 0,
};

/// Unread bytes in a ring of `EVENTS` at which the probe wakes the reader; set at load time.
///
/// Below it, events are submitted without a wakeup and the reader drains on a short timer.
/// Why: a wakeup is an irq_work self-IPI, and the softirqs run on that interrupt's exit can
/// hit this tracepoint again while the probe is still running on the CPU; the kernel then
/// skips the nested run (counted in the program's `recursion_misses`) and the event is lost.
#[no_mangle]
static WAKEUP_BYTES: u64 = 0;

/// 1 when `PORT_FILTER` is in force (only ports marked there are reported), set at load time.
#[no_mangle]
static FILTER_PORTS: u8 = 0;

/// 1 when userspace wants an event for each reset a socket sends (`tracer watch
/// --connections`, whose records say why a connection was reset); the agent counts them only.
#[no_mangle]
static RESET_EVENTS: u8 = 0;

/// The transitions: one ring buffer per CPU, indexed by CPU number, created and sized by
/// userspace (`--ring-buffer-size`), which merges them in time order.
///
/// Why one per CPU: a ring buffer shared by all CPUs serialises every event on one lock and
/// one producer position; with two CPUs changing TCP states at full speed, that contention
/// tripled the probe's cost (about 240 ns a run instead of 85, measured with
/// `kernel.bpf_stats_enabled`).
#[btf_map]
static EVENTS: ArrayOfMaps<BtfRingBuf<Transition, RING_TEMPLATE_BYTES>, MAX_CPUS> =
    ArrayOfMaps::new();

/// Size of the inner-map template (userspace creates the real rings with its own size).
const RING_TEMPLATE_BYTES: usize = 4096;
/// Upper bound on CPUs; userspace sets the real count at load time.
const MAX_CPUS: usize = 4096;

/// Per-CPU counters of what the probe could not do, indexed by `tracer_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Port filter: entry `p` is 1 when port `p` was asked for.
#[map]
static PORT_FILTER: Array<u8> = Array::with_max_entries(PORT_FILTER_LEN, 0);

/// Each TCP socket's state, on the socket (see [`SocketState`]).
#[btf_map]
static SOCKETS: SocketStorage = SocketStorage::new();

/// The BTF definition of `SOCKETS`, written out because aya-ebpf's `SkStorage` cannot ask for
/// `BPF_F_CLONE`: with it, the kernel copies a listener's storage to each child it accepts
/// (`bpf_sk_storage_clone` in `sk_clone_lock`, before the child's LISTEN -> SYN_RECV), which
/// is how children inherit their listener's owner.
#[repr(C)]
struct SocketStorage {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const SocketState,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholder pointers that the loader reads as BTF and never dereferenced.
unsafe impl Sync for SocketStorage {}

impl SocketStorage {
    const fn new() -> SocketStorage {
        SocketStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }
}

/// SYN-ACK retransmissions per listening port (`tcp/tcp_retransmit_synack`), read on scrape.
#[map]
static SYNACK_RETRANSMITS: PerCpuHashMap<u16, u64> =
    PerCpuHashMap::with_max_entries(MAX_SYNACK_PORTS, 0);

/// Segments retransmitted per service port (`tcp/tcp_retransmit_skb`), read each second.
#[map]
static RETRANSMITS: PerCpuHashMap<u16, u64> =
    PerCpuHashMap::with_max_entries(MAX_RETRANSMIT_PORTS, 0);

/// Resets sent and received, by the socket's state (`tcp/tcp_send_reset`,
/// `tcp/tcp_receive_reset`), indexed `direction * RESET_STATES + state`.
#[map]
static RESETS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * RESET_STATES, 0);

/// When each problem of `tracer_common::counter` was last logged on this CPU
/// (`bpf_ktime_get_ns`): the rate limit of [`report`].
#[map]
static LOGGED_AT: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Least time between two log lines of one problem on one CPU.
const LOG_EVERY_NS: u64 = 1_000_000_000;

/// Resets sent, by the kernel's reason (`enum sk_rst_reason`, Linux 6.10+), indexed by it.
#[map]
static RESET_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(RESET_REASONS_LEN, 0);

/// Set on a CPU while `inet_sock_set_state` runs there: read by the rescue program.
#[map]
static RUNNING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The main program: handles every transition.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    set_running(1);
    // The tracepoint's return value is ignored by the kernel; errors are counted instead.
    let _ = try_inet_sock_set_state(&ctx);
    set_running(0);
    0
}

/// The rescue program, attached to the same tracepoint: handles a transition only when it
/// fires while the main program is running on this CPU.
///
/// Why: the kernel never runs a BPF program nested in itself on one CPU; it skips the inner run
/// and counts it in `recursion_misses`. That happens when an interrupt arrives while the main
/// program runs in process context (connect, close) and the softirq on its exit processes a
/// packet that changes another socket's state. The check is per program, so this one, idle
/// at that moment, delivers the event instead. Events lost for good are the main program's
/// recursion misses minus `counter::RESCUED`.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_rescue(ctx: BtfTracePointContext) -> i32 {
    if RUNNING.get(0).is_some_and(|r| *r != 0) {
        count(counter::RESCUED);
        let _ = try_inet_sock_set_state(&ctx);
    }
    0
}

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
/// retransmission: counts the skb's segments (`tcp_skb_pcount`, as `TcpRetransSegs` and
/// `tcp_sock.total_retrans` count them) under the socket's service port, as its storage
/// keeps it; the remote port for a socket the probe did not see open.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: BtfTracePointContext) -> i32 {
    let (sk, skb): (*const u8, *const u8) = (ctx.arg(0), ctx.arg(1));
    let s = socket_state(sk, false);
    // SAFETY: null or this socket's storage; `skc_dport` is a direct load through the
    // BTF-typed socket, as in inet_sock_set_state.
    let port = match unsafe { s.as_ref() } {
        Some(s) if s.port != 0 => s.port,
        _ => u16::from_be(unsafe { field::<u16>(sk, offset!(skc_dport)) }),
    };
    let segs: u16 = read_or_report(&ctx, skb, offset!(skb_gso_segs), field::GSO_SEGS);
    let segs = u64::from(segs.max(1));
    if let Some(n) = RETRANSMITS.get_ptr_mut(&port) {
        // SAFETY: this CPU's value of a per-CPU map; preemption is disabled here.
        unsafe { *n += segs };
    } else if RETRANSMITS.insert(&port, &segs, 0).is_err() {
        report(&ctx, counter::RETRANSMIT_PORTS_FULL, u32::from(port));
    }
    0
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
fn count_reset(direction: u32, sk: *const u8) -> u8 {
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
fn report_reset(ctx: &BtfTracePointContext, sk: *const u8, state: u8, reason: u16) {
    // SAFETY: direct loads through the BTF-typed `struct sock *`, as in inet_sock_set_state;
    // `sk` is a full socket (its state says so).
    let (family, dport) = unsafe {
        (
            field::<u16>(sk, offset!(skc_family)),
            u16::from_be(field::<u16>(sk, offset!(skc_dport))),
        )
    };
    let Some(sport) = wanted_sport(ctx, sk, dport) else {
        return;
    };
    let Some((ring, mut entry)) = reserve() else {
        return;
    };
    let t: *mut Transition = entry.as_mut_ptr();
    // SAFETY: `t` points at the reserved record and each write stays inside its field; `sk`
    // is the tracepoint's BTF-typed socket, not NULL.
    unsafe {
        write_socket(ctx, t, sk, family, bpf_ktime_get_ns());
        write_stamps(t, core::ptr::null(), false);
        addr_of_mut!((*t).sport).write(sport);
        addr_of_mut!((*t).dport).write(dport);
        addr_of_mut!((*t).family).write(family);
        addr_of_mut!((*t).oldstate).write(state);
        addr_of_mut!((*t).newstate).write(SENT_RESET);
        write_close(t, sk, state, SENT_RESET, 0);
        addr_of_mut!((*t).reset_reason).write(reason);
    }
    submit(ring, entry);
}

#[inline(always)]
fn set_running(value: u32) {
    if let Some(r) = RUNNING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracepoint programs run with preemption disabled.
        unsafe { *r = value };
    }
}

#[inline(always)]
fn try_inet_sock_set_state(ctx: &BtfTracePointContext) -> Result<(), i32> {
    // The prototype is `inet_sock_set_state(const struct sock *sk, int oldstate,
    // int newstate)` (include/trace/events/sock.h); the arguments are read by index.
    let (sk, oldstate, newstate): (*const u8, i32, i32) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));

    // The tracepoint also fires for SCTP (and other inet protocols): keep TCP only.
    // SAFETY: direct loads through the BTF-typed `struct sock *` at offsets of `struct sock`
    // fields of the matching type; the verifier checks each against the kernel's BTF and makes
    // it a fault-safe load. (They cost a load each, where bpf_probe_read_kernel costs a helper
    // call: this is the per-event path.)
    let (protocol, family, dport) = unsafe {
        (
            field::<u16>(sk, offset!(sk_protocol)),
            field::<u16>(sk, offset!(skc_family)),
            u16::from_be(field::<u16>(sk, offset!(skc_dport))),
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let Some(sport) = wanted_sport(ctx, sk, dport) else {
        return Ok(());
    };
    let (oldstate, newstate) = (oldstate as u8, newstate as u8);
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };

    // The socket's own state. Not made for a socket that is closing (nothing follows CLOSE
    // but a new opening, which makes it).
    let s = socket_state(sk, newstate != state::CLOSE);
    let mut skipped = false;
    if s.is_null() {
        if newstate != state::CLOSE {
            report(ctx, counter::NO_STORAGE, u32::from(sport));
        }
    } else {
        // SAFETY: the storage of this socket, which only this transition touches now (a
        // socket's state changes under its lock).
        skipped = unsafe { prepare(ctx, &mut *s, sk, sport, dport, oldstate, newstate) };
        if skipped {
            count(counter::SKIPPED);
        }
    }
    // Handshake facts the tracepoint does not carry, read where they mean something.
    let srtt_us = if oldstate == state::SYN_RECV && newstate == state::ESTABLISHED {
        read_or_report(ctx, sk, offset!(srtt_us), field::SRTT_US)
    } else {
        0u32
    };

    // The event is stamped with the state as it stood before this transition; a full ring
    // loses the event, never the socket's state.
    if let Some((ring, mut entry)) = reserve() {
        // Every field is written once, in place in the ring buffer: no copy through the
        // stack, and no byte-wise memset (which is what zeroed byte arrays on the stack
        // compile to).
        let t: *mut Transition = entry.as_mut_ptr();
        // SAFETY: `t` points at the reserved record, `size_of::<Transition>()` writable
        // bytes, and each write below stays inside the field it names; `s` is null or this
        // socket's storage.
        unsafe {
            write_socket(ctx, t, sk, family, now);
            write_stamps(t, s, skipped);
            addr_of_mut!((*t).sport).write(sport);
            addr_of_mut!((*t).dport).write(dport);
            addr_of_mut!((*t).family).write(family);
            addr_of_mut!((*t).oldstate).write(oldstate);
            addr_of_mut!((*t).newstate).write(newstate);
            write_close(t, sk, oldstate, newstate, srtt_us);
        }
        submit(ring, entry);
    }
    if !s.is_null() {
        // SAFETY: as above.
        unsafe { advance(&mut *s, oldstate, newstate, now, srtt_us) };
    }
    Ok(())
}

/// This socket's storage in `SOCKETS`, made (zeroed) when `create` and there is none; null
/// when there is none, or the kernel refuses one (a dying socket, `optmem_max` reached, or
/// hard-irq context).
#[inline(always)]
fn socket_state(sk: *const u8, create: bool) -> *mut SocketState {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: `SOCKETS` is a socket storage map and `sk` a BTF-typed full socket from a
    // tracepoint's arguments, which `bpf_sk_storage_get` takes in tracing programs (Linux
    // 5.11+); no initial value (the storage starts zeroed).
    unsafe {
        gen::bpf_sk_storage_get(
            addr_of!(SOCKETS) as *mut c_void,
            sk as *mut c_void,
            core::ptr::null_mut(),
            flags,
        ) as *mut SocketState
    }
}

/// Brings the socket's state to where this transition starts. An opening (CLOSE -> SYN_SENT
/// or LISTEN), a listener's new child (LISTEN -> SYN_RECV) and a socket seen for the first
/// time start afresh: the namespace and cgroup read from the socket, the owner named where
/// this is process context (or the listener's, copied with its storage), how it opened and
/// its service port. Returns true when a transition was skipped: the old state is not the
/// one the probe saw the socket enter.
///
/// # Safety
/// `sk` must be the tracepoint's socket and `s` its storage.
#[inline(always)]
unsafe fn prepare(
    ctx: &BtfTracePointContext,
    s: &mut SocketState,
    sk: *const u8,
    sport: u16,
    dport: u16,
    old: u8,
    new: u8,
) -> bool {
    let opening = old == state::CLOSE && (new == state::SYN_SENT || new == state::LISTEN);
    let child = old == state::LISTEN && new == state::SYN_RECV;
    if !(opening || child || s.state == 0) {
        if s.state == old {
            return false;
        }
        // Whatever happened in between, the time in `old` is not known.
        s.flags &= !socket::SINCE_SEEN;
        return true;
    }
    // A child's storage is a copy of its listener's (when the listener had one): the owner,
    // cgroup and namespace are the listener's, and a seeded owner stays marked so. A socket
    // older than the probe may have been given its owner by userspace (seeded) before its
    // first transition here.
    let seeded = s.flags & socket::SEEDED;
    let cloned = child && (s.state == state::LISTEN || seeded != 0);
    let keep_owner = cloned || (s.state == 0 && seeded != 0 && !child);
    // (A seeded listener's copy has neither: userspace names only the owner.)
    if !cloned || s.netns == 0 {
        s.netns = net_inum(ctx, sk);
        s.cgroup = cgroup_id(ctx, sk);
    }
    if !keep_owner {
        s.pid = 0;
        zero16(addr_of_mut!(s.comm));
    }
    if opening {
        s.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let comm = addr_of_mut!(s.comm);
        if gen::bpf_get_current_comm(comm as *mut c_void, COMM_LEN as u32) != 0 {
            zero16(comm);
        }
    }
    let seeded = if keep_owner && !opening { seeded } else { 0 };
    // How it opened: seen now, or told by the state a socket is first seen in.
    let (mode, port) = match (old, new) {
        (state::CLOSE, state::LISTEN) => (0, sport),
        (state::CLOSE, state::SYN_SENT) | (state::SYN_SENT, _) => (socket::ACTIVE, dport),
        (state::LISTEN, state::SYN_RECV) | (state::SYN_RECV, _) => (socket::PASSIVE, sport),
        _ => (0, 0),
    };
    s.flags = mode | seeded;
    s.port = port;
    s.since_ns = 0;
    s.opened_ns = 0;
    s.established_ns = 0;
    s.teardown_ns = 0;
    s.reset_reason = 0;
    s.state = old;
    false
}

/// Moves the socket's state past this transition.
#[inline(always)]
fn advance(s: &mut SocketState, old: u8, new: u8, now: u64, srtt_us: u32) {
    match (old, new) {
        (state::CLOSE, state::SYN_SENT) => s.opened_ns = now,
        // srtt_us holds the smoothed RTT times 8; a new child has one sample, from its first
        // SYN-ACK to the handshake's final ACK.
        (state::SYN_RECV, state::ESTABLISHED) if srtt_us > 0 => {
            s.opened_ns = now.saturating_sub(u64::from(srtt_us >> 3) * 1_000)
        }
        (state::ESTABLISHED, state::FIN_WAIT1) => {
            s.teardown_ns = now;
            s.flags |= socket::TEARDOWN_HERE;
        }
        (state::ESTABLISHED, state::CLOSE_WAIT) => {
            s.teardown_ns = now;
            s.flags |= socket::TEARDOWN_PEER;
        }
        (state::FIN_WAIT1, state::CLOSING) => {
            if s.flags & (socket::TEARDOWN_HERE | socket::TEARDOWN_PEER) != 0 {
                s.flags |= socket::TEARDOWN_HERE | socket::TEARDOWN_PEER;
            }
        }
        _ => {}
    }
    if new == state::ESTABLISHED {
        s.established_ns = now;
    }
    s.state = new;
    s.since_ns = now;
    s.flags |= socket::SINCE_SEEN;
}

/// Writes what the socket's storage tells into the event: the owner, cgroup, namespace,
/// service port, the times and the flags (all 0 where there is no storage).
///
/// # Safety
/// `t` must point at a reserved ring buffer record and `s` be null or a socket's storage.
#[inline(always)]
unsafe fn write_stamps(t: *mut Transition, s: *const SocketState, skipped: bool) {
    let comm = addr_of_mut!((*t).comm);
    if s.is_null() {
        zero16(comm);
        addr_of_mut!((*t).pid).write(0);
        addr_of_mut!((*t).netns).write(0);
        addr_of_mut!((*t).cgroup).write(0);
        addr_of_mut!((*t).since_ns).write(0);
        addr_of_mut!((*t).opened_ns).write(0);
        addr_of_mut!((*t).established_ns).write(0);
        addr_of_mut!((*t).teardown_ns).write(0);
        addr_of_mut!((*t).port).write(0);
        addr_of_mut!((*t).socket_flags).write(0);
        addr_of_mut!((*t).reset_reason).write(0);
    } else {
        let (from, to) = (addr_of!((*s).comm) as *const u64, comm as *mut u64);
        to.write(from.read());
        to.add(1).write(from.add(1).read());
        addr_of_mut!((*t).pid).write((*s).pid);
        addr_of_mut!((*t).netns).write((*s).netns);
        addr_of_mut!((*t).cgroup).write((*s).cgroup);
        addr_of_mut!((*t).since_ns).write((*s).since_ns);
        addr_of_mut!((*t).opened_ns).write((*s).opened_ns);
        addr_of_mut!((*t).established_ns).write((*s).established_ns);
        addr_of_mut!((*t).teardown_ns).write((*s).teardown_ns);
        addr_of_mut!((*t).port).write((*s).port);
        let skipped = if skipped { socket::SKIPPED } else { 0 };
        addr_of_mut!((*t).socket_flags).write((*s).flags | skipped);
        addr_of_mut!((*t).reset_reason).write((*s).reset_reason);
    }
    addr_of_mut!((*t)._pad).write([0; 4]);
}

/// Writes what only a transition to CLOSE carries (zeroes elsewhere), and the handshake's
/// RTT sample at SYN_RECV -> ESTABLISHED.
///
/// # Safety
/// `t` must point at a reserved ring buffer record and `sk` be the tracepoint's socket.
#[inline(always)]
unsafe fn write_close(t: *mut Transition, sk: *const u8, old: u8, new: u8, srtt_us: u32) {
    let (mut srtt_us, mut sk_err, mut flags) = (srtt_us, 0u8, 0u8);
    let (mut bytes_acked, mut bytes_received, mut rtt_min_us, mut total_retrans) =
        (0u64, 0u64, 0u32, 0u32);
    if new == state::CLOSE {
        // `sk_err` is an `int` of `struct sock`, loaded directly as above.
        sk_err = field::<i32>(sk, offset!(sk_err)) as u8;
        if field::<u64>(sk, offset!(sk_flags)) & (1 << SOCK_DONE) != 0 {
            flags |= close_flags::PEER_FIN;
        }
        // The connection's story, for its close record. `bpf_skc_to_tcp_sock` (tracing
        // programs, Linux 5.9+) returns the socket as a BTF-typed `struct tcp_sock *` (or
        // null), whose fields are then direct loads: one helper call rather than one per
        // field.
        let tp = gen::bpf_skc_to_tcp_sock(sk as *mut c_void) as *const u8;
        if !tp.is_null() {
            srtt_us = field::<u32>(tp, offset!(srtt_us));
            total_retrans = field::<u32>(tp, offset!(total_retrans));
            bytes_acked = field::<u64>(tp, offset!(bytes_acked));
            bytes_received = field::<u64>(tp, offset!(bytes_received));
            rtt_min_us = field::<u32>(tp, offset!(rtt_min));
            let sent_fin = matches!(
                old,
                state::FIN_WAIT1 | state::FIN_WAIT2 | state::CLOSING | state::LAST_ACK
            );
            let all_acked =
                field::<u32>(tp, offset!(snd_una)) == field::<u32>(tp, offset!(write_seq));
            if sent_fin && all_acked {
                flags |= close_flags::FIN_ACKED;
            }
        }
    }
    addr_of_mut!((*t).close_flags).write(flags);
    addr_of_mut!((*t).bytes_acked).write(bytes_acked);
    addr_of_mut!((*t).bytes_received).write(bytes_received);
    addr_of_mut!((*t).rtt_min_us).write(rtt_min_us);
    addr_of_mut!((*t).total_retrans).write(total_retrans);
    addr_of_mut!((*t).srtt_us).write(srtt_us);
    addr_of_mut!((*t).sk_err).write(sk_err);
}

/// The inode of the socket's network namespace (`net.ns.inum`).
#[inline(always)]
fn net_inum(ctx: &BtfTracePointContext, sk: *const u8) -> u32 {
    // SAFETY: `skc_net` is a `possible_net_t` (one `struct net *`) of `struct sock_common`,
    // loaded directly; its `ns.inum` is read with the helper (a plain pointer, not a
    // BTF-typed one).
    let net = unsafe { field::<u64>(sk, offset!(skc_net)) } as *const u8;
    read_or_report(ctx, net, offset!(net_inum), field::NET_INUM)
}

/// This CPU's ring.
type Ring = BtfRingBuf<Transition, RING_TEMPLATE_BYTES>;

/// Reserves a record in this CPU's ring; a full ring is counted as a lost event.
#[inline(always)]
fn reserve() -> Option<(&'static Ring, RingBufEntry<Transition>)> {
    // SAFETY: a helper with no arguments, callable from any program type.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let reserved = EVENTS
        .get(cpu)
        .and_then(|ring| Some((ring, ring.reserve(0)?)));
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
unsafe fn write_socket(
    ctx: &BtfTracePointContext,
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
unsafe fn write_addresses(
    ctx: &BtfTracePointContext,
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
fn submit(ring: &Ring, entry: RingBufEntry<Transition>) {
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

/// The socket's local port, when it or `dport` passes the port filter.
#[inline(always)]
fn wanted_sport(ctx: &BtfTracePointContext, sk: *const u8, dport: u16) -> Option<u16> {
    // `inet_sport` lies in `struct inet_sock`, past `struct sock`, where the verifier allows no
    // direct load through a `struct sock *`: read it with the helper.
    let sport = u16::from_be(read_or_report(
        ctx,
        sk,
        offset!(inet_sport),
        field::INET_SPORT,
    ));
    (port_wanted(sport) || port_wanted(dport)).then_some(sport)
}

/// True when no port filter is set or `port` is in it.
#[inline(always)]
fn port_wanted(port: u16) -> bool {
    // SAFETY: read-only global, volatile for the same reason as OFFSETS.
    if unsafe { core::ptr::read_volatile(&FILTER_PORTS) } == 0 {
        return true;
    }
    PORT_FILTER.get(port as u32).is_some_and(|v| *v != 0)
}

/// The byte offset of a `SockOffsets` field, read straight from the load-time constant so that
/// the verifier knows its value.
macro_rules! offset {
    ($field:ident) => {{
        // SAFETY: a read-only global set at load time.
        #[allow(unused_unsafe)]
        let offset = unsafe { core::ptr::read_volatile(&OFFSETS.$field) } as usize;
        offset
    }};
}
use offset;

/// The id of the socket's cgroup v2 cgroup (`sk->sk_cgrp_data.cgroup->kn->id`, what
/// `cgroup_id()` returns and sock_diag reports), or 0 where this kernel does not keep it.
///
/// Read on the opening transitions only, like the namespace: a socket keeps the cgroup it was
/// created in (a passive child its listener's, copied by `sk_clone_lock`), so userspace
/// carries it from there.
#[inline(always)]
fn cgroup_id(ctx: &BtfTracePointContext, sk: *const u8) -> u64 {
    let sk_cgroup = offset!(sk_cgroup);
    if sk_cgroup == 0 {
        return 0;
    }
    // SAFETY: `sk_cgrp_data.cgroup` is a pointer field of `struct sock`, loaded directly as
    // the fields above; what it points to is read with the helper.
    let cgroup = unsafe { field::<u64>(sk, sk_cgroup) } as *const u8;
    if cgroup.is_null() {
        return 0;
    }
    let kn: u64 = read_or_report(ctx, cgroup, offset!(cgroup_kn), field::CGROUP_ID);
    if kn == 0 {
        return 0;
    }
    read_or_report(ctx, kn as *const u8, offset!(kn_id), field::CGROUP_ID)
}

/// Loads a `T` at byte offset `offset` of the kernel object at `base` with one instruction.
///
/// # Safety
/// `base` must be a BTF-typed kernel pointer from the tracepoint's arguments and `offset` a
/// field of type `T` in it (the verifier rejects the program otherwise).
#[inline(always)]
unsafe fn field<T: Copy>(base: *const u8, offset: usize) -> T {
    core::ptr::read_volatile(base.add(offset) as *const T)
}

/// Reads a `T` at byte offset `offset` of the kernel object at `base`.
fn read<T>(base: *const u8, offset: usize) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(base.add(offset) as *const T) }
}

/// [`read`], or 0 when the read fails, which is reported as a failed read of `which`
/// (`tracer_common::field`).
#[inline(always)]
fn read_or_report<T: Default>(
    ctx: &BtfTracePointContext,
    base: *const u8,
    offset: usize,
    which: u32,
) -> T {
    match read(base, offset) {
        Ok(value) => value,
        Err(_) => {
            report(ctx, counter::READ_FAILED, which);
            T::default()
        }
    }
}

/// Reads 16 bytes at byte offset `offset` of the kernel object at `base` straight into `dst`
/// (ring buffer memory); zeroes them and returns false if the read fails.
///
/// # Safety
/// `dst` must be 16 writable, 8-byte aligned bytes.
#[inline(always)]
unsafe fn read_into(dst: *mut [u8; 16], base: *const u8, offset: usize) -> bool {
    let src = base.add(offset) as *const c_void;
    if gen::bpf_probe_read_kernel(dst as *mut c_void, 16, src) != 0 {
        zero16(dst);
        return false;
    }
    true
}

/// Zeroes 16 bytes with two stores (an array write would become a byte-wise memset call).
///
/// # Safety
/// `dst` must be 16 writable, 8-byte aligned bytes.
#[inline(always)]
unsafe fn zero16(dst: *mut [u8; 16]) {
    let p = dst as *mut u64;
    p.write_volatile(0);
    p.add(1).write_volatile(0);
}

/// Counts `problem` (a `tracer_common::counter` index) and says what happened through aya-log,
/// at most once a second per problem on this CPU. `detail` is the port, field or family the
/// message names.
///
/// Out of line: the per-event path pays for it only when something went wrong, and a burst
/// of problems costs a map lookup and a clock read each, not a log record.
#[inline(never)]
fn report(ctx: &BtfTracePointContext, problem: u32, detail: u32) {
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
            "retransmission table full ({} ports): retransmissions on port {} are not counted",
            MAX_RETRANSMIT_PORTS,
            detail
        ),
        counter::SYNACK_PORTS_FULL => warn!(
            ctx,
            "SYN-ACK table full ({} listening ports): retransmissions on port {} are not counted",
            MAX_SYNACK_PORTS,
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
fn field_name(which: u32) -> &'static str {
    match which {
        field::INET_SPORT => "inet_sock.inet_sport",
        field::SRTT_US => "tcp_sock.srtt_us",
        field::NET_INUM => "net.ns.inum",
        field::CGROUP_ID => "sock.sk_cgrp_data.cgroup->kn->id",
        field::GSO_SEGS => "tcp_skb_cb.tcp_gso_segs",
        _ => "sock_common.skc_v6_rcv_saddr/skc_v6_daddr",
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, touched only by this CPU with preemption disabled.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
