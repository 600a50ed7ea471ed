//! The census join: every socket a census found, with what the probe keeps on it (its socket
//! storage, read in the same sock_diag dump): exact ages, owners and service ports, however
//! many events were lost on the way to the agent.
//!
//! Owns: ages and where they come from, owners and service ports of census sockets, the
//! figures that only a census gives (stuck sockets, TIME-WAIT, ephemeral ports, listen
//! queues), and the few sockets whose storage does not tell their age (older than the probe,
//! refused storage, or found in a state the probe did not see them enter), which get a lower
//! bound kept from census to census. Does not own: taking the census (`census`), when it runs
//! (`scrape`), what is stuck (`stuck`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use std::time::Duration;

use tracer_common::{socket, state};

use crate::census::owners::Holder;
use crate::census::stuck::{request_age, Thresholds};
use crate::census::HostCensus;

/// Where a socket's age comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgeSource {
    /// The probe saw the transition into the state: exact.
    Transition,
    /// The socket was in its state when the agent started: the agent's uptime, a lower bound.
    AgentStart,
    /// The probe did not see the socket enter this state (a skipped transition, or a socket
    /// the kernel gave no storage); a census found it there: time since that census, a lower
    /// bound.
    Census,
    /// A request socket: derived from its SYN-ACK timer (`stuck::request_age`), a close lower
    /// bound.
    SynAckTimer,
    /// No age: nothing tells it (a TIME-WAIT socket).
    Unknown,
}

impl AgeSource {
    pub fn name(self) -> &'static str {
        match self {
            AgeSource::Transition => "transition",
            AgeSource::AgentStart => "agent_start",
            AgeSource::Census => "census",
            AgeSource::SynAckTimer => "synack_timer",
            AgeSource::Unknown => "unknown",
        }
    }

    /// True when the age is only a lower bound.
    pub fn is_lower_bound(self) -> bool {
        matches!(
            self,
            AgeSource::AgentStart | AgeSource::Census | AgeSource::SynAckTimer
        )
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
    /// When it entered `state` (CLOCK_MONOTONIC ns), or at the latest then (see
    /// `age_source`); None when nothing tells it.
    pub entered_ns: Option<u64>,
    pub age_source: AgeSource,
    pub pid: u32,
    /// NUL-padded, as the kernel keeps it (turned into text only when rendered).
    pub comm: [u8; 16],
    /// The socket's cgroup id (0: not known; see `workload` for what it names).
    pub cgroup: u64,
    /// The service port (not a label value: `ports` decides that when exporting).
    pub port: u16,
    /// The socket's cookie and inode (0: no file holds it), to find its owner by.
    pub cookie: u64,
    pub inode: u32,
}

impl SocketView {
    /// Time in its state at `now_ns`.
    pub fn age(&self, now_ns: u64) -> Option<Duration> {
        self.entered_ns
            .map(|t| Duration::from_nanos(now_ns.saturating_sub(t)))
    }
}

/// A destination whose ephemeral ports are filling.
#[derive(Clone, Debug, PartialEq)]
pub struct Destination {
    pub netns: u64,
    pub local_ip: IpAddr,
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

/// What the census found that the probe's storage did not tell, counted once per socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Corrections {
    /// Sockets found in another state than the one the probe saw them enter (a transition
    /// the probe did not see).
    pub state_corrected: u64,
    /// Sockets found after start without storage (the kernel refused it: see
    /// `tracer_probe_errors_total{error="no_storage"}`).
    pub added: u64,
    /// Always 0: nothing is kept that a census could find gone (the kernel frees each
    /// socket's storage with it). The series stays for dashboards that read it.
    pub dropped: u64,
    /// Sockets whose owner the probe does not know, named from `/proc` ([`name_owners`]).
    pub owner_found: u64,
}

