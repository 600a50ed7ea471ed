//! Stuck sockets: every socket of the census with its age in its current state, whether it is
//! past its state's threshold and why that matters, plus what the census tells about TIME-WAIT,
//! ephemeral ports and listen queues.
//!
//! Pure code: it joins a census (all network namespaces) with what the socket table knows
//! (`lookup`, by cookie), and is unit-tested on hand-made censuses. Ages come from transitions
//! the agent saw; a socket that was already there when the agent started has "at least since
//! start"; a request socket (which never passes through the tracepoint) has the age its
//! SYN-ACK timer implies ([`request_age`]); any other socket has no age.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use tracer_common::state;

use crate::census::NetnsCensus;
use crate::event::state_name;
use crate::sockets::SocketInfo;

/// Default thresholds: how long a socket may stay in a state before it counts as stuck.
pub const DEFAULT_THRESHOLDS: [(u8, Duration); 7] = [
    // The application has not closed a connection its peer closed: a descriptor leak.
    (state::CLOSE_WAIT, Duration::from_secs(60)),
    // Our FIN is not acknowledged: the peer is gone or its receive window is closed.
    (state::FIN_WAIT1, Duration::from_secs(60)),
    // We closed, the peer has not (Linux drops orphans after tcp_fin_timeout, 60 s).
    (state::FIN_WAIT2, Duration::from_secs(60)),
    (state::LAST_ACK, Duration::from_secs(30)),
    (state::CLOSING, Duration::from_secs(30)),
    // Several SYN retransmissions without answer (1, 2, 3, 4 s ...).
    (state::SYN_SENT, Duration::from_secs(10)),
    (state::SYN_RECV, Duration::from_secs(10)),
];

/// Why a socket in `state` past its threshold is a problem, and where to look.
pub fn reason(state: u8) -> &'static str {
    match state {
        state::CLOSE_WAIT => {
            "the peer closed; the owning process has not called close() (descriptor leak?)"
        }
        state::FIN_WAIT1 => {
            "our FIN is not acknowledged: the peer is unresponsive or its window is closed"
        }
        state::FIN_WAIT2 => "we closed; the peer has not closed its side",
        state::LAST_ACK => "we closed after the peer; our FIN is not acknowledged",
        state::CLOSING => "both sides closed at once; the last ACK has not arrived",
        state::SYN_SENT => "no answer to our SYN: the peer is down, filtered or black-holed",
        state::SYN_RECV => {
            "the client has not completed the handshake: lost ACKs, a SYN flood or spoofed SYNs"
        }
        _ => "older than its threshold",
    }
}

/// Thresholds by state (index = kernel state number).
#[derive(Clone, Debug)]
pub struct Thresholds(pub [Option<Duration>; 13]);

impl Default for Thresholds {
    fn default() -> Self {
        let mut t = [None; 13];
        for (s, d) in DEFAULT_THRESHOLDS {
            t[s as usize] = Some(d);
        }
        Thresholds(t)
    }
}

/// One socket of the listing.
#[derive(Clone, Debug, PartialEq)]
pub struct SocketView {
    pub netns: u64,
    /// Kernel state (request sockets show as SYN_RECV, as in `ss`).
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Time in `state`, and where it comes from; None when nothing tells it.
    pub age: Option<Duration>,
    pub age_source: AgeSource,
    pub pid: u32,
    /// NUL-padded, as the kernel keeps it (turned into text only when rendered).
    pub comm: [u8; 16],
    /// The service port: the local port when it is a listening port there, else the remote one.
    pub port: u16,
    /// Set when older than the state's threshold: why that matters.
    pub stuck: Option<&'static str>,
}

/// Where a socket's age comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgeSource {
    /// The agent saw the transition into the state: exact.
    Transition,
    /// The socket was there when the agent started: the agent's uptime, a lower bound.
    AgentStart,
    /// A request socket: derived from its SYN-ACK timer ([`request_age`]), a close lower bound.
    SynAckTimer,
    /// No age.
    Unknown,
}

impl AgeSource {
    pub fn name(self) -> &'static str {
        match self {
            AgeSource::Transition => "transition",
            AgeSource::AgentStart => "agent_start",
            AgeSource::SynAckTimer => "synack_timer",
            AgeSource::Unknown => "unknown",
        }
    }
}

