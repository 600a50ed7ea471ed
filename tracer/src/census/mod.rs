//! The scrape path: the census of every socket ([`scrape`] runs it and publishes it),
//! joined with what the probe keeps on each ([`join`]), owners from `/proc` ([`owners`]),
//! what is stuck ([`stuck`]) and the `/sockets` listing ([`listing`]).
//!
//! This module: the socket census itself, every TCP socket the kernel has right now, from the
//! sock_diag netlink interface (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`), as `ss -tan`
//! reads it.
//!
//! Owns: the netlink dump ([`dump_tcp`], I/O, in the calling thread's network namespace) and
//! its decoding ([`parse`], pure, unit-tested on messages built with the same crate); the
//! visit of every network namespace on the host ([`all_namespaces`]) with the facts read
//! there (`ip_local_port_range`, TcpExt listen counters).
//! It sees what the tracepoint never reports: TIME-WAIT sockets and request sockets; and in
//! the same dump, each socket's storage in the probe's `SOCKETS` map
//! (`INET_DIAG_REQ_SK_BPF_STORAGES`, Linux 5.2+), which is what the probe knows of it.

pub mod failure;
pub mod figures;
pub mod join;
pub mod listing;
pub mod owners;
pub mod scrape;
pub mod stuck;
pub mod view;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags, Timer},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};
use tracer_common::{state, SocketState};

/// One socket of the census.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketRecord {
    /// Kernel TCP state number (`include/net/tcp_states.h`); the kernel reports request
    /// sockets as `SYN_RECV` (3, `inet_req_diag_fill`, though they are `NEW_SYN_RECV`
    /// inside), TIME-WAIT sockets as `TIME_WAIT` (6).
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// For listeners: the accept queue length and its limit (`idiag_rqueue`, `idiag_wqueue`);
    /// for other sockets the bytes queued to read and to send.
    pub rqueue: u32,
    pub wqueue: u32,
    /// Inode of the socket file (0 for TIME-WAIT and request sockets, which have none).
    pub inode: u32,
    /// The socket's cookie (`idiag_cookie`), the one the probe reports.
    pub cookie: u64,
    /// The retransmission timer when it is armed (`idiag_timer` 1): time until it fires and
    /// retransmissions so far. For request sockets this is the SYN-ACK timer.
    pub retransmit: Option<(std::time::Duration, u8)>,
    /// The socket's cgroup v2 id (`INET_DIAG_CGROUP_ID`, Linux 5.7+); 0 for TIME-WAIT and
    /// request sockets, which the kernel reports without one.
    pub cgroup: u64,
    /// What the probe keeps on the socket (`SocketState`), when it has storage: sockets the
    /// probe saw change state, or whose owner it was given at start. Never for TIME-WAIT and
    /// request sockets (not full sockets).
    pub storage: Option<SocketState>,
    /// The socket's option memory (`sk_omem_alloc`, `INET_DIAG_SKMEMINFO`), where the kernel
    /// charges its storage; 0 where not reported.
    pub optmem: u32,
    /// The connection's counters from the kernel's `tcp_info` (`INET_DIAG_INFO`), for full
    /// sockets.
    pub tcp: Option<TcpCounters>,
    /// A full socket: the kernel sent its memory figures, which it does only for full sockets.
    /// Not for request sockets, nor for TIME-WAIT sockets, which sock_diag reports in their
    /// substate: `FIN_WAIT2` for one that entered TIME-WAIT from FIN_WAIT2 (what `ss` shows
    /// as an orphaned FIN-WAIT-2), `TIME_WAIT` otherwise.
    pub full: bool,
}

/// What a census reads of a connection's `struct tcp_info` (`include/uapi/linux/tcp.h`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// `tcpi_bytes_acked` and `tcpi_bytes_received` (Linux 4.1+): sequence space acknowledged
    /// and received, SYN and FINs included.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// `tcpi_total_retrans`: segments retransmitted.
    pub total_retrans: u32,
    /// `tcpi_rtt` (smoothed) and `tcpi_min_rtt`, microseconds.
    pub rtt_us: u32,
    pub min_rtt_us: u32,
    /// `tcpi_busy_time`, `tcpi_rwnd_limited`, `tcpi_sndbuf_limited` (microseconds, Linux
    /// 4.10+) and `tcpi_dsack_dups` (Linux 5.3+; 0 where the kernel sends less).
    pub busy_us: u64,
    pub rwnd_limited_us: u64,
    pub sndbuf_limited_us: u64,
    pub dsack_dups: u32,
    /// `tcpi_snd_wnd`: the window the peer advertises now, bytes (0: a zero window, the
    /// peer's application not reading); None where the kernel does not send it.
    pub snd_wnd: Option<u32>,
}

