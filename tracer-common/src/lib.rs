//! Types shared by the eBPF probe (`tracer-ebpf`) and the userspace agent (`tracer`).
//!
//! Everything here is `#[repr(C)]` and read by both sides byte for byte: change a field and both
//! sides change with it. Nothing else belongs here: no logic, no kernel knowledge beyond the
//! numbers the probe needs.
#![no_std]

/// Length of a task's command name, `TASK_COMM_LEN` in `include/linux/sched.h`.
pub const COMM_LEN: usize = 16;

/// `AF_INET` and `AF_INET6` from `include/linux/socket.h`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `IPPROTO_TCP` from `include/uapi/linux/in.h`.
pub const IPPROTO_TCP: u16 = 6;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

/// One TCP state change, written by the probe into the `EVENTS` ring buffer.
///
/// The fields mirror what the `sock/inet_sock_set_state` tracepoint records
/// (`include/trace/events/sock.h`), plus the owning process, which the probe tracks itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// `bpf_ktime_get_ns()` at the transition: CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
    /// Kernel address of the `struct sock`: the identity of the socket for its whole life
    /// (the kernel reuses addresses after a socket is freed).
    pub skaddr: u64,
    /// The socket's cookie (`bpf_get_socket_cookie`): unique for the kernel's uptime, and the
    /// same number sock_diag reports, so that the census and the events can be joined.
    pub cookie: u64,
    /// Local and remote address. IPv4 uses the first 4 bytes; network byte order.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Command name of the owner, NUL-padded; empty where `pid` is 0. (8-byte aligned, so that
    /// the probe writes it with two stores.)
    pub comm: [u8; COMM_LEN],
    /// Process (thread group) id of the socket's owner, set where the probe knows it: at
    /// SYN_SENT and LISTEN (process context) and at a passive child's LISTEN -> SYN_RECV (the
    /// listener's owner). 0 elsewhere: userspace carries the owner from the socket's first event.
    pub pid: u32,
    /// Local and remote port, host byte order. `sport` is still 0 in CLOSE -> SYN_SENT.
    pub sport: u16,
    pub dport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub oldstate: u8,
    pub newstate: u8,
    /// At SYN_RECV -> ESTABLISHED and at every transition to CLOSE (else 0):
    /// `tcp_sock.srtt_us`, the smoothed RTT in microseconds times 8. For a new passive child
    /// it holds the one sample the kernel took, from the first SYN-ACK sent to the
    /// handshake's final ACK.
    pub srtt_us: u32,
    /// At every transition to CLOSE (else 0): `sock.sk_err`, why the socket ended
    /// (ECONNREFUSED, ETIMEDOUT, ECONNRESET, EPIPE; 0 when the application closed it). An
    /// errno: it fits in a byte.
    pub sk_err: u8,
    /// At every transition to CLOSE (else 0): [`close_flags`] bits, the FINs the sequence
    /// counters `bytes_acked` and `bytes_received` include.
    pub close_flags: u8,
    /// In a [`SENT_RESET`] event only (else 0): why the kernel sent the reset, its
    /// `enum sk_rst_reason` (Linux 6.10+), whose names userspace reads from BTF.
    pub reset_reason: u16,
    /// Inode number of the socket's network namespace (`net.ns.inum`, as in
    /// `/proc/PID/ns/net -> net:[INODE]`), on the transitions that open a socket (into
    /// SYN_SENT or LISTEN, and a passive child's LISTEN -> SYN_RECV); 0 elsewhere: userspace
    /// carries it from the socket's first event, as it does the owner.
    pub netns: u32,
    /// Id of the socket's cgroup v2 cgroup (`sock.sk_cgrp_data.cgroup->kn->id`, the number
    /// `ss --cgroup` resolves and the inode of the cgroup's directory), on the same opening
    /// transitions as `netns`; 0 elsewhere, and where the kernel does not keep it.
    pub cgroup: u64,
    /// At every transition to CLOSE (else 0), what the connection carried and how it went,
    /// from the kernel's own counters on the socket (`struct tcp_sock`): `bytes_acked`
    /// (bytes sent that the peer acknowledged), `bytes_received`, the minimum RTT seen
    /// (`rtt_min`, microseconds) and `total_retrans` (segments retransmitted, SYNs included).
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub rtt_min_us: u32,
    pub total_retrans: u32,
}

