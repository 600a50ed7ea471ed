//! The census join: every socket a census found, with what the socket table knows of it (by
//! cookie), and the table corrected by what the census shows.
//!
//! Owns: ages and where they come from, owners and service ports of census sockets, the
//! figures that only a census gives (stuck sockets, TIME-WAIT, ephemeral ports, listen
//! queues), and the corrections: a socket whose transition the agent lost takes the census's
//! state with a lower-bound age; a followed socket that the census no longer shows (its CLOSE
//! was lost) is dropped. Does not own: taking the census (`census`), when it runs (`scrape`),
//! what is stuck (`stuck`).
//!
//! The table is shared with the event reader: the join holds its lock for a few thousand
//! sockets at a time, never for the whole census. The caller makes sure the reader has applied
//! every event stamped before the census ended (see `scrape`), so that a difference between
//! the two is a lost event, not one still in flight.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use tracer_common::state;

use crate::census::HostCensus;
use crate::sockets::{Since, SocketTable};
use crate::stuck::{request_age, Thresholds};

/// Sockets looked up per hold of the table's lock.
const CHUNK: usize = 4_096;

/// Where a socket's age comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgeSource {
    /// The agent saw the transition into the state: exact.
    Transition,
    /// The socket was there when the agent started: the agent's uptime, a lower bound.
    AgentStart,
    /// The agent lost the transition into this state; a census found it there: time since
    /// that census, a lower bound.
    Census,
    /// A request socket: derived from its SYN-ACK timer (`stuck::request_age`), a close lower
    /// bound.
    SynAckTimer,
    /// No age: nothing tells it (a TIME-WAIT socket, or the table was full).
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

    fn of(since: Since) -> AgeSource {
        match since {
            Since::Transition => AgeSource::Transition,
            Since::AgentStart => AgeSource::AgentStart,
            Since::Census => AgeSource::Census,
        }
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

/// What the join changed in the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Corrections {
    /// Followed sockets found in another state than the table's (a transition was lost).
    pub state_corrected: u64,
    /// Sockets found that the table did not follow (their opening was lost), now followed.
    pub added: u64,
    /// Followed sockets the census no longer shows (their CLOSE was lost), dropped.
    pub dropped: u64,
    /// Sockets whose owner the probe never named, named from `/proc` ([`name_owners`]).
    pub owner_found: u64,
}

/// Everything a census tells, joined with the agent's table. Ports are service ports.
#[derive(Clone, Debug, Default)]
pub struct Joined {
    pub sockets: Vec<SocketView>,
    /// Stuck sockets per (state, service port, cgroup id) at the census.
    pub stuck: BTreeMap<(u8, u16, u64), u64>,
    /// Oldest age per state at the census, among sockets with a known age or lower bound.
    pub oldest: BTreeMap<u8, Duration>,
    /// TIME-WAIT sockets per service port.
    pub time_wait: BTreeMap<u16, u64>,
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
}

/// What a census saw that the next one must confirm before the table changes.
#[derive(Debug, Default)]
pub struct Sightings {
    /// Sockets found that the table does not follow, by cookie: their state and when that
    /// census began. One is added only when the next census finds it again in the same state:
    /// a socket that closed between a census and its join (and so already left the table)
    /// must not come back as a ghost.
    unfollowed: HashMap<u64, (u8, u64)>,
    /// Followed sockets not found, by cookie. One is dropped only when the next census does
    /// not find it either: a CLOSE still on its way to the table must not be taken for a lost
    /// one. (The reader has applied every event stamped before the census, on the assumption
    /// that the probe commits an event within `ring::HOLD_BACK_NS` of stamping it; a virtual
    /// CPU descheduled in between, as under emulation or CPU steal, commits it later.)
    missing: HashSet<u64>,
}

/// How the join may change the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The first census at start: sockets the table does not follow were there before the
    /// agent, since `started_ns` at the latest.
    AtStart { started_ns: u64 },
    /// Later censuses, once the reader caught up: correct the table.
    Correct,
    /// The reader did not catch up with the census: read the table, change nothing.
    ReadOnly,
}

