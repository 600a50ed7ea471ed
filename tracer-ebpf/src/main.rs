//! The kernel side of `tracer`: BTF tracepoint programs.
//!
//! - `inet_sock_set_state` (and its rescue twin, for runs nested in it): for every TCP state
//!   change it filters by port, brings the socket's own state (BPF socket storage, `SOCKETS`)
//!   up to date, and writes a [`Transition`] stamped with it into this CPU's ring buffer in
//!   `EVENTS`: each event complete in itself (the owner, the dwell's start, the handshake,
//!   teardown and lifetime times, the service port).
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
    macros::{btf_map, btf_tracepoint, fexit, map},
    maps::{ring_buf::RingBufEntry, Array, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, FExitContext},
    EbpfContext,
};
use aya_log_ebpf::{error, warn};
use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut};
use tracer_common::{
    close_flags, counter, field, retransmit, socket, state, DropKey, SockOffsets, SocketState,
    Transition, ACCEPTED, AF_INET, AF_INET6, COMM_LEN, HEAD_BYTES, IPPROTO_TCP, MAX_DROP_KEYS,
    MAX_RETRANSMIT_PORTS, MAX_SYNACK_PORTS, PORT_FILTER_LEN, RESET_REASONS as RESET_REASONS_LEN,
    RESET_RECEIVED, RESET_SENT, RESET_STATES, SENT_RESET, SOCK_DONE, WHOLE_RECORD_BYTES,
};

mod accept;
mod counts;
mod drops;
mod kernel;
mod record;
mod storage;

use counts::*;
use kernel::*;
use record::*;
use storage::*;

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
    icsk_ca_state: 0,
    icsk_ca_state_shift: 0,
    icsk_ca_state_mask: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    skb_protocol: 0,
    chrono_start: 0,
    chrono_stat: 0,
    chrono_type: 0,
    chrono_type_shift: 0,
    chrono_type_mask: 0,
    dsack_dups: 0,
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

/// 1 when userspace wants an event for each connection accepted (the agent's accept-queue
/// histogram); `watch` reads the wait from the close record alone.
#[no_mangle]
static ACCEPT_EVENTS: u8 = 0;

/// The transitions: one ring buffer per CPU, indexed by CPU number, created and sized by
/// userspace (`--ring-buffer-size`). Records are of two lengths ([`HeadRecord`],
/// [`WholeRecord`]); the map's type names the whole one.
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

/// Segments retransmitted per service port and kind (`tcp/tcp_retransmit_skb`, key
/// `kind << 16 | port`, kinds in `tracer_common::retransmit`), read each second.
#[map]
static RETRANSMITS: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(MAX_RETRANSMIT_PORTS, 0);

/// TCP packets dropped, by the kernel's reason (`enum skb_drop_reason`), service port and
/// the cgroup of the socket they were for (`skb/kfree_skb`), read each second.
#[map]
static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(MAX_DROP_KEYS, 0);

/// The host's ephemeral port range (`ip_local_port_range`), set at load time: of a dropped
/// packet's two ports, the one outside it is the service's.
#[no_mangle]
static EPHEMERAL_PORTS: [u16; 2] = [0, 0];

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

/// Set on a CPU while `inet_sock_set_state` runs there: read by the rescue program for
/// sockets without storage.
#[map]
static RUNNING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The transition the main program handled last on this CPU (its socket's address and new
/// state), cleared by the rescue program that follows it: the rescue's common case in two
/// inlined per-CPU loads, with no helper call.
#[map]
static HANDLED: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The main program: handles every transition.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    set_running(1);
    if let Some(h) = HANDLED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracepoint programs run with preemption disabled.
        unsafe { *h = this_transition(&ctx) };
    }
    // The tracepoint's return value is ignored by the kernel; errors are counted instead.
    let _ = try_inet_sock_set_state(&ctx);
    set_running(0);
    0
}

/// The rescue program, attached to the same tracepoint after the main one: handles a
/// transition only when the main program did not.
///
/// Why: the kernel never runs a BPF program nested in itself on one CPU; it skips the inner run
/// and counts it in `recursion_misses`. That happens when an interrupt arrives while the main
/// program runs in process context (connect, close) and the softirq on its exit processes a
/// packet that changes another socket's state. The check is per program, so this one, idle
/// at that moment, delivers the event instead. Events lost for good are the main program's
/// recursion misses minus `counter::RESCUED`.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_rescue(ctx: BtfTracePointContext) -> i32 {
    // The common case: the main program has just handled this very transition.
    let this = this_transition(&ctx);
    if let Some(h) = HANDLED.get_ptr_mut(0) {
        // SAFETY: as in the main program.
        unsafe {
            if (*h)[0] == this[0] && (*h)[1] == this[1] {
                (*h)[0] = 0;
                return 0;
            }
        }
    }
    if main_missed(&ctx) {
        count(counter::RESCUED);
        let _ = try_inet_sock_set_state(&ctx);
    }
    0
}

