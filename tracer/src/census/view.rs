//! One socket of a census as the agent shows it ([`SocketView`]): its state, how long it has
//! been in it and how that is known ([`AgeSource`]), its owner and its service port, from
//! what the probe keeps on the socket (its storage, read in the same sock_diag dump), and
//! for the few sockets whose storage does not tell, from what earlier censuses saw
//! ([`Sightings`]).
//!
//! Owns: the service port, age and owner of one socket ([`view`]) and the names found in
//! `/proc` for sockets the probe knows no owner of ([`name_owners`]). Does not own: the walk
//! of the census (`join`), the figures summed over sockets (`figures`), what is stuck
//! (`stuck`).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use tracer_common::{socket, state, SocketState};

use crate::census::join::Joined;
use crate::census::owners::Holder;
use crate::census::stuck::request_age;
use crate::census::{NetnsCensus, SocketRecord};

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

/// What one census leaves the next: the sockets whose age the probe's storage does not tell,
/// and owners found in `/proc`. It holds only those (and only while they last): every other
/// socket's state is on the socket.
#[derive(Debug, Default)]
pub struct Sightings {
    /// CLOCK_MONOTONIC when the probe was attached.
    pub(super) started_ns: u64,
    /// Censuses joined so far.
    pub(super) censuses: u64,
    /// Full sockets whose storage does not say when they entered their state, by cookie: the
    /// state they were found in, since when at the latest, and why. Kept while censuses find
    /// them in that state.
    pub(super) unaged: HashMap<u64, (u8, u64, AgeSource)>,
    /// Owners found in `/proc` for sockets the probe knows none of, by cookie.
    pub(super) owners: HashMap<u64, Holder>,
    /// Inodes looked for in `/proc` and not found (a process this agent cannot see).
    pub(super) not_found: HashSet<u64>,
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

/// What a namespace's listeners tell its other sockets: the ports something listens on, and
/// each listener's owner and cgroup (a request socket belongs to its listener, as the probe
/// credits a passive child to it).
#[derive(Debug, Default)]
pub struct Listeners {
    ports: HashSet<u16>,
    owners: HashMap<u16, (u32, [u8; 16], u64)>,
}

impl Listeners {
    pub fn of(ns: &NetnsCensus, sightings: &Sightings) -> Listeners {
        let mut out = Listeners::default();
        for r in ns.sockets.iter().filter(|r| r.state == state::LISTEN) {
            out.ports.insert(r.local.port());
            let stored = r.storage.filter(|_| r.full);
            let (pid, comm) = owner(stored, sightings, r.cookie);
            let cgroup = cgroup(stored, r);
            if pid != 0 || cgroup != 0 {
                out.owners.insert(r.local.port(), (pid, comm, cgroup));
            }
        }
        out
    }

    /// Something listens on `port`.
    pub fn contains(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }
}

/// The owner of a socket: as its storage names it, else as a walk of `/proc` found it.
fn owner(stored: Option<SocketState>, sightings: &Sightings, cookie: u64) -> Holder {
    match stored.filter(|s| s.pid != 0) {
        Some(s) => (s.pid, s.comm),
        None => sightings
            .owners
            .get(&cookie)
            .copied()
            .unwrap_or((0, [0; 16])),
    }
}

/// The cgroup the probe read from the socket, else sock_diag's (full sockets only: TIME-WAIT
/// and request sockets have none there).
fn cgroup(stored: Option<SocketState>, r: &SocketRecord) -> u64 {
    match stored.map_or(0, |s| s.cgroup) {
        0 => r.cgroup,
        c => c,
    }
}

/// The state a census reports a socket in, as `ss` shows it: request sockets (sock_diag
/// reports them as SYN_RECV, `inet_req_diag_fill`, though they are NEW_SYN_RECV inside)
/// count as SYN_RECV.
pub fn census_state(r: &SocketRecord) -> u8 {
    if r.state == state::NEW_SYN_RECV {
        state::SYN_RECV
    } else {
        r.state
    }
}

/// The service port of a socket: as the probe learnt it when the socket opened; else the
/// local port when something listens on it (or the socket listens), or when it is outside
/// the ephemeral range and the remote one inside it (an accepted connection whose listener
/// has closed, a server's leak after its restart), else the remote one.
pub fn service_port(ns: &NetnsCensus, r: &SocketRecord, listeners: &Listeners) -> u16 {
    let (lo, hi) = ns.port_range;
    let ephemeral = |p: u16| (lo..=hi).contains(&p);
    let accepted_here = !ephemeral(r.local.port()) && ephemeral(r.remote.port());
    match r
        .storage
        .filter(|_| r.full)
        .map(|s| s.port)
        .filter(|&p| p != 0)
    {
        Some(p) => p,
        None if listeners.contains(r.local.port())
            || census_state(r) == state::LISTEN
            || accepted_here =>
        {
            r.local.port()
        }
        None => r.remote.port(),
    }
}

/// What a census found of a socket that its storage did not tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finding {
    /// In another state than the one the probe saw it enter (a transition it did not see).
    StateCorrected,
    /// Found after start without storage (the kernel refused it: see
    /// `tracer_probe_errors_total{error="no_storage"}`).
    Added,
}