impl TcpCounters {
    /// Reads the fields at their offsets in `struct tcp_info`, a stable ABI that only grows;
    /// None when the kernel sent too little (older than `tcpi_min_rtt`, Linux 4.10).
    pub fn parse(info: &[u8]) -> Option<TcpCounters> {
        let u32_at = |at: usize| Some(u32::from_ne_bytes(info.get(at..at + 4)?.try_into().ok()?));
        let u64_at = |at: usize| Some(u64::from_ne_bytes(info.get(at..at + 8)?.try_into().ok()?));
        Some(TcpCounters {
            rtt_us: u32_at(68)?,
            total_retrans: u32_at(100)?,
            bytes_acked: u64_at(120)?,
            bytes_received: u64_at(128)?,
            min_rtt_us: u32_at(148)?,
            busy_us: u64_at(168)?,
            rwnd_limited_us: u64_at(176)?,
            sndbuf_limited_us: u64_at(184)?,
            dsack_dups: u32_at(216).unwrap_or(0),
            snd_wnd: u32_at(228),
        })
    }
}

/// The probe's socket storage map, whose values a census asks sock_diag for.
pub type StorageMap = Arc<OwnedFd>;

/// The census of every namespace, and how many namespaces could not be entered.
#[derive(Clone, Debug, Default)]
pub struct HostCensus {
    pub namespaces: Vec<NetnsCensus>,
    /// Namespaces found but not visited (no permission to open or enter them, or their
    /// census failed): their sockets are missing from this census.
    pub unreachable: u64,
    /// CPU time the walk over every namespace took (its thread's own).
    pub cpu: std::time::Duration,
}

/// What one network namespace holds.
#[derive(Clone, Debug, Default)]
pub struct NetnsCensus {
    /// The namespace's inode number, as in `/proc/PID/ns/net -> net:[INODE]`.
    pub netns: u64,
    pub sockets: Vec<SocketRecord>,
    /// `net.ipv4.ip_local_port_range` there (inclusive).
    pub port_range: (u16, u16),
    /// `TcpExt: ListenOverflows` and `ListenDrops` from its `/proc/net/netstat`.
    pub listen_overflows: u64,
    pub listen_drops: u64,
    /// `Tcp: OutSegs` from its `/proc/net/snmp`: segments sent.
    pub out_segs: u64,
    /// CLOCK_MONOTONIC ns just before its sockets were dumped: a socket the agent saw change
    /// state before this, and the dump does not show, is gone.
    pub dumped_at_ns: u64,
    /// CLOCK_MONOTONIC ns just after: every socket was read between the two (a busy host's
    /// census thread, niced, can wait tens of milliseconds for a CPU in between).
    pub dumped_until_ns: u64,
}