// The layout both sides rely on: no implicit padding, `comm` 8-byte aligned.
const _: () = assert!(core::mem::size_of::<Transition>() == 128);
const _: () = assert!(core::mem::offset_of!(Transition, comm) == 56);

/// `newstate` of an event that is not a state change: the socket sent a reset
/// (`tcp/tcp_send_reset`). `oldstate` is the state the socket is in (CLOSE when it reset as it
/// closed, which is when most resets are sent), `reset_reason` says why, and the owner,
/// namespace, cgroup and counters are 0. Sent only when userspace asks for them (`RESET_EVENTS`)
/// and the kernel gives a reason; never by listeners, request or TIME-WAIT sockets.
pub const SENT_RESET: u8 = 0x40;

/// Byte offsets of the kernel fields the probe reads from a `struct sock *`.
///
/// The probe has no CO-RE relocations, so userspace reads these from the running kernel's BTF
/// (`/sys/kernel/btf/vmlinux`) at start and hands them to the probe as a load-time constant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `sock_common.skc_daddr` (`__be32`).
    pub skc_daddr: u32,
    /// `sock_common.skc_rcv_saddr` (`__be32`), which `inet_sock.inet_saddr` names.
    pub skc_rcv_saddr: u32,
    /// `sock_common.skc_dport` (`__be16`).
    pub skc_dport: u32,
    /// `sock_common.skc_family` (`unsigned short`).
    pub skc_family: u32,
    /// `sock_common.skc_v6_daddr` and `skc_v6_rcv_saddr` (`struct in6_addr`).
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// `sock_common.skc_net` (`possible_net_t`, a `struct net *`).
    pub skc_net: u32,
    /// `sock.sk_protocol` (`u16`, not a bitfield since Linux 5.6).
    pub sk_protocol: u32,
    /// `inet_sock.inet_sport` (`__be16`).
    pub inet_sport: u32,
    /// `sock_common.skc_state` (`unsigned char`).
    pub skc_state: u32,
    /// `sock.sk_err` (`int`).
    pub sk_err: u32,
    /// `tcp_sock.srtt_us` and `tcp_sock.total_retrans` (`u32`).
    pub srtt_us: u32,
    pub total_retrans: u32,
    /// `net.ns` + `ns_common.inum` (`unsigned int`): the namespace's inode number.
    pub net_inum: u32,
    /// `sock.sk_cgrp_data.cgroup` (`struct cgroup *`, Linux 5.15+), `cgroup.kn`
    /// (`struct kernfs_node *`) and `kernfs_node.id` (`u64`): the socket's cgroup id.
    /// `sk_cgroup` is 0 where the kernel has no such field: the probe then reports no cgroup.
    pub sk_cgroup: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    /// `tcp_sock.bytes_acked`, `bytes_received` (`u64`) and `rtt_min` + `minmax_sample.v`
    /// (`u32`, the current minimum).
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub rtt_min: u32,
    /// `tcp_sock.snd_una` and `write_seq` (`u32`), and `sock.sk_flags` (`unsigned long`).
    pub snd_una: u32,
    pub write_seq: u32,
    pub sk_flags: u32,
    /// `sk_buff.cb` + `tcp_skb_cb.tcp_gso_segs` (`u16`): the segments an skb stands for
    /// (`tcp_skb_pcount`).
    pub skb_gso_segs: u32,
}

/// Key of the probe's listener table: a listening port in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerKey {
    /// Address of the `struct net` the listener lives in.
    pub net: u64,
    /// The port, host byte order, widened to 64 bits so that the key has no padding bytes to
    /// zero (the probe's compiler would zero them byte by byte).
    pub port: u64,
}