/// One socket's view, and what to keep of it for the next census.
pub struct Viewed {
    pub view: SocketView,
    /// The state it was found in, since when at the latest, and why: for a socket whose
    /// storage does not tell its age (kept while censuses find it in that state).
    pub unaged: Option<(u8, u64, AgeSource)>,
    pub finding: Option<Finding>,
}

/// The view of `r`, found in `ns`; `first` on the agent's first census.
pub fn view(
    ns: &NetnsCensus,
    r: &SocketRecord,
    listeners: &Listeners,
    sightings: &Sightings,
    first: bool,
) -> Viewed {
    let census_state = census_state(r);
    // Neither request sockets nor TIME-WAIT sockets (some shown in their FIN_WAIT2 substate)
    // are full sockets: they have no storage, and no age but the request's timer.
    let full = r.full;
    let request = census_state == state::SYN_RECV && !full;
    let stored = r.storage.filter(|_| full);
    let exact = stored.filter(|s| s.state == census_state && s.flags & socket::SINCE_SEEN != 0);
    let (mut unaged, mut finding) = (None, None);
    let (entered_ns, age_source) = match (exact, r.retransmit) {
        (Some(s), _) => (Some(s.since_ns), AgeSource::Transition),
        // The timer as the dump read it, some time between the dump's start and end: its
        // age taken as of the end, so that it stays a lower bound (not as of the join, which
        // a busy host's census reached more than a second later: ages came out too old).
        (None, Some((expires, retransmits))) if request => (
            Some(
                ns.dumped_until_ns
                    .saturating_sub(request_age(expires, retransmits).as_nanos() as u64),
            ),
            AgeSource::SynAckTimer,
        ),
        (None, _) if !full => (None, AgeSource::Unknown),
        // The socket changed state while the dump ran (sock_diag reads each socket after it
        // let go of the hash bucket; the probe writes the storage just before the kernel
        // stores the new state): nothing was missed, and it is no longer in the state the
        // dump read. The next census has it exact.
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
                // No transition since the probe was attached: storage it was only given at
                // start (state 0), or none at the first census.
                if stored.map_or(first, |s| s.state == 0) {
                    (sightings.started_ns, AgeSource::AgentStart)
                } else {
                    finding = Some(if stored.is_some() {
                        Finding::StateCorrected
                    } else {
                        Finding::Added
                    });
                    (ns.dumped_at_ns, AgeSource::Census)
                }
            });
            unaged = Some((census_state, since, source));
            (Some(since), source)
        }
    };
    let (mut pid, mut comm) = owner(stored, sightings, r.cookie);
    let mut cgroup = cgroup(stored, r);
    if age_source == AgeSource::SynAckTimer {
        if let Some(&listener) = listeners.owners.get(&r.local.port()) {
            (pid, comm, cgroup) = listener;
        }
    }
    Viewed {
        view: SocketView {
            netns: ns.netns,
            state: census_state,
            local: r.local,
            remote: r.remote,
            entered_ns,
            age_source,
            pid,
            comm,
            cgroup,
            port: service_port(ns, r, listeners),
            cookie: r.cookie,
            inode: r.inode,
        },
        unaged,
        finding,
    }
}