/// Takes the census of every network namespace on the host: those a process is in (found
/// through `/proc/*/ns/net`) and those named by `ip netns` (`/run/netns/*`), which may hold
/// sockets with no process inside. A thread enters each in turn (`setns`). Namespaces that
/// disappear meanwhile are skipped.
pub fn all_namespaces(storage: Option<StorageMap>) -> Result<HostCensus> {
    let own = std::fs::metadata("/proc/thread-self/ns/net")
        .context("reading this thread's network namespace")?
        .ino();
    let mut found: BTreeMap<u64, PathBuf> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc")
        .context("listing /proc")?
        .flatten()
    {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        if let Ok(meta) = std::fs::metadata(&path) {
            found.entry(meta.ino()).or_insert(path);
        }
    }
    if let Ok(named) = std::fs::read_dir("/run/netns") {
        for entry in named.flatten() {
            if let Ok(meta) = std::fs::metadata(entry.path()) {
                found.entry(meta.ino()).or_insert(entry.path());
            }
        }
    }
    std::thread::spawn(move || {
        let mut out = HostCensus {
            namespaces: Vec::with_capacity(found.len()),
            unreachable: 0,
            cpu: std::time::Duration::ZERO,
        };
        // Our own namespace first, without a setns.
        let storage = storage.as_deref();
        out.namespaces.push(netns_census(own, storage)?);
        for (ino, path) in found.into_iter().filter(|(ino, _)| *ino != own) {
            let Ok(ns) = std::fs::File::open(&path) else {
                out.unreachable += 1;
                continue;
            };
            // SAFETY: setns on an open namespace fd; it moves only this (short-lived) thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                out.unreachable += 1;
                continue;
            }
            match netns_census(ino, storage) {
                Ok(c) => out.namespaces.push(c),
                Err(_) => out.unreachable += 1,
            }
        }
        out.cpu = thread_cpu_time();
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow!("the census thread panicked"))?
}

/// CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID): time stopped, waiting or
/// preempted does not count.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The census of the calling thread's current network namespace.
fn netns_census(netns: u64, storage: Option<&OwnedFd>) -> Result<NetnsCensus> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading ip_local_port_range")?;
    let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")
        .context("reading /proc/net/netstat")?;
    let tcp_ext = parse_netstat(&netstat, "TcpExt");
    let snmp =
        std::fs::read_to_string("/proc/thread-self/net/snmp").context("reading /proc/net/snmp")?;
    let tcp = parse_netstat(&snmp, "Tcp");
    let dumped_at_ns = crate::stream::ring::monotonic_ns();
    let sockets = dump_tcp(storage)?;
    Ok(NetnsCensus {
        netns,
        dumped_at_ns,
        dumped_until_ns: crate::stream::ring::monotonic_ns(),
        sockets,
        port_range: parse_port_range(&range).context("parsing ip_local_port_range")?,
        listen_overflows: tcp_ext.get("ListenOverflows").copied().unwrap_or(0),
        listen_drops: tcp_ext.get("ListenDrops").copied().unwrap_or(0),
        out_segs: tcp.get("OutSegs").copied().unwrap_or(0),
    })
}

/// Parses `ip_local_port_range` ("32768\t60999").
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(|v| v.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// Parses one section of `/proc/net/netstat`: a line of names and a line of values, both
/// starting with `Section:`.
pub fn parse_netstat(text: &str, section: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{section}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

/// Every TCP socket, IPv4 and IPv6, in the calling thread's network namespace, with its
/// storage in `storage` (the probe's map) where it has one.
pub fn dump_tcp(storage: Option<&OwnedFd>) -> Result<Vec<SocketRecord>> {
    let mut socket =
        Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .context("connecting the netlink socket")?;
    let mut records = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_family(&socket, family, storage, &mut records)
            .with_context(|| format!("sock_diag dump of family {family}"))?;
    }
    Ok(records)
}

/// The states the census asks sock_diag for, as bits `1 << state`: ESTABLISHED (1) to
/// NEW_SYN_RECV (12, request sockets, which the crate's flags do not name). Not
/// TCP_BOUND_INACTIVE (13, Linux 6.8+): a socket that was only bound, neither listening nor
/// connected, which `ss` does not show either and which is no connection.
pub const CENSUS_STATES: u32 = ((1 << 13) - 1) & !1;

fn dump_family(
    socket: &Socket,
    family: u8,
    storage: Option<&OwnedFd>,
    out: &mut Vec<SocketRecord>,
) -> Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::SKMEMINFO | ExtensionFlags::INFO,
            states: StateFlags::from_bits_retain(CENSUS_STATES),
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    if let Some(map) = storage {
        ask_for_storage(&mut buf, map.as_raw_fd() as u32);
    }
    socket.send(&buf, 0).context("sending the dump request")?;

    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let n = socket
            .recv(&mut &mut receive[..], 0)
            .context("receiving the dump")?;
        if n == 0 {
            bail!("netlink socket closed mid-dump");
        }
        if parse(&receive[..n], out)? {
            return Ok(());
        }
    }
}

