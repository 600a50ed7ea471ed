//! The Prometheus metrics of `tracer run`: what each number means, its labels, and the bounded
//! set of `port` label values.
//!
//! Owns: the registry, turning [`Observation`]s into samples (in seconds, converted here and
//! only here), and turning the probe's cumulative kernel counters into counter increments.
//! Label handles are resolved once per label set and kept, so the per-event path does no
//! string work. Does not own: serving (`http`), the census I/O (`census`).

use anyhow::Result;
use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use std::collections::HashMap;

use crate::census::{count_by_state, NetnsCensus};
use crate::event::{state_name, STATE_NAMES};
use crate::probe::{ProbeReadings, RESET_STATES};
use crate::sockets::{Failure, Mode, Observation, Teardown};
use crate::stuck::Snapshot;

/// Handshake and teardown buckets (seconds): from tens of microseconds (loopback) to a minute,
/// with an edge between every SYN retransmission step. With an initial RTO of 1 s, classic
/// exponential backoff retries at 1 s, 3 s, 7 s, 15 s; since Linux 6.5 the first
/// `tcp_syn_linear_timeouts` (default 4) retries of an active open are linear: 1, 2, 3, 4, 5 s.
/// The half-second edges put each step in its own bucket.
pub const HANDSHAKE_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 3.5, 4.5, 5.5, 7.5, 10.0, 15.5, 31.5, 60.0,
];

/// Dwell and lifetime buckets (seconds): the handshake ones, then up to a day.
pub const LONG_BUCKETS: &[f64] = &[
    0.000_01, 0.000_1, 0.001, 0.01, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
];

const MODES: [&str; 2] = ["active", "passive"];
const TEARDOWNS: [&str; 3] = ["active", "passive", "simultaneous"];
const FAILURES: [&str; 4] = ["refused", "timeout", "aborted", "other"];
const DIRECTIONS: [&str; 2] = ["sent", "received"];

/// The `port` label's values: at most `max` distinct ports, the rest folded into `"other"`.
///
/// With an explicit list, only those ports get their own value. Otherwise ports get one in the
/// order they are first seen, until `max` are taken. Port 0 (not known) is always `"other"`.
pub struct PortLabels {
    /// Slot of each port, 0 = not given one yet / "other".
    slot_of: Vec<u16>,
    names: Vec<String>,
    max: usize,
    fixed: bool,
}

impl PortLabels {
    /// `explicit` non-empty: exactly those ports; else the first `max` ports seen.
    pub fn new(explicit: &[u16], max: usize) -> PortLabels {
        let mut labels = PortLabels {
            slot_of: vec![0; 65_536],
            names: vec!["other".to_owned()],
            max,
            fixed: !explicit.is_empty(),
        };
        for &p in explicit {
            labels.assign(p);
        }
        labels
    }

    /// The slot (index into [`PortLabels::name`]) of `port`, giving it one if allowed.
    pub fn slot(&mut self, port: u16) -> usize {
        match self.slot_of[port as usize] {
            0 if port != 0 && !self.fixed && self.names.len() <= self.max => self.assign(port),
            s => s as usize,
        }
    }

    /// The label value of a slot.
    pub fn name(&self, slot: usize) -> &str {
        &self.names[slot]
    }

    fn assign(&mut self, port: u16) -> usize {
        if self.slot_of[port as usize] == 0 {
            self.slot_of[port as usize] = self.names.len() as u16;
            self.names.push(port.to_string());
        }
        self.slot_of[port as usize] as usize
    }
}

/// Label handles of one metric, by (one closed label) x port slot, made on first use.
struct ByPort<T> {
    handles: Vec<Vec<Option<T>>>,
}

impl<T: Clone> ByPort<T> {
    fn new(kinds: usize) -> Self {
        ByPort {
            handles: vec![Vec::new(); kinds],
        }
    }

    fn get(&mut self, kind: usize, slot: usize, make: impl FnOnce() -> T) -> &T {
        let row = &mut self.handles[kind];
        if row.len() <= slot {
            row.resize(slot + 1, None);
        }
        row[slot].get_or_insert_with(make)
    }
}

