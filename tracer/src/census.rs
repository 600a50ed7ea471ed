//! The socket census: every TCP socket the kernel has right now, from the sock_diag netlink
//! interface (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`), as `ss -tan` reads it.
//!
//! Owns: the netlink dump ([`dump_tcp`], I/O, in the calling thread's network namespace) and
//! its decoding ([`parse`], pure, unit-tested on messages built with the same crate).
//! It sees what the tracepoint never reports: TIME-WAIT sockets and request sockets.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};
use tracer_common::state;

/// One socket of the census.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketRecord {
    /// Kernel TCP state number (`include/net/tcp_states.h`); request sockets are
    /// `NEW_SYN_RECV` (12) here, TIME-WAIT sockets `TIME_WAIT` (6).
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// For listeners: the accept queue length and its limit (`idiag_rqueue`, `idiag_wqueue`);
    /// for other sockets the bytes queued to read and to send.
    pub rqueue: u32,
    pub wqueue: u32,
    /// Inode of the socket file (0 for TIME-WAIT and request sockets, which have none).
    pub inode: u32,
}

/// Every TCP socket, IPv4 and IPv6, in the calling thread's network namespace.
pub fn dump_tcp() -> Result<Vec<SocketRecord>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0)).context("connecting the netlink socket")?;
    let mut records = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_family(&socket, family, &mut records)
            .with_context(|| format!("sock_diag dump of family {family}"))?;
    }
    Ok(records)
}

fn dump_family(socket: &Socket, family: u8, out: &mut Vec<SocketRecord>) -> Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            // Every state, including bit 12 (TCP_NEW_SYN_RECV: request sockets), which the
            // crate's flags do not name.
            states: StateFlags::from_bits_retain(u32::MAX),
            socket_id: if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).context("sending the dump request")?;

    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut receive[..], 0).context("receiving the dump")?;
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
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => bail!("sock_diag answered with an error: {e:?}"),
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                let h = r.header;
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

/// Sockets per state (index = kernel state number). Request sockets (`NEW_SYN_RECV`) are
/// counted as `SYN_RECV`, as `ss` shows them, and index 12 stays 0.
pub fn count_by_state(records: &[SocketRecord]) -> [u64; 13] {
    let mut counts = [0u64; 13];
    for r in records {
        let s = if r.state == state::NEW_SYN_RECV { state::SYN_RECV } else { r.state };
        if let Some(c) = counts.get_mut(s as usize) {
            *c += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::DoneMessage;
    use netlink_packet_sock_diag::inet::{InetResponse, InetResponseHeader};

    fn response(state: u8, sport: u16, rqueue: u32) -> NetlinkMessage<SockDiagMessage> {
        let mut id = SocketId::new_v4();
        id.source_port = sport;
        id.destination_port = 40_000;
        id.source_address = "127.0.0.1".parse().unwrap();
        id.destination_address = "127.0.0.2".parse().unwrap();
        let header = InetResponseHeader {
            family: AF_INET,
            state,
            timer: None,
            socket_id: id,
            recv_queue: rqueue,
            send_queue: 128,
            uid: 0,
            inode: 77,
        };
        let mut m = NetlinkMessage::new(
            NetlinkHeader::default(),
            SockDiagMessage::InetResponse(Box::new(InetResponse { header, nlas: Default::default() }))
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
        let datagram = bytes(&[response(10, 80, 3), response(1, 80, 0), response(12, 80, 0), done]);
        let mut out = Vec::new();
        assert!(parse(&datagram, &mut out).unwrap());
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].local, "127.0.0.1:80".parse().unwrap());
        assert_eq!(out[0].remote, "127.0.0.2:40000".parse().unwrap());
        assert_eq!((out[0].state, out[0].rqueue, out[0].wqueue, out[0].inode), (10, 3, 128, 77));
    }

    #[test]
    fn a_datagram_without_done_asks_for_more() {
        let mut out = Vec::new();
        assert!(!parse(&bytes(&[response(6, 1, 0)]), &mut out).unwrap());
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn request_sockets_count_as_syn_recv_like_ss() {
        let r = |state| SocketRecord {
            state,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            rqueue: 0,
            wqueue: 0,
            inode: 0,
        };
        let counts = count_by_state(&[r(12), r(3), r(6), r(6), r(1)]);
        assert_eq!(counts[state::SYN_RECV as usize], 2);
        assert_eq!(counts[state::TIME_WAIT as usize], 2);
        assert_eq!(counts[state::ESTABLISHED as usize], 1);
        assert_eq!(counts[state::NEW_SYN_RECV as usize], 0);
    }
}