/// Decodes one datagram of a dump into `out`. Returns true at the dump's end (NLMSG_DONE).
pub fn parse(mut bytes: &[u8], out: &mut Vec<SocketRecord>) -> Result<bool> {
    while !bytes.is_empty() {
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
            .map_err(|e| anyhow!("malformed sock_diag message: {e}"))?;
        let len = message.header.length as usize;
        match message.payload {
            // A dump that failed once it had started ends with its errno in NLMSG_DONE
            // (netlink_dump): on Linux 6.1 a missing tcp_diag ends the dump so, and read
            // as a plain end it was an empty census, every socket gone.
            NetlinkPayload::Done(d) if d.code < 0 => {
                return Err(failure::SockDiagRefused(-d.code).into());
            }
            NetlinkPayload::Done(_) => return Ok(true),
            // The kernel sends a negative errno.
            NetlinkPayload::Error(e) => {
                let errno = e.code.map_or(libc::EIO, |c| c.get().saturating_neg());
                return Err(failure::SockDiagRefused(errno).into());
            }
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                let h = r.header;
                let memory = r.nlas.iter().find_map(|n| match n {
                    Nla::MemInfo(m) => Some(m),
                    _ => None,
                });
                out.push(SocketRecord {
                    state: h.state,
                    local: SocketAddr::new(h.socket_id.source_address, h.socket_id.source_port),
                    remote: SocketAddr::new(
                        h.socket_id.destination_address,
                        h.socket_id.destination_port,
                    ),
                    rqueue: h.recv_queue,
                    wqueue: h.send_queue,
                    inode: h.inode,
                    cookie: cookie(&h.socket_id.cookie),
                    retransmit: match h.timer {
                        Some(Timer::Retransmit(expires, retransmits)) => {
                            Some((expires, retransmits))
                        }
                        _ => None,
                    },
                    cgroup: r.nlas.iter().find_map(cgroup_id).unwrap_or(0),
                    storage: r.nlas.iter().find_map(socket_storage),
                    optmem: memory.map_or(0, |m| m.options),
                    tcp: r.nlas.iter().find_map(|n| match n {
                        Nla::TcpInfo(info) => TcpCounters::parse(info),
                        _ => None,
                    }),
                    full: memory.is_some(),
                });
            }
            _ => {}
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN).
        let step = (len + 3) & !3;
        if len == 0 || step > bytes.len() {
            break;
        }
        bytes = &bytes[step..];
    }
    Ok(false)
}

/// `INET_DIAG_CGROUP_ID` (`include/uapi/linux/inet_diag.h`), which the crate does not name:
/// a host-order `u64`, sent for every full socket.
const INET_DIAG_CGROUP_ID: u16 = 21;

fn cgroup_id(nla: &Nla) -> Option<u64> {
    if nla.kind() != INET_DIAG_CGROUP_ID || nla.value_len() != 8 {
        return None;
    }
    let mut value = [0u8; 8];
    nla.emit_value(&mut value);
    Some(u64::from_ne_bytes(value))
}

