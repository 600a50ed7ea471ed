//! The scrape path's engine: one census thread that takes a census of every namespace, with
//! what the probe keeps on each socket, joins them, and publishes the result for every reader.
//!
//! Owns: when a census runs, and the last published [`Report`]. Does not own: the census I/O (`census`), the join (`join`), or how the
//! report is shown (`metrics::census`, `listing`).
//!
//! Why a thread that publishes, rather than a census per request: a census walks every socket
//! of the host (hundreds of milliseconds with 10^5-10^6 sockets). Run per request, concurrent
//! scrapes multiply that work and its memory; run on the event thread, it stalls the reader
//! and events are lost. Here there is one census at a time, off the event thread; `/metrics`
//! and `/sockets` answer at once from the last report, whose age is exported
//! (`tracer_census_timestamp_seconds`). It runs every `--census-interval`, but never uses more
//! than 1/20 of a core (after a census that used `c` of CPU, the next starts `20 c` later at
//! the earliest), so that a huge host costs at most 5% of a core in censuses. CPU time, not
//! wall time: a census slowed by a busy machine (or a stopped process) is not held against it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};

use std::collections::HashMap;

use crate::census::failure::{Failure, FailureLog};
use crate::census::join::{join, name_owners, Joined, Sightings};
use crate::census::stuck::Thresholds;
use crate::census::StorageMap;
use crate::metrics::ports::Use;
use crate::stream::ring::monotonic_ns;
use crate::workload::{Resolver, Workload};

/// Nice value of the census thread (the event thread keeps the default, 0).
const CENSUS_NICE: libc::c_int = 10;

/// A census's time may not exceed this share of the wall clock.
const MAX_DUTY: u32 = 20;

/// One published census, joined with what the probe keeps on each socket.
#[derive(Debug)]
pub struct Report {
    /// When the census began: CLOCK_MONOTONIC ns (the probe's clock) and wall-clock time.
    pub taken_ns: u64,
    pub taken_at: SystemTime,
    /// How long the census and the join took.
    pub duration: Duration,
    /// Namespaces visited, and found but not visited.
    pub visited: u64,
    pub unreachable: u64,
    pub joined: Joined,
    /// Running totals since the agent started: TcpExt ListenOverflows and ListenDrops over
    /// every namespace, and what the join found that the probe's storage did not tell.
    pub listen_overflows: u64,
    pub listen_drops: u64,
    /// TCP segments sent (Tcp OutSegs), over every namespace, since the agent started.
    pub segments_sent: u64,
    pub state_corrected: u64,
    pub added: u64,
    pub owner_found: u64,
    pub thresholds: Thresholds,
    /// What the cgroup of each listed socket is (container, pod, unit), for the sockets whose
    /// cgroup could be resolved.
    pub workloads: HashMap<u64, Arc<Workload>>,
    pub cgroups: CgroupReport,
}

/// How resolving the census's cgroups went.
#[derive(Clone, Copy, Debug, Default)]
pub struct CgroupReport {
    /// Cgroup ids of this census's sockets that no walk of the cgroup tree found (a wrong
    /// `--cgroup-root`, or cgroups removed before they were seen).
    pub unresolved: u64,
    /// Walks of the cgroup tree by the census thread, and walks that found more cgroups than
    /// it keeps, since the agent started.
    pub walks: u64,
    pub truncated_walks: u64,
}

impl Report {
    /// What the cgroup `id` is, if known.
    pub fn workload(&self, id: u64) -> Option<&Workload> {
        self.workloads.get(&id).map(|w| &**w)
    }
}

/// What the census thread publishes and the HTTP side reads.
#[derive(Default)]
pub struct Published {
    latest: Mutex<Option<Arc<Report>>>,
    /// Censuses that failed (the last report stays published).
    pub errors: AtomicU64,
    /// Why the last census failed, and the line that says it (None: it worked).
    failure: Mutex<Option<(Failure, String)>>,
}

impl Published {
    /// The last report, if a census has completed.
    pub fn latest(&self) -> Option<Arc<Report>> {
        self.latest.lock().clone()
    }

    pub(crate) fn publish(&self, report: Report) {
        *self.latest.lock() = Some(Arc::new(report));
        *self.failure.lock() = None;
    }

    /// Why the last census failed (None: it worked, or none has run yet).
    pub fn failure(&self) -> Option<(Failure, String)> {
        self.failure.lock().clone()
    }