/// The age of a request socket from its SYN-ACK timer as sock_diag shows it: `retransmits`
/// SYN-ACKs resent so far and `expires` until the next. The kernel arms the timer for 1 s
/// (`TCP_TIMEOUT_INIT`) when the SYN arrives and doubles it at each retransmission, up to
/// 120 s (`TCP_RTO_MAX`), so the time since the SYN is the sum of the periods so far minus
/// what is left of the current one. A lower bound: the timer wheel fires each period up to an
/// eighth late, and the next period starts from there (and a BPF `sock_ops` program can
/// change the initial timeout).
pub fn request_age(expires: Duration, retransmits: u8) -> Duration {
    let periods: Duration = (0..=u32::from(retransmits))
        .map(|i| Duration::from_secs(1u64.checked_shl(i).unwrap_or(u64::MAX).min(120)))
        .sum();
    periods.saturating_sub(expires)
}

/// A destination whose ephemeral ports are filling.
#[derive(Clone, Debug, PartialEq)]
pub struct Destination {
    pub netns: u64,
    pub local_ip: std::net::IpAddr,
    pub remote: SocketAddr,
    /// Sockets to it from ports in the local port range, and the range's size.
    pub used: u64,
    pub range: u64,
}

impl Destination {
    pub fn utilization(&self) -> f64 {
        self.used as f64 / self.range.max(1) as f64
    }
}

/// Everything a census tells, joined with the agent's table.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub sockets: Vec<SocketView>,
    /// Stuck sockets per (state, service port).
    pub stuck: BTreeMap<(u8, u16), u64>,
    /// Oldest age per state, among sockets with a known age or lower bound.
    pub oldest: BTreeMap<u8, Duration>,
    /// TIME-WAIT sockets per service port.
    pub time_wait: BTreeMap<u16, u64>,
    /// Destinations by ephemeral port use, busiest first (at most 10).
    pub destinations: Vec<Destination>,
    /// Per listening port: accept queue length and limit (summed over listeners).
    pub listen_queue: BTreeMap<u16, (u64, u64)>,
}

/// Joins `census` with the table. `now_ns` and `started_ns` are CLOCK_MONOTONIC, as the
/// probe's timestamps; `at_start` holds the cookies of the sockets there when the agent started.
pub fn snapshot(
    census: &[NetnsCensus],
    lookup: impl Fn(u64) -> Option<SocketInfo>,
    at_start: &HashSet<u64>,
    thresholds: &Thresholds,
    now_ns: u64,
    started_ns: u64,
) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut per_destination: HashMap<(u64, std::net::IpAddr, SocketAddr), u64> = HashMap::new();
    for ns in census {
        let listening: HashSet<u16> = ns
            .sockets
            .iter()
            .filter(|r| r.state == state::LISTEN)
            .map(|r| r.local.port())
            .collect();
        // Owners of the listeners the agent saw open: a request socket belongs to its listener
        // (the probe credits a passive child the same way).
        let listener_owner: HashMap<u16, (u32, [u8; 16])> = ns
            .sockets
            .iter()
            .filter(|r| r.state == state::LISTEN)
            .filter_map(|r| {
                lookup(r.cookie)
                    .filter(|i| i.pid != 0)
                    .map(|i| (r.local.port(), (i.pid, i.comm)))
            })
            .collect();
        let (lo, hi) = ns.port_range;
        for r in &ns.sockets {
            let state = if r.state == state::NEW_SYN_RECV {
                state::SYN_RECV
            } else {
                r.state
            };
            let info = lookup(r.cookie);
            // The service port: as the table learnt it when the socket opened; else the local
            // port when something listens on it (or the socket listens), else the remote one.
            let local_is_service = listening.contains(&r.local.port());
            let port = match info.map(|i| i.port).filter(|&p| p != 0) {
                Some(p) => p,
                None if local_is_service || state == state::LISTEN => r.local.port(),
                None => r.remote.port(),
            };
            if state == state::LISTEN {
                let q = snap.listen_queue.entry(port).or_default();
                q.0 += u64::from(r.rqueue);
                q.1 += u64::from(r.wqueue);
            }
            if state == state::TIME_WAIT {
                *snap.time_wait.entry(port).or_default() += 1;
            }
            if state != state::LISTEN && !local_is_service && (lo..=hi).contains(&r.local.port()) {
                *per_destination
                    .entry((ns.netns, r.local.ip(), r.remote))
                    .or_default() += 1;
            }

            let (age, age_source) = match (info, r.retransmit) {
                (Some(i), _) if i.state == state => (
                    Some(Duration::from_nanos(now_ns.saturating_sub(i.since_ns))),
                    AgeSource::Transition,
                ),
                // The census caught a transition the agent has not read yet: it just happened.
                (Some(_), _) => (Some(Duration::ZERO), AgeSource::Transition),
                // sock_diag reports request sockets as SYN_RECV (inet_req_diag_fill).
                (None, Some((expires, retransmits))) if state == state::SYN_RECV => (
                    Some(request_age(expires, retransmits)),
                    AgeSource::SynAckTimer,
                ),
                (None, _) if at_start.contains(&r.cookie) => (
                    Some(Duration::from_nanos(now_ns.saturating_sub(started_ns))),
                    AgeSource::AgentStart,
                ),
                (None, _) => (None, AgeSource::Unknown),
            };
            let stuck = match (thresholds.0.get(state as usize).copied().flatten(), age) {
                (Some(limit), Some(age)) if age >= limit => Some(reason(state)),
                _ => None,
            };
            if let Some(age) = age {
                let oldest = snap.oldest.entry(state).or_default();
                *oldest = (*oldest).max(age);
            }
            if stuck.is_some() {
                *snap.stuck.entry((state, port)).or_default() += 1;
            }
            let (pid, comm) = match info {
                Some(i) if i.pid != 0 => (i.pid, i.comm),
                None if age_source == AgeSource::SynAckTimer => listener_owner
                    .get(&r.local.port())
                    .copied()
                    .unwrap_or((0, [0; 16])),
                _ => (0, [0; 16]),
            };
            snap.sockets.push(SocketView {
                netns: ns.netns,
                state,
                local: r.local,
                remote: r.remote,
                age,
                age_source,
                pid,
                comm,
                port,
                stuck,
            });
        }
    }
    let range_of: HashMap<u64, u64> = census
        .iter()
        .map(|n| (n.netns, u64::from(n.port_range.1 - n.port_range.0) + 1))
        .collect();
    let mut destinations: Vec<Destination> = per_destination
        .into_iter()
        .map(|((netns, local_ip, remote), used)| Destination {
            netns,
            local_ip,
            remote,
            used,
            range: range_of.get(&netns).copied().unwrap_or(1),
        })
        .collect();
    destinations.sort_by(|a, b| b.utilization().total_cmp(&a.utilization()));
    destinations.truncate(10);
    snap.destinations = destinations;
    snap
}