/// Everything a census tells, joined with what the probe keeps. Ports are service ports.
#[derive(Clone, Debug, Default)]
pub struct Joined {
    pub sockets: Vec<SocketView>,
    /// Stuck sockets per (state, service port, cgroup id) at the census.
    pub stuck: BTreeMap<(u8, u16, u64), u64>,
    /// Oldest age per state at the census, among sockets with a known age or lower bound.
    pub oldest: BTreeMap<u8, Duration>,
    /// TIME-WAIT sockets per service port.
    pub time_wait: BTreeMap<u16, u64>,
    /// Connections whose peer advertises a zero window, per service port.
    pub zero_window: BTreeMap<u16, u64>,
    /// Destinations by ephemeral port use, busiest first (at most 10).
    pub destinations: Vec<Destination>,
    /// Per listening port: accept queue length and limit (summed over listeners).
    pub listen_queue: BTreeMap<u16, (u64, u64)>,
    /// Sockets per state (index = kernel state number; request sockets count as SYN_RECV).
    pub by_state: [u64; 13],
    /// Listening ports and remote service ports with the sockets using each, for the port
    /// label policy's seed (see `ports`): (port, sockets, listening).
    pub services: Vec<(u16, u64, bool)>,
    pub corrections: Corrections,
    /// Sockets with the probe's storage, and the option memory the kernel charges them (where
    /// their storage is).
    pub stored: u64,
    pub stored_bytes: u64,
}

/// What one census leaves the next: the sockets whose age the probe's storage does not tell,
/// and owners found in `/proc`. It holds only those (and only while they last): every other
/// socket's state is on the socket.
#[derive(Debug, Default)]
pub struct Sightings {
    /// CLOCK_MONOTONIC when the probe was attached.
    started_ns: u64,
    /// Censuses joined so far.
    censuses: u64,
    /// Full sockets whose storage does not say when they entered their state, by cookie: the
    /// state they were found in, since when at the latest, and why. Kept while censuses find
    /// them in that state.
    unaged: HashMap<u64, (u8, u64, AgeSource)>,
    /// Owners found in `/proc` for sockets the probe knows none of, by cookie.
    owners: HashMap<u64, Holder>,
    /// Inodes looked for in `/proc` and not found (a process this agent cannot see).
    not_found: HashSet<u64>,
}

impl Sightings {
    /// Before the first census of an agent whose probe was attached at `started_ns`.
    pub fn new(started_ns: u64) -> Sightings {
        Sightings {
            started_ns,
            ..Default::default()
        }
    }
}

/// Names the owner of each listed socket the probe knows none of (pid 0) that a process
/// holds (an inode), as `find` finds them (`owners::find`), and keeps the name for the next
/// censuses. Request sockets keep their listener's. Inodes looked for before and not found
/// are not looked for again while they last, so that a walk of `/proc` happens only for new
/// sockets. Returns how many were named.
pub fn name_owners(
    joined: &mut Joined,
    sightings: &mut Sightings,
    find: impl FnOnce(&HashSet<u64>) -> HashMap<u64, Holder>,
) -> u64 {
    let unowned = |v: &SocketView| v.pid == 0 && v.inode != 0;
    let unowned_now: HashSet<u64> = joined
        .sockets
        .iter()
        .filter(|v| unowned(v))
        .map(|v| u64::from(v.inode))
        .collect();
    let not_found = &mut sightings.not_found;
    not_found.retain(|i| unowned_now.contains(i));
    let wanted: HashSet<u64> = unowned_now.difference(not_found).copied().collect();
    if wanted.is_empty() {
        return 0;
    }
    let found = find(&wanted);
    not_found.extend(wanted.iter().filter(|i| !found.contains_key(i)));
    let mut named = 0;
    for v in joined.sockets.iter_mut().filter(|v| unowned(v)) {
        if let Some(&(pid, comm)) = found.get(&u64::from(v.inode)) {
            (v.pid, v.comm) = (pid, comm);
            sightings.owners.insert(v.cookie, (pid, comm));
            named += 1;
        }
    }
    named
}