/// The tracepoint's socket address and new state: one transition, told apart from any other
/// that can follow it on this CPU before the rescue program runs.
#[inline(always)]
fn this_transition(ctx: &BtfTracePointContext) -> [u64; 2] {
    let (sk, newstate): (u64, u64) = (ctx.arg(0), ctx.arg(2));
    [sk, newstate]
}

/// True when the main program did not handle this very transition, for the rare cases where
/// `HANDLED` does not say so: a run nested in the main program (which the kernel skipped),
/// or one nested in the rescue program before it read `HANDLED`. It decides by the socket's
/// own state: the main program moves the socket's storage to the new state as it handles a
/// transition, so storage still in another state was not handled (whenever the main program
/// was skipped: from its entry to its return, with no window). A socket without storage (one
/// the probe first sees closing, or that the kernel refused storage, or another protocol's)
/// is told by the flag the main program holds while it runs.
#[inline(always)]
fn main_missed(ctx: &BtfTracePointContext) -> bool {
    let (sk, newstate): (*const u8, i32) = (ctx.arg(0), ctx.arg(2));
    let s = socket_state(sk, false);
    // SAFETY: null or this socket's storage.
    match unsafe { s.as_ref() } {
        Some(s) => s.state != newstate as u8,
        None => RUNNING.get(0).is_some_and(|r| *r != 0),
    }
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
    // The socket as a BTF-typed `struct tcp_sock *` (`bpf_skc_to_tcp_sock`, tracing programs,
    // Linux 5.9+): its `inet_sock` and `tcp_sock` fields are then direct loads, one helper
    // call rather than a read helper per field. Null for what is not a full TCP socket.
    // SAFETY: `sk` is the tracepoint's BTF-typed socket.
    let tp = unsafe { gen::bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    // SAFETY: `inet_sport` is a `__be16` of `struct inet_sock`, which starts `struct
    // tcp_sock`.
    let sport = u16::from_be(unsafe { field::<u16>(tp, offset!(inet_sport)) });
    if !(port_wanted(sport) || port_wanted(dport)) {
        return Ok(());
    }
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
        // SAFETY: a `u32` field of `struct tcp_sock`.
        unsafe { field::<u32>(tp, offset!(srtt_us)) }
    } else {
        0u32
    };
    // The handshake's retransmissions (SYNs, or SYN-ACKs: a child starts from its request
    // socket's count), all there are when a connection becomes ESTABLISHED.
    let handshake_retransmits = if newstate == state::ESTABLISHED {
        // SAFETY: a `u32` field of `struct tcp_sock`.
        unsafe { field::<u32>(tp, offset!(total_retrans)) }
    } else {
        0u32
    };

    // The event is stamped with the state as it stood before this transition; a full ring
    // loses the event, never the socket's state. Every field is written once, in place in the
    // ring buffer: no copy through the stack, and no byte-wise memset (which is what zeroed
    // byte arrays on the stack compile to). Only a transition to CLOSE takes a whole record;
    // the others take its head (see `tracer_common::HEAD_BYTES`).
    let head = (family, sport, dport, oldstate, newstate, now);
    if newstate == state::CLOSE {
        if let Some((ring, mut entry)) = reserve::<WholeRecord>() {
            let t = entry.as_mut_ptr() as *mut Transition;
            // SAFETY: `t` points at the reserved record, a whole `Transition`, and each write
            // below stays inside the field it names; `s` is null or this socket's storage.
            unsafe {
                write_head(ctx, t, sk, s, skipped, head);
                write_close(t, sk, tp, s, oldstate);
            }
            submit(ring, entry);
        }
    } else if let Some((ring, mut entry)) = reserve::<HeadRecord>() {
        let t = entry.as_mut_ptr() as *mut Transition;
        // SAFETY: `t` points at the reserved record, `HEAD_BYTES` of a `Transition`, and each
        // write below stays inside a head field; `s` is null or this socket's storage.
        unsafe {
            write_head(ctx, t, sk, s, skipped, head);
            write_no_close(t, srtt_us);
        }
        submit(ring, entry);
    }
    if !s.is_null() {
        // SAFETY: as above.
        unsafe {
            advance(
                &mut *s,
                oldstate,
                newstate,
                now,
                srtt_us,
                handshake_retransmits,
            )
        };
    }
    Ok(())
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
