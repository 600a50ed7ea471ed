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

/// One TCP state change, written by the probe into its CPU's ring of `EVENTS`.
///
/// The fields mirror what the `sock/inet_sock_set_state` tracepoint records
/// (`include/trace/events/sock.h`), plus what the probe keeps on the socket ([`SocketState`]):
/// every event is complete in itself, and needs none before it to be understood.
///
/// Two lengths in the ring: every event carries the head, its first [`HEAD_BYTES`] (who,
/// where, which states, since when); only a transition to CLOSE also carries the rest, from
/// `opened_ns` on (the connection's story, for its record). The reader takes a head-only
/// record as a whole one with the rest 0. Why: four in five transitions of a short connection
/// are not to CLOSE, and a head-only record is two cache lines of ring where a whole one was
/// four, for the probe to write and the reader to read.
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
    /// Process (thread group) id of the socket's owner, from its storage ([`SocketState::pid`]):
    /// 0 where the probe does not know it.
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
    /// Why the kernel sent a reset, its `enum sk_rst_reason` (Linux 6.10+), whose names
    /// userspace reads from BTF: in a [`SENT_RESET`] event, and in other events where
    /// `socket_flags` has [`socket::RESET_SENT`] (the socket reset before this transition).
    pub reset_reason: u16,
    /// Inode number of the socket's network namespace (`net.ns.inum`, as in
    /// `/proc/PID/ns/net -> net:[INODE]`), from its storage; 0 where it has none.
    pub netns: u32,
    /// Id of the socket's cgroup v2 cgroup (`sock.sk_cgrp_data.cgroup->kn->id`, the number
    /// `ss --cgroup` resolves and the inode of the cgroup's directory), from its storage; 0
    /// where it has none, and where the kernel does not keep it.
    pub cgroup: u64,
    /// What the probe kept on the socket ([`SocketState`]) as it stood before this transition,
    /// so that every event is complete in itself: when the socket entered `oldstate` (valid
    /// with [`socket::SINCE_SEEN`]; CLOCK_MONOTONIC ns).
    pub since_ns: u64,
    /// The service port: the remote port of an active open, the local port of a passive one
    /// and of a listener (0: the probe did not see the socket open).
    pub port: u16,
    /// [`socket`] bits: how it opened, who started closing, what is known.
    pub socket_flags: u16,
    /// How long the connection waited in its listener's accept queue, from the handshake's
    /// end to the server's `accept()`, in microseconds (0: not accepted yet, or not a passive
    /// connection); in an [`ACCEPTED`] event and, from the socket's storage, in later ones.
    pub accept_wait_us: u32,
    // The rest: in a transition to CLOSE only.
    /// From the socket's storage as it stood before this transition: when it began to open,
    /// became ESTABLISHED and left it (each 0: not seen; CLOCK_MONOTONIC ns).
    pub opened_ns: u64,
    pub established_ns: u64,
    pub teardown_ns: u64,
    /// At every transition to CLOSE (else 0), what the connection carried and how it went,
    /// from the kernel's own counters on the socket (`struct tcp_sock`): `bytes_acked`
    /// (bytes sent that the peer acknowledged), `bytes_received`, the minimum RTT seen
    /// (`rtt_min`, microseconds) and `total_retrans` (segments retransmitted, SYNs included).
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub rtt_min_us: u32,
    pub total_retrans: u32,
    /// At every transition to CLOSE (else 0): `tcp_sock.dsack_dups`, segments the peer
    /// reported received twice (D-SACK): retransmissions that were not needed.
    pub dsack_dups: u32,
    /// At every transition to CLOSE (else 0): the time the connection had data to send, in
    /// jiffies, by what held it back (`tcp_sock.chrono_stat`, with the stretch under way
    /// added, as `tcp_info` does): [`chrono::BUSY`] (the network: congestion window,
    /// pacing), [`chrono::RWND_LIMITED`] (the receiver's window), [`chrono::SNDBUF_LIMITED`]
    /// (this side's send buffer). Their sum is `tcpi_busy_time`.
    pub chrono_jiffies: [u32; 3],
    /// Segments retransmitted so far, by kind, as the probe counted them on the socket
    /// ([`SocketState::retransmits`], from its storage; 0 where it has none).
    pub retransmits: [u32; retransmit::STORED],
}