/// Names the owner of each listed socket the probe never named (pid 0) that a process holds
/// (an inode): as `find` finds them (`owners::find`), in the listing and in the table, so its
/// later events carry it too. Request sockets keep their listener's. `not_found` holds the
/// inodes looked for before and not found (a process this agent cannot see, say): they are
/// not looked for again while they last, so that a walk of `/proc` happens only for new
/// sockets. Returns how many were named.
pub fn name_owners(
    joined: &mut Joined,
    table: &Mutex<SocketTable>,
    not_found: &mut HashSet<u64>,
    find: impl FnOnce(&HashSet<u64>) -> HashMap<u64, crate::owners::Holder>,
) -> u64 {
    let unowned = |v: &SocketView| v.pid == 0 && v.inode != 0;
    let unowned_now: HashSet<u64> = joined
        .sockets
        .iter()
        .filter(|v| unowned(v))
        .map(|v| u64::from(v.inode))
        .collect();
    not_found.retain(|i| unowned_now.contains(i));
    let wanted: HashSet<u64> = unowned_now.difference(not_found).copied().collect();
    if wanted.is_empty() {
        return 0;
    }
    let found = find(&wanted);
    not_found.extend(wanted.iter().filter(|i| !found.contains_key(i)));
    let mut named = Vec::new();
    for v in joined.sockets.iter_mut().filter(|v| unowned(v)) {
        if let Some(&(pid, comm)) = found.get(&u64::from(v.inode)) {
            (v.pid, v.comm) = (pid, comm);
            named.push((v.cookie, pid, comm));
        }
    }
    // In chunks, as the join does: the event reader waits for the table at most one chunk.
    for chunk in named.chunks(CHUNK) {
        let mut t = table.lock();
        for &(cookie, pid, comm) in chunk {
            t.set_owner(cookie, pid, comm);
        }
        MutexGuard::unlock_fair(t);
    }
    named.len() as u64
}

