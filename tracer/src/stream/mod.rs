//! The event stream, from the kernel to what each event tells: [`probe`] (loading the eBPF
//! program with this kernel's offsets from [`btf`], its maps, what this kernel allows:
//! [`features`]) → [`ring`] (the per-CPU rings) → [`event`] (decoding) → this module.
//!
//! This module: what each event from the probe tells on its own, the durations, failures and
//! close records the metrics and `watch` are made of.
//!
//! Pure code, fed one [`Transition`] at a time. Each event carries what the probe keeps on its
//! socket (BPF socket storage: when the socket entered the state it leaves, when it opened,
//! became established and began to close, how it opened, its owner and service port), so no
//! event needs those before it, and none is held, ordered or remembered here: a lost event
//! costs its own sample, never a wrong duration later. What the probe did not see (a socket
//! older than it) is None, never invented.

pub mod btf;
pub mod event;
pub mod features;
pub mod live;
pub mod probe;
pub mod record;
pub mod ring;

use tracer_common::{close_flags, retransmit, socket, state, ACCEPTED, SENT_RESET};

use crate::stream::event::Transition;

/// Which side opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// This host connected (SYN_SENT).
    Active = 0,
    /// This host accepted (a listener's child, SYN_RECV).
    Passive = 1,
}

/// Who started closing an established connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Teardown {
    /// This side sent the first FIN (ESTABLISHED -> FIN_WAIT1).
    Active = 0,
    /// The peer did (ESTABLISHED -> CLOSE_WAIT).
    Passive = 1,
    /// Both at once (FIN_WAIT1 -> CLOSING).
    Simultaneous = 2,
}

/// Why an active open failed, from `sk_err` at SYN_SENT -> CLOSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A RST answered the SYN (ECONNREFUSED).
    Refused = 0,
    /// The SYN retries ran out (ETIMEDOUT).
    Timeout = 1,
    /// The application closed the socket while it was connecting (no error).
    Aborted = 2,
    /// Any other error (e.g. EHOSTUNREACH from an ICMP answer).
    Other = 3,
}

impl Mode {
    /// Every mode, in the order of their values.
    pub const ALL: [Mode; 2] = [Mode::Active, Mode::Passive];

    /// The `mode` label value, and the `mode` of records.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Active => "active",
            Mode::Passive => "passive",
        }
    }
}

impl Teardown {
    /// Every teardown, in the order of their values.
    pub const ALL: [Teardown; 3] = [Teardown::Active, Teardown::Passive, Teardown::Simultaneous];

    /// The `mode` label value of `tracer_tcp_teardown_duration_seconds`.
    pub fn label(self) -> &'static str {
        match self {
            Teardown::Active => "active",
            Teardown::Passive => "passive",
            Teardown::Simultaneous => "simultaneous",
        }
    }
}

impl Failure {
    /// Every failure, in the order of their values.
    pub const ALL: [Failure; 4] = [
        Failure::Refused,
        Failure::Timeout,
        Failure::Aborted,
        Failure::Other,
    ];

    /// The `reason` label value of `tracer_tcp_handshake_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Timeout => "timeout",
            Failure::Aborted => "aborted",
            Failure::Other => "other",
        }
    }
}

/// Which way something went, from this host: data bytes, resets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent by this host; also the index of the probe's `RESETS` counters
    /// ([`tracer_common::RESET_SENT`]).
    Sent = 0,
    /// Received from the peer ([`tracer_common::RESET_RECEIVED`]).
    Received = 1,
}

const _: () = assert!(
    Direction::Sent as u32 == tracer_common::RESET_SENT
        && Direction::Received as u32 == tracer_common::RESET_RECEIVED
);

impl Direction {
    /// Both directions, in the order of their values.
    pub const ALL: [Direction; 2] = [Direction::Sent, Direction::Received];

    /// The `direction` label value.
    pub fn label(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }
}

const ECONNREFUSED: u16 = 111;
const ETIMEDOUT: u16 = 110;
const ECONNRESET: u16 = 104;
const EPIPE: u16 = 32;

/// How a connection ended, from the state it left for CLOSE, `sock.sk_err` then, and who
/// started closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// This side sent the first FIN and the close completed.
    ClosedHereFirst,
    /// The peer sent the first FIN and the close completed.
    ClosedByPeerFirst,
    /// Both sent FIN at once.
    ClosedTogether,
    /// This side reset it: the application closed with unread data, or with SO_LINGER 0, or
    /// the kernel aborted it (no error recorded, CLOSE straight from a connected state).
    ResetSent,
    /// The peer reset it (ECONNRESET, or EPIPE after the peer's FIN).
    ResetReceived,
    /// A RST answered the SYN (ECONNREFUSED).
    Refused,
    /// The SYN or data retransmissions ran out (ETIMEDOUT).
    TimedOut,
    /// The application closed it while it was connecting.
    Aborted,
    /// Any other error (`sk_err` says which, e.g. EHOSTUNREACH).
    Failed,
}

