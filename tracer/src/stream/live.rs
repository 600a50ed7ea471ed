//! Open connections, counted while they live: at each census, every connection the probe saw
//! open at least [`FOLLOW_AFTER_NS`] before it (or found open when the agent started) has
//! what it did since the previous census counted in the metrics (its bytes and RTT are
//! current within one `--census-interval`), and, once `--record-interval` has passed since
//! its last record, an update record ([`Update::due`]) with what it did since that record.
//! Its close then counts only the rest, and its close record reports only what followed the
//! last update record. Nothing is counted twice, and update records and close add up to the
//! connection's totals.
//!
//! Why at the census rather than on a hook: the kernel keeps the counters on the socket
//! (`tcp_info`), and the census already reads every socket of every namespace each
//! `--census-interval` with the probe's storage on it; a hook on the data path (a program
//! per segment) would cost every packet, and a BPF iterator over the storage, which would
//! keep the last report on the socket, is refused by some kernels (EPERM on this project's
//! test hosts, as fentry is). So what was last counted and recorded is kept here, for
//! connections older than [`FOLLOW_AFTER_NS`] only (short ones never get an entry: a churning
//! host's connections are counted at their close), and a connection's entry goes at its
//! close, or at the first census that no longer finds it.
//!
//! A census and a close can cross: a census taken just before a close may be handled after
//! it. The close of a connection that could be followed (open longer than
//! [`FOLLOW_AFTER_NS`]) is remembered until the next census, whose samples from before the
//! close are then skipped.
//!
//! Pure code: fed censuses and closes, it returns what they tell.

use std::net::SocketAddr;

use tracer_common::{socket, state, SocketState};

use crate::census::HostCensus;
use crate::stream::{Closed, Flow, Interval, Mode};

/// A connection the probe saw open is followed (counted at each census) once it has been
/// established this long: shorter ones are counted at their close, so that a census of a
/// churning host hands over (and the tracker remembers) only what lives.
pub const FOLLOW_AFTER_NS: u64 = 1_000_000_000;

/// A connection's counters at one moment: data bytes sent (acknowledged) and received, the
/// SYN and FINs that the kernel's counters include left out as the close record leaves them
/// out, and segments retransmitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub sent: u64,
    pub received: u64,
    pub retransmits: u64,
    pub flow: Flow,
}

/// One open connection as a census saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// CLOCK_MONOTONIC ns just before its namespace was dumped.
    pub time_ns: u64,
    pub cookie: u64,
    pub netns: u32,
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub cgroup: u64,
    /// What the probe keeps on the socket (owner, service port, how and when it opened).
    pub storage: SocketState,
    pub counters: Counters,
    /// Smoothed and minimum RTT, microseconds (0: no sample).
    pub srtt_us: u32,
    pub rtt_min_us: u32,
    /// The window the peer advertises now (0: zero window), where the kernel tells.
    pub snd_wnd: Option<u32>,
}

/// What one census gives the tracker: the connections it saw open, and which namespaces it
/// visited (an entry of a namespace it could not visit is kept).
#[derive(Clone, Debug, Default)]
pub struct LiveCensus {
    pub samples: Vec<Sample>,
    pub visited: Vec<u32>,
}

/// How often `watch --connections` takes a census for its update records: a tenth of the
/// interval, between 1 s and 5 s (the agent takes one each `--census-interval`).
pub fn census_period(interval: std::time::Duration) -> std::time::Duration {
    (interval / 10).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(5),
    )
}

/// Data bytes sent (acknowledged) and received of an open connection in `state`, from the
/// kernel's `tcp_info` counters, less the SYN and FINs they count, as the close record counts
/// them: the SYN only where the probe saw this side send it (`flags`, the storage's).
pub fn data_bytes(state: u8, flags: u16, tcp: &crate::census::TcpCounters) -> (u64, u64) {
    let syn = u64::from(flags & socket::ACTIVE != 0 && tcp.bytes_acked > 0);
    // This side's FIN is acknowledged in FIN_WAIT2 only (a later state is TIME-WAIT or
    // gone); the peer's has arrived in these.
    let fin_acked = u64::from(state == state::FIN_WAIT2);
    let peer_fin = u64::from(matches!(
        state,
        state::CLOSE_WAIT | state::LAST_ACK | state::CLOSING
    ));
    (
        tcp.bytes_acked.saturating_sub(syn + fin_acked),
        tcp.bytes_received.saturating_sub(peer_fin),
    )
}

