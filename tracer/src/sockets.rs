//! The table of live sockets: which state each one is in, since when, and who owns it, keyed
//! by the socket's cookie (unique for the kernel's uptime, and what sock_diag reports).
//!
//! Pure code, fed one [`Transition`] at a time and unit-tested with hand-made sequences.
//! It is bounded: when full, the socket seen longest ago is evicted, and evictions are counted.
//! A socket the tracer did not see entering its state (one older than the tracer, or evicted)
//! has no known dwell time: nothing here invents one.

use std::collections::VecDeque;

use tracer_common::{close_flags, state, SENT_RESET};

use crate::event::Transition;

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
    /// started closing, when the table saw it.
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

/// A connection's story when it closes: what the table saw of it and what the kernel counted
/// on the socket. Times the table did not see are None, never guessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed {
    /// Who opened it (None: the table did not see it open).
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
    /// table did not see the connection open (a SYN may be counted in them).
    pub bytes_sent: Option<u64>,
    pub bytes_received: u64,
    /// Segments retransmitted (`tcp_sock.total_retrans`, SYNs included).
    pub retransmits: u32,
    /// Smoothed and minimum RTT, microseconds (0: no sample).
    pub srtt_us: u32,
    pub rtt_min_us: u32,
    /// Why the kernel last sent a reset on this connection (`enum sk_rst_reason`; Linux
    /// 6.10+, and only where the probe reports resets), if it sent one.
    pub reset_reason: Option<u16>,
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
    /// Time spent in `state`, when the table saw the socket enter it.
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
    /// The socket sent a reset for `reason` (a [`SENT_RESET`] event): before its close, the
    /// table keeps the reason for the record; after it, the record's reader adds it (see
    /// [`Closed::reset_as_it_closed`]). `followed` says whether the table still follows it.
    ResetSent { reason: u16, followed: bool },
}

/// Where the time a socket entered its current state comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// The table saw the transition into the state: exact.
    Transition,
    /// The socket was already in that state when the agent started: the start time, so the
    /// age is a lower bound.
    AgentStart,
    /// A census found the socket in a state the table did not follow it into (its transition
    /// was lost): the start of that census, so the age is a lower bound.
    Census,
}

/// What the table remembers of one socket: 48 bytes (see `SocketTable` for the cost of each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    /// When it entered `state` (CLOCK_MONOTONIC ns, the probe's clock), and how that is known.
    since_ns: u64,
    /// When it became ESTABLISHED (0: not seen).
    established_ns: u64,
    /// When it began to open: SYN sent, or (passive) first SYN-ACK sent (0: not seen).
    opened_ns: u64,
    /// When it left ESTABLISHED (0: not seen); who started closing is in `teardown`.
    teardown_ns: u64,
    /// The owner the probe named (process and cgroup), as an id in [`Owners`] (0: unknown).
    owner: u32,
    /// Its network namespace inode (0: not known).
    netns: u32,
    /// Its service port (0: not known).
    port: u16,
    /// The state the socket is in now.
    state: u8,
    since: Since,
    /// How it was opened, when the table saw that.
    mode: Option<Mode>,
    teardown: Option<Teardown>,
    /// Why it last sent a reset (`enum sk_rst_reason`, at most 255), if it did.
    reset_reason: Option<u8>,
}

/// What following one transition tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// How long (ns) the socket stayed in the state it left, when the table saw it enter it.
    pub dwell: Option<u64>,
    /// Its owner, as the probe named it at the socket's SYN_SENT, LISTEN or passive open
    /// (pid 0 and an empty comm when the table never saw that).
    pub pid: u32,
    pub comm: [u8; 16],
    /// Its cgroup id, as the probe read it then (0: not known).
    pub cgroup: u64,
}

/// What the table knows of one socket, for the stuck-socket listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    pub state: u8,
    /// When it entered `state` (CLOCK_MONOTONIC ns), and how that is known.
    pub since_ns: u64,
    pub since: Since,
    pub pid: u32,
    pub comm: [u8; 16],
    /// Its cgroup id (0: not known).
    pub cgroup: u64,
    /// The service port the table learnt when it saw the socket open (0: not known).
    pub port: u16,
    /// Network namespace inode (0: not known).
    pub netns: u32,
}

/// Bounded table of live sockets.
///
/// Memory: an entry is 40 bytes plus its 8-byte key and a control byte in the hash table
/// (whose load factor lies between 7/16 and 7/8 after each doubling), plus 8 bytes in the
/// eviction queue: 64 to 120 bytes per followed socket, depending on where the last doubling
/// landed, plus one owner record per distinct owning process.
pub struct SocketTable {
    /// By socket cookie. foldhash rather than SipHash: the keys are the kernel's, not an
    /// attacker's, and hashing is a visible share of the per-event cost.
    entries: foldhash::HashMap<u64, Entry>,
    /// Cookies in the order sockets were first seen, for evicting the oldest; cookies whose
    /// socket has since closed are skipped (and dropped) when reached. A cookie is never
    /// reused while the kernel runs, so a cookie still in `entries` is the same socket.
    order: VecDeque<u64>,
    /// Where the census's sweep for closed sockets is in `order` (see [`SocketTable::sweep`]).
    sweep_at: usize,
    /// Passive children whose first event carried their listener's cookie, by kernel
    /// address, until their next event carries their own (see [`SocketTable::follow`]).
    awaiting_cookie: foldhash::HashMap<u64, Entry>,
    owners: Owners,
    capacity: usize,
    evicted: u64,
}