impl Ending {
    /// The name records show.
    pub fn name(self) -> &'static str {
        match self {
            Ending::ClosedHereFirst => "closed_here_first",
            Ending::ClosedByPeerFirst => "closed_by_peer_first",
            Ending::ClosedTogether => "closed_together",
            Ending::ResetSent => "reset_sent",
            Ending::ResetReceived => "reset_received",
            Ending::Refused => "refused",
            Ending::TimedOut => "timed_out",
            Ending::Aborted => "aborted",
            Ending::Failed => "failed",
        }
    }

    /// How a socket that left state `old` for CLOSE with `sk_err` ended; `teardown` is who
    /// started closing, when the probe saw it.
    pub fn of(old: u8, sk_err: u16, teardown: Option<Teardown>) -> Ending {
        use state::*;
        match (old, sk_err) {
            (SYN_SENT, ECONNREFUSED) => Ending::Refused,
            (SYN_SENT, 0) => Ending::Aborted,
            (_, ETIMEDOUT) => Ending::TimedOut,
            (_, ECONNRESET | EPIPE) => Ending::ResetReceived,
            (_, 0) => match (teardown, old) {
                (Some(Teardown::Simultaneous), _) | (None, CLOSING) => Ending::ClosedTogether,
                // The peer's FIN came first and ours was acknowledged (LAST_ACK).
                (_, LAST_ACK) => Ending::ClosedByPeerFirst,
                // Ours came first, and the socket is handed to TIME-WAIT (or its FIN_WAIT2
                // timer ran out).
                (_, FIN_WAIT1 | FIN_WAIT2 | CLOSING) => Ending::ClosedHereFirst,
                // Straight from a connected state with no error: this side reset it.
                _ => Ending::ResetSent,
            },
            _ => Ending::Failed,
        }
    }
}

/// A connection's story when it closes: what the probe saw of it and what the kernel counted
/// on the socket. Times the probe did not see are None, never guessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed {
    /// Who opened it (None: the probe did not see it open).
    pub mode: Option<Mode>,
    /// When it began to open (CLOCK_MONOTONIC ns): the SYN sent (active), or the first SYN-ACK
    /// sent (passive).
    pub opened_ns: Option<u64>,
    pub handshake_ns: Option<u64>,
    /// From ESTABLISHED to CLOSE.
    pub lifetime_ns: Option<u64>,
    pub ending: Ending,
    pub sk_err: u16,
    /// Service port (0: not known), network namespace, cgroup (0: not known).
    pub port: u16,
    pub netns: u32,
    pub cgroup: u64,
    /// Data bytes sent and acknowledged, and received (`tcp_sock.bytes_acked` and
    /// `bytes_received`, less the SYN and FINs they count); bytes sent are None when the
    /// probe did not see the connection open (a SYN may be counted in them).
    pub bytes_sent: Option<u64>,
    pub bytes_received: u64,
    /// Segments retransmitted (`tcp_sock.total_retrans`, SYNs included).
    pub retransmits: u32,
    /// How long it waited in its listener's accept queue (None: not a passive connection the
    /// server accepted while the probe ran).
    pub accept_wait_ns: Option<u64>,
    /// Smoothed and minimum RTT, microseconds (0: no sample).
    pub srtt_us: u32,
    pub rtt_min_us: u32,
    /// Its whole life's sending: time busy, limited, spurious retransmissions.
    pub flow: Flow,
    /// Why the kernel last sent a reset on this connection (`enum sk_rst_reason`; Linux
    /// 6.10+, and only where the probe reports resets), if it sent one.
    pub reset_reason: Option<u16>,
    /// What it did since its last update record (see [`live`]), or since it opened where it
    /// had none: what its close record reports. The event alone gives the latter; a
    /// [`live::Tracker`] makes it the former.
    pub interval: Interval,
    /// What it did since a census last counted it in the metrics, or since it opened where
    /// none did: what the close adds to the metrics, so that nothing counts twice.
    pub counted: Interval,
    /// Data bytes sent as a census counts them (the SYN taken out only where the probe saw
    /// this side send it), known even where `bytes_sent` is not: what the tracker takes its
    /// last report from.
    pub data_sent: u64,
}

