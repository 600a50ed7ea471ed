//! The kernel side of `tracer`: one BTF tracepoint program on `inet_sock_set_state`.
//!
//! For every TCP state change it names the owning process where it is known, filters by port,
//! and writes a [`Transition`] into the `EVENTS` ring buffer. It counts what it cannot deliver
//! (`COUNTERS`); it keeps no other statistics: userspace follows the sockets.
//!
//! Why a BTF tracepoint (`tp_btf`) rather than the classic tracepoint: it attaches by name
//! through `bpf()` with no tracefs mounted (containers rarely have it), and it receives the
//! kernel's `struct sock *`, whose fields later features read. The fields are read at byte
//! offsets that userspace takes from the running kernel's BTF ([`SockOffsets`]).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::BtfTracePointContext,
};
use tracer_common::{
    counter, state, ListenerKey, Owner, SockOffsets, Transition, AF_INET, AF_INET6, COMM_LEN,
    IPPROTO_TCP, MAX_LISTENERS, MAX_SYNACK_PORTS, PORT_FILTER_LEN,
    RESET_RECEIVED, RESET_SENT, RESET_STATES,
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
};

/// Unread bytes in `EVENTS` at which the probe wakes the reader; set at load time.
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

/// The transitions, in order per CPU. Its size is set by userspace (`--ring-buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Per-CPU counters of what the probe could not do, indexed by `tracer_common::counter`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Port filter: entry `p` is 1 when port `p` was asked for.
#[map]
static PORT_FILTER: Array<u8> = Array::with_max_entries(PORT_FILTER_LEN, 0);

/// Owner of each listening port, so that passive-open children inherit it.
#[map]
static LISTENERS: HashMap<ListenerKey, Owner> = HashMap::with_max_entries(MAX_LISTENERS, 0);

/// SYN-ACK retransmissions per listening port (`tcp/tcp_retransmit_synack`), read on scrape.
#[map]
static SYNACK_RETRANSMITS: PerCpuHashMap<u16, u64> =
    PerCpuHashMap::with_max_entries(MAX_SYNACK_PORTS, 0);

/// Resets sent and received, by the socket's state (`tcp/tcp_send_reset`,
/// `tcp/tcp_receive_reset`), indexed `direction * RESET_STATES + state`.
#[map]
static RESETS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * RESET_STATES, 0);

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
    // SAFETY: OFFSETS is a read-only global.
    let off = unsafe { core::ptr::read_volatile(&OFFSETS) };
    let Ok(port) = read::<u16>(sk, off.inet_sport).map(u16::from_be) else { return 0 };
    if let Some(n) = SYNACK_RETRANSMITS.get_ptr_mut(&port) {
        // SAFETY: this CPU's value of a per-CPU map; preemption is disabled here.
        unsafe { *n += 1 };
    } else if SYNACK_RETRANSMITS.insert(&port, &1, 0).is_err() {
        count(counter::SYNACK_PORTS_FULL);
    }
    0
}

/// `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb, enum sk_rst_reason)`;
/// `sk` is NULL for a reset that answers no socket (e.g. a SYN to a closed port).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    count_reset(RESET_SENT, ctx.arg(0));
    0
}

/// `tcp_receive_reset(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    count_reset(RESET_RECEIVED, ctx.arg(0));
    0
}

fn count_reset(direction: u32, sk: *const u8) {
    // SAFETY: OFFSETS is a read-only global.
    let off = unsafe { core::ptr::read_volatile(&OFFSETS) };
    let state = if sk.is_null() { 0 } else { read::<u8>(sk, off.skc_state).unwrap_or(0) as u32 };
    let index = direction * RESET_STATES + (state % RESET_STATES);
    if let Some(c) = RESETS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot; preemption is disabled here.
        unsafe { *c += 1 };
    }
}

fn set_running(value: u32) {
    if let Some(r) = RUNNING.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; tracepoint programs run with preemption disabled.
        unsafe { *r = value };
    }
}