/// Attribute numbers of `include/uapi/linux/inet_diag.h` and `sock_diag.h`, which the crate
/// does not name.
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
/// `nla_type` masks the nested and byte-order flags off an attribute's type.
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// Appends to a serialized dump request the attribute that asks for each socket's storage in
/// map `fd` (`INET_DIAG_REQ_SK_BPF_STORAGES` holding one `SK_DIAG_BPF_STORAGE_REQ_MAP_FD`,
/// as `ss --bpf-map-id` sends it), and fixes the message's length.
fn ask_for_storage(request: &mut Vec<u8>, fd: u32) {
    let inner = 4 + 4;
    request.extend_from_slice(&((4 + inner) as u16).to_ne_bytes());
    request.extend_from_slice(&(INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
    request.extend_from_slice(&(inner as u16).to_ne_bytes());
    request.extend_from_slice(&SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
    request.extend_from_slice(&fd.to_ne_bytes());
    let len = request.len() as u32;
    request[..4].copy_from_slice(&len.to_ne_bytes());
}

/// The probe's `SocketState` in an `INET_DIAG_SK_BPF_STORAGES` attribute: a list of
/// `SK_DIAG_BPF_STORAGE`, each holding a map id and the value (`bpf_sk_storage_diag_put`).
/// Only the probe's map is asked for, so the first value of the right size is its own.
fn socket_storage(nla: &Nla) -> Option<SocketState> {
    if nla.kind() & NLA_TYPE_MASK != INET_DIAG_SK_BPF_STORAGES {
        return None;
    }
    let mut value = vec![0u8; nla.value_len()];
    nla.emit_value(&mut value);
    let state = attributes(&value)
        .filter(|(kind, _)| *kind == SK_DIAG_BPF_STORAGE)
        .flat_map(|(_, storage)| attributes(storage))
        .find(|(kind, v)| {
            *kind == SK_DIAG_BPF_STORAGE_MAP_VALUE && v.len() == std::mem::size_of::<SocketState>()
        })
        // SAFETY: the length was checked and SocketState is plain old data (every bit pattern
        // valid); read_unaligned does not need the buffer's alignment.
        .map(|(_, v)| unsafe { std::ptr::read_unaligned(v.as_ptr().cast::<SocketState>()) });
    state
}

/// The netlink attributes packed in `bytes` (each a 4-byte header, its value, padding to 4),
/// as (type without flags, value); stops at the first malformed one.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let value = &bytes[4..len];
        bytes = &bytes[((len + 3) & !3).min(bytes.len())..];
        Some((kind, value))
    })
}