/// Indexes of [`Transition::chrono_jiffies`]: the kernel's `enum tcp_chrono` less one.
pub mod chrono {
    pub const BUSY: usize = 0;
    pub const RWND_LIMITED: usize = 1;
    pub const SNDBUF_LIMITED: usize = 2;
}

/// Bytes of a [`Transition`] that every event carries: up to `opened_ns`.
pub const HEAD_BYTES: usize = core::mem::offset_of!(Transition, opened_ns);

/// What a whole [`Transition`] takes in a ring, padded: with the ring's 8-byte record header
/// (`BPF_RINGBUF_HDR_SZ`), a head-only record is 128 bytes and a whole one 256, so that every
/// record starts on a 64-byte cache line and a head-only one spans two lines, never three.
pub const WHOLE_RECORD_BYTES: usize = 248;

// The layout both sides rely on: no implicit padding, `comm` and the retransmission counters
// 8-byte aligned, records a whole number of cache lines with the ring's header.
const _: () = assert!(core::mem::size_of::<Transition>() == 200);
const _: () = assert!(core::mem::offset_of!(Transition, comm) == 56);
const _: () = assert!(core::mem::offset_of!(Transition, retransmits).is_multiple_of(8));
const _: () = assert!(HEAD_BYTES == 120);
const _: () = assert!((HEAD_BYTES + 8).is_multiple_of(64));
const _: () = assert!((WHOLE_RECORD_BYTES + 8).is_multiple_of(64));
const _: () = assert!(WHOLE_RECORD_BYTES >= core::mem::size_of::<Transition>());

/// What the probe keeps on each TCP socket, in BPF socket storage (the `SOCKETS` map; freed by
/// the kernel with the socket): what the transitions so far tell, so that each new one is
/// stamped with it. A passive child starts with a copy of its listener's (the map is
/// `BPF_F_CLONE`): the owner, cgroup and namespace of the process that listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// When the socket entered `state` (valid with [`socket::SINCE_SEEN`]), began to open,
    /// became ESTABLISHED, left ESTABLISHED (0: not seen); CLOCK_MONOTONIC ns.
    pub since_ns: u64,
    pub opened_ns: u64,
    pub established_ns: u64,
    pub teardown_ns: u64,
    /// The socket's cgroup v2 id (0: not known), as in [`Transition::cgroup`].
    pub cgroup: u64,
    /// The owner: named at SYN_SENT and LISTEN (the process that connects or listens), a
    /// listener's for its children, or by userspace for a socket older than the probe
    /// ([`socket::SEEDED`]); pid 0 and an empty name when not known.
    pub comm: [u8; COMM_LEN],
    pub pid: u32,
    /// The socket's network namespace inode.
    pub netns: u32,
    /// The service port, as [`Transition::port`].
    pub port: u16,
    /// [`socket`] bits.
    pub flags: u16,
    /// Why the socket last sent a reset (`enum sk_rst_reason`; valid with
    /// [`socket::RESET_SENT`]).
    pub reset_reason: u16,
    /// The state the probe last saw the socket enter (0: none yet).
    pub state: u8,
    pub _pad: u8,
    /// Segments retransmitted since it opened, by kind, indexed by the [`retransmit`] kinds
    /// below [`retransmit::STORED`]: timeouts, fast retransmits and tail loss probes as the
    /// retransmission program tells them, and the handshake's (SYNs of an active open,
    /// SYN-ACKs of a passive one: `tcp_sock.total_retrans` when it became ESTABLISHED, which
    /// for a passive child starts from its request socket's retransmissions).
    pub retransmits: [u32; retransmit::STORED],
    /// As [`Transition::accept_wait_us`].
    pub accept_wait_us: u32,
    pub _pad2: u32,
}

const _: () = assert!(core::mem::size_of::<SocketState>() == 96);
const _: () = assert!(core::mem::offset_of!(SocketState, comm) == 40);

