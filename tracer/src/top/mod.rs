//! `tracer top`'s figures: what the probe's events and a census tell, summed by who and what
//! (process, cgroup, service port, remote endpoint), in one [`Snapshot`] that a screen turns
//! into rates between two of them (`view`).
//!
//! Two sources, each for what it knows:
//! - **events** ([`Tally`]): connections opened (handshakes completed), failed connects, the
//!   handshake's duration, and what each connection did in all when it closed (bytes each
//!   way, retransmissions);
//! - **a census** ([`CensusPart`], every socket of every namespace with the probe's storage
//!   on it): connections open now, stuck ones (past their state's threshold, as `/sockets`
//!   decides), the bytes and retransmissions of open connections so far, and their RTT.
//!
//! Bytes and retransmissions add the two: what closed connections did, settled when a census
//! arrives, plus what the open ones of that census did so far. Between two censuses that sum
//! grows by exactly what every connection did meanwhile (one that closed in between counts
//! its total less what the first census saw of it), so a rate needs no memory of each open
//! connection: this keeps aggregates (at most [`MAX_KEYS`] of them; more are counted in one
//! overflow row, and said), and the closes read since the last census. A census settles the
//! closes that it did not count open: a connection open at its dump that closed before the
//! census reached the tally is counted by the census, and settles at the next one (else it
//! would count twice for one refresh).
//!
//! The agent keeps a [`Tally`] of its own event stream and serves its snapshot at `/top`;
//! `tracer top` keeps one of its own probe's, or reads an agent's.
//!
//! Pure code: fed events and censuses, it returns snapshots.

pub mod screen;
pub mod view;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use tracer_common::{socket, state, Transition, COMM_LEN};

use crate::census::join::Joined;
use crate::census::stuck::Thresholds;
use crate::census::HostCensus;
use crate::stream::event::{comm_text, remote_addr};
use crate::stream::Observation;
use crate::workload::Workload;

/// Most keys kept; the events and sockets of more go to one overflow key (pid 0, comm
/// [`OVERFLOW_COMM`]), counted in [`Totals::keys_overflowed`].
pub const MAX_KEYS: usize = 8192;

/// A key with no event for this long, and no socket in the last census, is forgotten (its
/// snapshot entry goes; `view` reads a missing entry as one that did nothing), so that the
/// keys of processes long gone do not fill [`MAX_KEYS`] on a host that runs many.
pub const FORGET_AFTER_NS: u64 = 10 * 60 * 1_000_000_000;

/// The overflow key's comm.
pub const OVERFLOW_COMM: &str = "(more)";

/// Who and what a figure is about. The remote endpoint is the peer's address and its port
/// where the port is a service's (this side connected to it); for a connection this side
/// accepted, the peer's address alone (its port is an ephemeral one, which says nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub pid: u32,
    pub comm: [u8; COMM_LEN],
    pub cgroup: u64,
    /// Service port (0: not known).
    pub port: u16,
    pub remote: SocketAddr,
}

impl Key {
    fn overflow() -> Key {
        let mut comm = [0; COMM_LEN];
        comm[..OVERFLOW_COMM.len()].copy_from_slice(OVERFLOW_COMM.as_bytes());
        Key {
            pid: 0,
            comm,
            cgroup: 0,
            port: 0,
            remote: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        }
    }

    /// The key of an event's socket.
    pub fn of_event(t: &Transition) -> Key {
        let active = t.socket_flags & socket::ACTIVE != 0;
        let ip = remote_addr(t);
        Key {
            pid: t.pid,
            comm: t.comm,
            cgroup: t.cgroup,
            port: t.port,
            remote: SocketAddr::new(ip, if active { t.dport } else { 0 }),
        }
    }
}

/// A histogram of durations in microseconds, four buckets per doubling (a quantile read
/// from it is within an eighth of the true one), kept sparse: (bucket, count), by bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram(pub Vec<(u8, u64)>);

impl Histogram {
    /// The bucket of `us`: `floor(4 log2(us))` (0 for 0 and 1 us).
    fn bucket(us: u64) -> u8 {
        if us < 2 {
            return 0;
        }
        let octave = 63 - us.leading_zeros() as u64;
        // The two bits under the leading one pick the quarter of the octave (about).
        let quarter = if octave >= 2 {
            (us >> (octave - 2)) & 3
        } else {
            (us << (2 - octave)) & 3
        };
        (octave * 4 + quarter).min(255) as u8
    }