/// What a connection did over one stretch of its life: from its opening (or its previous
/// report) to a report or its close.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interval {
    /// When the stretch began: its previous report, or when it became ESTABLISHED (None: the
    /// probe did not see that).
    pub start_ns: Option<u64>,
    /// Data bytes sent (acknowledged), None where the bytes sent are not known (see
    /// [`Closed::bytes_sent`]); received; segments retransmitted.
    pub bytes_sent: Option<u64>,
    pub bytes_received: u64,
    pub retransmits: u64,
    /// Time sending and what limited it, and retransmissions found not needed.
    pub flow: Flow,
}

/// How a connection's sending went, from the kernel's own counters on the socket: the time
/// it had data to send (`tcpi_busy_time`), of which how long the receiver's window
/// (`tcpi_rwnd_limited`: a slow reader on the other side) or this side's send buffer
/// (`tcpi_sndbuf_limited`: all it holds in flight and the application waiting to write
/// more, a buffer too small for the path) held it
/// back, microseconds, as `ss -ti` shows them; the segments the peer reported received
/// twice (`tcpi_dsack_dups`): retransmissions that were not needed (spurious); and the
/// segments retransmitted by kind ([`retransmits_by_kind`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub busy_us: u64,
    pub rwnd_limited_us: u64,
    pub sndbuf_limited_us: u64,
    pub spurious_retransmits: u64,
    /// Indexed by the kinds of `tracer_common::retransmit` (`NAMES`): the same kinds as
    /// `tracer_tcp_retransmits_total`; they add up to the connection's `total_retrans`.
    pub retransmits: [u64; retransmit::KINDS],
}

impl Flow {
    /// From the probe's reading at a close (`Transition::chrono_jiffies`, `dsack_dups`,
    /// `retransmits`), in microseconds as the kernel converts them for `tcp_info`.
    pub fn from_close(t: &Transition) -> Flow {
        let us = |j: u32| u64::from(j) * jiffy_us();
        let [busy, rwnd, sndbuf] = t.chrono_jiffies.map(us);
        Flow {
            busy_us: busy + rwnd + sndbuf,
            rwnd_limited_us: rwnd,
            sndbuf_limited_us: sndbuf,
            spurious_retransmits: u64::from(t.dsack_dups),
            retransmits: retransmits_by_kind(
                t.retransmits,
                t.socket_flags,
                t.established_ns,
                u64::from(t.total_retrans),
            ),
        }
    }

    /// What grew from `earlier` to this.
    pub fn since(&self, earlier: &Flow) -> Flow {
        let mut retransmits = [0; retransmit::KINDS];
        for (k, n) in retransmits.iter_mut().enumerate() {
            *n = self.retransmits[k].saturating_sub(earlier.retransmits[k]);
        }
        Flow {
            busy_us: self.busy_us.saturating_sub(earlier.busy_us),
            rwnd_limited_us: self.rwnd_limited_us.saturating_sub(earlier.rwnd_limited_us),
            sndbuf_limited_us: self
                .sndbuf_limited_us
                .saturating_sub(earlier.sndbuf_limited_us),
            spurious_retransmits: self
                .spurious_retransmits
                .saturating_sub(earlier.spurious_retransmits),
            retransmits,
        }
    }
}

/// A connection's `total` retransmitted segments by kind, from what the probe counted on its
/// socket (`stored`, `SocketState::retransmits`), its storage's `flags` and when it became
/// ESTABLISHED (0: not seen). The handshake's are SYNs on an active connection and SYN-ACKs
/// on a passive one; a connection that never became ESTABLISHED retransmitted nothing but
/// its handshake. What the probe did not count is `other`: retransmissions before it saw the
/// socket (an agent started after it opened), and those that failed to leave this host
/// (`total_retrans` counts them, the probe's tracepoint leaves them out).
pub fn retransmits_by_kind(
    stored: [u32; retransmit::STORED],
    flags: u16,
    established_ns: u64,
    total: u64,
) -> [u64; retransmit::KINDS] {
    let mut out = [0u64; retransmit::KINDS];
    let handshake = if flags & socket::ACTIVE != 0 {
        Some(retransmit::SYN)
    } else if flags & socket::PASSIVE != 0 {
        Some(retransmit::SYNACK)
    } else {
        None
    };
    let mut counted = 0;
    for k in [
        retransmit::TIMEOUT,
        retransmit::FAST,
        retransmit::TAIL_LOSS_PROBE,
    ] {
        out[usize::from(k)] = u64::from(stored[usize::from(k)]);
        counted += out[usize::from(k)];
    }
    if let Some(h) = handshake {
        let n = if established_ns != 0 {
            u64::from(stored[retransmit::HANDSHAKE])
        } else {
            total.saturating_sub(counted)
        };
        out[usize::from(h)] = n;
        counted += n;
    }
    out[usize::from(retransmit::OTHER)] = total.saturating_sub(counted);
    out
}

