//! Each socket's own state, in BPF socket storage (`SOCKETS`): made on the socket's first
//! transition the probe sees, started afresh at each opening (a listener's child starting
//! from its listener's copy), and moved past each transition.

use super::*;

/// This socket's storage in `SOCKETS`, made (zeroed) when `create` and there is none; null
/// when there is none, or the kernel refuses one (a dying socket, `optmem_max` reached, or
/// hard-irq context).
#[inline(always)]
pub(crate) fn socket_state(sk: *const u8, create: bool) -> *mut SocketState {
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
pub(crate) unsafe fn prepare(
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
    // Volatile stores: adjacent plain ones become a call to a byte-wise memset.
    addr_of_mut!(s.since_ns).write_volatile(0);
    addr_of_mut!(s.opened_ns).write_volatile(0);
    addr_of_mut!(s.established_ns).write_volatile(0);
    addr_of_mut!(s.teardown_ns).write_volatile(0);
    s.reset_reason = 0;
    let kinds = addr_of_mut!(s.retransmits) as *mut u64;
    kinds.write_volatile(0);
    kinds.add(1).write_volatile(0);
    s.accept_wait_us = 0;
    s.state = old;
    false
}

/// Moves the socket's state past this transition.
#[inline(always)]
pub(crate) fn advance(
    s: &mut SocketState,
    old: u8,
    new: u8,
    now: u64,
    srtt_us: u32,
    handshake_retransmits: u32,
) {
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
        s.retransmits[retransmit::HANDSHAKE] = handshake_retransmits;
    }
    s.state = new;
    s.since_ns = now;
    s.flags |= socket::SINCE_SEEN;
}

/// The inode of the socket's network namespace (`net.ns.inum`).
#[inline(always)]
pub(crate) fn net_inum(ctx: &BtfTracePointContext, sk: *const u8) -> u32 {
    // SAFETY: `skc_net` is a `possible_net_t` (one `struct net *`) of `struct sock_common`,
    // loaded directly; its `ns.inum` is read with the helper (a plain pointer, not a
    // BTF-typed one).
    let net = unsafe { field::<u64>(sk, offset!(skc_net)) } as *const u8;
    read_or_report(ctx, net, offset!(net_inum), field::NET_INUM)
}

/// The id of the socket's cgroup v2 cgroup (`sk->sk_cgrp_data.cgroup->kn->id`, what
/// `cgroup_id()` returns and sock_diag reports), or 0 where this kernel does not keep it.
///
/// Read on the opening transitions only, like the namespace: a socket keeps the cgroup it was
/// created in (a passive child its listener's, copied by `sk_clone_lock`), so userspace
/// carries it from there.
#[inline(always)]
pub(crate) fn cgroup_id(ctx: &BtfTracePointContext, sk: *const u8) -> u64 {
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
