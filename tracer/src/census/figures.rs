//! The figures only a census gives, summed over its sockets' views in the same walk that
//! makes them: sockets per state, stuck sockets and the oldest age per state, TIME-WAIT and
//! zero-window sockets per service port, listen queues, ephemeral port use per destination,
//! the services in use (for the port label policy's seed), and what the probe's storage did
//! not tell.
//!
//! Pure code: fed each socket's record and view, it returns the figures.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tracer_common::state;

use crate::census::stuck::Thresholds;
use crate::census::view::{Finding, SocketView};
use crate::census::{HostCensus, NetnsCensus, SocketRecord};

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
    /// Sockets found in another state than the one the probe saw them enter.
    pub state_corrected: u64,
    /// Sockets found after start without storage.
    pub added: u64,
    /// Sockets whose owner the probe does not know, named from `/proc` (`view::name_owners`).
    pub owner_found: u64,
}

/// A census's figures. Ports are service ports.
#[derive(Clone, Debug, Default)]
pub struct Figures {
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

/// Sums figures one socket at a time ([`Summing::add`]), then [`Summing::finish`]es them.
pub struct Summing<'a> {
    out: Figures,
    thresholds: &'a Thresholds,
    now_ns: u64,
    per_destination: HashMap<(u64, IpAddr, SocketAddr), u64>,
    services: HashMap<(u16, bool), u64>,
}

impl<'a> Summing<'a> {
    /// Figures of a census joined at `now_ns`, stuck past `thresholds`.
    pub fn new(thresholds: &'a Thresholds, now_ns: u64) -> Summing<'a> {
        Summing {
            out: Figures::default(),
            thresholds,
            now_ns,
            per_destination: HashMap::new(),
            services: HashMap::new(),
        }
    }

    /// Adds socket `r` of `ns`, seen as `v`; `local_is_service` when something listens on
    /// its local port.
    pub fn add(
        &mut self,
        ns: &NetnsCensus,
        r: &SocketRecord,
        v: &SocketView,
        local_is_service: bool,
        finding: Option<Finding>,
    ) {
        let out = &mut self.out;
        let (lo, hi) = ns.port_range;
        let ephemeral = |p: u16| (lo..=hi).contains(&p);
        if r.full && r.storage.is_some() {
            out.stored += 1;
            out.stored_bytes += u64::from(r.optmem);
        }
        if let Some(c) = out.by_state.get_mut(v.state as usize) {
            *c += 1;
        }
        match finding {
            Some(Finding::StateCorrected) => out.corrections.state_corrected += 1,
            Some(Finding::Added) => out.corrections.added += 1,
            None => {}
        }
        if v.state == state::LISTEN {
            let q = out.listen_queue.entry(v.port).or_default();
            q.0 += u64::from(r.rqueue);
            q.1 += u64::from(r.wqueue);
            *self.services.entry((v.port, true)).or_default() += 0;
        } else if local_is_service {
            *self.services.entry((r.local.port(), true)).or_default() += 1;
        } else if ephemeral(r.local.port()) && !ephemeral(r.remote.port()) {
            // This host connected from an ephemeral port to a service port.
            *self.services.entry((r.remote.port(), false)).or_default() += 1;
        }
        if v.state == state::TIME_WAIT {
            *out.time_wait.entry(v.port).or_default() += 1;
        }
        let sends = matches!(v.state, state::ESTABLISHED | state::CLOSE_WAIT);
        if sends && r.tcp.and_then(|t| t.snd_wnd) == Some(0) {
            *out.zero_window.entry(v.port).or_default() += 1;
        }
        if v.state != state::LISTEN && !local_is_service && ephemeral(r.local.port()) {
            *self
                .per_destination
                .entry((ns.netns, r.local.ip(), r.remote))
                .or_default() += 1;
        }
        if let Some(age) = v.age(self.now_ns) {
            let oldest = out.oldest.entry(v.state).or_default();
            *oldest = (*oldest).max(age);
            if self.thresholds.is_stuck(v.state, age) {
                *out.stuck.entry((v.state, v.port, v.cgroup)).or_default() += 1;
            }
        }
    }

    /// The figures of every socket added, of `census`.
    pub fn finish(self, census: &HostCensus) -> Figures {
        let mut out = self.out;
        out.services = self
            .services
            .into_iter()
            .map(|((port, listening), n)| (port, n, listening))
            .collect();
        let range_of: HashMap<u64, u64> = census
            .namespaces
            .iter()
            .map(|n| (n.netns, u64::from(n.port_range.1 - n.port_range.0) + 1))
            .collect();
        let mut destinations: Vec<Destination> = self
            .per_destination
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
}