/// Microseconds per jiffy, as the kernel counts them for `tcp_info` (`USEC_PER_SEC / HZ`).
/// `HZ` is read from the resolution of the coarse clock, which is one tick.
fn jiffy_us() -> u64 {
    static US: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *US.get_or_init(|| {
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid clock id and a valid out pointer.
        let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } == 0;
        let tick_ns = if ok {
            res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64
        } else {
            0
        };
        // HZ is 100, 250, 300 or 1000; a tick's nanoseconds round to it. (4 ms, HZ 250,
        // where the clock says nothing.)
        let hz = (1_000_000_000 + tick_ns / 2)
            .checked_div(tick_ns)
            .unwrap_or(250);
        1_000_000 / hz.max(1)
    })
}

impl Closed {
    /// The connection sent a reset, for `reason`, as it closed (the kernel sends it just after
    /// the transition to CLOSE): whatever the states said, this side reset it.
    pub fn reset_as_it_closed(&mut self, reason: u16) {
        self.ending = Ending::ResetSent;
        self.reset_reason = Some(reason);
    }
}

/// What one transition tells, for the metrics. Durations in nanoseconds, ports are service
/// ports: the remote port of an active open, the local port of a passive one (0: not known).
/// `netns` is the socket's network namespace inode (0: not known), which decides whether a
/// remote port is an ephemeral one (see `ports`); `cgroup` its cgroup id (0: not known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// Every transition.
    Transition { from: u8, to: u8 },
    /// Time spent in `state`, when the probe saw the socket enter it.
    Dwell { state: u8, ns: u64 },
    /// A socket started listening on `port` (CLOSE -> LISTEN).
    Listen { port: u16, netns: u32 },
    /// A completed handshake. Active: SYN_SENT -> ESTABLISHED. Passive: the kernel's sample
    /// from the first SYN-ACK to the final ACK (`tcp_sock.srtt_us` of the new child).
    Handshake {
        mode: Mode,
        port: u16,
        netns: u32,
        ns: u64,
        cgroup: u64,
    },
    /// A failed active open, from a socket in cgroup `cgroup` (0: not known).
    HandshakeFailure {
        reason: Failure,
        port: u16,
        netns: u32,
        cgroup: u64,
    },
    /// From leaving ESTABLISHED to CLOSE.
    Teardown {
        mode: Teardown,
        port: u16,
        ns: u64,
        cgroup: u64,
    },
    /// From ESTABLISHED to CLOSE.
    Lifetime {
        mode: Mode,
        port: u16,
        ns: u64,
        cgroup: u64,
    },
    /// Every transition to CLOSE: the connection's record.
    Closed(Closed),
    /// A periodic report of an open connection (from a census, not from an event).
    Update(live::Update),
    /// The socket sent a reset for `reason` (a [`SENT_RESET`] event): before its close, the
    /// probe keeps the reason on the socket for the record; after it, the record's reader adds
    /// it (see [`Closed::reset_as_it_closed`]). `followed` says whether it came before the
    /// close (the record will carry it).
    ResetSent { reason: u16, followed: bool },
    /// The server accepted a connection on service `port` after it waited `ns` in the accept
    /// queue (an [`ACCEPTED`] event).
    Accepted {
        port: u16,
        netns: u32,
        ns: u64,
        cgroup: u64,
    },
}

/// How long the socket stayed in the state it leaves, when the probe saw it enter it.
pub fn dwell(t: &Transition) -> Option<u64> {
    let seen = t.socket_flags & socket::SINCE_SEEN != 0;
    let transition = t.newstate != SENT_RESET && t.newstate != ACCEPTED;
    (seen && transition && t.time_ns >= t.since_ns).then(|| t.time_ns - t.since_ns)
}

/// How the socket opened, when the probe saw it (or first saw it in SYN_SENT or SYN_RECV).
pub fn mode(t: &Transition) -> Option<Mode> {
    if t.socket_flags & socket::ACTIVE != 0 {
        Some(Mode::Active)
    } else if t.socket_flags & socket::PASSIVE != 0 {
        Some(Mode::Passive)
    } else {
        None
    }
}