/// States in which a connection carries data (and whose counters a census reads).
fn carries_data(s: u8) -> bool {
    use state::*;
    matches!(
        s,
        ESTABLISHED | FIN_WAIT1 | FIN_WAIT2 | CLOSE_WAIT | CLOSING | LAST_ACK
    )
}

/// The connections a census saw open with the probe's storage on them (a socket the probe
/// never saw and was not told the owner of has no service port to count under), less those
/// the probe saw open less than [`FOLLOW_AFTER_NS`] ago: none of them is followed yet, so a
/// census of a churning host hands over only the connections that live.
pub fn samples(census: &HostCensus) -> LiveCensus {
    let mut out = LiveCensus::default();
    for ns in &census.namespaces {
        out.visited.push(ns.netns as u32);
        for r in &ns.sockets {
            let (Some(storage), Some(tcp)) = (r.storage, r.tcp) else {
                continue;
            };
            if !carries_data(r.state) {
                continue;
            }
            let seen_open = storage.flags & (socket::ACTIVE | socket::PASSIVE) != 0
                && storage.established_ns != 0;
            if seen_open && ns.dumped_at_ns < storage.established_ns.saturating_add(FOLLOW_AFTER_NS)
            {
                continue;
            }
            let (sent, received) = data_bytes(r.state, storage.flags, &tcp);
            out.samples.push(Sample {
                time_ns: ns.dumped_at_ns,
                cookie: r.cookie,
                netns: ns.netns as u32,
                state: r.state,
                local: r.local,
                remote: r.remote,
                cgroup: r.cgroup,
                storage,
                counters: Counters {
                    sent,
                    received,
                    retransmits: u64::from(tcp.total_retrans),
                    flow: Flow {
                        busy_us: tcp.busy_us,
                        rwnd_limited_us: tcp.rwnd_limited_us,
                        sndbuf_limited_us: tcp.sndbuf_limited_us,
                        spurious_retransmits: u64::from(tcp.dsack_dups),
                        retransmits: crate::stream::retransmits_by_kind(
                            storage.retransmits,
                            storage.flags,
                            storage.established_ns,
                            u64::from(tcp.total_retrans),
                        ),
                    },
                },
                srtt_us: tcp.rtt_us,
                rtt_min_us: tcp.min_rtt_us,
                snd_wnd: tcp.snd_wnd,
            });
        }
    }
    out
}

/// What a census tells of one followed connection: what it did since the previous census
/// (for the metrics), and, when its record interval is up, its update record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update {
    pub sample: Sample,
    pub mode: Option<Mode>,
    /// What it did since its previous update record, or since it became ESTABLISHED: what
    /// the update record reports (when [`Update::due`]).
    pub interval: Interval,
    /// What it did since the previous census counted it: what the metrics add now.
    pub counted: Interval,
    /// Its `--record-interval` is up: an update record is due (and `interval` starts the
    /// next one).
    pub due: bool,
}

/// What was last recorded and counted of a connection: when, and its counters then. For a
/// connection the probe did not see open, both are its counters at the first census that
/// saw it: what it carried before is neither recorded nor counted.
#[derive(Clone, Copy, Debug)]
struct Entry {
    netns: u32,
    recorded_ns: u64,
    recorded: Counters,
    counted_ns: u64,
    counted: Counters,
    /// Seen by the latest census.
    seen: bool,
}

/// Follows what was recorded and counted of each connection open longer than
/// [`FOLLOW_AFTER_NS`].
pub struct Tracker {
    interval_ns: u64,
    entries: foldhash::HashMap<u64, Entry>,
    /// Closes of connections old enough to be followed, by cookie, with the time of the
    /// close: a census taken before it is not to count them again.
    closed: foldhash::HashMap<u64, u64>,
}