/// The owners (pid, command name, cgroup id) of followed sockets, each kept once: a host's
/// sockets belong to few processes, so an entry holds a 4-byte id rather than 28 bytes.
#[derive(Default)]
struct Owners {
    ids: foldhash::HashMap<OwnerKey, u32>,
    /// Owner `id` is at `id - 1`, with the number of entries that refer to it.
    list: Vec<(OwnerKey, u32)>,
    /// Ids no entry refers to any more, to reuse.
    free: Vec<u32>,
}

/// An owner: pid, command name and cgroup id.
type OwnerKey = (u32, [u8; 16], u64);

impl Owners {
    /// The id of this owner, counted as one more reference.
    fn acquire(&mut self, key: OwnerKey) -> u32 {
        let id = match self.ids.get(&key) {
            Some(&id) => id,
            None => {
                let id = match self.free.pop() {
                    Some(id) => {
                        self.list[id as usize - 1] = (key, 0);
                        id
                    }
                    None => {
                        self.list.push((key, 0));
                        self.list.len() as u32
                    }
                };
                self.ids.insert(key, id);
                id
            }
        };
        self.list[id as usize - 1].1 += 1;
        id
    }

    /// Drops one reference to `id` (0: none), and the owner with its last one.
    fn release(&mut self, id: u32) {
        let Some((key, refs)) = id
            .checked_sub(1)
            .and_then(|i| self.list.get_mut(i as usize))
        else {
            return;
        };
        *refs -= 1;
        if *refs == 0 {
            self.ids.remove(key);
            self.free.push(id);
        }
    }

    /// The pid, command name and cgroup of `id` (0, empty and 0 for 0).
    fn get(&self, id: u32) -> OwnerKey {
        match id.checked_sub(1).and_then(|i| self.list.get(i as usize)) {
            Some(&(owner, _)) => owner,
            None => (0, [0; 16], 0),
        }
    }
}

impl SocketTable {
    /// A table for at most `capacity` sockets. It grows with the sockets it follows rather
    /// than allocating `capacity` up front: a sparse table spread over tens of megabytes costs
    /// a cache miss (and, at first, a page fault) per event; a compact one stays in cache.
    pub fn new(capacity: usize) -> SocketTable {
        let capacity = capacity.max(1);
        let initial = capacity.min(4_096);
        SocketTable {
            entries: foldhash::HashMap::with_capacity_and_hasher(initial, Default::default()),
            order: VecDeque::with_capacity(initial),
            sweep_at: 0,
            awaiting_cookie: Default::default(),
            owners: Owners::default(),
            capacity,
            evicted: 0,
        }
    }

    /// Follows one transition: how long the socket stayed in `t.oldstate` and who owns it.
    pub fn observe(&mut self, t: &Transition) -> Step {
        self.follow(t, |_| {})
    }