    /// The middle of a bucket, microseconds.
    fn middle(b: u8) -> f64 {
        let (octave, quarter) = (u32::from(b) / 4, u32::from(b) % 4);
        let base = 2f64.powi(octave as i32);
        base * (1.0 + (f64::from(quarter) + 0.5) / 4.0)
    }

    pub fn add(&mut self, us: u64, n: u64) {
        let b = Self::bucket(us);
        match self.0.binary_search_by_key(&b, |&(k, _)| k) {
            Ok(i) => self.0[i].1 += n,
            Err(i) => self.0.insert(i, (b, n)),
        }
    }

    pub fn merge(&mut self, other: &Histogram) {
        for &(b, n) in &other.0 {
            match self.0.binary_search_by_key(&b, |&(k, _)| k) {
                Ok(i) => self.0[i].1 += n,
                Err(i) => self.0.insert(i, (b, n)),
            }
        }
    }

    /// What grew from `earlier` to this.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let mut out = Histogram::default();
        for &(b, n) in &self.0 {
            let before = earlier
                .0
                .binary_search_by_key(&b, |&(k, _)| k)
                .map_or(0, |i| earlier.0[i].1);
            if n > before {
                out.0.push((b, n - before));
            }
        }
        out
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|&(_, n)| n).sum()
    }

    /// The `q` quantile (0..=1), microseconds; None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for &(b, n) in &self.0 {
            seen += n;
            if seen >= rank {
                return Some(Self::middle(b));
            }
        }
        self.0.last().map(|&(b, _)| Self::middle(b))
    }
}

/// What the events tell of one key, since the tally began.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFigures {
    /// Handshakes completed, either way.
    pub opened: u64,
    /// Connects that failed (refused, timed out, unreachable, reset in the handshake).
    pub failed: u64,
    /// Handshake durations (as `tracer_tcp_handshake_seconds` measures them).
    pub handshake_us: Histogram,
    /// Connections closed.
    pub closed: u64,
}

/// What connections that closed did in all: data bytes sent (acknowledged) and received,
/// segments retransmitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
    pub retransmits: u64,
}

impl Traffic {
    fn add(&mut self, o: &Traffic) {
        self.sent += o.sent;
        self.received += o.received;
        self.retransmits += o.retransmits;
    }
}

/// What a census tells of one key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CensusFigures {
    /// Connections open (every state but LISTEN, TIME-WAIT and CLOSE).
    pub open: u64,
    /// Sockets past their state's threshold (`--stuck-after`), as `/sockets` lists them.
    pub stuck: u64,
    /// What its open connections did so far.
    pub traffic: Traffic,
    /// Their smoothed RTT.
    pub rtt_us: Histogram,
}

/// A census's figures by key, taken at `taken_ns`.
#[derive(Clone, Debug, Default)]
pub struct CensusPart {
    pub taken_ns: u64,
    pub figures: HashMap<Key, CensusFigures>,
    /// Cookies of the open connections whose traffic it counts.
    pub counted: foldhash::HashSet<u64>,
    /// Pod (`namespace/name`) of each cgroup that is a pod's.
    pub pods: HashMap<u64, String>,
    /// Sockets counted under the overflow key.
    pub overflowed: u64,
}