/// Bits of [`SocketState::flags`] and [`Transition::socket_flags`].
pub mod socket {
    /// The probe saw the socket open: it connected (CLOSE -> SYN_SENT) ...
    pub const ACTIVE: u16 = 1;
    /// ... or it is a listener's child (LISTEN -> SYN_RECV).
    pub const PASSIVE: u16 = 2;
    /// It left ESTABLISHED for FIN_WAIT1: this side sent the first FIN ...
    pub const TEARDOWN_HERE: u16 = 4;
    /// ... for CLOSE_WAIT: the peer did. Both bits: both at once (FIN_WAIT1 -> CLOSING).
    pub const TEARDOWN_PEER: u16 = 8;
    /// `since_ns` is when the probe saw the socket enter its state.
    pub const SINCE_SEEN: u16 = 16;
    /// In an event: the tracepoint's old state is not the one the probe saw the socket enter;
    /// a transition was skipped (the kernel changed the state without the tracepoint, or the
    /// probe missed a run). The dwell is then not known.
    pub const SKIPPED: u16 = 32;
    /// The owner was given by userspace from the process holding the socket (`/proc`): the
    /// socket is older than the probe.
    pub const SEEDED: u16 = 64;
    /// `reset_reason` holds why the socket last sent a reset.
    pub const RESET_SENT: u16 = 128;
}

/// `newstate` of an event that is not a state change: the socket sent a reset
/// (`tcp/tcp_send_reset`). `oldstate` is the state the socket is in (CLOSE when it reset as it
/// closed, which is when most resets are sent), `reset_reason` says why, and the owner,
/// namespace, cgroup and counters are 0. Sent only when userspace asks for them (`RESET_EVENTS`)
/// and the kernel gives a reason; never by listeners, request or TIME-WAIT sockets.
pub const SENT_RESET: u8 = 0x40;

/// `newstate` of an event that is not a state change: the server accepted the connection
/// (`inet_csk_accept` returned it). `oldstate` is its state then (ESTABLISHED, or CLOSE_WAIT
/// when the client already closed), `accept_wait_us` how long it waited in the accept queue.
pub const ACCEPTED: u8 = 0x41;

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
    /// `inet_connection_sock.icsk_ca_state` (a 5-bit bitfield, `enum tcp_ca_state`): the byte
    /// that holds it, its shift in that byte and its mask. `struct tcp_sock` starts with
    /// `struct inet_connection_sock`.
    pub icsk_ca_state: u32,
    pub icsk_ca_state_shift: u32,
    pub icsk_ca_state_mask: u32,
    /// `sk_buff.head` (`unsigned char *`), `network_header` and `transport_header` (`__u16`
    /// offsets from `head`; `~0` when not set) and `protocol` (`__be16`, the ethertype).
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_protocol: u32,
    /// `tcp_sock.chrono_start` (`u32`, `tcp_jiffies32` when the current stretch began),
    /// `chrono_stat` (`u32[3]`, jiffies), and `chrono_type` (a 2-bit bitfield, `enum
    /// tcp_chrono`: the byte, shift and mask), and `dsack_dups` (`u32`).
    pub chrono_start: u32,
    pub chrono_stat: u32,
    pub chrono_type: u32,
    pub chrono_type_shift: u32,
    pub chrono_type_mask: u32,
    pub dsack_dups: u32,
}

/// Why a segment was retransmitted: the kind of `RETRANSMITS` keys (`kind << 16 | port`),
/// told in `tcp/tcp_retransmit_skb` from the socket's state and its congestion-avoidance
/// state (`icsk_ca_state`).
pub mod retransmit {
    /// In the Loss state: the retransmission timer fired (RTO), and the segments resent in
    /// slow start after it (the kernel's `TCPTimeouts` and `TCPSlowStartRetrans`).
    pub const TIMEOUT: u16 = 0;
    /// In the Recovery state: duplicate ACKs, SACK or RACK found a segment lost while the
    /// flow went on (`TCPFastRetrans`).
    pub const FAST: u16 = 1;
    /// In Open, Disorder or CWR: the tail loss probe timer fired and the last segment was
    /// resent to draw an ACK (`TCPLossProbes`, which also counts probes of new data).
    pub const TAIL_LOSS_PROBE: u16 = 2;
    /// A connect's SYN (in SYN_SENT).
    pub const SYN: u16 = 3;
    /// A SYN-ACK: a request socket's (`tcp/tcp_retransmit_synack`) or a Fast Open child's.
    pub const SYNACK: u16 = 4;
    /// A socket that is not a full TCP socket: the probe cannot read its state.
    pub const OTHER: u16 = 5;
    pub const KINDS: usize = 6;
    /// The kinds a socket's storage counts ([`super::SocketState::retransmits`]): the first
    /// four, where the fourth, [`SYN`], stands for the handshake's retransmissions of either
    /// side (SYN-ACKs on a passive connection).
    pub const STORED: usize = 4;
    pub const HANDSHAKE: usize = SYN as usize;
    /// The `kind` label values, indexed by kind.
    pub const NAMES: [&str; KINDS] = [
        "timeout",
        "fast",
        "tail_loss_probe",
        "syn",
        "synack",
        "other",
    ];