fn try_inet_sock_set_state(ctx: &BtfTracePointContext) -> Result<(), i32> {
    // The prototype is `inet_sock_set_state(const struct sock *sk, int oldstate,
    // int newstate)` (include/trace/events/sock.h); the arguments are read by index.
    let (sk, oldstate, newstate): (*const u8, i32, i32) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));
    // SAFETY: OFFSETS is a read-only global; volatile so the compiler cannot fold the
    // zeroes it was compiled with.
    let off = unsafe { core::ptr::read_volatile(&OFFSETS) };

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
    // `inet_sport` lies in `struct inet_sock`, past `struct sock`, where the verifier allows no
    // direct load through a `struct sock *`: read it with the helper.
    let sport = u16::from_be(read::<u16>(sk, off.inet_sport)?);
    if !port_wanted(sport) && !port_wanted(dport) {
        return Ok(());
    }
    let (oldstate, newstate) = (oldstate as u8, newstate as u8);
    let skaddr = sk as u64;
    let owner = owner_at(sk, skaddr, sport, oldstate, newstate);

    let (mut saddr, mut daddr) = ([0u8; 16], [0u8; 16]);
    if family == AF_INET6 {
        saddr = read(sk, off.skc_v6_rcv_saddr).unwrap_or([0; 16]);
        daddr = read(sk, off.skc_v6_daddr).unwrap_or([0; 16]);
    } else if family == AF_INET {
        // SAFETY: as above; both are `__be32` fields of `struct sock_common`.
        let (s, d): (u32, u32) =
            unsafe { (field(sk, offset!(skc_rcv_saddr)), field(sk, offset!(skc_daddr))) };
        let (s, d) = (s.to_ne_bytes(), d.to_ne_bytes());
        saddr[..4].copy_from_slice(&s);
        daddr[..4].copy_from_slice(&d);
    }

    let Some(mut entry) = EVENTS.reserve::<Transition>(0) else {
        count(counter::LOST_RINGBUF_FULL);
        return Ok(());
    };
    // Handshake facts the tracepoint does not carry, read where they mean something.
    let (mut srtt_us, mut sk_err, mut retrans) = (0u32, 0u16, 0u16);
    if oldstate == state::SYN_RECV && newstate == state::ESTABLISHED {
        srtt_us = read(sk, off.srtt_us).unwrap_or(0);
        retrans = read::<u32>(sk, off.total_retrans).unwrap_or(0) as u16;
    } else if oldstate == state::SYN_SENT && newstate == state::CLOSE {
        // SAFETY: as above; `sk_err` is an `int` of `struct sock`.
        sk_err = unsafe { field::<i32>(sk, offset!(sk_err)) } as u16;
    }

    // SAFETY: `sk` is the tracepoint's BTF-typed socket, which this helper accepts in
    // tracing programs (Linux 5.12+); it returns the existing cookie or makes one.
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut core::ffi::c_void) };
    entry.write(Transition {
        // SAFETY: a helper with no arguments, callable from any program type.
        time_ns: unsafe { bpf_ktime_get_ns() },
        skaddr,
        cookie,
        saddr,
        daddr,
        pid: owner.pid,
        sport,
        dport,
        family,
        oldstate,
        newstate,
        comm: owner.comm,
        srtt_us,
        sk_err,
        retrans,
        _pad: [0; 4],
    });
    // SAFETY: read-only global, volatile for the same reason as OFFSETS.
    let wakeup_bytes = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= wakeup_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags.into());
    Ok(())
}

/// The owner of `sk` when this transition names it; pid 0 otherwise.
///
/// The owner is known in process context: when the socket enters SYN_SENT (connect) or LISTEN
/// (listen). A passive-open child (LISTEN -> SYN_RECV, in softirq) inherits the owner of the
/// listener on its port, kept here per (network namespace, port). Every other transition
/// carries pid 0 and userspace, which follows each socket from its first event, fills in the
/// owner it recorded: no per-event owner lookup here, and the process that happens to run when
/// a packet arrives is never named.
fn owner_at(sk: *const u8, skaddr: u64, sport: u16, oldstate: u8, newstate: u8) -> Owner {
    let unknown = Owner { skaddr, pid: 0, comm: [0; COMM_LEN], _pad: [0; 4] };
    let listener = |port: u16| ListenerKey {
        // SAFETY: as above; `skc_net` is a `possible_net_t` (one `struct net *`).
        net: unsafe { field::<u64>(sk, offset!(skc_net)) },
        port,
        _pad: [0; 6],
    };
    if newstate == state::SYN_SENT || newstate == state::LISTEN {
        let owner = Owner {
            skaddr,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
            _pad: [0; 4],
        };
        if newstate == state::LISTEN && LISTENERS.insert(&listener(sport), &owner, 0).is_err() {
            count(counter::OWNERS_FULL);
        }
        return owner;
    }
    if oldstate == state::LISTEN && newstate == state::SYN_RECV {
        // SAFETY: the value is copied out before any other map operation.
        return match unsafe { LISTENERS.get(&listener(sport)) } {
            Some(parent) => Owner { skaddr, ..*parent },
            None => unknown,
        };
    }
    if oldstate == state::LISTEN && newstate == state::CLOSE {
        let key = listener(sport);
        // SAFETY: as above.
        if unsafe { LISTENERS.get(&key) }.is_some_and(|l| l.skaddr == skaddr) {
            let _ = LISTENERS.remove(&key);
        }
    }
    unknown
}

/// True when no port filter is set or `port` is in it.
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
fn read<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T) }
}

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