impl CensusPart {
    /// The figures of a census: `joined` for each socket's state, age and owner, `census` for
    /// the counters of the open ones, `workloads` for pods.
    pub fn of(
        census: &HostCensus,
        joined: &Joined,
        thresholds: &Thresholds,
        now_ns: u64,
        taken_ns: u64,
        workloads: &HashMap<u64, std::sync::Arc<Workload>>,
    ) -> CensusPart {
        let mut counters = HashMap::new();
        for r in census.namespaces.iter().flat_map(|n| &n.sockets) {
            if let (Some(tcp), Some(storage)) = (r.tcp, r.storage) {
                if open(r.state) {
                    counters.insert(r.cookie, (tcp, storage.flags));
                }
            }
        }
        let mut part = CensusPart {
            taken_ns,
            ..CensusPart::default()
        };
        for v in &joined.sockets {
            if v.state == state::LISTEN {
                continue;
            }
            let found = counters.get(&v.cookie);
            let active = found.map_or(v.port != 0 && v.remote.port() == v.port, |(_, f)| {
                f & socket::ACTIVE != 0
            });
            let key = Key {
                pid: v.pid,
                comm: v.comm,
                cgroup: v.cgroup,
                port: v.port,
                remote: SocketAddr::new(v.remote.ip(), if active { v.remote.port() } else { 0 }),
            };
            let key = if part.figures.len() < MAX_KEYS || part.figures.contains_key(&key) {
                key
            } else {
                part.overflowed += 1;
                Key::overflow()
            };
            let f = part.figures.entry(key).or_default();
            if v.age(now_ns)
                .is_some_and(|age| thresholds.is_stuck(v.state, age))
            {
                f.stuck += 1;
            }
            if !open(v.state) {
                continue;
            }
            f.open += 1;
            if let Some((tcp, flags)) = found {
                part.counted.insert(v.cookie);
                // As the close record counts them: data bytes, the SYN and FINs left out.
                let (sent, received) = crate::stream::live::data_bytes(v.state, *flags, tcp);
                f.traffic.add(&Traffic {
                    sent,
                    received,
                    retransmits: u64::from(tcp.total_retrans),
                });
                if tcp.rtt_us > 0 {
                    f.rtt_us.add(u64::from(tcp.rtt_us), 1);
                }
            }
        }
        // Every pod of the census, listeners' included: a service's connections may all be
        // short, and its events still want its pod's name.
        for (&cgroup, w) in workloads {
            if let Some(pod) = &w.pod {
                part.pods.insert(cgroup, pod.text());
            }
        }
        part
    }
}

/// Connections that count as open: every state a connection is in from its SYN to its close
/// but TIME-WAIT (the kernel's, not the application's).
fn open(s: u8) -> bool {
    !matches!(s, state::LISTEN | state::TIME_WAIT | state::CLOSE)
}

/// Host-wide figures of the source, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Events read from the probe's rings.
    pub events: u64,
    /// Events lost: the ring buffer was full.
    pub lost: u64,
    /// Transitions the kernel skipped the probe for.
    pub missed: u64,
    /// The probe's programs: runs and time in them, as the kernel measures them (0 unless
    /// `kernel.bpf_stats_enabled` is 1).
    pub probe_runs: u64,
    pub probe_ns: u64,
    /// Events and sockets counted under the overflow key (more than [`MAX_KEYS`] keys).
    pub keys_overflowed: u64,
}

/// One key's figures in a snapshot, with its names as text.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub pid: u32,
    /// The process name, as the kernel keeps it (escaped only when shown).
    pub comm: String,
    pub cgroup: u64,
    /// `namespace/pod` when the cgroup is a pod's, else empty.
    pub pod: String,
    pub port: u16,
    /// `ip:port` (a service this side connected to) or `ip` (a peer that connected here).
    pub remote: String,
    pub events: EventFigures,
    /// What connections of this key that closed before the census did.
    pub closed: Traffic,
    pub census: CensusFigures,
}

/// Everything `top` shows, at one moment: the answer of the agent's `/top`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// CLOCK_MONOTONIC ns of the source when taken, and of the census in it (0: none yet).
    pub time_ns: u64,
    pub census_ns: u64,
    pub totals: Totals,
    pub entries: Vec<Entry>,
}

/// How long the agent keeps counting for `/top` after the last request: a `tracer top`
/// asks every second; once none has for this long, the agent stops (and frees its tally).
pub const WANTED_FOR_NS: u64 = 5 * 60 * 1_000_000_000;

/// The agent's `/top`: the last snapshot, published by the event thread each second while a
/// client asks for it, and when one last asked. Nothing is counted until the first request
/// (an agent nobody runs `top` against pays nothing for it).
#[derive(Debug, Default)]
pub struct Latest {
    snapshot: parking_lot::Mutex<Option<std::sync::Arc<Snapshot>>>,
    /// CLOCK_MONOTONIC ns of the last request (0: none yet).
    asked_ns: std::sync::atomic::AtomicU64,
    /// Wanted whatever is asked (`tracer top`'s own census).
    always: bool,
}

impl Latest {
    /// One that is always wanted.
    pub fn always() -> Latest {
        Latest {
            always: true,
            ..Latest::default()
        }
    }

    /// The last snapshot (None until the event thread has made one since the first request).
    pub fn ask(&self, now_ns: u64) -> Option<std::sync::Arc<Snapshot>> {
        self.asked_ns
            .store(now_ns, std::sync::atomic::Ordering::Relaxed);
        self.snapshot.lock().clone()
    }