/// The process that owns a socket, as the probe remembers it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// For listener entries: the listening socket, so that only it removes the entry.
    pub skaddr: u64,
    /// 8-byte aligned, like `Transition::comm`, so that it is copied with two loads.
    pub comm: [u8; COMM_LEN],
    pub pid: u32,
    pub _pad: [u8; 4],
}

const _: () = assert!(core::mem::offset_of!(Owner, comm) == 8);

/// Bits of `Transition::close_flags`.
pub mod close_flags {
    /// The peer's FIN arrived (`SOCK_DONE` in `sock.sk_flags`, set by `tcp_fin`): it counts
    /// one in `bytes_received`.
    pub const PEER_FIN: u8 = 1;
    /// This side's FIN was sent and acknowledged (it left FIN_WAIT1, FIN_WAIT2, CLOSING or
    /// LAST_ACK with `snd_una == write_seq`): it counts one in `bytes_acked`.
    pub const FIN_ACKED: u8 = 2;
}

/// `SOCK_DONE` of `enum sock_flags` (`include/net/sock.h`): a bit of `sock.sk_flags`.
pub const SOCK_DONE: u64 = 1;

/// Indices of the probe's per-CPU counters (`COUNTERS` map).
pub mod counter {
    /// Events dropped because the ring buffer was full.
    pub const LOST_RINGBUF_FULL: u32 = 0;
    /// Listeners whose owner could not be remembered because the listener table was full.
    pub const OWNERS_FULL: u32 = 1;
    /// Transitions delivered by the rescue program because the main one was busy on the CPU.
    pub const RESCUED: u32 = 2;
    /// SYN-ACK retransmissions not counted because `SYNACK_RETRANSMITS` was full.
    pub const SYNACK_PORTS_FULL: u32 = 3;
    /// Kernel field reads that failed (`bpf_probe_read_kernel` returned an error): the field
    /// is reported as 0; the transition itself is still delivered.
    pub const READ_FAILED: u32 = 4;
    /// Transitions of a TCP socket whose family is neither `AF_INET` nor `AF_INET6`: delivered
    /// with the family as read and IPv4-style addresses.
    pub const UNKNOWN_FAMILY: u32 = 5;
    /// Retransmitted segments not counted because `RETRANSMITS` was full.
    pub const RETRANSMIT_PORTS_FULL: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// The fields whose read can fail in the probe, as the `detail` of a `READ_FAILED` report
/// (its log line names the field).
pub mod field {
    pub const INET_SPORT: u32 = 0;
    pub const SRTT_US: u32 = 1;
    pub const TOTAL_RETRANS: u32 = 2;
    pub const NET_INUM: u32 = 3;
    pub const IPV6_ADDRESS: u32 = 4;
    pub const CGROUP_ID: u32 = 5;
    pub const GSO_SEGS: u32 = 6;
}

/// Direction index of the `RESETS` counters: `RESETS[direction * RESET_STATES + state]`.
pub const RESET_SENT: u32 = 0;
pub const RESET_RECEIVED: u32 = 1;
/// States per direction in `RESETS` (state 0 = no socket, e.g. a RST to a closed port).
pub const RESET_STATES: u32 = 16;

/// Slots of the `RESET_REASONS` counters: one per `enum sk_rst_reason` value (6.18 has 26);
/// a larger value is counted in the last slot.
pub const RESET_REASONS: u32 = 64;

/// Listening ports whose SYN-ACK retransmissions the probe counts (`SYNACK_RETRANSMITS`).
pub const MAX_SYNACK_PORTS: u32 = 4_096;
/// Service ports whose retransmitted segments the probe counts (`RETRANSMITS`).
pub const MAX_RETRANSMIT_PORTS: u32 = 4_096;

/// Size of the probe's listener table.
pub const MAX_LISTENERS: u32 = 16_384;
/// Number of ports in the port filter array (every u16).
pub const PORT_FILTER_LEN: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all four are #[repr(C)], made only of integers and byte arrays, with explicit
    // padding, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::Transition {}
    unsafe impl aya::Pod for super::SockOffsets {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::Owner {}
}