/// Every metric `tracer run` exports.
pub struct Metrics {
    pub registry: Registry,
    ports: PortLabels,
    handshake: HistogramVec,
    handshake_h: ByPort<LocalHistogram>,
    failures: IntCounterVec,
    failures_h: ByPort<LocalIntCounter>,
    synack: IntCounterVec,
    teardown: HistogramVec,
    teardown_h: ByPort<LocalHistogram>,
    lifetime: HistogramVec,
    lifetime_h: ByPort<LocalHistogram>,
    state_duration: Vec<LocalHistogram>,
    transitions: IntCounterVec,
    transitions_h: Vec<Option<LocalIntCounter>>,
    resets: IntCounterVec,
    /// `tracer_tcp_sockets{state}`, set from the census on each scrape.
    pub sockets: IntGaugeVec,
    /// Scrapes whose census failed.
    pub census_errors: IntCounter,
    namespaces: IntGaugeVec,
    stuck: IntGaugeVec,
    oldest_age: prometheus::GaugeVec,
    time_wait: IntGaugeVec,
    ephemeral: prometheus::Gauge,
    listen_queue: IntGaugeVec,
    listen_queue_limit: IntGaugeVec,
    listen_overflows: IntCounter,
    listen_drops: IntCounter,
    /// Last TcpExt listen counters per network namespace, to turn them into increments.
    last_listen: HashMap<u64, (u64, u64)>,
    events: IntCounter,
    events_lost: IntCounter,
    probe_runs: IntCounterVec,
    probe_run_seconds: prometheus::CounterVec,
    tracked: IntGauge,
    evicted: IntCounter,
    /// Last kernel totals seen, to turn them into counter increments.
    last: KernelTotals,
}

#[derive(Default)]
struct KernelTotals {
    lost: u64,
    /// Per program: (runs, run nanoseconds).
    programs: HashMap<&'static str, (u64, u64)>,
    evicted: u64,
    synack: HashMap<u16, u64>,
    resets: [[u64; RESET_STATES as usize]; 2],
}