    /// True while a client asked within [`WANTED_FOR_NS`].
    pub fn wanted(&self, now_ns: u64) -> bool {
        let asked = self.asked_ns.load(std::sync::atomic::Ordering::Relaxed);
        self.always || (asked != 0 && now_ns.saturating_sub(asked) < WANTED_FOR_NS)
    }

    pub fn publish(&self, s: Option<Snapshot>) {
        *self.snapshot.lock() = s.map(std::sync::Arc::new);
    }
}

/// What a tally keeps of one key: its event figures, its closed connections' traffic, and
/// when it last had an event (CLOCK_MONOTONIC ns).
#[derive(Clone, Debug, Default)]
struct Kept {
    events: EventFigures,
    closed: Traffic,
    last_ns: u64,
}

/// A close read since the last census: its connection's traffic, settled by the next census
/// that does not count the connection open.
#[derive(Clone, Copy, Debug)]
struct Unsettled {
    time_ns: u64,
    cookie: u64,
    key: Key,
    traffic: Traffic,
}

/// Most closes kept unsettled between two censuses (80 bytes each); past it a close settles at
/// once (and may count twice for one refresh, if a census counted it open).
const MAX_UNSETTLED: usize = 1 << 20;

/// Sums a stream of events by key, and settles closed connections' traffic at each census.
/// One hash lookup per event that counts (a handshake, a failed connect, a close).
#[derive(Debug, Default)]
pub struct Tally {
    keys: foldhash::HashMap<Key, Kept>,
    /// Closes read since the last census, in the order read.
    unsettled: Vec<Unsettled>,
    /// Closed connections' traffic by key as of the last census.
    settled: foldhash::HashMap<Key, Traffic>,
    census: CensusPart,
    /// Pods of the cgroups of the last census and of the keys kept.
    pods: HashMap<u64, String>,
    pub totals: Totals,
}

impl Tally {
    /// Counts what one event completes (`o`, one of what `stream::observe` told of `t`).
    pub fn observe(&mut self, t: &Transition, o: &Observation) {
        if !matches!(
            o,
            Observation::Handshake { .. }
                | Observation::HandshakeFailure { .. }
                | Observation::Closed(_)
        ) {
            return;
        }
        let mut key = Key::of_event(t);
        if self.keys.len() >= MAX_KEYS && !self.keys.contains_key(&key) {
            self.totals.keys_overflowed += 1;
            key = Key::overflow();
        }
        let kept = self.keys.entry(key).or_default();
        kept.last_ns = t.time_ns;
        let f = &mut kept.events;
        match o {
            Observation::Handshake { ns, .. } => {
                f.opened += 1;
                f.handshake_us.add(ns / 1_000, 1);
            }
            Observation::HandshakeFailure { .. } => f.failed += 1,
            Observation::Closed(c) => {
                f.closed += 1;
                let traffic = Traffic {
                    sent: c.data_sent,
                    received: c.bytes_received,
                    retransmits: u64::from(c.retransmits),
                };
                if self.unsettled.len() < MAX_UNSETTLED {
                    self.unsettled.push(Unsettled {
                        time_ns: t.time_ns,
                        cookie: t.cookie,
                        key,
                        traffic,
                    });
                } else {
                    kept.closed.add(&traffic);
                }
            }
            _ => {}
        }
    }

    /// The probe's counters and programs' figures, read now.
    pub fn probe(
        &mut self,
        c: &crate::stream::probe::ProbeCounters,
        programs: &[crate::stream::probe::ProgramStats],
    ) {
        self.totals.lost = c.lost;
        self.totals.missed = c.missed;
        self.totals.probe_runs = programs.iter().map(|p| p.runs).sum();
        self.totals.probe_ns = programs.iter().map(|p| p.run_ns).sum();
    }