/// `idiag_cookie` is two host-order `u32`s, low word first (`sock_diag_save_cookie`).
fn cookie(bytes: &[u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let hi = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Sockets per state (index = kernel state number). Request sockets count as `SYN_RECV`, as
/// the kernel reports them and `ss` shows them (a `NEW_SYN_RECV` would too), and index 12
/// stays 0.
pub fn count_by_state(records: &[SocketRecord]) -> [u64; 13] {
    let mut counts = [0u64; 13];
    for r in records {
        let s = if r.state == state::NEW_SYN_RECV {
            state::SYN_RECV
        } else {
            r.state
        };
        if let Some(c) = counts.get_mut(s as usize) {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_census_asks_for_every_state_but_bound_only_sockets() {
        for st in 1..=12u32 {
            assert_ne!(CENSUS_STATES & (1 << st), 0, "state {st}");
        }
        assert_eq!(CENSUS_STATES & (1 << 13), 0, "TCP_BOUND_INACTIVE");
        assert_eq!(CENSUS_STATES & 1, 0);
    }
    use netlink_packet_core::{DefaultNla, DoneMessage};
    use netlink_packet_sock_diag::inet::{InetResponse, InetResponseHeader};

    fn response(state: u8, sport: u16, rqueue: u32) -> NetlinkMessage<SockDiagMessage> {
        let mut id = SocketId::new_v4();
        id.source_port = sport;
        id.destination_port = 40_000;
        id.source_address = "127.0.0.1".parse().unwrap();
        id.destination_address = "127.0.0.2".parse().unwrap();
        let (lo, hi) = (0x1234_5678u32, 0x9u32);
        id.cookie[..4].copy_from_slice(&lo.to_ne_bytes());
        id.cookie[4..].copy_from_slice(&hi.to_ne_bytes());
        let header = InetResponseHeader {
            family: AF_INET,
            state,
            // Request sockets carry their SYN-ACK timer, as the kernel fills it.
            timer: (state == 12).then_some(Timer::Retransmit(
                std::time::Duration::from_millis(1_500),
                2,
            )),
            socket_id: id,
            recv_queue: rqueue,
            send_queue: 128,
            uid: 0,
            inode: 77,
        };
        let mut m = NetlinkMessage::new(
            NetlinkHeader::default(),
            SockDiagMessage::InetResponse(Box::new(InetResponse {
                header,
                nlas: Default::default(),
            }))
            .into(),
        );
        m.finalize();
        m
    }

    fn bytes(messages: &[NetlinkMessage<SockDiagMessage>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            let mut b = vec![0; m.buffer_len()];
            m.serialize(&mut b);
            out.extend_from_slice(&b);
        }
        out
    }

    #[test]
    fn parses_every_socket_of_a_datagram_and_stops_at_done() {
        let mut done = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::<SockDiagMessage>::Done(DoneMessage::default()),
        );
        done.finalize();
        let datagram = bytes(&[
            response(10, 80, 3),
            response(1, 80, 0),
            response(12, 80, 0),
            done,
        ]);
        let mut out = Vec::new();
        assert!(parse(&datagram, &mut out).unwrap());
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].local, "127.0.0.1:80".parse().unwrap());
        assert_eq!(out[0].remote, "127.0.0.2:40000".parse().unwrap());
        assert_eq!(
            (out[0].state, out[0].rqueue, out[0].wqueue, out[0].inode),
            (10, 3, 128, 77)
        );
        assert_eq!(out[0].cookie, 0x9_1234_5678);
        assert_eq!(
            (out[0].retransmit, out[2].retransmit),
            (None, Some((std::time::Duration::from_millis(1_500), 2)))
        );
    }

    #[test]
    fn an_error_answer_is_sock_diags_errno_not_a_message_dump() {
        let mut error = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::<SockDiagMessage>::Error(netlink_packet_core::ErrorMessage::default()),
        );
        if let NetlinkPayload::Error(e) = &mut error.payload {
            e.code = std::num::NonZeroI32::new(-libc::ENOENT);
        }
        error.finalize();
        let e = parse(&bytes(&[error]), &mut Vec::new()).unwrap_err();
        assert_eq!(
            e.downcast_ref::<failure::SockDiagRefused>(),
            Some(&failure::SockDiagRefused(libc::ENOENT))
        );
        assert_eq!(failure::Failure::of(&e), failure::Failure::SockDiagMissing);
    }

    #[test]
    fn a_dump_that_ends_with_an_errno_is_that_error_not_an_empty_census() {
        let mut done = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::<SockDiagMessage>::Done(DoneMessage::default()),
        );
        if let NetlinkPayload::Done(d) = &mut done.payload {
            d.code = -libc::ENOENT;
        }
        done.finalize();
        let e = parse(&bytes(&[response(1, 80, 0), done]), &mut Vec::new()).unwrap_err();
        assert_eq!(failure::Failure::of(&e), failure::Failure::SockDiagMissing);
    }

    #[test]
    fn a_full_sockets_cgroup_id_is_read_and_one_without_is_zero() {
        let mut full = response(1, 80, 0);
        if let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) = &mut full.payload {
            // As inet_diag_msg_attrs_fill puts it: a host-order u64 (INET_DIAG_CGROUP_ID).
            let id = 4_242u64.to_ne_bytes().to_vec();
            r.nlas
                .push(Nla::Other(DefaultNla::new(INET_DIAG_CGROUP_ID, id)));
        }
        full.finalize();
        let mut out = Vec::new();
        parse(&bytes(&[full, response(6, 80, 0)]), &mut out).unwrap();
        assert_eq!((out[0].cgroup, out[1].cgroup), (4_242, 0));
    }

    /// One netlink attribute: header, value, padding to 4 bytes.
    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    #[test]
    fn a_sockets_probe_storage_is_read_from_its_nested_attributes() {
        let state = SocketState {
            since_ns: 123,
            pid: 77,
            port: 8080,
            state: 8,
            flags: tracer_common::socket::SINCE_SEEN,
            ..Default::default()
        };
        // SAFETY: viewing a POD value as its bytes, as the kernel copies it.
        let value = unsafe {
            std::slice::from_raw_parts(
                (&state as *const SocketState).cast::<u8>(),
                std::mem::size_of::<SocketState>(),
            )
        };
        // As bpf_sk_storage_diag_put nests it: SK_DIAG_BPF_STORAGE { MAP_ID, MAP_VALUE }.
        let mut storage = attribute(2, &7u32.to_ne_bytes());
        storage.extend(attribute(SK_DIAG_BPF_STORAGE_MAP_VALUE, value));
        let list = attribute(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &storage);
        let mut full = response(8, 80, 0);
        if let NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) = &mut full.payload {
            r.nlas.push(Nla::Other(DefaultNla::new(
                INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED,
                list,
            )));
        }
        full.finalize();
        let mut out = Vec::new();
        parse(&bytes(&[full, response(6, 80, 0)]), &mut out).unwrap();
        assert_eq!((out[0].storage, out[1].storage), (Some(state), None));
    }

    #[test]
    fn the_dump_request_asks_for_the_maps_storage_and_keeps_its_length_right() {
        let mut request = vec![0u8; 72];
        request[..4].copy_from_slice(&72u32.to_ne_bytes());
        ask_for_storage(&mut request, 9);
        assert_eq!(request.len(), 72 + 12);
        assert_eq!(&request[..4], &84u32.to_ne_bytes());
        let attrs: Vec<(u16, Vec<u8>)> = attributes(&request[72..])
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].0, INET_DIAG_REQ_SK_BPF_STORAGES);
        let inner: Vec<(u16, Vec<u8>)> = attributes(&attrs[0].1)
            .map(|(k, v)| (k, v.to_vec()))
            .collect();
        assert_eq!(
            inner,
            vec![(SK_DIAG_BPF_STORAGE_REQ_MAP_FD, 9u32.to_ne_bytes().to_vec())]
        );
    }

    #[test]
    fn a_datagram_without_done_asks_for_more() {
        let mut out = Vec::new();
        assert!(!parse(&bytes(&[response(6, 1, 0)]), &mut out).unwrap());
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_census_record_is_296_bytes_as_the_readme_says() {
        assert_eq!(std::mem::size_of::<SocketRecord>(), 296);
        let readme = include_str!("../../../docs/design.md");
        assert!(readme.contains("a 296-byte sock_diag record"));
    }

    #[test]
    fn request_sockets_count_as_syn_recv_like_ss() {
        let r = |state| SocketRecord {
            state,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            cgroup: 0,
            rqueue: 0,
            wqueue: 0,
            inode: 0,
            cookie: 0,
            retransmit: None,
            storage: None,
            optmem: 0,
            tcp: None,
            full: false,
        };
        let counts = count_by_state(&[r(12), r(3), r(6), r(6), r(1)]);
        assert_eq!(counts[state::SYN_RECV as usize], 2);
        assert_eq!(counts[state::TIME_WAIT as usize], 2);
        assert_eq!(counts[state::ESTABLISHED as usize], 1);
        assert_eq!(counts[state::NEW_SYN_RECV as usize], 0);
    }

    #[test]
    fn netstat_sections_pair_names_with_values() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\n\
                    IpExt: InNoRoutes\nIpExt: 3\n";
        let m = parse_netstat(text, "TcpExt");
        assert_eq!(m.get("ListenOverflows"), Some(&7));
        assert_eq!(m.get("ListenDrops"), Some(&9));
        assert!(parse_netstat(text, "MPTcpExt").is_empty());
    }

    #[test]
    fn port_range_reads_the_sysctl_format() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("40000 40009"), Some((40000, 40009)));
        assert_eq!(parse_port_range("9 1"), None);
    }

    #[test]
    fn tcp_info_counters_are_read_at_their_uapi_offsets() {
        let mut info = vec![0u8; 232];
        info[68..72].copy_from_slice(&250u32.to_ne_bytes());
        info[100..104].copy_from_slice(&3u32.to_ne_bytes());
        info[120..128].copy_from_slice(&8_000_001u64.to_ne_bytes());
        info[128..136].copy_from_slice(&3_000_001u64.to_ne_bytes());
        info[148..152].copy_from_slice(&40u32.to_ne_bytes());
        info[168..176].copy_from_slice(&9_000_000u64.to_ne_bytes());
        info[176..184].copy_from_slice(&2_000_000u64.to_ne_bytes());
        info[184..192].copy_from_slice(&1_000u64.to_ne_bytes());
        info[216..220].copy_from_slice(&2u32.to_ne_bytes());
        let c = TcpCounters::parse(&info).unwrap();
        assert_eq!(
            c,
            TcpCounters {
                bytes_acked: 8_000_001,
                bytes_received: 3_000_001,
                total_retrans: 3,
                rtt_us: 250,
                min_rtt_us: 40,
                busy_us: 9_000_000,
                rwnd_limited_us: 2_000_000,
                sndbuf_limited_us: 1_000,
                dsack_dups: 2,
                snd_wnd: Some(0),
            }
        );
        // A kernel older than tcpi_busy_time sends less: not read at all.
        assert_eq!(TcpCounters::parse(&info[..168]), None);
    }
}