/// Joins `census` with what the probe keeps on each socket. `now_ns` is CLOCK_MONOTONIC, the
/// probe's clock.
pub fn join(
    census: &HostCensus,
    sightings: &mut Sightings,
    thresholds: &Thresholds,
    now_ns: u64,
) -> Joined {
    let mut out = Joined::default();
    let first = sightings.censuses == 0;
    sightings.censuses += 1;
    let mut unaged_now = HashMap::new();
    let mut present = HashSet::new();
    // Sized once: a vector grown by doubling would hold up to twice the sockets' memory.
    out.sockets
        .reserve_exact(census.namespaces.iter().map(|n| n.sockets.len()).sum());
    let mut per_destination: HashMap<(u64, IpAddr, SocketAddr), u64> = HashMap::new();
    let mut services: HashMap<(u16, bool), u64> = HashMap::new();
    for ns in &census.namespaces {
        let listening: HashSet<u16> = ns
            .sockets
            .iter()
            .filter(|r| r.state == state::LISTEN)
            .map(|r| r.local.port())
            .collect();
        let (lo, hi) = ns.port_range;
        let first_socket = out.sockets.len();
        for r in &ns.sockets {
            present.insert(r.cookie);
            let census_state = if r.state == state::NEW_SYN_RECV {
                state::SYN_RECV
            } else {
                r.state
            };
            // sock_diag reports request sockets as SYN_RECV with their SYN-ACK timer
            // (inet_req_diag_fill); they never pass the tracepoint. Neither they nor TIME-WAIT
            // sockets (some shown in their FIN_WAIT2 substate) are full sockets: they have no
            // storage, and no age but the request's timer.
            let full = r.full;
            let request = census_state == state::SYN_RECV && !full;
            let stored = r.storage.filter(|_| full);
            if stored.is_some() {
                out.stored += 1;
                out.stored_bytes += u64::from(r.optmem);
            }
            if let Some(c) = out.by_state.get_mut(census_state as usize) {
                *c += 1;
            }
            // The service port: as the probe learnt it when the socket opened; else the
            // local port when something listens on it (or the socket listens), or when it is
            // outside the ephemeral range and the remote one inside it (an accepted
            // connection whose listener has closed, a server's leak after its restart), else
            // the remote one.
            let local_is_service = listening.contains(&r.local.port());
            let ephemeral = |p: u16| (lo..=hi).contains(&p);
            let accepted_here = !ephemeral(r.local.port()) && ephemeral(r.remote.port());
            let port = match stored.map(|s| s.port).filter(|&p| p != 0) {
                Some(p) => p,
                None if local_is_service || census_state == state::LISTEN || accepted_here => {
                    r.local.port()
                }
                None => r.remote.port(),
            };
            if census_state == state::LISTEN {
                let q = out.listen_queue.entry(port).or_default();
                q.0 += u64::from(r.rqueue);
                q.1 += u64::from(r.wqueue);
                *services.entry((port, true)).or_default() += 0;
            } else if local_is_service {
                *services.entry((r.local.port(), true)).or_default() += 1;
            } else if (lo..=hi).contains(&r.local.port()) && !(lo..=hi).contains(&r.remote.port()) {
                // This host connected from an ephemeral port to a service port.
                *services.entry((r.remote.port(), false)).or_default() += 1;
            }
            if census_state == state::TIME_WAIT {
                *out.time_wait.entry(port).or_default() += 1;
            }
            let sends = matches!(census_state, state::ESTABLISHED | state::CLOSE_WAIT);
            if sends && r.tcp.and_then(|t| t.snd_wnd) == Some(0) {
                *out.zero_window.entry(port).or_default() += 1;
            }
            if census_state != state::LISTEN
                && !local_is_service
                && (lo..=hi).contains(&r.local.port())
            {
                *per_destination
                    .entry((ns.netns, r.local.ip(), r.remote))
                    .or_default() += 1;
            }
            let exact =
                stored.filter(|s| s.state == census_state && s.flags & socket::SINCE_SEEN != 0);
            let (entered_ns, age_source) = match (exact, r.retransmit) {
                (Some(s), _) => (Some(s.since_ns), AgeSource::Transition),
                (None, Some((expires, retransmits))) if request => (
                    Some(
                        now_ns.saturating_sub(request_age(expires, retransmits).as_nanos() as u64),
                    ),
                    AgeSource::SynAckTimer,
                ),
                (None, _) if !full => (None, AgeSource::Unknown),
                // The socket changed state while the dump ran (sock_diag reads each socket
                // after it let go of the hash bucket; the probe writes the storage just before
                // the kernel stores the new state): nothing was missed, and it is no longer in
                // the state the dump read. The next census has it exact.
                (None, _)
                    if stored.is_some_and(|s| {
                        s.flags & socket::SINCE_SEEN != 0 && s.since_ns >= ns.dumped_at_ns
                    }) =>
                {
                    (None, AgeSource::Unknown)
                }
                (None, _) => {
                    let kept = sightings
                        .unaged
                        .get(&r.cookie)
                        .filter(|(s, _, _)| *s == census_state)
                        .map(|&(_, since, source)| (since, source));
                    let (since, source) = kept.unwrap_or_else(|| {
                        // No transition since the probe was attached: storage it was only
                        // given at start (state 0), or none at the first census.
                        let before_probe = stored.map_or(first, |s| s.state == 0);
                        if before_probe {
                            (sightings.started_ns, AgeSource::AgentStart)
                        } else {
                            if stored.is_some() {
                                out.corrections.state_corrected += 1;
                            } else {
                                out.corrections.added += 1;
                            }
                            (ns.dumped_at_ns, AgeSource::Census)
                        }
                    });
                    unaged_now.insert(r.cookie, (census_state, since, source));
                    (Some(since), source)
                }
            };
            let (pid, comm) = match stored.filter(|s| s.pid != 0) {
                Some(s) => (s.pid, s.comm),
                None => sightings
                    .owners
                    .get(&r.cookie)
                    .copied()
                    .unwrap_or((0, [0; 16])),
            };
            // The cgroup the probe read from the socket, else sock_diag's (full sockets only:
            // TIME-WAIT and request sockets have none there).
            let cgroup = match stored.map_or(0, |s| s.cgroup) {
                0 => r.cgroup,
                c => c,
            };
            out.sockets.push(SocketView {
                netns: ns.netns,
                state: census_state,
                local: r.local,
                remote: r.remote,
                entered_ns,
                age_source,
                pid,
                comm,
                cgroup,
                port,
                cookie: r.cookie,
                inode: r.inode,
            });
        }
        // A request socket belongs to its listener (the probe credits a passive child the
        // same way).
        let owners: HashMap<u16, (u32, [u8; 16], u64)> = out.sockets[first_socket..]
            .iter()
            .filter(|v| v.state == state::LISTEN && (v.pid != 0 || v.cgroup != 0))
            .map(|v| (v.local.port(), (v.pid, v.comm, v.cgroup)))
            .collect();
        for v in &mut out.sockets[first_socket..] {
            if v.age_source == AgeSource::SynAckTimer {
                if let Some(&(pid, comm, cgroup)) = owners.get(&v.local.port()) {
                    (v.pid, v.comm, v.cgroup) = (pid, comm, cgroup);
                }
            }
        }
    }
    // What is kept lasts as long as its socket: a census that could not visit every
    // namespace keeps what it did not see.
    if census.unreachable == 0 {
        sightings.unaged = unaged_now;
        sightings
            .owners
            .retain(|cookie, _| present.contains(cookie));
    } else {
        sightings.unaged.extend(unaged_now);
    }
    for v in &out.sockets {
        let Some(age) = v.age(now_ns) else { continue };
        let oldest = out.oldest.entry(v.state).or_default();
        *oldest = (*oldest).max(age);
        if thresholds.is_stuck(v.state, age) {
            *out.stuck.entry((v.state, v.port, v.cgroup)).or_default() += 1;
        }
    }
    out.services = services
        .into_iter()
        .map(|((port, listening), n)| (port, n, listening))
        .collect();
    let range_of: HashMap<u64, u64> = census
        .namespaces
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
    out.destinations = destinations;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{NetnsCensus, SocketRecord};
    use crate::stream::event::comm_text;
    use tracer_common::SocketState;

    const S: u64 = 1_000_000_000;
    const NS: u64 = 4026531840;
    /// When the probe was attached, in these tests.
    const STARTED: u64 = 9 * S;

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
            cgroup: 0,
            storage: None,
            optmem: 0,
            tcp: None,
            full: !matches!(state, state::TIME_WAIT),
        }
    }

    /// Storage the probe wrote when it saw the socket enter `state` at `since_ns`.
    fn seen(state: u8, since_ns: u64, pid: u32, port: u16) -> Option<SocketState> {
        Some(SocketState {
            state,
            since_ns,
            pid,
            comm: *b"leaky\0\0\0\0\0\0\0\0\0\0\0",
            port,
            flags: socket::SINCE_SEEN,
            ..Default::default()
        })
    }

    fn census(sockets: Vec<SocketRecord>, dumped_at_ns: u64) -> HostCensus {
        HostCensus {
            namespaces: vec![NetnsCensus {
                netns: NS,
                sockets,
                port_range: (40000, 40009),
                dumped_at_ns,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A join with no earlier census.
    fn join_once(census: &HostCensus, now_ns: u64) -> Joined {
        join(
            census,
            &mut Sightings::new(STARTED),
            &Thresholds::default(),
            now_ns,
        )
    }

    #[test]
    fn a_close_wait_the_probe_saw_entering_gets_its_exact_age_owner_and_is_stuck_past_the_threshold(
    ) {
        // Accepted on 8080, the peer closed at 10 s: the probe's storage says so, whatever
        // the agent read of its events.
        let mut leak = rec(state::CLOSE_WAIT, "127.0.0.1:8080", "127.0.0.1:40001", 2);
        leak.storage = seen(state::CLOSE_WAIT, 10 * S, 77, 8080);
        let c = census(
            vec![rec(state::LISTEN, "127.0.0.1:8080", "0.0.0.0:0", 1), leak],
            74 * S,
        );
        let j = join_once(&c, 75 * S);
        let v = &j.sockets[1];
        assert_eq!(
            (
                v.age(75 * S),
                v.age_source,
                v.pid,
                &*comm_text(&v.comm),
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
        assert_eq!(j.stuck.get(&(state::CLOSE_WAIT, 8080, 0)), Some(&1));
        assert_eq!(
            j.oldest.get(&state::CLOSE_WAIT),
            Some(&Duration::from_secs(65))
        );
        assert_eq!(j.corrections, Corrections::default());
    }

    #[test]
    fn sockets_from_before_the_agent_are_at_least_its_uptime() {
        // One seeded at start (its owner, no state: no transition since), one without storage
        // (an orphan no process holds); both were there before the probe.
        let mut seeded = rec(state::CLOSE_WAIT, "127.0.0.1:9000", "127.0.0.1:50000", 5);
        seeded.storage = Some(SocketState {
            pid: 41,
            flags: socket::SEEDED,
            ..Default::default()
        });
        let orphan = rec(state::FIN_WAIT2, "127.0.0.1:9000", "127.0.0.1:50001", 6);
        let listener = rec(state::LISTEN, "127.0.0.1:9000", "0.0.0.0:0", 7);
        let c = census(vec![seeded, orphan, listener], 30 * S);
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        let j = join(&c, &mut sightings, &thresholds, 30 * S);
        assert_eq!(j.sockets[0].age_source, AgeSource::AgentStart);
        assert_eq!(j.sockets[1].age_source, AgeSource::AgentStart);
        assert_eq!((j.sockets[0].pid, j.sockets[1].pid), (41, 0));
        // Seventy seconds later a census sees them still there: at least 91 s old, stuck.
        let later = census(c.namespaces[0].sockets.clone(), 100 * S);
        let j = join(&later, &mut sightings, &thresholds, 100 * S);
        for v in &j.sockets[..2] {
            assert_eq!(
                (v.age(100 * S), v.age_source),
                (Some(Duration::from_secs(91)), AgeSource::AgentStart)
            );
        }
        assert_eq!(j.stuck.get(&(state::CLOSE_WAIT, 9000, 0)), Some(&1));
        assert_eq!(j.corrections, Corrections::default());
    }

    #[test]
    fn a_socket_that_moves_on_while_the_dump_runs_is_no_correction() {
        // The dump started at 20 s and read FIN_WAIT1; by the time it read the storage the
        // probe had seen the socket enter FIN_WAIT2 (20.000001 s): nothing was missed.
        let mut r = rec(state::FIN_WAIT1, "127.0.0.1:40003", "127.0.0.1:8080", 4);
        r.storage = seen(state::FIN_WAIT2, 20 * S + 1_000, 77, 8080);
        let j = join_once(&census(vec![r], 20 * S), 20 * S);
        assert_eq!(j.corrections, Corrections::default());
        let v = &j.sockets[0];
        assert_eq!(
            (v.state, v.age_source, v.age(20 * S), v.pid),
            (state::FIN_WAIT1, AgeSource::Unknown, None, 77)
        );
    }

    #[test]
    fn a_state_the_probe_did_not_see_entered_gets_a_lower_bound_from_the_census_that_found_it() {
        // The probe saw it enter ESTABLISHED at 1 s; its ESTABLISHED -> CLOSE_WAIT was
        // skipped by the kernel.
        let mut r = rec(state::CLOSE_WAIT, "127.0.0.1:40002", "127.0.0.1:8080", 3);
        r.storage = seen(state::ESTABLISHED, S, 77, 8080);
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        let j = join(
            &census(vec![r.clone()], 20 * S),
            &mut sightings,
            &thresholds,
            20 * S,
        );
        assert_eq!(j.corrections.state_corrected, 1);
        let v = &j.sockets[0];
        assert_eq!(
            (v.state, v.age_source, v.age(20 * S)),
            (state::CLOSE_WAIT, AgeSource::Census, Some(Duration::ZERO))
        );
        assert!(j.stuck.is_empty());
        // The next censuses keep the lower bound from the first one: past 60 s, it is stuck,
        // and it is counted once.
        let j = join(
            &census(vec![r], 81 * S),
            &mut sightings,
            &thresholds,
            81 * S,
        );
        assert_eq!(j.corrections, Corrections::default());
        assert_eq!(j.sockets[0].age(81 * S), Some(Duration::from_secs(61)));
        assert_eq!(
            j.stuck.get(&(state::CLOSE_WAIT, 8080, 0)),
            Some(&1),
            "service port from the storage"
        );
    }

    #[test]
    fn a_socket_found_without_storage_after_start_is_counted_once_and_aged_from_then() {
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        join(&census(vec![], 10 * S), &mut sightings, &thresholds, 10 * S);
        let leak = rec(state::CLOSE_WAIT, "127.0.0.1:8080", "127.0.0.1:40001", 9);
        let j = join(
            &census(vec![leak.clone()], 20 * S),
            &mut sightings,
            &thresholds,
            20 * S,
        );
        assert_eq!(j.corrections.added, 1);
        let j = join(
            &census(vec![leak], 30 * S),
            &mut sightings,
            &thresholds,
            80 * S,
        );
        assert_eq!(j.corrections.added, 0);
        let v = &j.sockets[0];
        assert_eq!(
            (v.age_source, v.age(80 * S)),
            (AgeSource::Census, Some(Duration::from_secs(60)))
        );
        // No storage, nothing listening on 8080 here, but 8080 is outside the ephemeral
        // range and 40001 inside it: accepted here, so 8080 is the service's.
        assert_eq!(j.stuck.get(&(state::CLOSE_WAIT, 8080, 0)), Some(&1));
        // Gone: nothing is kept of it.
        join(&census(vec![], 40 * S), &mut sightings, &thresholds, 40 * S);
        assert!(sightings.unaged.is_empty());
    }

    #[test]
    fn sockets_the_probe_knows_no_owner_of_are_named_by_who_holds_them() {
        let mut listener = rec(state::LISTEN, "0.0.0.0:5432", "0.0.0.0:0", 11);
        let mut leak = rec(state::CLOSE_WAIT, "127.0.0.1:5432", "127.0.0.1:40001", 12);
        let mut orphan = rec(state::FIN_WAIT2, "127.0.0.1:5432", "127.0.0.1:40002", 13);
        (listener.inode, leak.inode, orphan.inode) = (501, 502, 0);
        let c = census(vec![listener, leak, orphan], 10 * S);
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        let mut j = join(&c, &mut sightings, &thresholds, 10 * S);
        assert!(j.sockets.iter().all(|v| v.pid == 0));
        let comm = *b"postgres\0\0\0\0\0\0\0\0";
        let mut asked = HashSet::new();
        let named = name_owners(&mut j, &mut sightings, |wanted| {
            asked = wanted.clone();
            HashMap::from([(501, (40, comm)), (502, (41, comm))])
        });
        // The orphan (no file holds it: inode 0) is not looked for.
        assert_eq!((named, asked), (2, HashSet::from([501, 502])));
        let pids: Vec<(u64, u32)> = j.sockets.iter().map(|v| (v.cookie, v.pid)).collect();
        assert_eq!(pids, vec![(11, 40), (12, 41), (13, 0)]);
        // Kept: the next census names them without looking.
        let mut again = join(&c, &mut sightings, &thresholds, 11 * S);
        assert_eq!(
            name_owners(&mut again, &mut sightings, |_| unreachable!()),
            0
        );
        assert_eq!(again.sockets[1].pid, 41);
        // One that no process shows is looked for once, then not while it lasts.
        let mut hidden = rec(state::ESTABLISHED, "127.0.0.1:5432", "127.0.0.1:40003", 14);
        hidden.inode = 503;
        let c = census(vec![hidden], 12 * S);
        let mut looks = 0;
        for _ in 0..3 {
            let mut j = join(&c, &mut sightings, &thresholds, 12 * S);
            name_owners(&mut j, &mut sightings, |_| {
                looks += 1;
                HashMap::new()
            });
        }
        assert_eq!((looks, sightings.not_found.len()), (1, 1));
        let mut gone = join(&census(vec![], 13 * S), &mut sightings, &thresholds, 13 * S);
        name_owners(&mut gone, &mut sightings, |_| unreachable!());
        assert!(sightings.not_found.is_empty(), "forgotten once gone");
        assert!(sightings.owners.is_empty(), "forgotten once gone");
    }

    #[test]
    fn request_sockets_are_aged_by_their_synack_timer_and_owned_by_their_listener() {
        let mut r = rec(state::SYN_RECV, "127.0.0.1:9000", "127.0.0.1:50001", 6);
        (r.inode, r.retransmit, r.full) = (0, Some((Duration::from_millis(500), 3)), false);
        let mut l = rec(state::LISTEN, "127.0.0.1:9000", "0.0.0.0:0", 1);
        l.storage = seen(state::LISTEN, 0, 42, 9000);
        l.storage.as_mut().unwrap().comm = *b"srv\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let j = join_once(&census(vec![l, r], 20 * S), 20 * S);
        let v = &j.sockets[1];
        assert_eq!((v.pid, &*comm_text(&v.comm)), (42, "srv"));
        // 1+2+4+8-0.5 = 14.5 s old: past the 10 s threshold.
        assert_eq!(
            (v.state, v.age(20 * S), v.age_source),
            (
                state::SYN_RECV,
                Some(Duration::from_millis(14_500)),
                AgeSource::SynAckTimer
            )
        );
        assert_eq!(j.stuck.get(&(state::SYN_RECV, 9000, 0)), Some(&1));
    }

    #[test]
    fn time_wait_ports_ephemeral_use_and_service_candidates() {
        let c = census(
            vec![
                rec(state::LISTEN, "127.0.0.1:80", "0.0.0.0:0", 1),
                // Server side closed first: TIME-WAIT on the listening port.
                rec(state::TIME_WAIT, "127.0.0.1:80", "127.0.0.1:40003", 2),
                // Client side closed first: TIME-WAIT toward remote port 5432, from ephemeral ports.
                rec(state::TIME_WAIT, "127.0.0.1:40001", "127.0.0.2:5432", 3),
                rec(state::TIME_WAIT, "127.0.0.1:40002", "127.0.0.2:5432", 4),
                rec(state::ESTABLISHED, "127.0.0.1:40004", "127.0.0.2:5432", 5),
                // Outside the range: not an ephemeral port.
                rec(state::ESTABLISHED, "127.0.0.1:30000", "127.0.0.2:5432", 6),
                // Between two ephemeral ports: no service at all.
                rec(state::TIME_WAIT, "127.0.0.1:40005", "127.0.0.1:40006", 7),
            ],
            S,
        );
        let j = join_once(&c, S);
        assert_eq!(j.time_wait.get(&80), Some(&1));
        assert_eq!(j.time_wait.get(&5432), Some(&2));
        let worst = &j.destinations[0];
        assert_eq!(
            (worst.remote.port(), worst.used, worst.range),
            (5432, 3, 10)
        );
        let mut services = j.services.clone();
        services.sort();
        assert_eq!(services, vec![(80, 1, true), (5432, 3, false)]);
        assert_eq!(j.by_state[state::TIME_WAIT as usize], 4);
        assert!(j
            .sockets
            .iter()
            .filter(|v| v.state == state::TIME_WAIT)
            .all(|v| v.age_source == AgeSource::Unknown));
    }

    #[test]
    fn a_time_wait_socket_in_its_fin_wait2_substate_is_no_socket_found_without_storage() {
        // As sock_diag shows a socket that entered TIME-WAIT from FIN_WAIT2: that state, no
        // inode, no memory figures.
        let mut tw = rec(state::FIN_WAIT2, "127.0.0.1:40001", "127.0.0.1:8080", 4);
        (tw.inode, tw.full) = (0, false);
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        join(&census(vec![], S), &mut sightings, &thresholds, S);
        let j = join(&census(vec![tw], 2 * S), &mut sightings, &thresholds, 2 * S);
        assert_eq!(j.corrections, Corrections::default());
        assert_eq!(
            (
                j.sockets[0].age_source,
                j.by_state[state::FIN_WAIT2 as usize]
            ),
            (AgeSource::Unknown, 1)
        );
        assert!(sightings.unaged.is_empty());
    }

    #[test]
    fn listen_queues_are_read_per_port() {
        let mut l = rec(state::LISTEN, "127.0.0.1:7000", "0.0.0.0:0", 1);
        l.rqueue = 2;
        l.wqueue = 1;
        let j = join_once(&census(vec![l], S), S);
        assert_eq!(j.listen_queue.get(&7000), Some(&(2, 1)));
    }
}