    /// A census arrived: closed connections' traffic up to now goes with it, and keys idle
    /// past [`FORGET_AFTER_NS`] with no socket in it are forgotten.
    pub fn census(&mut self, part: CensusPart) {
        // Closes after its dump of connections it counted open wait for the next census.
        for u in std::mem::take(&mut self.unsettled) {
            if u.time_ns > part.taken_ns && part.counted.contains(&u.cookie) {
                self.unsettled.push(u);
            } else {
                self.keys.entry(u.key).or_default().closed.add(&u.traffic);
            }
        }
        let horizon = part.taken_ns.saturating_sub(FORGET_AFTER_NS);
        self.keys
            .retain(|k, kept| kept.last_ns >= horizon || part.figures.contains_key(k));
        self.settled = self
            .keys
            .iter()
            .filter(|(_, kept)| kept.closed != Traffic::default())
            .map(|(k, kept)| (*k, kept.closed))
            .collect();
        // The pods of this census's cgroups, and those of the keys kept (a cgroup whose
        // sockets have all closed keeps its pod while its figures last).
        let mut pods = part.pods.clone();
        for k in self.keys.keys() {
            if let Some(pod) = self.pods.get(&k.cgroup) {
                pods.entry(k.cgroup).or_insert_with(|| pod.clone());
            }
        }
        self.pods = pods;
        self.totals.keys_overflowed += part.overflowed;
        self.census = part;
    }