    /// Follows one transition and tells `sink` everything it completes (see [`Observation`]).
    pub fn follow(&mut self, t: &Transition, mut sink: impl FnMut(Observation)) -> Step {
        use state::*;
        let (old, new, now) = (t.oldstate, t.newstate, t.time_ns);
        if new == SENT_RESET {
            return self.reset_sent(t, sink);
        }
        sink(Observation::Transition { from: old, to: new });
        let mut known = self.entries.get(&t.cookie).copied();
        // A passive child's LISTEN -> SYN_RECV fires while the kernel clones the listener
        // (`inet_csk_clone_lock`). On some kernels (Debian's 6.1 and 6.12, in the kernel
        // matrix; not 6.18) the clone still holds the listener's cookie at that moment and
        // takes its own (the request socket's) just after: the event names the listener's
        // cookie and the child's next event another one. The child is then kept by its
        // kernel address until that next event.
        let listeners_cookie =
            (old, new) == (LISTEN, SYN_RECV) && known.is_some_and(|e| e.state == LISTEN);
        let mut adopted = false;
        if listeners_cookie {
            known = None;
        } else if known.is_none() && !self.awaiting_cookie.is_empty() {
            known = self.awaiting_cookie.remove(&t.skaddr);
            adopted = known.is_some();
        }
        // A dwell only when the table saw the socket enter `old` (not a census's guess).
        let seen = known.filter(|e| e.state == old && e.since == Since::Transition);
        let dwell = seen.filter(|e| now >= e.since_ns).map(|e| now - e.since_ns);
        if let Some(ns) = dwell {
            sink(Observation::Dwell { state: old, ns });
        }

        let mut e = known.unwrap_or(Entry {
            since_ns: 0,
            established_ns: 0,
            opened_ns: 0,
            teardown_ns: 0,
            owner: 0,
            netns: 0,
            port: 0,
            state: old,
            since: Since::Transition,
            mode: opening_mode(old, new),
            teardown: None,
            reset_reason: None,
        });
        if e.mode.is_none() {
            // A socket the census found before the table saw it open.
            e.mode = opening_mode(old, new);
        }
        // The opening transitions name the owner and the cgroup; the others carry neither.
        let names_owner = t.pid != 0 || t.cgroup != 0;
        let (pid, comm, cgroup) = if names_owner {
            (t.pid, t.comm, t.cgroup)
        } else {
            self.owners.get(e.owner)
        };
        if t.netns != 0 {
            e.netns = t.netns;
        }
        if e.port == 0 {
            e.port = match e.mode {
                Some(Mode::Active) => t.dport,
                Some(Mode::Passive) => t.sport,
                None => 0,
            };
        }

        match (old, new) {
            (CLOSE, LISTEN) => sink(Observation::Listen {
                port: t.sport,
                netns: e.netns,
            }),
            (SYN_SENT, ESTABLISHED) => {
                if let Some(ns) = dwell {
                    sink(Observation::Handshake {
                        mode: Mode::Active,
                        port: e.port,
                        netns: e.netns,
                        ns,
                        cgroup,
                    });
                }
            }
            (SYN_RECV, ESTABLISHED) if t.srtt_us > 0 => {
                // srtt_us holds the smoothed RTT times 8; a new child has one sample.
                let ns = u64::from(t.srtt_us >> 3) * 1_000;
                e.opened_ns = now.saturating_sub(ns);
                sink(Observation::Handshake {
                    mode: Mode::Passive,
                    port: t.sport,
                    netns: e.netns,
                    ns,
                    cgroup,
                });
            }
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
                    netns: e.netns,
                    cgroup,
                });
            }
            (ESTABLISHED, FIN_WAIT1) => (e.teardown, e.teardown_ns) = (Some(Teardown::Active), now),
            (ESTABLISHED, CLOSE_WAIT) => {
                (e.teardown, e.teardown_ns) = (Some(Teardown::Passive), now)
            }
            (FIN_WAIT1, CLOSING) => {
                e.teardown = e.teardown.map(|_| Teardown::Simultaneous);
            }
            _ => {}
        }
        if new == ESTABLISHED {
            e.established_ns = now;
        }
        if (old, new) == (CLOSE, SYN_SENT) {
            e.opened_ns = now;
        }

        if new == CLOSE {
            if let Some(mode) = e.teardown.filter(|_| now >= e.teardown_ns) {
                sink(Observation::Teardown {
                    mode,
                    port: e.port,
                    ns: now - e.teardown_ns,
                    cgroup,
                });
            }
            let lifetime =
                (e.established_ns != 0 && now >= e.established_ns).then(|| now - e.established_ns);
            if let (Some(mode), Some(ns)) = (e.mode, lifetime) {
                sink(Observation::Lifetime {
                    mode,
                    port: e.port,
                    ns,
                    cgroup,
                });
            }
            let opened = (e.opened_ns != 0).then_some(e.opened_ns);
            let mode = e.mode.filter(|_| known.is_some());
            // The kernel's counters run over sequence numbers: an active side's SYN, once
            // answered, counts one in bytes_acked, and each FIN one where it went (the probe
            // says which FINs did). Data bytes are what is left; with the opening unseen, a SYN
            // may be in bytes_acked, so the bytes sent are not known exactly.
            let fin = |bit: u8| u64::from(t.close_flags & bit != 0);
            let syn = u64::from(mode == Some(Mode::Active) && t.bytes_acked > 0);
            let bytes_sent = mode.map(|_| {
                t.bytes_acked
                    .saturating_sub(syn + fin(close_flags::FIN_ACKED))
            });
            let bytes_received = t.bytes_received.saturating_sub(fin(close_flags::PEER_FIN));
            // A listener closing is not a connection.
            if old != LISTEN {
                sink(Observation::Closed(Closed {
                    mode,
                    opened_ns: opened,
                    handshake_ns: opened
                        .filter(|&o| e.established_ns >= o && e.established_ns != 0)
                        .map(|o| e.established_ns - o),
                    lifetime_ns: lifetime,
                    ending: Ending::of(old, u16::from(t.sk_err), e.teardown),
                    sk_err: u16::from(t.sk_err),
                    port: e.port,
                    netns: e.netns,
                    cgroup,
                    bytes_sent,
                    bytes_received,
                    retransmits: t.total_retrans,
                    srtt_us: t.srtt_us >> 3,
                    // `~0U` until the kernel's first sample.
                    rtt_min_us: if t.rtt_min_us == u32::MAX {
                        0
                    } else {
                        t.rtt_min_us
                    },
                    reset_reason: e.reset_reason.map(u16::from),
                }));
            }
            if known.is_some() {
                self.entries.remove(&t.cookie);
                self.owners.release(e.owner);
            }
            return Step {
                dwell,
                pid,
                comm,
                cgroup,
            };
        }
        if names_owner {
            // Taken before the old one is let go: the same owner is not dropped and re-made.
            let id = self.owners.acquire((t.pid, t.comm, t.cgroup));
            self.owners.release(e.owner);
            e.owner = id;
        }
        if listeners_cookie {
            e.state = new;
            e.since_ns = now;
            e.since = Since::Transition;
            self.await_cookie(t.skaddr, e);
            return Step {
                dwell,
                pid,
                comm,
                cgroup,
            };
        }

        e.state = new;
        e.since_ns = now;
        e.since = Since::Transition;
        if known.is_none() || adopted {
            self.make_room();
            self.order.push_back(t.cookie);
            self.compact_order();
        }
        self.entries.insert(t.cookie, e);
        Step {
            dwell,
            pid,
            comm,
            cgroup,
        }
    }

    /// A [`SENT_RESET`] event: keeps the reason on the socket's entry, if it is followed.
    fn reset_sent(&mut self, t: &Transition, mut sink: impl FnMut(Observation)) -> Step {
        let entry = self.entries.get_mut(&t.cookie);
        let followed = entry.is_some();
        let owner = entry.map_or(0, |e| {
            e.reset_reason = Some(t.reset_reason.min(255) as u8);
            e.owner
        });
        sink(Observation::ResetSent {
            reason: t.reset_reason,
            followed,
        });
        let (pid, comm, cgroup) = self.owners.get(owner);
        Step {
            dwell: None,
            pid,
            comm,
            cgroup,
        }
    }

    /// Number of sockets followed now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no socket is followed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when a new socket would evict another.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Bytes the table holds now: its hash table (buckets and control bytes, at its current
    /// capacity), the eviction queue and the owners.
    pub fn allocated_bytes(&self) -> usize {
        let bucket = std::mem::size_of::<(u64, Entry)>() + 1;
        let buckets = (self.entries.capacity() * 8 / 7).next_power_of_two();
        let owner = std::mem::size_of::<(OwnerKey, u32)>();
        buckets * bucket
            + self.order.capacity() * 8
            + self.owners.list.capacity() * owner
            + self.owners.ids.capacity() * 8 / 7 * (owner + 1)
    }

    /// Sockets evicted because the table was full, since it was made.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// What the table knows of the socket with this cookie.
    pub fn get(&self, cookie: u64) -> Option<SocketInfo> {
        self.entries.get(&cookie).map(|e| {
            let (pid, comm, cgroup) = self.owners.get(e.owner);
            SocketInfo {
                state: e.state,
                since_ns: e.since_ns,
                since: e.since,
                pid,
                comm,
                cgroup,
                port: e.port,
                netns: e.netns,
            }
        })
    }

    /// Takes what a census saw of a socket whose transition into `state` the table did not
    /// follow: in that state since `since_ns` at the latest (`since` says why). A socket the
    /// table does not follow yet is added, unless the table is full (a census never evicts).
    /// Returns false when nothing was recorded.
    pub fn correct(
        &mut self,
        cookie: u64,
        state: u8,
        since_ns: u64,
        since: Since,
        netns: u32,
        cgroup: u64,
    ) -> bool {
        if let Some(e) = self.entries.get_mut(&cookie) {
            (e.state, e.since_ns, e.since) = (state, since_ns, since);
            if e.netns == 0 {
                e.netns = netns;
            }
            let (pid, comm, known) = self.owners.get(e.owner);
            if known == 0 && cgroup != 0 {
                let id = self.owners.acquire((pid, comm, cgroup));
                self.owners.release(e.owner);
                e.owner = id;
            }
            return true;
        }
        if self.is_full() {
            return false;
        }
        // A socket older than the agent: no owner is known, its cgroup is (sock_diag's).
        let owner = if cgroup != 0 {
            self.owners.acquire((0, [0; 16], cgroup))
        } else {
            0
        };
        self.entries.insert(
            cookie,
            Entry {
                since_ns,
                established_ns: 0,
                opened_ns: 0,
                teardown_ns: 0,
                owner,
                netns,
                port: 0,
                state,
                since,
                mode: None,
                teardown: None,
                reset_reason: None,
            },
        );
        self.order.push_back(cookie);
        self.compact_order();
        true
    }

    /// Names the owner of a followed socket whose owner is not known (pid 0), keeping its
    /// cgroup; false when it was not followed or already had one.
    pub fn set_owner(&mut self, cookie: u64, pid: u32, comm: [u8; 16]) -> bool {
        let Some(e) = self.entries.get_mut(&cookie) else {
            return false;
        };
        let (known, _, cgroup) = self.owners.get(e.owner);
        if known != 0 {
            return false;
        }
        let id = self.owners.acquire((pid, comm, cgroup));
        self.owners.release(e.owner);
        e.owner = id;
        true
    }

    /// Stops following a socket (a census found it closed); false when it was not followed.
    pub fn forget(&mut self, cookie: u64) -> bool {
        self.remove(cookie)
    }

    /// Removes a socket and lets go of its owner; false when it was not followed.
    fn remove(&mut self, cookie: u64) -> bool {
        match self.entries.remove(&cookie) {
            Some(e) => {
                self.owners.release(e.owner);
                true
            }
            None => false,
        }
    }

    /// Starts a sweep over every followed socket (see [`SocketTable::sweep`]).
    pub fn start_sweep(&mut self) {
        self.sweep_at = 0;
    }

    /// Visits up to `max` more sockets of the sweep started by [`SocketTable::start_sweep`]
    /// and drops those for which `gone` is true (their CLOSE was lost: a census no longer
    /// shows them). Returns how many were dropped, and whether the sweep is done. Done in
    /// steps so that a caller sharing the table with the event reader holds it briefly.
    pub fn sweep(
        &mut self,
        max: usize,
        mut gone: impl FnMut(u64, &SocketInfo) -> bool,
    ) -> (u64, bool) {
        let mut dropped = 0;
        let end = (self.sweep_at + max).min(self.order.len());
        for i in self.sweep_at..end {
            let cookie = self.order[i];
            if let Some(info) = self.get(cookie) {
                if gone(cookie, &info) {
                    self.remove(cookie);
                    dropped += 1;
                }
            }
        }
        self.sweep_at = end;
        (dropped, end >= self.order.len())
    }

    /// Keeps a passive child by its kernel address until its own cookie shows. The kernel
    /// gives it that cookie within the same packet's processing, so this holds a handful;
    /// should the child's next event be lost, the oldest are let go (counted as evicted).
    fn await_cookie(&mut self, skaddr: u64, e: Entry) {
        const MAX_AWAITING: usize = 4_096;
        if self.awaiting_cookie.len() >= MAX_AWAITING {
            for (_, stale) in self.awaiting_cookie.drain() {
                self.owners.release(stale.owner);
                self.evicted += 1;
            }
        }
        if let Some(old) = self.awaiting_cookie.insert(skaddr, e) {
            self.owners.release(old.owner);
        }
    }

    /// Evicts the socket seen longest ago when the table is full.
    fn make_room(&mut self) {
        if !self.is_full() {
            return;
        }
        while let Some(cookie) = self.order.pop_front() {
            self.sweep_at = self.sweep_at.saturating_sub(1);
            if self.remove(cookie) {
                self.evicted += 1;
                return;
            }
        }
    }

    /// Drops queue entries of closed sockets once they outnumber live ones, so that the queue
    /// stays within twice the capacity.
    fn compact_order(&mut self) {
        if self.order.len() <= 2 * self.capacity {
            return;
        }
        let entries = &self.entries;
        let (mut index, sweep_at, mut kept_before) = (0, self.sweep_at, 0);
        self.order.retain(|cookie| {
            let keep = entries.contains_key(cookie);
            if keep && index < sweep_at {
                kept_before += 1;
            }
            index += 1;
            keep
        });
        self.sweep_at = kept_before;
    }
}