/// What a connection did from `from` (taken at `start_ns`) to `to`.
fn stretch(start_ns: u64, from: &Counters, to: &Counters) -> Interval {
    Interval {
        start_ns: Some(start_ns),
        bytes_sent: Some(to.sent.saturating_sub(from.sent)),
        bytes_received: to.received.saturating_sub(from.received),
        retransmits: to.retransmits.saturating_sub(from.retransmits),
        flow: to.flow.since(&from.flow),
    }
}

impl Tracker {
    pub fn new(interval: std::time::Duration) -> Tracker {
        Tracker {
            interval_ns: u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX),
            entries: Default::default(),
            closed: Default::default(),
        }
    }

    /// Connections followed now (for the agent's own memory figures).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Handles one census: an [`Update`] for every connection followed (its update record
    /// due where its record interval is up).
    pub fn census(&mut self, census: &LiveCensus, mut report: impl FnMut(Update)) {
        let visited: foldhash::HashSet<u32> = census.visited.iter().copied().collect();
        for e in self.entries.values_mut() {
            if visited.contains(&e.netns) {
                e.seen = false;
            }
        }
        let oldest = census.samples.iter().map(|s| s.time_ns).min().unwrap_or(0);
        for s in &census.samples {
            if self.closed.get(&s.cookie).is_some_and(|&at| s.time_ns < at) {
                continue;
            }
            let st = &s.storage;
            let mode = if st.flags & socket::ACTIVE != 0 {
                Some(Mode::Active)
            } else if st.flags & socket::PASSIVE != 0 {
                Some(Mode::Passive)
            } else {
                None
            };
            let seen_open = mode.is_some() && st.established_ns != 0;
            let previous = match self.entries.get_mut(&s.cookie) {
                Some(e) => {
                    e.seen = true;
                    *e
                }
                None if seen_open => {
                    if s.time_ns < st.established_ns.saturating_add(FOLLOW_AFTER_NS) {
                        continue;
                    }
                    Entry {
                        netns: s.netns,
                        recorded_ns: st.established_ns,
                        recorded: Counters::default(),
                        counted_ns: st.established_ns,
                        counted: Counters::default(),
                        seen: true,
                    }
                }
                None => {
                    let first = Entry {
                        netns: s.netns,
                        recorded_ns: s.time_ns,
                        recorded: s.counters,
                        counted_ns: s.time_ns,
                        counted: s.counters,
                        seen: true,
                    };
                    self.entries.insert(s.cookie, first);
                    continue;
                }
            };
            let c = s.counters;
            let due = s.time_ns >= previous.recorded_ns.saturating_add(self.interval_ns);
            report(Update {
                sample: *s,
                mode,
                interval: stretch(previous.recorded_ns, &previous.recorded, &c),
                counted: stretch(previous.counted_ns, &previous.counted, &c),
                due,
            });
            let (recorded_ns, recorded) = if due {
                (s.time_ns, c)
            } else {
                (previous.recorded_ns, previous.recorded)
            };
            self.entries.insert(
                s.cookie,
                Entry {
                    netns: s.netns,
                    recorded_ns,
                    recorded,
                    counted_ns: s.time_ns,
                    counted: c,
                    seen: true,
                },
            );
        }
        // Gone without a close (its event lost): forgotten. Closes before this census can
        // appear in no later one.
        self.entries.retain(|_, e| e.seen);
        self.closed.retain(|_, &mut at| at >= oldest);
    }

    /// Handles a connection's close: what it did since its last update record becomes the
    /// close record's interval, and what it did since the last census counted it what the
    /// close adds to the metrics ([`Closed::counted`]).
    pub fn close(&mut self, cookie: u64, time_ns: u64, c: &mut Closed) {
        if let Some(e) = self.entries.remove(&cookie) {
            let now = Counters {
                sent: c.data_sent,
                received: c.bytes_received,
                retransmits: u64::from(c.retransmits),
                flow: c.flow,
            };
            c.interval = stretch(e.recorded_ns, &e.recorded, &now);
            c.counted = stretch(e.counted_ns, &e.counted, &now);
        }
        // Old enough that a census from before the close could count it again. (One the
        // probe did not see open would only be given a first look again, which counts
        // nothing and goes at the next census.)
        if c.lifetime_ns.is_some_and(|l| l >= FOLLOW_AFTER_NS) {
            self.closed.insert(cookie, time_ns);
        }
    }
}