    /// Everything, as of `now_ns`.
    pub fn snapshot(&self, now_ns: u64) -> Snapshot {
        let mut keys: Vec<&Key> = self.keys.keys().collect();
        keys.extend(
            self.census
                .figures
                .keys()
                .filter(|k| !self.keys.contains_key(k)),
        );
        let entries = keys
            .into_iter()
            .map(|k| Entry {
                pid: k.pid,
                comm: comm_text(&k.comm).into_owned(),
                cgroup: k.cgroup,
                pod: self.pods.get(&k.cgroup).cloned().unwrap_or_default(),
                port: k.port,
                remote: if k.remote.port() == 0 {
                    k.remote.ip().to_string()
                } else {
                    k.remote.to_string()
                },
                events: self
                    .keys
                    .get(k)
                    .map(|kept| kept.events.clone())
                    .unwrap_or_default(),
                closed: self.settled.get(k).copied().unwrap_or_default(),
                census: self.census.figures.get(k).cloned().unwrap_or_default(),
            })
            .collect();
        Snapshot {
            time_ns: now_ns,
            census_ns: self.census.taken_ns,
            totals: self.totals,
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::event::tests::transition;

    const S: u64 = 1_000_000_000;

    /// What `stream::observe` tells of `t`, counted.
    fn feed(tally: &mut Tally, t: &Transition) {
        crate::stream::observe(t, |o| tally.observe(t, &o));
    }

    #[test]
    fn a_tally_counts_by_key_and_settles_closed_traffic_at_each_census() {
        let mut tally = Tally::default();
        // curl (pid 42) connects to 8080 twice: 150 us handshakes; one fails.
        for (i, at) in [(1u64, 10 * S), (2, 11 * S)] {
            let mut t = transition(i, at, state::SYN_SENT, state::ESTABLISHED);
            t.since_ns = at - 150_000;
            t.socket_flags = socket::ACTIVE | socket::SINCE_SEEN;
            feed(&mut tally, &t);
        }
        let mut refused = transition(3, 12 * S, state::SYN_SENT, state::CLOSE);
        refused.sk_err = 111;
        refused.socket_flags = socket::ACTIVE | socket::SINCE_SEEN;
        refused.since_ns = 12 * S - 50_000;
        feed(&mut tally, &refused);
        // One closes, having received 5,000 bytes.
        let mut close = transition(1, 13 * S, state::LAST_ACK, state::CLOSE);
        close.socket_flags = socket::ACTIVE | socket::SINCE_SEEN;
        close.established_ns = 10 * S;
        close.bytes_received = 5_001;
        feed(&mut tally, &close);
        let s = tally.snapshot(14 * S);
        assert_eq!(s.entries.len(), 1, "{s:?}");
        let e = &s.entries[0];
        assert_eq!(
            (e.pid, e.comm.as_str(), e.port, e.remote.as_str()),
            (42, "curl", 8080, "127.0.0.1:8080")
        );
        // Closed: the refused connect's socket too (every transition to CLOSE is a record).
        assert_eq!(
            (e.events.opened, e.events.failed, e.events.closed),
            (2, 1, 2)
        );
        assert_eq!(e.events.handshake_us.count(), 2);
        // Not settled before a census: the census's open connections are what it adds to.
        assert_eq!(e.closed, Traffic::default());
        tally.census(CensusPart {
            taken_ns: 14 * S,
            ..CensusPart::default()
        });
        let e = &tally.snapshot(15 * S).entries[0];
        assert!(e.closed.received > 0 && e.closed.received <= 5_001, "{e:?}");
        assert_eq!(tally.snapshot(15 * S).census_ns, 14 * S);
    }

    #[test]
    fn a_connection_open_at_a_census_dump_and_closed_before_it_arrives_counts_once() {
        let mut tally = Tally::default();
        // Connection 1 closes at 19 s, before the dump at 20 s, having received 1,000 bytes;
        // connection 2, open at the dump with 3,000 received, closes at 20.5 s with 4,000.
        // Both closes are read before the census reaches the tally.
        let closing = |cookie: u64, at: u64, received: u64| {
            let mut t = transition(cookie, at, state::LAST_ACK, state::CLOSE);
            t.cookie = cookie;
            t.socket_flags = socket::ACTIVE | socket::SINCE_SEEN;
            t.established_ns = S;
            t.bytes_received = received;
            t
        };
        let first = closing(1, 19 * S, 1_000);
        let key = Key::of_event(&first);
        feed(&mut tally, &first);
        feed(&mut tally, &closing(2, 20 * S + S / 2, 4_000));
        let open = CensusFigures {
            open: 1,
            traffic: Traffic {
                received: 3_000,
                ..Traffic::default()
            },
            ..CensusFigures::default()
        };
        tally.census(CensusPart {
            taken_ns: 20 * S,
            figures: [(key, open)].into_iter().collect(),
            counted: [2].into_iter().collect(),
            ..CensusPart::default()
        });
        let seen = |tally: &Tally| {
            let e = &tally.snapshot(30 * S).entries[0];
            (e.closed.received, e.census.traffic.received)
        };
        // Connection 2 is in the census's 3,000, not yet in what closed.
        assert_eq!(seen(&tally), (1_000, 3_000));
        tally.census(CensusPart {
            taken_ns: 25 * S,
            ..CensusPart::default()
        });
        // Now it has settled: 1,000 + 4,000, and nothing open. The sum grew by 1,000: what
        // connection 2 received after the first dump.
        assert_eq!(seen(&tally), (5_000, 0));
    }

    #[test]
    fn keys_idle_past_the_horizon_are_forgotten_and_the_overflow_is_counted() {
        let mut tally = Tally::default();
        for i in 0..(MAX_KEYS as u64 + 5) {
            let mut t = transition(i, S, state::SYN_SENT, state::ESTABLISHED);
            t.pid = i as u32 + 1;
            t.since_ns = S - 1_000;
            t.socket_flags = socket::ACTIVE | socket::SINCE_SEEN;
            feed(&mut tally, &t);
        }
        assert_eq!(tally.totals.keys_overflowed, 5);
        let s = tally.snapshot(2 * S);
        assert_eq!(s.entries.len(), MAX_KEYS + 1);
        let more = s.entries.iter().find(|e| e.comm == OVERFLOW_COMM).unwrap();
        assert_eq!(more.events.opened, 5);
        // Ten minutes on, with none of them in the census: all forgotten.
        tally.census(CensusPart {
            taken_ns: S + FORGET_AFTER_NS + 1,
            ..CensusPart::default()
        });
        assert!(tally.snapshot(FORGET_AFTER_NS + 2 * S).entries.is_empty());
    }

    #[test]
    fn histogram_quantiles_are_within_a_tenth() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.add(us * 100, 1);
        }
        for (q, truth) in [(0.5, 50_000.0), (0.99, 99_000.0), (0.01, 1_000.0)] {
            let got = h.quantile(q).unwrap();
            assert!((got / truth - 1.0).abs() < 0.1, "q{q}: {got} for {truth}");
        }
        assert_eq!(h.count(), 1000);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn histogram_since_keeps_only_what_grew() {
        let mut a = Histogram::default();
        a.add(100, 2);
        let mut b = a.clone();
        b.add(100, 3);
        b.add(5_000, 1);
        let d = b.since(&a);
        assert_eq!(d.count(), 4);
        assert!((d.quantile(0.5).unwrap() / 100.0 - 1.0).abs() < 0.1);
    }

    #[test]
    fn buckets_grow_with_the_duration() {
        let mut last = 0;
        for us in [1u64, 2, 3, 4, 5, 6, 7, 8, 100, 1_000, 1 << 40] {
            let b = Histogram::bucket(us);
            assert!(b >= last, "{us}");
            last = b;
            let mid = Histogram::middle(b);
            assert!(
                mid / us as f64 > 0.85 && mid / (us as f64) < 1.2,
                "{us}: {mid}"
            );
        }
    }
}