    pub(crate) fn failed(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.failure.lock() = Some((Failure::of(e), Failure::text(e)));
    }
}

/// What the census tells the event path: its port label policy (`ports`), and the open
/// connections for their periodic reports (`stream::live`).
pub struct PortNews {
    /// `ip_local_port_range` of each namespace visited.
    pub ranges: std::collections::HashMap<u32, (u16, u16)>,
    /// At the first census: the service ports in use and their volume, for the seed.
    pub seed: Option<Vec<(u16, u64, Use)>>,
    pub live: crate::stream::live::LiveCensus,
    /// The census's figures for `tracer top` (`/top`), while a client asks for them.
    pub top: Option<crate::top::CensusPart>,
}

/// What the census thread needs.
pub struct CensusConfig {
    pub interval: Duration,
    pub thresholds: Thresholds,
    /// CLOCK_MONOTONIC when the probe was attached: sockets older than that are "at least
    /// since start".
    pub started_ns: u64,
    /// Resolves cgroup ids to containers and pods (None: not on this host).
    pub resolver: Option<Resolver>,
    /// The probe's socket storage, read in each dump.
    pub storage: StorageMap,
    /// `/top`: whether a client asks for its figures now (none are made otherwise).
    pub top: Arc<crate::top::Latest>,
}