    /// The `kind` label value of `kind`; `other` for a kind this build does not know.
    pub fn name(kind: u16) -> &'static str {
        match NAMES.get(kind as usize) {
            Some(name) => name,
            None => NAMES[OTHER as usize],
        }
    }

    /// `enum tcp_ca_state` (`include/uapi/linux/tcp.h`, user ABI).
    pub const TCP_CA_RECOVERY: u8 = 3;
    pub const TCP_CA_LOSS: u8 = 4;
}

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
    /// Transitions delivered by the rescue program because the main one was busy on the CPU.
    pub const RESCUED: u32 = 1;
    /// SYN-ACK retransmissions not counted because `SYNACK_RETRANSMITS` was full.
    pub const SYNACK_PORTS_FULL: u32 = 2;
    /// Kernel field reads that failed (`bpf_probe_read_kernel` returned an error): the field
    /// is reported as 0; the transition itself is still delivered.
    pub const READ_FAILED: u32 = 3;
    /// Transitions of a TCP socket whose family is neither `AF_INET` nor `AF_INET6`: delivered
    /// with the family as read and IPv4-style addresses.
    pub const UNKNOWN_FAMILY: u32 = 4;
    /// Retransmitted segments not counted because `RETRANSMITS` was full.
    pub const RETRANSMIT_PORTS_FULL: u32 = 5;
    /// Transitions whose old state was not the one the probe last saw the socket enter
    /// ([`socket::SKIPPED`](crate::socket::SKIPPED)).
    pub const SKIPPED: u32 = 6;
    /// Transitions of sockets on which the kernel refused socket storage (a dying socket, or
    /// `net.core.optmem_max` reached): delivered without what the storage would tell.
    pub const NO_STORAGE: u32 = 7;
    /// TCP packets dropped but not counted because `DROPS` was full.
    pub const DROP_PORTS_FULL: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// The fields whose read can fail in the probe, as the `detail` of a `READ_FAILED` report
/// (its log line names the field).
pub mod field {
    pub const INET_SPORT: u32 = 0;
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
/// (service port, kind) pairs whose retransmitted segments the probe counts
/// (`RETRANSMITS`): a port takes one slot per kind it has seen.
pub const MAX_RETRANSMIT_PORTS: u32 = 8_192;

/// (reason, service port, cgroup) keys of dropped TCP packets the probe counts (`DROPS`).
pub const MAX_DROP_KEYS: u32 = 4_096;

/// A key of the probe's `DROPS` map: a dropped TCP packet's reason (`enum skb_drop_reason`),
/// its service port, and the cgroup of the socket it was for, where the kernel names that
/// socket (`kfree_skb`'s `rx_sk`, Linux 6.11+, with the probe's storage on it; 0 otherwise).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub cgroup: u64,
    pub reason: u16,
    pub port: u16,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<DropKey>() == 16);

/// Number of ports in the port filter array (every u16).
pub const PORT_FILTER_LEN: u32 = 65_536;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are #[repr(C)], made only of integers and byte arrays, with explicit
    // padding, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::Transition {}
    unsafe impl aya::Pod for super::SockOffsets {}
    unsafe impl aya::Pod for super::SocketState {}
    unsafe impl aya::Pod for super::DropKey {}
}