/// Joins `census` with `table`. `now_ns` is CLOCK_MONOTONIC, the probe's clock.
pub fn join(
    census: &HostCensus,
    table: &Mutex<SocketTable>,
    sightings: &mut Sightings,
    thresholds: &Thresholds,
    mode: Mode,
    now_ns: u64,
) -> Joined {
    let mut out = Joined::default();
    let mut unfollowed_now = HashMap::new();
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
        let netns = ns.netns as u32;
        let first = out.sockets.len();
        for chunk in ns.sockets.chunks(CHUNK) {
            let mut table = table.lock();
            for r in chunk {
                let census_state = if r.state == state::NEW_SYN_RECV {
                    state::SYN_RECV
                } else {
                    r.state
                };
                // sock_diag reports request sockets as SYN_RECV with their SYN-ACK timer
                // (inet_req_diag_fill); they never pass the tracepoint.
                let request = census_state == state::SYN_RECV && r.inode == 0;
                let mut info = table.get(r.cookie);
                let mut view_state = census_state;
                if census_state == state::TIME_WAIT || request {
                    // Not a full socket: the table follows none of these. A TIME-WAIT socket
                    // carries the cookie of the socket it replaced, whose CLOSE was lost.
                    if info.is_some() && mode != Mode::ReadOnly {
                        table.forget(r.cookie);
                        out.corrections.dropped += 1;
                    }
                    info = None;
                } else {
                    match (info, mode) {
                        (Some(i), _) if i.state == census_state => {}
                        // The table saw it change after the dump began: the table is newer.
                        (Some(i), _) if i.since_ns >= ns.dumped_at_ns => view_state = i.state,
                        (Some(_), Mode::ReadOnly) => info = None,
                        (Some(_), _) => {
                            table.correct(
                                r.cookie,
                                census_state,
                                ns.dumped_at_ns,
                                Since::Census,
                                netns,
                                r.cgroup,
                            );
                            out.corrections.state_corrected += 1;
                            info = table.get(r.cookie);
                        }
                        (None, Mode::ReadOnly) => {}
                        (None, Mode::AtStart { started_ns }) => {
                            table.correct(
                                r.cookie,
                                census_state,
                                started_ns,
                                Since::AgentStart,
                                netns,
                                r.cgroup,
                            );
                            info = table.get(r.cookie);
                        }
                        (None, Mode::Correct) => match sightings.unfollowed.get(&r.cookie) {
                            // Found by the previous census too, in this state: add it, in
                            // that state since that census at the latest.
                            Some(&(state, since_ns)) if state == census_state => {
                                if table.correct(
                                    r.cookie,
                                    state,
                                    since_ns,
                                    Since::Census,
                                    netns,
                                    r.cgroup,
                                ) {
                                    out.corrections.added += 1;
                                }
                                info = table.get(r.cookie);
                            }
                            _ => {
                                unfollowed_now.insert(r.cookie, (census_state, ns.dumped_at_ns));
                            }
                        },
                    }
                }
                // Counted as listed: in the table's state when it changed during the dump.
                if let Some(c) = out.by_state.get_mut(view_state as usize) {
                    *c += 1;
                }
                // The service port: as the table learnt it when the socket opened; else the
                // local port when something listens on it (or the socket listens), else the
                // remote one.
                let local_is_service = listening.contains(&r.local.port());
                let port = match info.map(|i| i.port).filter(|&p| p != 0) {
                    Some(p) => p,
                    None if local_is_service || census_state == state::LISTEN => r.local.port(),
                    None => r.remote.port(),
                };
                if census_state == state::LISTEN {
                    let q = out.listen_queue.entry(port).or_default();
                    q.0 += u64::from(r.rqueue);
                    q.1 += u64::from(r.wqueue);
                    *services.entry((port, true)).or_default() += 0;
                } else if local_is_service {
                    *services.entry((r.local.port(), true)).or_default() += 1;
                } else if (lo..=hi).contains(&r.local.port())
                    && !(lo..=hi).contains(&r.remote.port())
                {
                    // This host connected from an ephemeral port to a service port.
                    *services.entry((r.remote.port(), false)).or_default() += 1;
                }
                if census_state == state::TIME_WAIT {
                    *out.time_wait.entry(port).or_default() += 1;
                }
                if census_state != state::LISTEN
                    && !local_is_service
                    && (lo..=hi).contains(&r.local.port())
                {
                    *per_destination
                        .entry((ns.netns, r.local.ip(), r.remote))
                        .or_default() += 1;
                }
                let (entered_ns, age_source) =
                    match (info, r.retransmit) {
                        (Some(i), _) => (Some(i.since_ns), AgeSource::of(i.since)),
                        (None, Some((expires, retransmits))) if request => (
                            Some(now_ns.saturating_sub(
                                request_age(expires, retransmits).as_nanos() as u64,
                            )),
                            AgeSource::SynAckTimer,
                        ),
                        (None, _) => (None, AgeSource::Unknown),
                    };
                let (pid, comm) = info.map_or((0, [0; 16]), |i| (i.pid, i.comm));
                // The cgroup the probe read when the socket opened, else sock_diag's (full
                // sockets only: TIME-WAIT and request sockets have none there).
                let cgroup = info.map_or(0, |i| i.cgroup);
                let cgroup = if cgroup != 0 { cgroup } else { r.cgroup };
                out.sockets.push(SocketView {
                    netns: ns.netns,
                    state: view_state,
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
            // Hand the table to the event reader if it is waiting, rather than taking it
            // straight back for the next chunk.
            MutexGuard::unlock_fair(table);
        }
        // A request socket belongs to its listener (the probe credits a passive child the
        // same way).
        let owners: HashMap<u16, (u32, [u8; 16], u64)> = out.sockets[first..]
            .iter()
            .filter(|v| v.state == state::LISTEN && (v.pid != 0 || v.cgroup != 0))
            .map(|v| (v.local.port(), (v.pid, v.comm, v.cgroup)))
            .collect();
        for v in &mut out.sockets[first..] {
            if v.age_source == AgeSource::SynAckTimer {
                if let Some(&(pid, comm, cgroup)) = owners.get(&v.local.port()) {
                    (v.pid, v.comm, v.cgroup) = (pid, comm, cgroup);
                }
            }
        }
    }
    if mode != Mode::ReadOnly {
        let (dropped, missing) = drop_gone(census, table, &sightings.missing);
        out.corrections.dropped += dropped;
        *sightings = Sightings {
            unfollowed: unfollowed_now,
            missing,
        };
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

/// Drops followed sockets that this census and the one before (`missing_before`) no longer
/// show and that the table saw nothing of since the dump of their namespace began: their
/// CLOSE was lost. A socket of a namespace the census could not visit is kept; one whose
/// namespace is not known only when the census visited every namespace. Returns how many were
/// dropped, and the sockets missing for the first time.
fn drop_gone(
    census: &HostCensus,
    table: &Mutex<SocketTable>,
    missing_before: &HashSet<u64>,
) -> (u64, HashSet<u64>) {
    let present: HashSet<u64> = census
        .namespaces
        .iter()
        .flat_map(|ns| ns.sockets.iter().map(|r| r.cookie))
        .collect();
    let dumped_at: HashMap<u32, u64> = census
        .namespaces
        .iter()
        .map(|ns| (ns.netns as u32, ns.dumped_at_ns))
        .collect();
    let everywhere = census.unreachable == 0;
    let first_dump = dumped_at.values().copied().min().unwrap_or(0);
    let (mut dropped, mut missing) = (0, HashSet::new());
    table.lock().start_sweep();
    loop {
        let mut t = table.lock();
        let (n, done) = t.sweep(CHUNK, |cookie, info| {
            let before = match dumped_at.get(&info.netns) {
                Some(&at) => at,
                None if info.netns == 0 && everywhere => first_dump,
                None => return false,
            };
            let gone = info.since_ns < before && !present.contains(&cookie);
            if gone && !missing_before.contains(&cookie) {
                missing.insert(cookie);
                return false;
            }
            gone
        });
        MutexGuard::unlock_fair(t);
        dropped += n;
        if done {
            return (dropped, missing);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{NetnsCensus, SocketRecord};
    use crate::event::comm_text;
    use crate::event::tests::transition;

    const S: u64 = 1_000_000_000;
    const NS: u64 = 4026531840;

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
        }
    }

    #[test]
    fn sockets_older_than_the_agent_are_named_by_who_holds_them() {
        let t = table();
        let mut listener = rec(state::LISTEN, "0.0.0.0:5432", "0.0.0.0:0", 11);
        let mut leak = rec(state::CLOSE_WAIT, "127.0.0.1:5432", "127.0.0.1:40001", 12);
        let mut orphan = rec(state::FIN_WAIT2, "127.0.0.1:5432", "127.0.0.1:40002", 13);
        (listener.inode, leak.inode, orphan.inode) = (501, 502, 0);
        let c = census(vec![listener, leak, orphan], 10 * S);
        let at_start = Mode::AtStart { started_ns: 9 * S };
        let mut j = join_once(&c, &t, &Thresholds::default(), at_start, 10 * S);
        assert!(j.sockets.iter().all(|v| v.pid == 0));
        let comm = *b"postgres\0\0\0\0\0\0\0\0";
        let mut asked = HashSet::new();
        let mut not_found = HashSet::new();
        let named = name_owners(&mut j, &t, &mut not_found, |wanted| {
            asked = wanted.clone();
            HashMap::from([(501, (40, comm)), (502, (41, comm))])
        });
        // The orphan (no file holds it: inode 0) is not looked for.
        assert_eq!((named, asked), (2, HashSet::from([501, 502])));
        let pids: Vec<(u64, u32)> = j.sockets.iter().map(|v| (v.cookie, v.pid)).collect();
        assert_eq!(pids, vec![(11, 40), (12, 41), (13, 0)]);
        // Kept in the table: the next census names them without looking.
        assert_eq!(t.lock().get(12).map(|i| (i.pid, i.comm)), Some((41, comm)));
        let mut again = join_once(&c, &t, &Thresholds::default(), Mode::Correct, 11 * S);
        assert_eq!(
            name_owners(&mut again, &t, &mut not_found, |_| unreachable!()),
            0
        );
        assert_eq!(again.sockets[1].pid, 41);
        assert!(!t.lock().set_owner(12, 99, comm), "a known owner stays");
        // One that no process shows is looked for once, then not while it lasts.
        let mut hidden = rec(state::ESTABLISHED, "127.0.0.1:5432", "127.0.0.1:40003", 14);
        hidden.inode = 503;
        let c = census(vec![hidden], 12 * S);
        let mut looks = 0;
        for _ in 0..3 {
            let mut j = join_once(&c, &t, &Thresholds::default(), Mode::Correct, 12 * S);
            name_owners(&mut j, &t, &mut not_found, |_| {
                looks += 1;
                HashMap::new()
            });
        }
        assert_eq!((looks, not_found.len()), (1, 1));
        let mut gone = join_once(
            &census(vec![], 13 * S),
            &t,
            &Thresholds::default(),
            Mode::Correct,
            13 * S,
        );
        name_owners(&mut gone, &t, &mut not_found, |_| unreachable!());
        assert!(not_found.is_empty(), "forgotten once gone");
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
    fn join_once(
        census: &HostCensus,
        table: &Mutex<SocketTable>,
        thresholds: &Thresholds,
        mode: Mode,
        now_ns: u64,
    ) -> Joined {
        join(
            census,
            table,
            &mut Sightings::default(),
            thresholds,
            mode,
            now_ns,
        )
    }

    fn table() -> Mutex<SocketTable> {
        Mutex::new(SocketTable::new(64))
    }

    #[test]
    fn a_close_wait_seen_entering_gets_its_age_owner_and_is_stuck_past_the_threshold() {
        let t = table();
        // Socket 2 (cookie 1_000_002): accepted on 8080 at 5 s, peer closed at 10 s.
        let mut open = transition(2, 5 * S, state::LISTEN, state::SYN_RECV);
        (open.sport, open.dport, open.pid) = (8080, 40001, 77);
        open.comm = *b"leaky\0\0\0\0\0\0\0\0\0\0\0";
        t.lock().observe(&open);
        let mut est = transition(2, 5 * S, state::SYN_RECV, state::ESTABLISHED);
        est.pid = 0;
        t.lock().observe(&est);
        let mut cw = transition(2, 10 * S, state::ESTABLISHED, state::CLOSE_WAIT);
        cw.pid = 0;
        t.lock().observe(&cw);
        let c = census(
            vec![
                rec(state::LISTEN, "127.0.0.1:8080", "0.0.0.0:0", 1),
                rec(
                    state::CLOSE_WAIT,
                    "127.0.0.1:8080",
                    "127.0.0.1:40001",
                    1_000_002,
                ),
            ],
            74 * S,
        );
        let j = join_once(&c, &t, &Thresholds::default(), Mode::Correct, 75 * S);
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
        // The listener was not followed: one census is not enough to add it (see the test
        // of unfollowed sockets).
        assert_eq!(j.corrections, Corrections::default());
    }

    #[test]
    fn sockets_from_before_the_agent_are_at_least_its_uptime() {
        let t = table();
        let c = census(
            vec![
                rec(state::CLOSE_WAIT, "127.0.0.1:9000", "127.0.0.1:50000", 5),
                rec(state::LISTEN, "127.0.0.1:9000", "0.0.0.0:0", 6),
            ],
            30 * S,
        );
        let j = join_once(
            &c,
            &t,
            &Thresholds::default(),
            Mode::AtStart { started_ns: 30 * S },
            30 * S,
        );
        assert_eq!(j.sockets[0].age_source, AgeSource::AgentStart);
        // Seventy seconds later a census sees it still there: at least 70 s old, stuck.
        let later = census(c.namespaces[0].sockets.clone(), 100 * S);
        let j = join_once(&later, &t, &Thresholds::default(), Mode::Correct, 100 * S);
        let v = &j.sockets[0];
        assert_eq!(
            (v.age(100 * S), v.age_source),
            (Some(Duration::from_secs(70)), AgeSource::AgentStart)
        );
        assert_eq!(j.stuck.get(&(state::CLOSE_WAIT, 9000, 0)), Some(&1));
    }

    #[test]
    fn a_lost_transition_takes_the_census_state_with_a_lower_bound_age_and_is_flagged_later() {
        let t = table();
        // Followed into ESTABLISHED at 1 s; its ESTABLISHED -> CLOSE_WAIT was lost.
        t.lock()
            .observe(&transition(3, S / 2, state::CLOSE, state::SYN_SENT));
        t.lock()
            .observe(&transition(3, S, state::SYN_SENT, state::ESTABLISHED));
        let cookie = 1_000_003;
        let sockets = vec![rec(
            state::CLOSE_WAIT,
            "127.0.0.1:40002",
            "127.0.0.1:8080",
            cookie,
        )];
        let j = join_once(
            &census(sockets.clone(), 20 * S),
            &t,
            &Thresholds::default(),
            Mode::Correct,
            20 * S,
        );
        assert_eq!(j.corrections.state_corrected, 1);
        let v = &j.sockets[0];
        assert_eq!(
            (v.state, v.age_source, v.age(20 * S)),
            (state::CLOSE_WAIT, AgeSource::Census, Some(Duration::ZERO))
        );
        assert!(j.stuck.is_empty());
        // The next censuses keep the lower bound from the first one: past 60 s, it is stuck.
        let j = join_once(
            &census(sockets, 81 * S),
            &t,
            &Thresholds::default(),
            Mode::Correct,
            81 * S,
        );
        assert_eq!(j.corrections, Corrections::default());
        assert_eq!(j.sockets[0].age(81 * S), Some(Duration::from_secs(61)));
        assert_eq!(
            j.stuck.get(&(state::CLOSE_WAIT, 8080, 0)),
            Some(&1),
            "service port from the table"
        );
        // Its dwell in CLOSE_WAIT is not known when it leaves it: no invented figure.
        let step = t
            .lock()
            .observe(&transition(3, 90 * S, state::CLOSE_WAIT, state::LAST_ACK));
        assert_eq!(step.dwell, None);
    }

    #[test]
    fn an_unfollowed_socket_is_added_when_two_censuses_find_it_and_a_closed_one_never() {
        let t = table();
        let mut unfollowed = Sightings::default();
        let thresholds = Thresholds::default();
        let leak = rec(state::CLOSE_WAIT, "127.0.0.1:8080", "127.0.0.1:40001", 9);
        let closing = rec(state::ESTABLISHED, "127.0.0.1:8080", "127.0.0.1:40002", 10);
        let c = census(vec![leak.clone(), closing], 10 * S);
        let j = join(&c, &t, &mut unfollowed, &thresholds, Mode::Correct, 10 * S);
        assert_eq!((j.corrections.added, t.lock().len()), (0, 0));
        assert_eq!(j.sockets[0].age_source, AgeSource::Unknown);
        // Socket 10 closed (its CLOSE was seen, or it closed before this join): not added.
        let j = join(
            &census(vec![leak], 20 * S),
            &t,
            &mut unfollowed,
            &thresholds,
            Mode::Correct,
            70 * S,
        );
        assert_eq!(j.corrections.added, 1);
        assert!(t.lock().get(10).is_none());
        // In CLOSE_WAIT since the first census at the latest: 60 s, stuck.
        let v = &j.sockets[0];
        assert_eq!(
            (v.age_source, v.age(70 * S)),
            (AgeSource::Census, Some(Duration::from_secs(60)))
        );
        assert_eq!(j.stuck.get(&(state::CLOSE_WAIT, 40001, 0)), Some(&1));
    }

    #[test]
    fn followed_sockets_the_census_no_longer_shows_are_dropped_unless_newer_than_the_dump() {
        let t = table();
        t.lock()
            .observe(&transition(4, S, state::CLOSE, state::SYN_SENT));
        t.lock()
            .observe(&transition(5, 12 * S, state::CLOSE, state::SYN_SENT));
        // Socket 4's CLOSE was lost; socket 5 opened after the dump began. A first census
        // that misses socket 4 only notes it (its CLOSE may still be on its way); the next one
        // drops it.
        let mut sightings = Sightings::default();
        for (dumped_at, dropped) in [(10 * S, 0), (11 * S, 1)] {
            let j = join(
                &census(vec![], dumped_at),
                &t,
                &mut sightings,
                &Thresholds::default(),
                Mode::Correct,
                13 * S,
            );
            assert_eq!(j.corrections.dropped, dropped, "census at {dumped_at}");
        }
        assert!(t.lock().get(1_000_004).is_none());
        assert!(t.lock().get(1_000_005).is_some());
        // Socket 5 is missing from every census from now on. Twice from a census that could
        // not visit every namespace: nothing of unknown namespace is dropped.
        let mut partial = census(vec![], 20 * S);
        partial.unreachable = 1;
        let mut join_at = |c: &HostCensus, mode: Mode| {
            join(c, &t, &mut sightings, &Thresholds::default(), mode, 21 * S)
                .corrections
                .dropped
        };
        assert_eq!(join_at(&partial, Mode::Correct), 0);
        assert_eq!(join_at(&partial, Mode::Correct), 0);
        // Nor twice from a census the reader did not catch up with.
        let full = census(vec![], 20 * S);
        assert_eq!(join_at(&full, Mode::ReadOnly), 0);
        assert_eq!(join_at(&full, Mode::ReadOnly), 0);
        // Two full censuses in a row drop it.
        assert_eq!(join_at(&full, Mode::Correct), 0);
        assert_eq!(join_at(&full, Mode::Correct), 1);
    }

    #[test]
    fn request_sockets_are_aged_by_their_synack_timer_and_owned_by_their_listener() {
        let t = table();
        let mut listen = transition(1, 0, state::CLOSE, state::LISTEN);
        (listen.sport, listen.pid) = (9000, 42);
        listen.comm = *b"srv\0\0\0\0\0\0\0\0\0\0\0\0\0";
        t.lock().observe(&listen);
        let mut r = rec(state::SYN_RECV, "127.0.0.1:9000", "127.0.0.1:50001", 6);
        (r.inode, r.retransmit) = (0, Some((Duration::from_millis(500), 3)));
        let l = rec(state::LISTEN, "127.0.0.1:9000", "0.0.0.0:0", 1_000_001);
        let j = join_once(
            &census(vec![l, r], 20 * S),
            &t,
            &Thresholds::default(),
            Mode::Correct,
            20 * S,
        );
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
        let j = join_once(&c, &table(), &Thresholds::default(), Mode::ReadOnly, S);
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
    }

    #[test]
    fn listen_queues_are_read_per_port() {
        let mut l = rec(state::LISTEN, "127.0.0.1:7000", "0.0.0.0:0", 1);
        l.rqueue = 2;
        l.wqueue = 1;
        let j = join_once(
            &census(vec![l], S),
            &table(),
            &Thresholds::default(),
            Mode::ReadOnly,
            S,
        );
        assert_eq!(j.listen_queue.get(&7000), Some(&(2, 1)));
    }
}