/// Runs censuses until `stop` is dropped (or sends).
pub fn run(
    mut config: CensusConfig,
    published: Arc<Published>,
    news: Sender<PortNews>,
    stop: Receiver<()>,
) {
    // The census can wait; the event reader, which shares the CPUs, cannot: on a saturated
    // host the scheduler should run the reader first.
    // SAFETY: setpriority on this thread's id (Linux applies PRIO_PROCESS to one thread);
    // a failure only leaves the default priority.
    unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::gettid() as libc::id_t,
            CENSUS_NICE,
        )
    };
    let mut totals = Totals::default();
    let mut sightings = Sightings::new(config.started_ns);
    let mut first = true;
    let mut log = FailureLog::default();
    loop {
        let began = Instant::now();
        let cpu_before = crate::census::thread_cpu_time();
        let mut cpu = Duration::ZERO;
        match crate::census::all_namespaces(Some(config.storage.clone())) {
            Ok(census) => {
                let taken_ns = census
                    .namespaces
                    .iter()
                    .map(|n| n.dumped_at_ns)
                    .min()
                    .unwrap_or_else(monotonic_ns);
                // The wall-clock time of `taken_ns` itself (not of `began`: finding the
                // namespaces takes milliseconds before the first dump, and ages given as of
                // the census's start must be as of the same moment in both clocks).
                let taken_at = SystemTime::now()
                    - Duration::from_nanos(monotonic_ns().saturating_sub(taken_ns));
                let mut joined = join(&census, &mut sightings, &config.thresholds, monotonic_ns());
                joined.figures.corrections.owner_found =
                    name_owners(&mut joined, &mut sightings, |wanted| {
                        crate::census::owners::find(std::path::Path::new("/proc"), wanted)
                    });
                let ranges = census
                    .namespaces
                    .iter()
                    .map(|n| (n.netns as u32, n.port_range))
                    .collect();
                let seed = first.then(|| {
                    joined
                        .figures
                        .services
                        .iter()
                        .map(|&(port, n, listening)| {
                            let why = if listening {
                                Use::Accepted
                            } else {
                                Use::Connected { netns: 0 }
                            };
                            (port, n, why)
                        })
                        .collect()
                });
                let live = crate::stream::live::samples(&census);
                let (workloads, unresolved) = resolve_all(config.resolver.as_mut(), &joined);
                let top = config.top.wanted(monotonic_ns()).then(|| {
                    crate::top::CensusPart::of(
                        &census,
                        &joined,
                        &config.thresholds,
                        monotonic_ns(),
                        taken_ns,
                        &workloads,
                    )
                });
                let _ = news.send(PortNews {
                    ranges,
                    seed,
                    live,
                    top,
                });
                let cgroups = CgroupReport {
                    unresolved,
                    walks: config.resolver.as_ref().map_or(0, |r| r.paths().walks()),
                    truncated_walks: config
                        .resolver
                        .as_ref()
                        .map_or(0, |r| r.paths().truncated_walks()),
                };
                totals.add(&census, &joined);
                published.publish(Report {
                    taken_ns,
                    taken_at,
                    duration: began.elapsed(),
                    visited: census.namespaces.len() as u64,
                    unreachable: census.unreachable,
                    listen_overflows: totals.overflows,
                    listen_drops: totals.drops,
                    segments_sent: totals.out_segs,
                    state_corrected: totals.state_corrected,
                    added: totals.added,
                    owner_found: totals.owner_found,
                    joined,
                    thresholds: config.thresholds.clone(),
                    workloads,
                    cgroups,
                });
                first = false;
                if let Some(line) = log.worked() {
                    eprintln!("{line}");
                }
                cpu = census.cpu;
                drop(census);
                return_freed_memory();
            }
            Err(e) => {
                published.failed(&e);
                if let Some(line) = log.failed(&Failure::text(&e), Instant::now()) {
                    eprintln!("{line}");
                }
            }
        }
        let cpu = cpu + crate::census::thread_cpu_time().saturating_sub(cpu_before);
        let wait = config.interval.max(cpu * MAX_DUTY);
        match stop.recv_timeout(wait.saturating_sub(began.elapsed())) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// Gives the memory of the census just dropped back to the system. A census of a big host
/// allocates and frees tens of megabytes; glibc keeps freed memory below the top of its heap
/// for reuse, and the agent's resident size would stay at its peak between censuses.
fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Running totals across censuses.
#[derive(Default)]
struct Totals {
    /// Last kernel counters per network namespace (ListenOverflows, ListenDrops, OutSegs), to
    /// turn them into increments.
    last: std::collections::HashMap<u64, [u64; 3]>,
    overflows: u64,
    drops: u64,
    out_segs: u64,
    state_corrected: u64,
    added: u64,
    owner_found: u64,
}

impl Totals {
    fn add(&mut self, census: &crate::census::HostCensus, joined: &Joined) {
        // Kernel counters per namespace become increments; a new namespace adds its total.
        for ns in &census.namespaces {
            let now = [ns.listen_overflows, ns.listen_drops, ns.out_segs];
            let before = self.last.get(&ns.netns).copied().unwrap_or_default();
            let totals = [&mut self.overflows, &mut self.drops, &mut self.out_segs];
            for ((total, now), before) in totals.into_iter().zip(now).zip(before) {
                *total += now.saturating_sub(before);
            }
            let kept = [0, 1, 2].map(|i| now[i].max(before[i]));
            self.last.insert(ns.netns, kept);
        }
        let present: std::collections::HashSet<u64> =
            census.namespaces.iter().map(|n| n.netns).collect();
        self.last.retain(|ns, _| present.contains(ns));
        self.state_corrected += joined.figures.corrections.state_corrected;
        self.added += joined.figures.corrections.added;
        self.owner_found += joined.figures.corrections.owner_found;
    }
}

/// The workload of every distinct cgroup among the census's sockets, and how many distinct
/// ids could not be resolved.
fn resolve_all(
    resolver: Option<&mut Resolver>,
    joined: &Joined,
) -> (HashMap<u64, Arc<Workload>>, u64) {
    let mut out = HashMap::new();
    let Some(resolver) = resolver else {
        return (out, 0);
    };
    let mut unresolved = std::collections::HashSet::new();
    for v in &joined.sockets {
        if v.cgroup == 0 || out.contains_key(&v.cgroup) || unresolved.contains(&v.cgroup) {
            continue;
        }
        match resolver.resolve(v.cgroup) {
            Some(w) => {
                out.insert(v.cgroup, w);
            }
            None => {
                unresolved.insert(v.cgroup);
            }
        }
    }
    (out, unresolved.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{HostCensus, NetnsCensus};

    fn census(namespaces: &[(u64, u64)]) -> HostCensus {
        HostCensus {
            namespaces: namespaces
                .iter()
                .map(|&(netns, out_segs)| NetnsCensus {
                    netns,
                    out_segs,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn kernel_counters_of_each_namespace_add_up_as_increments() {
        let mut totals = Totals::default();
        let joined = Joined::default();
        totals.add(&census(&[(1, 100), (2, 10)]), &joined);
        assert_eq!(
            totals.out_segs, 110,
            "a namespace first seen adds its total"
        );
        totals.add(&census(&[(1, 150), (2, 15)]), &joined);
        assert_eq!(totals.out_segs, 165);
        // Namespace 2 is gone; a new one (3) appears; 1 goes on.
        totals.add(&census(&[(1, 160), (3, 7)]), &joined);
        assert_eq!(totals.out_segs, 182);
    }
}