/// Who started closing, when the probe saw the socket leave ESTABLISHED.
pub fn teardown(t: &Transition) -> Option<Teardown> {
    let here = t.socket_flags & socket::TEARDOWN_HERE != 0;
    let peer = t.socket_flags & socket::TEARDOWN_PEER != 0;
    match (here, peer) {
        (true, true) => Some(Teardown::Simultaneous),
        (true, false) => Some(Teardown::Active),
        (false, true) => Some(Teardown::Passive),
        (false, false) => None,
    }
}

/// Tells `sink` everything one event completes (see [`Observation`]).
pub fn observe(t: &Transition, mut sink: impl FnMut(Observation)) {
    use state::*;
    let (old, new, now) = (t.oldstate, t.newstate, t.time_ns);
    if new == SENT_RESET {
        sink(Observation::ResetSent {
            reason: t.reset_reason,
            followed: old != CLOSE,
        });
        return;
    }
    if new == ACCEPTED {
        sink(Observation::Accepted {
            port: t.port,
            netns: t.netns,
            ns: u64::from(t.accept_wait_us) * 1_000,
            cgroup: t.cgroup,
        });
        return;
    }
    sink(Observation::Transition { from: old, to: new });
    let dwell = dwell(t);
    if let Some(ns) = dwell {
        sink(Observation::Dwell { state: old, ns });
    }
    let (netns, cgroup) = (t.netns, t.cgroup);
    match (old, new) {
        (CLOSE, LISTEN) => sink(Observation::Listen {
            port: t.sport,
            netns,
        }),
        (SYN_SENT, ESTABLISHED) => {
            if let Some(ns) = dwell {
                sink(Observation::Handshake {
                    mode: Mode::Active,
                    port: t.dport,
                    netns,
                    ns,
                    cgroup,
                });
            }
        }
        // srtt_us holds the smoothed RTT times 8; a new child has one sample.
        (SYN_RECV, ESTABLISHED) if t.srtt_us > 0 => sink(Observation::Handshake {
            mode: Mode::Passive,
            port: t.sport,
            netns,
            ns: u64::from(t.srtt_us >> 3) * 1_000,
            cgroup,
        }),
        (SYN_SENT, CLOSE) => {
            let reason = match u16::from(t.sk_err) {
                ECONNREFUSED => Failure::Refused,
                ETIMEDOUT => Failure::Timeout,
                0 => Failure::Aborted,
                _ => Failure::Other,
            };
            sink(Observation::HandshakeFailure {
                reason,
                port: t.dport,
                netns,
                cgroup,
            });
        }
        _ => {}
    }
    if new != CLOSE {
        return;
    }
    let (mode, teardown, port) = (mode(t), teardown(t), t.port);
    if let Some(mode) = teardown.filter(|_| t.teardown_ns != 0 && now >= t.teardown_ns) {
        sink(Observation::Teardown {
            mode,
            port,
            ns: now - t.teardown_ns,
            cgroup,
        });
    }
    let established = (t.established_ns != 0).then_some(t.established_ns);
    let lifetime = established.filter(|&e| now >= e).map(|e| now - e);
    if let (Some(mode), Some(ns)) = (mode, lifetime) {
        sink(Observation::Lifetime {
            mode,
            port,
            ns,
            cgroup,
        });
    }
    // A listener closing is not a connection.
    if old == LISTEN {
        return;
    }
    let opened = (t.opened_ns != 0).then_some(t.opened_ns);
    // The kernel's counters run over sequence numbers: an active side's SYN, once answered,
    // counts one in bytes_acked, and each FIN one where it went (the probe says which FINs
    // did). Data bytes are what is left; with the opening unseen, a SYN may be in bytes_acked,
    // so the bytes sent are not known exactly.
    let fin = |bit: u8| u64::from(t.close_flags & bit != 0);
    let syn = u64::from(mode == Some(Mode::Active) && t.bytes_acked > 0);
    let sent = t
        .bytes_acked
        .saturating_sub(syn + fin(close_flags::FIN_ACKED));
    let bytes_sent = mode.map(|_| sent);
    let bytes_received = t.bytes_received.saturating_sub(fin(close_flags::PEER_FIN));
    let flow = Flow::from_close(t);
    let interval = Interval {
        start_ns: established,
        bytes_sent,
        bytes_received,
        retransmits: u64::from(t.total_retrans),
        flow,
    };
    sink(Observation::Closed(Closed {
        mode,
        opened_ns: opened,
        handshake_ns: opened
            .zip(established)
            .filter(|&(o, e)| e >= o)
            .map(|(o, e)| e - o),
        lifetime_ns: lifetime,
        ending: Ending::of(old, u16::from(t.sk_err), teardown),
        sk_err: u16::from(t.sk_err),
        port,
        netns,
        cgroup,
        bytes_sent,
        bytes_received,
        retransmits: t.total_retrans,
        accept_wait_ns: (t.accept_wait_us > 0).then(|| u64::from(t.accept_wait_us) * 1_000),
        srtt_us: t.srtt_us >> 3,
        // `~0U` until the kernel's first sample.
        rtt_min_us: if t.rtt_min_us == u32::MAX {
            0
        } else {
            t.rtt_min_us
        },
        reset_reason: (t.socket_flags & socket::RESET_SENT != 0).then_some(t.reset_reason),
        flow,
        interval,
        counted: interval,
        data_sent: sent,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::event::tests::transition;
    use tracer_common::state::*;

    /// A transition of one socket of service port `port` at `now`, stamped as the probe
    /// stamps it: in `old` since `since` (None: not seen), with `flags`.
    fn at(port: u16, now: u64, old: u8, new: u8, since: Option<u64>, flags: u16) -> Transition {
        let mut t = transition(1, now, old, new);
        t.since_ns = since.unwrap_or(0);
        t.socket_flags = flags | since.map_or(0, |_| socket::SINCE_SEEN);
        t.port = port;
        t
    }

    #[test]
    fn retransmissions_by_kind_add_up_to_the_kernels_total() {
        // [timeout, fast, tail_loss_probe, syn, synack, other]
        let kinds = |stored, flags, established, total| {
            retransmits_by_kind(stored, flags, established, total)
        };
        // An active connection: 2 SYNs before it was established, then 3 timeouts, 1 fast
        // retransmit, 1 probe; 2 more the probe did not see (total_retrans says 9).
        assert_eq!(
            kinds([3, 1, 1, 2], socket::ACTIVE, 5, 9),
            [3, 1, 1, 2, 0, 2]
        );
        // A passive one whose request socket resent its SYN-ACK once.
        assert_eq!(
            kinds([0, 0, 0, 1], socket::PASSIVE, 5, 1),
            [0, 0, 0, 0, 1, 0]
        );
        // A connect that timed out: every retransmission was a SYN.
        assert_eq!(kinds([0; 4], socket::ACTIVE, 0, 2), [0, 0, 0, 2, 0, 0]);
        // A socket older than the probe: what it did before is `other`.
        assert_eq!(kinds([1, 0, 0, 0], 0, 0, 4), [1, 0, 0, 0, 0, 3]);
        // `other` is what is left of the total, never below 0.
        assert_eq!(
            kinds([5, 0, 0, 0], socket::ACTIVE, 5, 3),
            [5, 0, 0, 0, 0, 0]
        );
    }

    /// Everything but transitions, dwells and records that `events` tell.
    fn outcomes(events: &[Transition]) -> Vec<Observation> {
        let mut out = Vec::new();
        for t in events {
            observe(t, |o| {
                if !matches!(
                    o,
                    Observation::Transition { .. }
                        | Observation::Dwell { .. }
                        | Observation::Closed(_)
                ) {
                    out.push(o);
                }
            });
        }
        out
    }

    /// The record one event tells.
    fn record(t: &Transition) -> Closed {
        let mut closed = None;
        observe(t, |o| {
            if let Observation::Closed(c) = o {
                closed = Some(c);
            }
        });
        closed.expect("a record")
    }

    #[test]
    fn the_dwell_is_the_time_since_the_probe_saw_the_socket_enter_its_state() {
        assert_eq!(
            dwell(&at(8080, 1_500, SYN_SENT, ESTABLISHED, Some(1_000), 0)),
            Some(500)
        );
        // Older than the probe, or a transition skipped: not known, never invented.
        assert_eq!(
            dwell(&at(8080, 1_500, ESTABLISHED, CLOSE_WAIT, None, 0)),
            None
        );
        let skipped = at(8080, 1_500, FIN_WAIT1, FIN_WAIT2, None, socket::SKIPPED);
        assert_eq!(dwell(&skipped), None);
        let mut out = Vec::new();
        observe(
            &at(8080, 1_500, SYN_SENT, ESTABLISHED, Some(1_000), 0),
            |o| out.push(o),
        );
        assert_eq!(
            out[..2],
            [
                Observation::Transition {
                    from: SYN_SENT,
                    to: ESTABLISHED
                },
                Observation::Dwell {
                    state: SYN_SENT,
                    ns: 500
                }
            ]
        );
    }

    #[test]
    fn active_open_and_close_give_handshake_teardown_and_lifetime() {
        // Client side of a client-closes-first connection to port 8080: SYN at 1,000,
        // established at 1,050, FIN at 501,050, closed at 501,100.
        let active = socket::ACTIVE;
        let mut close = at(
            8080,
            501_100,
            FIN_WAIT2,
            CLOSE,
            Some(501_060),
            active | socket::TEARDOWN_HERE,
        );
        (close.opened_ns, close.established_ns, close.teardown_ns) = (1_000, 1_050, 501_050);
        assert_eq!(
            outcomes(&[
                at(8080, 1_050, SYN_SENT, ESTABLISHED, Some(1_000), active),
                close
            ]),
            vec![
                Observation::Handshake {
                    mode: Mode::Active,
                    port: 8080,
                    netns: 0,
                    ns: 50,
                    cgroup: 0,
                },
                Observation::Teardown {
                    mode: Teardown::Active,
                    port: 8080,
                    ns: 50,
                    cgroup: 0,
                },
                Observation::Lifetime {
                    mode: Mode::Active,
                    port: 8080,
                    ns: 500_050,
                    cgroup: 0,
                },
            ]
        );
    }

    #[test]
    fn passive_handshake_is_the_kernels_synack_rtt_sample_on_the_local_port() {
        let passive = socket::PASSIVE;
        let mut est = at(443, 2_000, SYN_RECV, ESTABLISHED, Some(2_000), passive);
        (est.sport, est.dport) = (443, 50_000);
        est.srtt_us = 1_025_000 << 3;
        let mut close = at(
            443,
            9_600,
            LAST_ACK,
            CLOSE,
            Some(9_500),
            passive | socket::TEARDOWN_PEER,
        );
        (close.sport, close.established_ns, close.teardown_ns) = (443, 2_000, 9_000);
        assert_eq!(
            outcomes(&[est, close]),
            vec![
                Observation::Handshake {
                    mode: Mode::Passive,
                    port: 443,
                    netns: 0,
                    ns: 1_025_000_000,
                    cgroup: 0,
                },
                Observation::Teardown {
                    mode: Teardown::Passive,
                    port: 443,
                    ns: 600,
                    cgroup: 0,
                },
                Observation::Lifetime {
                    mode: Mode::Passive,
                    port: 443,
                    ns: 7_600,
                    cgroup: 0,
                },
            ]
        );
    }

    #[test]
    fn failed_connects_are_told_apart_by_sk_err() {
        let reason = |sk_err| {
            let mut t = at(8080, 10, SYN_SENT, CLOSE, Some(0), socket::ACTIVE);
            t.sk_err = sk_err;
            match outcomes(&[t])[..] {
                [Observation::HandshakeFailure {
                    reason, port: 8080, ..
                }] => reason,
                ref o => panic!("{o:?}"),
            }
        };
        assert_eq!(reason(111), Failure::Refused);
        assert_eq!(reason(110), Failure::Timeout);
        assert_eq!(reason(0), Failure::Aborted);
        assert_eq!(reason(113), Failure::Other);
    }

    #[test]
    fn crossing_fins_are_a_simultaneous_teardown() {
        let both = socket::ACTIVE | socket::TEARDOWN_HERE | socket::TEARDOWN_PEER;
        let mut close = at(8080, 130, CLOSING, CLOSE, Some(110), both);
        (close.established_ns, close.teardown_ns) = (10, 100);
        assert!(outcomes(&[close]).contains(&Observation::Teardown {
            mode: Teardown::Simultaneous,
            port: 8080,
            ns: 30,
            cgroup: 0,
        }));
        assert_eq!(record(&close).ending, Ending::ClosedTogether);
    }

    #[test]
    fn sockets_older_than_the_probe_get_no_lifetime_or_handshake() {
        // First seen leaving ESTABLISHED: a teardown is measured, a lifetime is not.
        let mut close = at(0, 170, FIN_WAIT2, CLOSE, Some(150), socket::TEARDOWN_HERE);
        close.teardown_ns = 100;
        assert_eq!(
            outcomes(&[close]),
            vec![Observation::Teardown {
                mode: Teardown::Active,
                port: 0,
                ns: 70,
                cgroup: 0,
            }]
        );
        // Seen first at SYN_SENT -> ESTABLISHED: when SYN_SENT began is unknown.
        assert_eq!(
            outcomes(&[at(8080, 100, SYN_SENT, ESTABLISHED, None, socket::ACTIVE)]),
            vec![]
        );
    }

    #[test]
    fn a_close_record_has_the_data_bytes_and_the_times_the_probe_saw() {
        // An active open: SYN at 100, established at 150, FIN at 500, closed at 600. The
        // kernel's counters include the SYN and this side's FIN (acked), and the peer's FIN.
        let flags = socket::ACTIVE | socket::TEARDOWN_HERE;
        let mut close = at(8080, 600, FIN_WAIT2, CLOSE, Some(550), flags);
        (close.opened_ns, close.established_ns, close.teardown_ns) = (100, 150, 500);
        (close.bytes_acked, close.bytes_received) = (1_002, 2_001);
        close.close_flags = close_flags::FIN_ACKED | close_flags::PEER_FIN;
        (close.srtt_us, close.rtt_min_us, close.total_retrans) = (40 << 3, u32::MAX, 3);
        let c = record(&close);
        assert_eq!(
            (c.mode, c.opened_ns, c.handshake_ns, c.lifetime_ns),
            (Some(Mode::Active), Some(100), Some(50), Some(450))
        );
        assert_eq!((c.bytes_sent, c.bytes_received), (Some(1_000), 2_000));
        assert_eq!((c.srtt_us, c.rtt_min_us, c.retransmits), (40, 0, 3));
        assert_eq!(
            (c.ending, c.port, c.reset_reason),
            (Ending::ClosedHereFirst, 8080, None)
        );
        // Seen only from its teardown on: no opening, no handshake or lifetime, and the bytes
        // sent not known exactly (a SYN may be in them).
        let mut close = at(8080, 600, LAST_ACK, CLOSE, Some(500), socket::TEARDOWN_PEER);
        close.bytes_acked = 10;
        let c = record(&close);
        assert_eq!(
            (
                c.mode,
                c.opened_ns,
                c.handshake_ns,
                c.lifetime_ns,
                c.bytes_sent
            ),
            (None, None, None, None, None)
        );
        assert_eq!(c.ending, Ending::ClosedByPeerFirst);
    }

    #[test]
    fn a_reset_before_the_close_is_in_the_record_and_one_after_is_reported() {
        // Keepalive ran out: the kernel resets (reason 15), then closes with ETIMEDOUT; the
        // probe kept the reason on the socket.
        let mut close = at(8080, 900, ESTABLISHED, CLOSE, Some(150), socket::ACTIVE);
        close.socket_flags |= socket::RESET_SENT;
        (close.sk_err, close.reset_reason) = (ETIMEDOUT as u8, 15);
        let c = record(&close);
        assert_eq!((c.ending, c.reset_reason), (Ending::TimedOut, Some(15)));

        // A reset after the close (the usual order): its reader completes the record, which
        // then says this side reset it, whatever the states said. Not a transition.
        let mut reset = transition(9, 601, CLOSE, SENT_RESET);
        reset.reset_reason = 11;
        let mut out = Vec::new();
        observe(&reset, |o| out.push(o));
        assert_eq!(
            out,
            [Observation::ResetSent {
                reason: 11,
                followed: false
            }]
        );
        let mut c = record(&at(
            8080,
            600,
            FIN_WAIT2,
            CLOSE,
            Some(550),
            socket::TEARDOWN_HERE,
        ));
        c.reset_as_it_closed(11);
        assert_eq!((c.ending, c.reset_reason), (Ending::ResetSent, Some(11)));
    }

    #[test]
    fn a_listener_closing_is_no_connection_record() {
        let mut out = Vec::new();
        observe(&at(8080, 900, LISTEN, CLOSE, Some(100), 0), |o| out.push(o));
        assert!(
            !out.iter().any(|o| matches!(o, Observation::Closed(_))),
            "{out:?}"
        );
    }

    #[test]
    fn endings_follow_the_state_left_and_the_socket_error() {
        use Ending::*;
        for (old, err, teardown, ending) in [
            (SYN_SENT, 111, None, Refused),
            (SYN_SENT, 110, None, TimedOut),
            (SYN_SENT, 0, None, Aborted),
            (SYN_SENT, 113, None, Failed),
            (ESTABLISHED, 104, None, ResetReceived),
            (CLOSE_WAIT, 32, Some(Teardown::Passive), ResetReceived),
            (ESTABLISHED, 0, None, ResetSent),
            (CLOSE_WAIT, 0, Some(Teardown::Passive), ResetSent),
            (ESTABLISHED, 110, None, TimedOut),
            (FIN_WAIT2, 0, Some(Teardown::Active), ClosedHereFirst),
            (LAST_ACK, 0, Some(Teardown::Passive), ClosedByPeerFirst),
            (CLOSING, 0, Some(Teardown::Simultaneous), ClosedTogether),
        ] {
            assert_eq!(Ending::of(old, err, teardown), ending, "{old} {err}");
        }
    }
}