/// The text of a NUL-padded command name.
pub fn comm_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Human name of a state for the listing.
pub fn state_label(s: u8) -> &'static str {
    state_name(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::SocketRecord;

    fn rec(state: u8, local: &str, remote: &str, cookie: u64) -> SocketRecord {
        SocketRecord {
            state,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            rqueue: 0,
            wqueue: 0,
            inode: 1,
            cookie,
            retransmit: None,
        }
    }

    fn census(sockets: Vec<SocketRecord>) -> Vec<NetnsCensus> {
        vec![NetnsCensus {
            netns: 4026531840,
            sockets,
            port_range: (40000, 40009),
            ..Default::default()
        }]
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_close_wait_seen_entering_gets_its_age_owner_and_is_stuck_past_the_threshold() {
        let c = census(vec![
            rec(state::LISTEN, "127.0.0.1:8080", "0.0.0.0:0", 1),
            rec(state::CLOSE_WAIT, "127.0.0.1:8080", "127.0.0.1:40001", 2),
        ]);
        let lookup = |cookie| {
            (cookie == 2).then_some(SocketInfo {
                state: state::CLOSE_WAIT,
                since_ns: 10 * S,
                pid: 77,
                comm: *b"leaky\0\0\0\0\0\0\0\0\0\0\0",
                port: 8080,
            })
        };
        let snap = snapshot(
            &c,
            lookup,
            &HashSet::new(),
            &Thresholds::default(),
            75 * S,
            0,
        );
        let v = &snap.sockets[1];
        assert_eq!(
            (
                v.age,
                v.age_source,
                v.pid,
                comm_string(&v.comm).as_str(),
                v.port
            ),
            (
                Some(Duration::from_secs(65)),
                AgeSource::Transition,
                77,
                "leaky",
                8080
            )
        );
        assert!(v.stuck.is_some());
        assert_eq!(snap.stuck.get(&(state::CLOSE_WAIT, 8080)), Some(&1));
        assert_eq!(
            snap.oldest.get(&state::CLOSE_WAIT),
            Some(&Duration::from_secs(65))
        );
    }

    #[test]
    fn sockets_from_before_the_agent_are_at_least_its_uptime_and_others_have_no_age() {
        let c = census(vec![
            rec(state::CLOSE_WAIT, "127.0.0.1:9000", "127.0.0.1:50000", 5),
            rec(state::SYN_SENT, "127.0.0.1:50001", "127.0.0.1:9", 6),
        ]);
        let at_start: HashSet<u64> = [5].into();
        let snap = snapshot(
            &c,
            |_| None,
            &at_start,
            &Thresholds::default(),
            100 * S,
            30 * S,
        );
        assert_eq!(snap.sockets[0].age, Some(Duration::from_secs(70)));
        assert_eq!(snap.sockets[0].age_source, AgeSource::AgentStart);
        assert!(snap.sockets[0].stuck.is_some(), "at least 70 s > 60 s");
        // A socket the agent never saw enter its state: age unknown, never stuck.
        assert_eq!(
            (snap.sockets[1].age, snap.sockets[1].age_source),
            (None, AgeSource::Unknown)
        );
        assert!(snap.sockets[1].stuck.is_none());
    }

    #[test]
    fn request_sockets_are_aged_by_their_synack_timer() {
        // SYN at 0; SYN-ACKs resent at 1 s and 3 s; next at 7 s, 2.5 s away: 4.5 s old.
        assert_eq!(
            request_age(Duration::from_millis(2_500), 2),
            Duration::from_millis(4_500)
        );
        assert_eq!(request_age(Duration::from_millis(1_000), 0), Duration::ZERO);
        // The doubling stops at 120 s: 1+2+...+64 = 127, then 120 per period.
        assert_eq!(
            request_age(Duration::ZERO, 8),
            Duration::from_secs(127 + 120 + 120)
        );
        let mut r = rec(state::SYN_RECV, "127.0.0.1:9000", "127.0.0.1:50001", 6);
        r.retransmit = Some((Duration::from_millis(500), 3));
        let listener = rec(state::LISTEN, "127.0.0.1:9000", "0.0.0.0:0", 1);
        let lookup = |cookie| {
            (cookie == 1).then_some(SocketInfo {
                state: state::LISTEN,
                since_ns: 0,
                pid: 42,
                comm: *b"srv\0\0\0\0\0\0\0\0\0\0\0\0\0",
                port: 9000,
            })
        };
        let snap = snapshot(
            &census(vec![listener, r]),
            lookup,
            &HashSet::new(),
            &Thresholds::default(),
            S,
            0,
        );
        let v = &snap.sockets[1];
        // Owned by its listener's process.
        assert_eq!((v.pid, comm_string(&v.comm).as_str()), (42, "srv"));
        // 1+2+4+8-0.5 = 14.5 s old: past the 10 s threshold.
        assert_eq!(
            (v.state, v.age, v.age_source),
            (
                state::SYN_RECV,
                Some(Duration::from_millis(14_500)),
                AgeSource::SynAckTimer
            )
        );
        assert_eq!(snap.stuck.get(&(state::SYN_RECV, 9000)), Some(&1));
    }

    #[test]
    fn time_wait_ports_and_ephemeral_use_per_destination() {
        let c = census(vec![
            rec(state::LISTEN, "127.0.0.1:80", "0.0.0.0:0", 1),
            // Server side closed first: TIME-WAIT on the listening port.
            rec(state::TIME_WAIT, "127.0.0.1:80", "127.0.0.1:40003", 2),
            // Client side closed first: TIME-WAIT toward remote port 5432, from ephemeral ports.
            rec(state::TIME_WAIT, "127.0.0.1:40001", "127.0.0.2:5432", 3),
            rec(state::TIME_WAIT, "127.0.0.1:40002", "127.0.0.2:5432", 4),
            rec(state::ESTABLISHED, "127.0.0.1:40004", "127.0.0.2:5432", 5),
            // Outside the range: not an ephemeral port.
            rec(state::ESTABLISHED, "127.0.0.1:30000", "127.0.0.2:5432", 6),
        ]);
        let snap = snapshot(&c, |_| None, &HashSet::new(), &Thresholds::default(), S, 0);
        assert_eq!(snap.time_wait.get(&80), Some(&1));
        assert_eq!(snap.time_wait.get(&5432), Some(&2));
        let worst = &snap.destinations[0];
        assert_eq!(
            (worst.remote.port(), worst.used, worst.range),
            (5432, 3, 10)
        );
        assert!((worst.utilization() - 0.3).abs() < 1e-9);
    }

    #[test]
    fn listen_queues_are_read_per_port() {
        let mut l = rec(state::LISTEN, "127.0.0.1:7000", "0.0.0.0:0", 1);
        l.rqueue = 2;
        l.wqueue = 1;
        let snap = snapshot(
            &census(vec![l]),
            |_| None,
            &HashSet::new(),
            &Thresholds::default(),
            S,
            0,
        );
        assert_eq!(snap.listen_queue.get(&7000), Some(&(2, 1)));
    }
}