impl Metrics {
    /// Registers every metric. `ports`: which ports get their own `port` label value.
    pub fn new(ports: PortLabels) -> Result<Metrics> {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let h = HistogramVec::new(opts, labels)?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let handshake = histogram(
            "tracer_tcp_handshake_duration_seconds",
            "TCP handshakes completed, from inet_sock_set_state: active is SYN_SENT to \
             ESTABLISHED on the connecting side, passive is the kernel's first-SYN-ACK-to-final-ACK \
             time on the accepting side; seconds.",
            &["mode", "port"],
            HANDSHAKE_BUCKETS,
        )?;
        let failures = counter(
            "tracer_tcp_handshake_failures_total",
            "Active opens that ended SYN_SENT -> CLOSE, from inet_sock_set_state, by sk_err reason.",
            &["mode", "reason", "port"],
        )?;
        let synack = counter(
            "tracer_tcp_synack_retransmits_total",
            "SYN-ACK retransmissions, from tcp/tcp_retransmit_synack, by listening port.",
            &["port"],
        )?;
        let teardown = histogram(
            "tracer_tcp_teardown_duration_seconds",
            "Time from leaving ESTABLISHED (FIN_WAIT1 or CLOSE_WAIT) to CLOSE, from \
             inet_sock_set_state, by who closed first; seconds.",
            &["mode", "port"],
            HANDSHAKE_BUCKETS,
        )?;
        let lifetime = histogram(
            "tracer_tcp_connection_duration_seconds",
            "Connection lifetime from ESTABLISHED to CLOSE, from inet_sock_set_state, by open mode; \
             seconds.",
            &["mode", "port"],
            LONG_BUCKETS,
        )?;
        let state_vec = histogram(
            "tracer_tcp_state_duration_seconds",
            "Time sockets spent in a state, from inet_sock_set_state, when the tracer saw them \
             enter it; seconds.",
            &["state"],
            LONG_BUCKETS,
        )?;
        let state_duration = STATE_NAMES
            .iter()
            .map(|s| state_vec.with_label_values(&[s]).local())
            .collect();
        let transitions = counter(
            "tracer_tcp_transitions_total",
            "TCP state changes, from inet_sock_set_state.",
            &["from", "to"],
        )?;
        let resets = counter(
            "tracer_tcp_resets_total",
            "TCP resets, from tcp/tcp_send_reset and tcp/tcp_receive_reset, by the socket's state \
             (none: a reset that answered no socket).",
            &["direction", "state"],
        )?;
        let sockets = IntGaugeVec::new(
            Opts::new(
                "tracer_tcp_sockets",
                "TCP sockets per state now, from sock_diag (request sockets count as syn_recv, as \
                 in ss).",
            ),
            &["state"],
        )?;
        registry.register(Box::new(sockets.clone()))?;
        let single = |name: &str, help: &str| -> Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let events = single(
            "tracer_events_total",
            "Transitions read from the probe's ring buffer (inet_sock_set_state).",
        )?;
        let events_lost = single(
            "tracer_events_lost_total",
            "Transitions that never reached the agent: ring buffer full, or skipped by the kernel \
             as nested runs that the rescue program could not deliver.",
        )?;
        let probe_runs = counter(
            "tracer_probe_runs_total",
            "Runs of each eBPF program, counted by the kernel only while the sysctl \
             kernel.bpf_stats_enabled is 1 (0 otherwise).",
            &["program"],
        )?;
        let probe_run_seconds = prometheus::CounterVec::new(
            Opts::new(
                "tracer_probe_run_seconds_total",
                "Kernel CPU time spent in each eBPF program, counted only while the sysctl \
                 kernel.bpf_stats_enabled is 1 (0 otherwise).",
            ),
            &["program"],
        )?;
        registry.register(Box::new(probe_run_seconds.clone()))?;
        let evicted = single(
            "tracer_tracked_sockets_evicted_total",
            "Sockets dropped from the agent's table because it was full (--max-sockets).",
        )?;
        let census_errors = single(
            "tracer_census_errors_total",
            "Scrapes whose sock_diag census failed (tracer_tcp_sockets kept its last values).",
        )?;
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let namespaces = gauge_vec(
            "tracer_census_namespaces",
            "Network namespaces in the last sock_diag census: visited, or unreachable (no \
             permission to enter them: their sockets are missing).",
            &["result"],
        )?;
        namespaces.with_label_values(&["visited"]).set(0);
        namespaces.with_label_values(&["unreachable"]).set(0);
        let stuck = gauge_vec(
            "tracer_tcp_stuck_sockets",
            "Sockets older than their state's --stuck-after threshold now, from sock_diag joined \
             with inet_sock_set_state, every network namespace.",
            &["state", "port"],
        )?;
        let oldest_age = prometheus::GaugeVec::new(
            Opts::new(
                "tracer_tcp_oldest_socket_age_seconds",
                "Age in its state of the oldest socket in each state, every network namespace \
                 (at least the agent's uptime for sockets older than the agent); seconds.",
            ),
            &["state"],
        )?;
        registry.register(Box::new(oldest_age.clone()))?;
        let time_wait = gauge_vec(
            "tracer_tcp_time_wait_sockets",
            "TIME-WAIT sockets now by service port, from sock_diag, every network namespace.",
            &["port"],
        )?;
        let ephemeral = prometheus::Gauge::new(
            "tracer_tcp_ephemeral_port_utilization",
            "Fraction (0 to 1) of ip_local_port_range in use toward the busiest destination \
             (local address, remote address and port), from sock_diag; GET /sockets names it.",
        )?;
        registry.register(Box::new(ephemeral.clone()))?;
        let listen_queue = gauge_vec(
            "tracer_tcp_listen_queue",
            "Connections waiting in listeners' accept queues by port, from sock_diag.",
            &["port"],
        )?;
        let listen_queue_limit = gauge_vec(
            "tracer_tcp_listen_queue_limit",
            "Accept queue limit (listen backlog) of listeners by port, from sock_diag.",
            &["port"],
        )?;
        let listen_overflows = single(
            "tracer_tcp_listen_overflows_total",
            "Times a listener's accept queue was full (TcpExt ListenOverflows), every network namespace.",
        )?;
        let listen_drops = single(
            "tracer_tcp_listen_drops_total",
            "SYNs dropped by listeners (TcpExt ListenDrops), every network namespace.",
        )?;
        let tracked = IntGauge::new("tracer_tracked_sockets", "Sockets the agent follows now.")?;
        registry.register(Box::new(tracked.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "tracer_build_info",
                "Always 1; the version of the running tracer.",
            ),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        Ok(Metrics {
            registry,
            ports,
            handshake,
            handshake_h: ByPort::new(MODES.len()),
            failures,
            failures_h: ByPort::new(FAILURES.len()),
            synack,
            teardown,
            teardown_h: ByPort::new(TEARDOWNS.len()),
            lifetime,
            lifetime_h: ByPort::new(MODES.len()),
            state_duration,
            transitions,
            transitions_h: vec![None; STATE_NAMES.len() * STATE_NAMES.len()],
            resets,
            sockets,
            census_errors,
            namespaces,
            stuck,
            oldest_age,
            time_wait,
            ephemeral,
            listen_queue,
            listen_queue_limit,
            listen_overflows,
            listen_drops,
            last_listen: HashMap::new(),
            events,
            events_lost,
            probe_runs,
            probe_run_seconds,
            tracked,
            evicted,
            last: KernelTotals::default(),
        })
    }

    /// Records what the socket table observed. The per-event path: no allocation once a label
    /// set has been seen.
    pub fn record(&mut self, o: Observation) {
        let secs = |ns: u64| ns as f64 / 1e9;
        match o {
            Observation::Transition { from, to } => {
                let (f, t) = (
                    from as usize % STATE_NAMES.len(),
                    to as usize % STATE_NAMES.len(),
                );
                let transitions = &self.transitions;
                self.transitions_h[f * STATE_NAMES.len() + t]
                    .get_or_insert_with(|| {
                        transitions
                            .with_label_values(&[state_name(from), state_name(to)])
                            .local()
                    })
                    .inc();
            }
            Observation::Dwell { state, ns } => {
                if let Some(h) = self.state_duration.get(state as usize) {
                    h.observe(secs(ns));
                }
            }
            Observation::Handshake { mode, port, ns } => {
                let slot = self.ports.slot(port);
                let (vec, name) = (&self.handshake, self.ports.name(slot));
                self.handshake_h
                    .get(mode as usize, slot, || {
                        vec.with_label_values(&[MODES[mode as usize], name]).local()
                    })
                    .observe(secs(ns));
            }
            Observation::HandshakeFailure { reason, port } => {
                let slot = self.ports.slot(port);
                let (vec, name) = (&self.failures, self.ports.name(slot));
                self.failures_h
                    .get(reason as usize, slot, || {
                        vec.with_label_values(&["active", FAILURES[reason as usize], name])
                            .local()
                    })
                    .inc();
            }
            Observation::Teardown { mode, port, ns } => {
                let slot = self.ports.slot(port);
                let (vec, name) = (&self.teardown, self.ports.name(slot));
                self.teardown_h
                    .get(mode as usize, slot, || {
                        vec.with_label_values(&[TEARDOWNS[mode as usize], name])
                            .local()
                    })
                    .observe(secs(ns));
            }
            Observation::Lifetime { mode, port, ns } => {
                let slot = self.ports.slot(port);
                let (vec, name) = (&self.lifetime, self.ports.name(slot));
                self.lifetime_h
                    .get(mode as usize, slot, || {
                        vec.with_label_values(&[MODES[mode as usize], name]).local()
                    })
                    .observe(secs(ns));
            }
        }
    }

    /// Publishes what [`Metrics::record`] gathered since the last call, and counts the batch's
    /// `events` (transitions read). The per-event path updates thread-local copies (no atomic
    /// operation per event); call this after each batch, before anything reads the registry.
    pub fn flush(&self, events: u64) {
        self.events.inc_by(events);
        self.transitions_h
            .iter()
            .flatten()
            .for_each(LocalIntCounter::flush);
        self.state_duration.iter().for_each(LocalHistogram::flush);
        self.failures_h
            .handles
            .iter()
            .flatten()
            .flatten()
            .for_each(LocalIntCounter::flush);
        for h in [&self.handshake_h, &self.teardown_h, &self.lifetime_h] {
            h.handles
                .iter()
                .flatten()
                .flatten()
                .for_each(LocalHistogram::flush);
        }
    }

    /// Brings the kernel-side counters and the table's size into the metrics (once a second).
    pub fn sync(&mut self, probe: &ProbeReadings, tracked: usize, evicted: u64) {
        let (synack, resets) = (&probe.synack, &probe.resets);
        let lost = probe.counters.lost_total();
        self.events_lost.inc_by(lost.saturating_sub(self.last.lost));
        self.last.lost = self.last.lost.max(lost);
        self.evicted
            .inc_by(evicted.saturating_sub(self.last.evicted));
        self.last.evicted = self.last.evicted.max(evicted);
        self.tracked.set(tracked as i64);
        for p in &probe.programs {
            let (runs, ns) = self
                .last
                .programs
                .insert(p.name, (p.runs, p.run_ns))
                .unwrap_or((0, 0));
            self.probe_runs
                .with_label_values(&[p.name])
                .inc_by(p.runs.saturating_sub(runs));
            let secs = p.run_ns.saturating_sub(ns) as f64 / 1e9;
            self.probe_run_seconds
                .with_label_values(&[p.name])
                .inc_by(secs);
        }
        for &(port, total) in synack {
            let before = self.last.synack.insert(port, total).unwrap_or(0);
            let slot = self.ports.slot(port);
            self.synack
                .with_label_values(&[self.ports.name(slot)])
                .inc_by(total.saturating_sub(before));
        }
        for (d, direction) in DIRECTIONS.iter().enumerate() {
            for (state, &total) in resets[d].iter().enumerate() {
                let before = std::mem::replace(&mut self.last.resets[d][state], total);
                if total > before {
                    let name = if state == 0 {
                        "none"
                    } else {
                        state_name(state as u8)
                    };
                    self.resets
                        .with_label_values(&[direction, name])
                        .inc_by(total - before);
                }
            }
        }
    }

    /// Sets every census-based metric from a census of all namespaces and its snapshot.
    pub fn apply_census(&mut self, census: &[NetnsCensus], unreachable: u64, snap: &Snapshot) {
        self.namespaces
            .with_label_values(&["visited"])
            .set(census.len() as i64);
        self.namespaces
            .with_label_values(&["unreachable"])
            .set(unreachable as i64);
        let mut counts = [0u64; 13];
        for ns in census {
            for (total, n) in counts.iter_mut().zip(count_by_state(&ns.sockets)) {
                *total += n;
            }
        }
        Metrics::set_census(&self.sockets, &counts);

        // Gauges by port are rebuilt from scratch, so that ports that emptied disappear.
        self.stuck.reset();
        for (&(state, port), &n) in &snap.stuck {
            let slot = self.ports.slot(port);
            self.stuck
                .with_label_values(&[state_name(state), self.ports.name(slot)])
                .add(n as i64);
        }
        for (s, _) in crate::stuck::DEFAULT_THRESHOLDS {
            self.oldest_age.with_label_values(&[state_name(s)]).set(0.0);
        }
        for (&state, age) in &snap.oldest {
            self.oldest_age
                .with_label_values(&[state_name(state)])
                .set(age.as_secs_f64());
        }
        self.time_wait.reset();
        for (&port, &n) in &snap.time_wait {
            let slot = self.ports.slot(port);
            self.time_wait
                .with_label_values(&[self.ports.name(slot)])
                .add(n as i64);
        }
        self.ephemeral
            .set(snap.destinations.first().map_or(0.0, |d| d.utilization()));
        self.listen_queue.reset();
        self.listen_queue_limit.reset();
        for (&port, &(queue, limit)) in &snap.listen_queue {
            let slot = self.ports.slot(port);
            let name = self.ports.name(slot);
            self.listen_queue
                .with_label_values(&[name])
                .add(queue as i64);
            self.listen_queue_limit
                .with_label_values(&[name])
                .add(limit as i64);
        }
        // Kernel counters per namespace become increments; a new namespace adds its total.
        for ns in census {
            let (ovf, drops) = self.last_listen.get(&ns.netns).copied().unwrap_or((0, 0));
            self.listen_overflows
                .inc_by(ns.listen_overflows.saturating_sub(ovf));
            self.listen_drops
                .inc_by(ns.listen_drops.saturating_sub(drops));
            self.last_listen.insert(
                ns.netns,
                (ns.listen_overflows.max(ovf), ns.listen_drops.max(drops)),
            );
        }
        let present: std::collections::HashSet<u64> = census.iter().map(|n| n.netns).collect();
        self.last_listen.retain(|ns, _| present.contains(ns));
    }

    /// Sets `tracer_tcp_sockets` from a census (index = kernel state number).
    pub fn set_census(sockets: &IntGaugeVec, counts: &[u64; 13]) {
        for (state, &n) in counts.iter().enumerate().skip(1) {
            if state == tracer_common::state::NEW_SYN_RECV as usize {
                continue; // folded into syn_recv by the census, as ss does
            }
            sockets
                .with_label_values(&[state_name(state as u8)])
                .set(n as i64);
        }
    }

    /// The text exposition of every metric.
    pub fn encode(registry: &Registry) -> Result<String> {
        let mut out = String::new();
        prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out)?;
        Ok(out)
    }
}