/// How a socket was opened, read from the first transition the table sees of it.
fn opening_mode(old: u8, new: u8) -> Option<Mode> {
    match (old, new) {
        (state::CLOSE, state::SYN_SENT) | (state::SYN_SENT, _) => Some(Mode::Active),
        (state::LISTEN, state::SYN_RECV) | (state::SYN_RECV, _) => Some(Mode::Passive),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::transition;
    use tracer_common::state::*;

    #[test]
    fn dwell_is_the_time_between_entering_and_leaving_a_state() {
        let mut table = SocketTable::new(16);
        assert_eq!(
            table.observe(&transition(1, 1_000, CLOSE, SYN_SENT)).dwell,
            None
        );
        assert_eq!(
            table
                .observe(&transition(1, 1_500, SYN_SENT, ESTABLISHED))
                .dwell,
            Some(500)
        );
        assert_eq!(
            table
                .observe(&transition(1, 301_500, ESTABLISHED, FIN_WAIT1))
                .dwell,
            Some(300_000)
        );
        assert_eq!(
            table
                .observe(&transition(1, 301_600, FIN_WAIT1, FIN_WAIT2))
                .dwell,
            Some(100)
        );
        assert_eq!(
            table
                .observe(&transition(1, 301_700, FIN_WAIT2, CLOSE))
                .dwell,
            Some(100)
        );
        assert!(table.is_empty(), "CLOSE forgets the socket");
    }

    #[test]
    fn sockets_older_than_the_tracer_get_no_invented_dwell() {
        let mut table = SocketTable::new(16);
        // First sighting leaves ESTABLISHED: when it entered is unknown.
        assert_eq!(
            table
                .observe(&transition(7, 5_000, ESTABLISHED, CLOSE_WAIT))
                .dwell,
            None
        );
        assert_eq!(
            table
                .observe(&transition(7, 9_000, CLOSE_WAIT, LAST_ACK))
                .dwell,
            Some(4_000)
        );
        // A passive child's LISTEN -> SYN_RECV: the child itself was never in LISTEN.
        assert_eq!(
            table.observe(&transition(8, 9_000, LISTEN, SYN_RECV)).dwell,
            None
        );
    }

    #[test]
    fn a_state_the_table_did_not_record_gives_no_dwell() {
        let mut table = SocketTable::new(16);
        table.observe(&transition(1, 1_000, CLOSE, SYN_SENT));
        // A transition out of a state other than the recorded one means events were lost.
        assert_eq!(
            table
                .observe(&transition(1, 2_000, FIN_WAIT1, FIN_WAIT2))
                .dwell,
            None
        );
    }

    #[test]
    fn full_table_evicts_the_oldest_socket_and_counts_it() {
        let mut table = SocketTable::new(2);
        table.observe(&transition(1, 10, CLOSE, SYN_SENT));
        table.observe(&transition(2, 20, CLOSE, SYN_SENT));
        table.observe(&transition(3, 30, CLOSE, SYN_SENT));
        assert_eq!(table.len(), 2);
        assert_eq!(table.evicted(), 1);
        // Socket 1 was evicted: its dwell is unknown; socket 2 is still followed.
        assert_eq!(
            table
                .observe(&transition(1, 40, SYN_SENT, ESTABLISHED))
                .dwell,
            None
        );
        assert_eq!(
            table
                .observe(&transition(3, 50, SYN_SENT, ESTABLISHED))
                .dwell,
            Some(20)
        );
    }

    #[test]
    fn closed_sockets_are_not_evicted_twice_and_the_queue_stays_bounded() {
        let mut table = SocketTable::new(4);
        for i in 0..1_000u64 {
            table.observe(&transition(i, i * 10, CLOSE, SYN_SENT));
            table.observe(&transition(i, i * 10 + 5, SYN_SENT, CLOSE));
        }
        assert_eq!(table.evicted(), 0);
        assert!(table.order.len() <= 8, "queue length {}", table.order.len());
    }

    /// Runs a sequence through a fresh table and returns everything but transitions and dwells.
    fn outcomes(seq: &[Transition]) -> Vec<Observation> {
        let mut table = SocketTable::new(16);
        let mut out = Vec::new();
        for t in seq {
            table.follow(t, |o| {
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

    #[test]
    fn active_open_and_close_give_handshake_teardown_and_lifetime() {
        // Client side of a client-closes-first connection to port 8080.
        let seq = [
            transition(1, 1_000, CLOSE, SYN_SENT),
            transition(1, 1_050, SYN_SENT, ESTABLISHED),
            transition(1, 501_050, ESTABLISHED, FIN_WAIT1),
            transition(1, 501_060, FIN_WAIT1, FIN_WAIT2),
            transition(1, 501_100, FIN_WAIT2, CLOSE),
        ];
        assert_eq!(
            outcomes(&seq),
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
        let mut est = transition(2, 2_000, SYN_RECV, ESTABLISHED);
        est.sport = 443;
        est.dport = 50_000;
        est.srtt_us = 1_025_000 << 3;
        let mut listen = transition(2, 2_000, LISTEN, SYN_RECV);
        listen.sport = 443;
        let mut wait = transition(2, 9_000, ESTABLISHED, CLOSE_WAIT);
        wait.sport = 443;
        let mut last = transition(2, 9_500, CLOSE_WAIT, LAST_ACK);
        last.sport = 443;
        let mut close = transition(2, 9_600, LAST_ACK, CLOSE);
        close.sport = 443;
        assert_eq!(
            outcomes(&[listen, est, wait, last, close]),
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
        let fail = |sk_err| {
            let mut t = transition(3, 10, SYN_SENT, CLOSE);
            t.sk_err = sk_err;
            outcomes(&[transition(3, 0, CLOSE, SYN_SENT), t])
        };
        let reason = |o: Vec<Observation>| match o[..] {
            [Observation::HandshakeFailure {
                reason, port: 8080, ..
            }] => reason,
            _ => panic!("{o:?}"),
        };
        assert_eq!(reason(fail(111)), Failure::Refused);
        assert_eq!(reason(fail(110)), Failure::Timeout);
        assert_eq!(reason(fail(0)), Failure::Aborted);
        assert_eq!(reason(fail(113)), Failure::Other);
    }

    #[test]
    fn crossing_fins_are_a_simultaneous_teardown() {
        let seq = [
            transition(4, 0, CLOSE, SYN_SENT),
            transition(4, 10, SYN_SENT, ESTABLISHED),
            transition(4, 100, ESTABLISHED, FIN_WAIT1),
            transition(4, 110, FIN_WAIT1, CLOSING),
            transition(4, 130, CLOSING, CLOSE),
        ];
        let out = outcomes(&seq);
        assert!(out.contains(&Observation::Teardown {
            mode: Teardown::Simultaneous,
            port: 8080,
            ns: 30,
            cgroup: 0,
        }));
    }

    #[test]
    fn sockets_older_than_the_tracer_get_no_lifetime_or_handshake() {
        // First seen leaving ESTABLISHED: a teardown is measured, a lifetime is not.
        let seq = [
            transition(5, 100, ESTABLISHED, FIN_WAIT1),
            transition(5, 150, FIN_WAIT1, FIN_WAIT2),
            transition(5, 170, FIN_WAIT2, CLOSE),
        ];
        assert_eq!(
            outcomes(&seq),
            vec![Observation::Teardown {
                mode: Teardown::Active,
                port: 0,
                ns: 70,
                cgroup: 0,
            }]
        );
        // Seen first at SYN_SENT -> ESTABLISHED: when SYN_SENT began is unknown.
        assert_eq!(
            outcomes(&[transition(6, 100, SYN_SENT, ESTABLISHED)]),
            vec![]
        );
    }

    #[test]
    fn the_table_remembers_state_since_and_owner_by_cookie() {
        let mut table = SocketTable::new(16);
        table.observe(&transition(9, 100, CLOSE, SYN_SENT));
        let mut t = transition(9, 200, SYN_SENT, ESTABLISHED);
        t.pid = 0; // a softirq-time event whose owner the probe did not repeat
        table.observe(&t);
        let info = table.get(9 + 1_000_000).expect("followed by cookie");
        assert_eq!(
            (info.state, info.since_ns, info.pid),
            (ESTABLISHED, 200, 42)
        );
        assert_eq!(&info.comm[..4], b"curl");
        assert_eq!(table.get(9), None, "not keyed by address");
    }

    #[test]
    fn a_child_cloned_with_its_listeners_cookie_keeps_its_owner_and_the_listener_stays() {
        // As Linux 6.1 and 6.12 report it: the child's LISTEN -> SYN_RECV carries the
        // listener's cookie (1_000_001), its next events its own (2_000_000).
        let mut table = SocketTable::new(16);
        let mut listen = transition(1, 100, CLOSE, LISTEN);
        (listen.sport, listen.dport) = (8080, 0);
        table.observe(&listen);
        let child = |at, old, new, cookie, pid| {
            let mut t = transition(7, at, old, new);
            (t.sport, t.dport, t.cookie, t.pid) = (8080, 40_000, cookie, pid);
            t
        };
        let listener_cookie = 1_000_001;
        let first = table.observe(&child(200, LISTEN, SYN_RECV, listener_cookie, 42));
        assert_eq!(first.dwell, None, "the child was never in LISTEN");
        let mut out = Vec::new();
        let mut est = child(200, SYN_RECV, ESTABLISHED, 2_000_000, 0);
        est.srtt_us = 80 << 3;
        let step = table.follow(&est, |o| out.push(o));
        assert_eq!((step.pid, step.dwell), (42, Some(0)));
        assert!(out.contains(&Observation::Handshake {
            mode: Mode::Passive,
            port: 8080,
            netns: 0,
            ns: 80_000,
            cgroup: 0,
        }));
        let step = table.observe(&child(900, ESTABLISHED, CLOSE_WAIT, 2_000_000, 0));
        assert_eq!((step.pid, &step.comm[..4]), (42, &b"curl"[..]));
        let listener = table
            .get(listener_cookie)
            .expect("the listener is still followed");
        assert_eq!((listener.state, listener.since_ns), (LISTEN, 100));
        let child = table
            .get(2_000_000)
            .expect("the child under its own cookie");
        assert_eq!((child.state, child.pid, child.port), (CLOSE_WAIT, 42, 8080));
        assert!(table.awaiting_cookie.is_empty());
    }

    /// The record of the last transition's socket, from a table that saw `seq`.
    fn record(seq: &[Transition]) -> Closed {
        let mut table = SocketTable::new(16);
        let mut closed = None;
        for t in seq {
            table.follow(t, |o| {
                if let Observation::Closed(c) = o {
                    closed = Some(c);
                }
            });
        }
        closed.expect("a record")
    }

    #[test]
    fn a_close_record_has_the_data_bytes_and_the_times_the_table_saw() {
        // An active open: SYN at 100, established at 150, FIN at 500, closed at 600. The
        // kernel's counters include the SYN and this side's FIN (acked), and the peer's FIN.
        let mut close = transition(8, 600, FIN_WAIT2, CLOSE);
        (close.bytes_acked, close.bytes_received) = (1_002, 2_001);
        close.close_flags = close_flags::FIN_ACKED | close_flags::PEER_FIN;
        (close.srtt_us, close.rtt_min_us, close.total_retrans) = (40 << 3, u32::MAX, 3);
        let c = record(&[
            transition(8, 100, CLOSE, SYN_SENT),
            transition(8, 150, SYN_SENT, ESTABLISHED),
            transition(8, 500, ESTABLISHED, FIN_WAIT1),
            transition(8, 550, FIN_WAIT1, FIN_WAIT2),
            close,
        ]);
        assert_eq!(
            (c.mode, c.opened_ns, c.handshake_ns, c.lifetime_ns),
            (Some(Mode::Active), Some(100), Some(50), Some(450))
        );
        assert_eq!((c.bytes_sent, c.bytes_received), (Some(1_000), 2_000));
        assert_eq!((c.srtt_us, c.rtt_min_us, c.retransmits), (40, 0, 3));
        assert_eq!(c.ending, Ending::ClosedHereFirst);
        // Seen only from its teardown on: no opening, no handshake or lifetime, and the bytes
        // sent not known exactly (a SYN may be in them).
        let c = record(&[transition(9, 500, CLOSE_WAIT, LAST_ACK), {
            let mut t = transition(9, 600, LAST_ACK, CLOSE);
            t.bytes_acked = 10;
            t
        }]);
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
    fn a_reset_before_the_close_is_kept_for_the_record_and_one_after_is_reported() {
        let reset = |cookie, time, state, reason| {
            let mut t = transition(cookie, time, state, SENT_RESET);
            t.reset_reason = reason;
            t
        };
        // Keepalive ran out: the kernel resets (reason 15), then closes with ETIMEDOUT.
        let mut close = transition(8, 900, ESTABLISHED, CLOSE);
        close.sk_err = ETIMEDOUT as u8;
        let c = record(&[
            transition(8, 100, CLOSE, SYN_SENT),
            transition(8, 150, SYN_SENT, ESTABLISHED),
            reset(8, 890, ESTABLISHED, 15),
            close,
        ]);
        assert_eq!((c.ending, c.reset_reason), (Ending::TimedOut, Some(15)));

        // A reset after the close (the usual order) finds no entry: its reader completes the
        // record, which then says this side reset it, whatever the states said.
        let mut table = SocketTable::new(16);
        let mut out = Vec::new();
        for t in [
            transition(9, 100, CLOSE, SYN_SENT),
            transition(9, 150, SYN_SENT, ESTABLISHED),
            transition(9, 500, ESTABLISHED, FIN_WAIT1),
            transition(9, 550, FIN_WAIT1, FIN_WAIT2),
            transition(9, 600, FIN_WAIT2, CLOSE),
            reset(9, 601, CLOSE, 11),
        ] {
            table.follow(&t, |o| out.push(o));
        }
        let mut c = out
            .iter()
            .find_map(|o| match o {
                Observation::Closed(c) => Some(*c),
                _ => None,
            })
            .unwrap();
        assert_eq!((c.ending, c.reset_reason), (Ending::ClosedHereFirst, None));
        assert_eq!(
            out.last(),
            Some(&Observation::ResetSent {
                reason: 11,
                followed: false
            })
        );
        // Not a transition: nothing counts it as one.
        assert!(!out.contains(&Observation::Transition {
            from: CLOSE,
            to: SENT_RESET
        }));
        c.reset_as_it_closed(11);
        assert_eq!((c.ending, c.reset_reason), (Ending::ResetSent, Some(11)));
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

    #[test]
    fn an_entry_is_48_bytes_and_owners_are_kept_once_while_referred_to() {
        assert_eq!(std::mem::size_of::<Entry>(), 48);
        let mut table = SocketTable::new(2);
        for cookie in 1..=3 {
            table.observe(&transition(cookie, cookie * 10, CLOSE, SYN_SENT));
        }
        // Three sockets of one owner, one evicted: one owner record, two references.
        assert_eq!((table.owners.ids.len(), table.owners.list[0].1), (1, 2));
        table.observe(&transition(2, 100, SYN_SENT, CLOSE));
        table.forget(3 + 1_000_000);
        assert!(table.owners.ids.is_empty(), "no entry refers to the owner");
        let mut other = transition(4, 200, CLOSE, SYN_SENT);
        (other.pid, other.comm) = (43, *b"wget\0\0\0\0\0\0\0\0\0\0\0\0");
        table.observe(&other);
        assert_eq!(table.owners.list.len(), 1, "the freed id is reused");
        assert_eq!(table.get(4 + 1_000_000).map(|i| i.pid), Some(43));
    }

    #[test]
    fn the_owner_named_at_opening_is_carried_to_every_later_transition() {
        let mut table = SocketTable::new(16);
        let open = table.observe(&transition(4, 100, CLOSE, SYN_SENT));
        assert_eq!(open.pid, 42);
        for (at, old, new) in [
            (200, SYN_SENT, ESTABLISHED),
            (300, ESTABLISHED, FIN_WAIT1),
            (400, FIN_WAIT1, CLOSE),
        ] {
            let mut t = transition(4, at, old, new);
            (t.pid, t.comm) = (0, [0; 16]); // softirq-time events: the probe names nobody
            let step = table.observe(&t);
            assert_eq!(
                (step.pid, &step.comm[..4]),
                (42, &b"curl"[..]),
                "{old} -> {new}"
            );
        }
        // A socket first seen mid-life has no owner.
        let mut t = transition(5, 100, ESTABLISHED, CLOSE_WAIT);
        t.pid = 0;
        assert_eq!(table.observe(&t).pid, 0);
    }
}