/// Label value of a teardown mode (for tests and docs).
pub fn teardown_name(t: Teardown) -> &'static str {
    TEARDOWNS[t as usize]
}

/// Label value of a failure reason.
pub fn failure_name(f: Failure) -> &'static str {
    FAILURES[f as usize]
}

/// Label value of an open mode.
pub fn mode_name(m: Mode) -> &'static str {
    MODES[m as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{ProbeCounters, ProgramStats};

    #[test]
    fn ports_beyond_the_cap_fold_into_other() {
        let mut p = PortLabels::new(&[], 2);
        let a = p.slot(80);
        let b = p.slot(443);
        let c = p.slot(8080);
        assert_eq!((p.name(a), p.name(b), p.name(c)), ("80", "443", "other"));
        assert_eq!(p.slot(80), a, "a port keeps its slot");
        let unknown = p.slot(0);
        assert_eq!(p.name(unknown), "other", "unknown port");
    }

    #[test]
    fn an_explicit_port_list_names_only_those() {
        let mut p = PortLabels::new(&[5432], 10);
        let s = p.slot(5432);
        assert_eq!(p.name(s), "5432");
        let s = p.slot(80);
        assert_eq!(p.name(s), "other");
    }

    #[test]
    fn handshakes_land_in_the_bucket_of_their_retry_step() {
        let mut m = Metrics::new(PortLabels::new(&[], 8)).unwrap();
        for ns in [
            40_000,
            1_030_000_000,
            3_050_000_000,
            4_050_000_000,
            7_100_000_000,
        ] {
            m.record(Observation::Handshake {
                mode: Mode::Active,
                port: 80,
                ns,
            });
        }
        let before = Metrics::encode(&m.registry).unwrap();
        assert!(
            before.contains("_count{mode=\"active\",port=\"80\"} 0\n"),
            "published only at flush: {before}"
        );
        m.flush(0);
        let text = Metrics::encode(&m.registry).unwrap();
        let bucket = |le: &str| -> u64 {
            let needle = format!(
                "tracer_tcp_handshake_duration_seconds_bucket{{mode=\"active\",port=\"80\",le=\"{le}\"}} "
            );
            let line = text
                .lines()
                .find(|l| l.starts_with(&needle))
                .unwrap_or_else(|| panic!("{needle}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(bucket("0.00005"), 1);
        assert_eq!(bucket("1"), 1);
        assert_eq!(bucket("1.5"), 2);
        assert_eq!(bucket("3.5"), 3);
        assert_eq!(bucket("4.5"), 4);
        assert_eq!(bucket("7.5"), 5);
    }

    #[test]
    fn kernel_counters_become_increments() {
        let mut m = Metrics::new(PortLabels::new(&[], 8)).unwrap();
        let mut resets = [[0; RESET_STATES as usize]; 2];
        resets[0][0] = 3;
        let counters = ProbeCounters {
            lost: 2,
            missed: 1,
            ..Default::default()
        };
        let stats = |runs, run_ns| {
            vec![ProgramStats {
                name: "inet_sock_set_state",
                runs,
                run_ns,
            }]
        };
        let mut probe = ProbeReadings {
            counters,
            synack: vec![(8080, 5)],
            resets,
            programs: stats(10, 1_000),
        };
        m.sync(&probe, 7, 0);
        probe.synack = vec![(8080, 6)];
        probe.programs = stats(30, 5_000);
        m.sync(&probe, 7, 0);
        let text = Metrics::encode(&m.registry).unwrap();
        assert!(text.contains("tracer_events_lost_total 3\n"), "{text}");
        assert!(
            text.contains("tracer_tcp_synack_retransmits_total{port=\"8080\"} 6\n"),
            "{text}"
        );
        assert!(text.contains("tracer_tcp_resets_total{direction=\"sent\",state=\"none\"} 3\n"));
        assert!(text.contains("tracer_tracked_sockets 7\n"));
        assert!(text.contains("tracer_tracked_sockets_evicted_total 0\n"));
        assert!(text.contains("tracer_probe_runs_total{program=\"inet_sock_set_state\"} 30\n"));
        let seconds: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("tracer_probe_run_seconds_total{program=\"inet_sock_set_state\"} ")
            })
            .expect("run seconds exported")
            .parse()
            .unwrap();
        assert!((seconds - 5e-6).abs() < 1e-12, "{seconds}");
    }
}
