//! The metrics of the event path: what each event tells (`stream::observe`), turned into Prometheus
//! samples (in seconds, converted here and only here).
//!
//! Owns: the histograms and counters fed by transitions, and their label handles, resolved
//! once per label set and kept, so that the per-event path does no string work and no atomic
//! operation (thread-local copies published after each batch). Does not own: which ports get
//! a label value (`ports`), kernel counters (`kernel`), the census (`census`).

use anyhow::Result;
use prometheus::local::{LocalCounter, LocalHistogram, LocalIntCounter};
use prometheus::{
    CounterVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::metrics::pods::PodAttribution;
use crate::metrics::ports::{PortLabels, Use, OTHER};
use crate::stream::event::{state_name, STATE_NAMES};
use crate::stream::{Direction, Failure, Mode, Observation, Teardown};

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

/// Round-trip-time buckets (seconds): loopback and a data centre (tens of microseconds) to
/// intercontinental and satellite links and bufferbloat (seconds).
pub const RTT_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What held a connection's sending back, by the `limited_by` label of
/// `tracer_tcp_send_seconds_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    /// Nothing of the two ends: the congestion window, pacing.
    Network = 0,
    /// The receiver's window.
    ReceiveWindow = 1,
    /// This side's send buffer.
    SendBuffer = 2,
}

impl Limit {
    const ALL: [Limit; 3] = [Limit::Network, Limit::ReceiveWindow, Limit::SendBuffer];

    /// The `limited_by` label value.
    fn label(self) -> &'static str {
        match self {
            Limit::Network => "network",
            Limit::ReceiveWindow => "receive_window",
            Limit::SendBuffer => "send_buffer",
        }
    }
}

/// Label handles of one metric, by (one closed label) x port slot x pod slot, made on first
/// use.
struct ByPort<T> {
    handles: Vec<Vec<Vec<Option<T>>>>,
}

impl<T: Clone> ByPort<T> {
    fn new(kinds: usize) -> Self {
        ByPort {
            handles: vec![Vec::new(); kinds],
        }
    }

    fn get(&mut self, kind: usize, slot: usize, pod: usize, make: impl FnOnce() -> T) -> &T {
        let row = &mut self.handles[kind];
        if row.len() <= slot {
            row.resize(slot + 1, Vec::new());
        }
        let pods = &mut row[slot];
        if pods.len() <= pod {
            pods.resize(pod + 1, None);
        }
        pods[pod].get_or_insert_with(make)
    }

    fn all(&self) -> impl Iterator<Item = &T> {
        self.handles.iter().flatten().flatten().flatten()
    }
}

/// The histograms of [`EventMetrics::observe`], each with the `mode` of its series.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Histogram {
    Handshake(Mode),
    Teardown(Teardown),
    Lifetime(Mode),
}

impl Histogram {
    /// The series' `mode` label value, and its index among the histogram's modes.
    fn mode(self) -> (usize, &'static str) {
        match self {
            Histogram::Handshake(m) | Histogram::Lifetime(m) => (m as usize, m.label()),
            Histogram::Teardown(t) => (t as usize, t.label()),
        }
    }
}

/// One sample of a per-port metric, as [`Held`] keeps it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PortSample {
    Histogram {
        which: Histogram,
        pod: usize,
        seconds: f64,
    },
    Failure {
        reason: Failure,
        pod: usize,
    },
    Bytes {
        direction: Direction,
        n: u64,
    },
    Rtt {
        seconds: f64,
    },
    /// Microseconds sending, held back by `limit`.
    Sending {
        limit: Limit,
        us: u64,
    },
    Spurious {
        n: u64,
    },
    AcceptWait {
        seconds: f64,
    },
}

/// Ports held at most at once (see [`Held`]); past that, samples of ports without a value go
/// to `other` at once, and are counted.
pub const MAX_HELD_PORTS: usize = 1_024;
/// Samples held per port; past that they go to `other`.
const MAX_HELD_SAMPLES: usize = 256;

/// Samples of ports that have no label value yet, by raw port, until they are exported: so that
/// a service's events count under its own port from its first one. A service's port qualifies
/// for a value by an event of its own (its first passive handshake, say), which may come just
/// after others (the client side of that very handshake). A port's samples go to `other` once
/// a scrape has come and gone without the port qualifying (a scrape exported `other` without
/// them), or when [`MAX_HELD_SAMPLES`] of them wait; to the port's own value if it qualifies
/// first.
#[derive(Default)]
struct Held {
    /// By port: the scrape count when its first sample was held, and the samples.
    ports: foldhash::HashMap<u16, (u64, Vec<PortSample>)>,
}

/// The metrics the event path feeds.
pub struct EventMetrics {
    /// Which ports get a label value (the event path is where values are given).
    pub ports: PortLabels,
    /// Which pod a socket belongs to: for failed connects always, for the histograms with
    /// `--label-by pod`.
    pods: PodAttribution,
    label_by_pod: bool,
    durations: Durations,
    carried: Carried,
    states: States,
    events: IntCounter,
    held: Held,
    /// Scrapes of `/metrics` so far (counted by the HTTP thread before it gathers).
    scrapes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Samples not held because [`MAX_HELD_PORTS`] ports were.
    held_overflow: IntCounter,
}

/// Registers metric families in a registry.
struct Families<'a>(&'a Registry);

impl Families<'_> {
    fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> prometheus::Result<HistogramVec> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        let h = HistogramVec::new(opts, labels)?;
        self.0.register(Box::new(h.clone()))?;
        Ok(h)
    }

    fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }

    /// A counter of seconds (a float).
    fn seconds(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<CounterVec> {
        let c = CounterVec::new(Opts::new(name, help), labels)?;
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }

    /// A counter without labels.
    fn single(&self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        let c = IntCounter::new(name, help)?;
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }
}

/// How long connections took to open, fail, close and be accepted, by mode and port (and pod),
/// and their handles.
struct Durations {
    handshake: HistogramVec,
    handshake_h: ByPort<LocalHistogram>,
    failures: IntCounterVec,
    failures_h: ByPort<LocalIntCounter>,
    teardown: HistogramVec,
    teardown_h: ByPort<LocalHistogram>,
    lifetime: HistogramVec,
    lifetime_h: ByPort<LocalHistogram>,
    accept_wait: HistogramVec,
    accept_wait_h: ByPort<LocalHistogram>,
}

impl Durations {
    /// Registers the families; the histograms are labelled `by` (mode, port, and the pod's
    /// with `--label-by pod`).
    fn register(families: &Families<'_>, by: &[&str]) -> prometheus::Result<Durations> {
        let handshake = families.histogram(
            "tracer_tcp_handshake_duration_seconds",
            "TCP handshakes completed, from inet_sock_set_state: active is SYN_SENT to \
             ESTABLISHED on the connecting side, passive is the kernel's first-SYN-ACK-to-final-ACK \
             time on the accepting side; seconds.",
            by,
            HANDSHAKE_BUCKETS,
        )?;
        let failures = families.counter(
            "tracer_tcp_handshake_failures_total",
            "Active opens that ended SYN_SENT -> CLOSE, from inet_sock_set_state, by sk_err reason \
             and by the Kubernetes namespace and pod of the connecting socket's cgroup (empty \
             outside pods).",
            &["mode", "reason", "port", "namespace", "pod"],
        )?;
        let teardown = families.histogram(
            "tracer_tcp_teardown_duration_seconds",
            "Time from leaving ESTABLISHED (FIN_WAIT1 or CLOSE_WAIT) to CLOSE, from \
             inet_sock_set_state, by who closed first; seconds.",
            by,
            HANDSHAKE_BUCKETS,
        )?;
        let lifetime = families.histogram(
            "tracer_tcp_connection_duration_seconds",
            "Connection lifetime from ESTABLISHED to CLOSE, from inet_sock_set_state, by open mode; \
             seconds.",
            by,
            LONG_BUCKETS,
        )?;
        let accept_wait = families.histogram(
            "tracer_tcp_accept_wait_seconds",
            "Time accepted connections waited in their listener's accept queue, from the end of \
             the handshake (SYN_RECV -> ESTABLISHED) to the server's accept() (inet_csk_accept \
             returning it), by listening port; seconds. Long waits mean a server too busy to \
             accept (see tracer_feature_enabled{feature=\"accept_wait\"}).",
            &["port"],
            HANDSHAKE_BUCKETS,
        )?;
        Ok(Durations {
            handshake,
            handshake_h: ByPort::new(Mode::ALL.len()),
            failures,
            failures_h: ByPort::new(Failure::ALL.len()),
            teardown,
            teardown_h: ByPort::new(Teardown::ALL.len()),
            lifetime,
            lifetime_h: ByPort::new(Mode::ALL.len()),
            accept_wait,
            accept_wait_h: ByPort::new(1),
        })
    }

    /// Publishes what the handles gathered.
    fn flush(&self) {
        self.failures_h.all().for_each(LocalIntCounter::flush);
        self.accept_wait_h.all().for_each(LocalHistogram::flush);
        for h in [&self.handshake_h, &self.teardown_h, &self.lifetime_h] {
            h.all().for_each(LocalHistogram::flush);
        }
    }
}

/// What connections carried and how their sending went, by port, counted while they live
/// and at their close, and their handles.
struct Carried {
    bytes: IntCounterVec,
    bytes_h: ByPort<LocalIntCounter>,
    rtt: HistogramVec,
    rtt_h: ByPort<LocalHistogram>,
    sending: CounterVec,
    sending_h: ByPort<LocalCounter>,
    spurious: IntCounterVec,
    spurious_h: ByPort<LocalIntCounter>,
}

impl Carried {
    fn register(families: &Families<'_>) -> prometheus::Result<Carried> {
        let bytes = families.counter(
            "tracer_tcp_bytes_total",
            "Data bytes carried by connections, from the kernel's counters on each socket: \
             sent is tcp_sock.bytes_acked (sent and acknowledged), received is \
             tcp_sock.bytes_received, less SYN and FINs. Counted while a connection lives, \
             at each of its periodic reports (every --record-interval), and the rest at its \
             close (inet_sock_set_state to CLOSE); bytes.",
            &["direction", "port"],
        )?;
        let rtt = families.histogram(
            "tracer_tcp_rtt_seconds",
            "Smoothed round-trip time of connections (tcp_sock.srtt_us): one sample at each \
             periodic report of an open connection (every --record-interval) and one at its \
             close (inet_sock_set_state to CLOSE), where it had one; seconds.",
            &["port"],
            RTT_BUCKETS,
        )?;
        let sending = families.seconds(
            "tracer_tcp_send_seconds_total",
            "Time connections had data to send, by what held them back: network (the \
             congestion window or pacing), receive_window (the peer's window: its \
             application reads slowly or not at all), send_buffer (this side's send \
             buffer, full of data sent and not yet acknowledged: too small for the \
             path, the application waiting to write more), from the \
             kernel's counters on each socket (tcp_sock.chrono_stat, as tcp_info's \
             tcpi_busy_time, tcpi_rwnd_limited, tcpi_sndbuf_limited); counted while a \
             connection lives, at each periodic report, and the rest at its close; \
             seconds. All three together are the time busy sending.",
            &["limited_by", "port"],
        )?;
        let spurious = families.counter(
            "tracer_tcp_spurious_retransmits_total",
            "Retransmitted segments that the peer reported it had received already (D-SACK, \
             tcp_sock.dsack_dups, as tcp_info's tcpi_dsack_dups and the kernel's \
             TCPDSACKRecvSegs): retransmissions that were not needed (a timer too eager, \
             reordering taken for loss); counted while a connection lives and at its close.",
            &["port"],
        )?;
        Ok(Carried {
            bytes,
            bytes_h: ByPort::new(Direction::ALL.len()),
            rtt,
            rtt_h: ByPort::new(1),
            sending,
            sending_h: ByPort::new(Limit::ALL.len()),
            spurious,
            spurious_h: ByPort::new(1),
        })
    }

    /// Makes the series of port `other` at 0.
    fn zero_other(&self) {
        for direction in Direction::ALL {
            self.bytes.with_label_values(&[direction.label(), OTHER]);
        }
        self.rtt.with_label_values(&[OTHER]);
        for limit in Limit::ALL {
            self.sending.with_label_values(&[limit.label(), OTHER]);
        }
        self.spurious.with_label_values(&[OTHER]);
    }

    /// Publishes what the handles gathered.
    fn flush(&self) {
        self.bytes_h.all().for_each(LocalIntCounter::flush);
        self.rtt_h.all().for_each(LocalHistogram::flush);
        self.sending_h.all().for_each(LocalCounter::flush);
        self.spurious_h.all().for_each(LocalIntCounter::flush);
    }
}

/// The states sockets went through, and how long they stayed in each; their handles.
struct States {
    /// By state value (every state's handle made at start).
    state_duration: Vec<LocalHistogram>,
    transitions: IntCounterVec,
    /// By `from * STATE_NAMES.len() + to`, made on first use.
    transitions_h: Vec<Option<LocalIntCounter>>,
}

impl States {
    fn register(families: &Families<'_>) -> prometheus::Result<States> {
        let state_vec = families.histogram(
            "tracer_tcp_state_duration_seconds",
            "Time sockets spent in a state, from inet_sock_set_state, when the tracer saw them \
             enter it; seconds.",
            &["state"],
            LONG_BUCKETS,
        )?;
        let transitions = families.counter(
            "tracer_tcp_transitions_total",
            "TCP state changes, from inet_sock_set_state.",
            &["from", "to"],
        )?;
        Ok(States {
            state_duration: STATE_NAMES
                .iter()
                .map(|s| state_vec.with_label_values(&[s]).local())
                .collect(),
            transitions,
            transitions_h: vec![None; STATE_NAMES.len() * STATE_NAMES.len()],
        })
    }

    /// Publishes what the handles gathered.
    fn flush(&self) {
        self.transitions_h
            .iter()
            .flatten()
            .for_each(LocalIntCounter::flush);
        self.state_duration.iter().for_each(LocalHistogram::flush);
    }
}

impl EventMetrics {
    /// Registers every event metric in `registry`, with the series of port `other` at 0.
    pub fn new(
        registry: &Registry,
        ports: PortLabels,
        pods: PodAttribution,
        label_by_pod: bool,
    ) -> Result<EventMetrics> {
        // The histograms' labels: mode and port, and the pod's when asked for.
        let by: &[&str] = if label_by_pod {
            &["mode", "port", "namespace", "pod"]
        } else {
            &["mode", "port"]
        };
        let families = Families(registry);
        let mut metrics = EventMetrics {
            ports,
            pods,
            label_by_pod,
            durations: Durations::register(&families, by)?,
            carried: Carried::register(&families)?,
            states: States::register(&families)?,
            events: families.single(
                "tracer_events_total",
                "Transitions read from the probe's ring buffers (inet_sock_set_state).",
            )?,
            held: Held::default(),
            scrapes: Default::default(),
            held_overflow: families.single(
                "tracer_port_held_overflow_total",
                "Samples of per-port metrics of ports without a label value that went to \
                 port=\"other\" at once because 1,024 such ports had samples waiting for the \
                 port to qualify.",
            )?,
        };
        // Panels and alerts read these from the first scrape: 0, not "No data".
        metrics.zero_other_durations();
        metrics.carried.zero_other();
        metrics.new_ports();
        Ok(metrics)
    }

    /// Makes the duration series of port `other` (no pod) at 0.
    fn zero_other_durations(&self) {
        let d = &self.durations;
        for mode in Mode::ALL {
            let values = self.values(mode.label(), OTHER, 0);
            d.handshake.with_label_values(&values);
            d.lifetime.with_label_values(&values);
        }
        for mode in Teardown::ALL {
            d.teardown
                .with_label_values(&self.values(mode.label(), OTHER, 0));
        }
        d.accept_wait.with_label_values(&[OTHER]);
        let active = Mode::Active.label();
        for reason in Failure::ALL {
            d.failures
                .with_label_values(&[active, reason.label(), OTHER, "", ""]);
        }
    }

    /// Records what one event tells. The per-event path: no allocation once a label
    /// set has been seen.
    pub fn record(&mut self, o: &Observation) {
        let secs = |ns: u64| ns as f64 / 1e9;
        match *o {
            Observation::Transition { from, to } => {
                let (f, t) = (
                    from as usize % STATE_NAMES.len(),
                    to as usize % STATE_NAMES.len(),
                );
                let transitions = &self.states.transitions;
                self.states.transitions_h[f * STATE_NAMES.len() + t]
                    .get_or_insert_with(|| {
                        transitions
                            .with_label_values(&[state_name(from), state_name(to)])
                            .local()
                    })
                    .inc();
            }
            Observation::Dwell { state, ns } => {
                if let Some(h) = self.states.state_duration.get(state as usize) {
                    h.observe(secs(ns));
                }
            }
            Observation::Listen { port, netns } => {
                self.ports.slot(port, Use::Listening { netns });
            }
            Observation::Handshake {
                mode,
                port,
                netns,
                ns,
                cgroup,
            } => {
                let why = match mode {
                    Mode::Active => Use::Connected { netns },
                    Mode::Passive => Use::Accepted,
                };
                self.duration(Histogram::Handshake(mode), port, why, cgroup, ns);
            }
            Observation::HandshakeFailure {
                reason,
                port,
                netns,
                cgroup,
            } => {
                let slot = self.ports.slot(port, Use::Connected { netns });
                let pod = self.pods.slot(cgroup);
                self.sample(port, slot, PortSample::Failure { reason, pod });
            }
            Observation::Teardown {
                mode,
                port,
                ns,
                cgroup,
            } => self.duration(Histogram::Teardown(mode), port, Use::Counted, cgroup, ns),
            Observation::Lifetime {
                mode,
                port,
                ns,
                cgroup,
            } => self.duration(Histogram::Lifetime(mode), port, Use::Counted, cgroup, ns),
            // Reported only to `watch --connections`; the agent counts resets in the kernel.
            Observation::ResetSent { .. } => {}
            Observation::Accepted { port, ns, .. } => {
                let slot = self.ports.slot(port, Use::Accepted);
                let seconds = secs(ns);
                self.sample(port, slot, PortSample::AcceptWait { seconds });
            }
            // What a close or a census adds: the stretch since a census last counted the
            // connection.
            Observation::Closed(ref c) => self.carried(c.port, &c.counted, c.srtt_us),
            Observation::Update(ref u) => {
                let s = &u.sample;
                self.carried(s.storage.port, &u.counted, s.srtt_us)
            }
        }
    }

    /// The bytes a connection on `port` carried over `interval`, and its smoothed RTT then.
    fn carried(&mut self, port: u16, interval: &crate::stream::Interval, srtt_us: u32) {
        let slot = self.ports.slot(port, Use::Counted);
        let sent = interval.bytes_sent.unwrap_or(0);
        for (direction, n) in [
            (Direction::Sent, sent),
            (Direction::Received, interval.bytes_received),
        ] {
            if n > 0 {
                self.sample(port, slot, PortSample::Bytes { direction, n });
            }
        }
        if srtt_us > 0 {
            let seconds = f64::from(srtt_us) / 1e6;
            self.sample(port, slot, PortSample::Rtt { seconds });
        }
        let f = &interval.flow;
        let network = f
            .busy_us
            .saturating_sub(f.rwnd_limited_us + f.sndbuf_limited_us);
        for (limit, us) in [
            (Limit::Network, network),
            (Limit::ReceiveWindow, f.rwnd_limited_us),
            (Limit::SendBuffer, f.sndbuf_limited_us),
        ] {
            if us > 0 {
                self.sample(port, slot, PortSample::Sending { limit, us });
            }
        }
        if f.spurious_retransmits > 0 {
            let n = f.spurious_retransmits;
            self.sample(port, slot, PortSample::Spurious { n });
        }
    }

    /// A duration of histogram `which` (and mode) of a socket on `port` in `cgroup`; `why`
    /// says whether it may give the port a value.
    fn duration(&mut self, which: Histogram, port: u16, why: Use, cgroup: u64, ns: u64) {
        let slot = self.ports.slot(port, why);
        let pod = self.pod_slot(cgroup);
        let sample = PortSample::Histogram {
            which,
            pod,
            seconds: ns as f64 / 1e9,
        };
        self.sample(port, slot, sample);
    }

    /// Takes the scrape count the HTTP side keeps (`http::Health::scrapes`): held samples go
    /// to `other` once a scrape has passed them.
    pub fn count_scrapes(&mut self, scrapes: std::sync::Arc<std::sync::atomic::AtomicU64>) {
        self.scrapes = scrapes;
    }

    /// A sample of `port`'s series in label slot `slot`: recorded, or held while the port has
    /// no value and may still get one (see [`Held`]).
    fn sample(&mut self, port: u16, slot: usize, sample: PortSample) {
        if slot == 0 && port != 0 && self.ports.may_grow() {
            let scrapes = self.scrapes.load(std::sync::atomic::Ordering::Relaxed);
            let room = self.held.ports.len() < MAX_HELD_PORTS;
            match self.held.ports.get_mut(&port) {
                Some((_, samples)) if samples.len() < MAX_HELD_SAMPLES => {
                    samples.push(sample);
                    return;
                }
                Some(_) => {
                    // Waited long enough: these go to `other`, the next are held afresh.
                    let (_, samples) = self.held.ports.remove(&port).unwrap_or_default();
                    for s in samples {
                        self.apply(0, s);
                    }
                    self.held.ports.insert(port, (scrapes, vec![sample]));
                    return;
                }
                None if room => {
                    self.held.ports.insert(port, (scrapes, vec![sample]));
                    return;
                }
                None => self.held_overflow.inc(),
            }
        }
        self.apply(slot, sample);
    }

    /// Records `sample` in label slot `slot`; a handle is made on first use.
    fn apply(&mut self, slot: usize, sample: PortSample) {
        match sample {
            PortSample::Histogram {
                which,
                pod,
                seconds,
            } => self.observe(which, slot, pod, seconds),
            PortSample::Failure { reason, pod } => {
                let (namespace, pod_name) = self.pods.label(pod);
                let (vec, name) = (&self.durations.failures, self.ports.name(slot));
                self.durations
                    .failures_h
                    .get(reason as usize, slot, pod, || {
                        let (active, reason) = (Mode::Active.label(), reason.label());
                        vec.with_label_values(&[active, reason, name, namespace, pod_name])
                            .local()
                    })
                    .inc();
            }
            PortSample::Bytes { direction, n } => {
                let (vec, name) = (&self.carried.bytes, self.ports.name(slot));
                self.carried
                    .bytes_h
                    .get(direction as usize, slot, 0, || {
                        vec.with_label_values(&[direction.label(), name]).local()
                    })
                    .inc_by(n);
            }
            PortSample::Sending { limit, us } => {
                let (vec, name) = (&self.carried.sending, self.ports.name(slot));
                self.carried
                    .sending_h
                    .get(limit as usize, slot, 0, || {
                        vec.with_label_values(&[limit.label(), name]).local()
                    })
                    .inc_by(us as f64 / 1e6);
            }
            PortSample::Spurious { n } => {
                let (vec, name) = (&self.carried.spurious, self.ports.name(slot));
                self.carried
                    .spurious_h
                    .get(0, slot, 0, || vec.with_label_values(&[name]).local())
                    .inc_by(n);
            }
            PortSample::Rtt { seconds } => {
                let (vec, name) = (&self.carried.rtt, self.ports.name(slot));
                self.carried
                    .rtt_h
                    .get(0, slot, 0, || vec.with_label_values(&[name]).local())
                    .observe(seconds);
            }
            PortSample::AcceptWait { seconds } => {
                let (vec, name) = (&self.durations.accept_wait, self.ports.name(slot));
                self.durations
                    .accept_wait_h
                    .get(0, slot, 0, || vec.with_label_values(&[name]).local())
                    .observe(seconds);
            }
        }
    }

    /// Gives the held samples their place: their port's own value if it has qualified since,
    /// `other` once a scrape has come since the first of them, else they wait.
    fn settle_held(&mut self) {
        if self.held.ports.is_empty() {
            return;
        }
        let scrapes = self.scrapes.load(std::sync::atomic::Ordering::Relaxed);
        let grow = self.ports.may_grow();
        let mut held = std::mem::take(&mut self.held.ports);
        held.retain(|&port, (since, samples)| {
            let slot = self.ports.slot(port, Use::Counted);
            if slot == 0 && scrapes == *since && grow {
                return true;
            }
            for s in samples.drain(..) {
                self.apply(slot, s);
            }
            false
        });
        self.held.ports = held;
    }

    /// Publishes what [`EventMetrics::record`] gathered since the last call, and counts the
    /// batch's `events` (transitions read). The per-event path updates thread-local copies (no
    /// atomic operation per event); call this after each batch.
    pub fn flush(&mut self, events: u64) {
        self.settle_held();
        self.events.inc_by(events);
        self.states.flush();
        self.durations.flush();
        self.carried.flush();
        self.new_ports();
    }

    /// Observes `seconds` in histogram `which`, series (its mode, port slot, pod slot); its
    /// handle is made on first use.
    fn observe(&mut self, which: Histogram, slot: usize, pod: usize, seconds: f64) {
        let (vec, handles) = match which {
            Histogram::Handshake(_) => (&self.durations.handshake, &mut self.durations.handshake_h),
            Histogram::Teardown(_) => (&self.durations.teardown, &mut self.durations.teardown_h),
            Histogram::Lifetime(_) => (&self.durations.lifetime, &mut self.durations.lifetime_h),
        };
        let (kind, kind_name) = which.mode();
        let (pods, by_pod, port) = (&self.pods, self.label_by_pod, self.ports.name(slot));
        handles
            .get(kind, slot, pod, || {
                vec.with_label_values(&values(pods, by_pod, kind_name, port, pod))
                    .local()
            })
            .observe(seconds);
    }

    /// The pod slot a histogram observation of a socket in `cgroup` goes to: 0 (none) unless
    /// `--label-by pod`.
    fn pod_slot(&mut self, cgroup: u64) -> usize {
        if self.label_by_pod {
            self.pods.slot(cgroup)
        } else {
            0
        }
    }

    /// The label values of a histogram series (see [`values`]).
    fn values<'a>(&'a self, mode: &'a str, port: &'a str, pod: usize) -> Vec<&'a str> {
        values(&self.pods, self.label_by_pod, mode, port, pod)
    }

    /// Makes the series of ports given a label value since the last call, at 0: the passive
    /// ones of a listening port, the active ones (and failures) of a connected-to port.
    fn new_ports(&mut self) {
        for (port, why) in self.ports.take_new() {
            let name = port.to_string();
            if matches!(why, Use::Accepted | Use::Listening { .. } | Use::Counted) {
                let passive = Mode::Passive.label();
                self.durations
                    .handshake
                    .with_label_values(&self.values(passive, &name, 0));
            }
            if matches!(why, Use::Connected { .. } | Use::Counted) {
                let active = Mode::Active.label();
                self.durations
                    .handshake
                    .with_label_values(&self.values(active, &name, 0));
                for reason in Failure::ALL {
                    self.durations.failures.with_label_values(&[
                        active,
                        reason.label(),
                        &name,
                        "",
                        "",
                    ]);
                }
            }
        }
    }
}

/// The label values of a histogram series: mode and port, and the pod's with `--label-by
/// pod`. Called when a label set is first used, not per event.
fn values<'a>(
    pods: &'a PodAttribution,
    label_by_pod: bool,
    mode: &'a str,
    port: &'a str,
    pod: usize,
) -> Vec<&'a str> {
    let mut v = vec![mode, port];
    if label_by_pod {
        let (namespace, pod) = pods.label(pod);
        v.extend([&**namespace, &**pod]);
    }
    v
}

/// The text exposition of every metric in `registry`.
pub fn encode(registry: &Registry) -> Result<String> {
    let mut out = String::new();
    prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ports::DEFAULT_EPHEMERAL;

    fn metrics(max_ports: usize) -> (Registry, EventMetrics) {
        let registry = Registry::new();
        let ports = PortLabels::new(&[], max_ports, DEFAULT_EPHEMERAL);
        let pods = PodAttribution::new(None, Default::default());
        let m = EventMetrics::new(&registry, ports, pods, false).unwrap();
        (registry, m)
    }

    #[test]
    fn handshakes_land_in_the_bucket_of_their_retry_step() {
        let (registry, mut m) = metrics(8);
        for ns in [
            40_000,
            1_030_000_000,
            3_050_000_000,
            4_050_000_000,
            7_100_000_000,
        ] {
            m.record(&Observation::Handshake {
                mode: Mode::Active,
                port: 80,
                netns: 0,
                ns,
                cgroup: 0,
            });
        }
        m.flush(0);
        let text = encode(&registry).unwrap();
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
    fn the_series_panels_read_exist_at_zero_before_any_event() {
        let (registry, mut m) = metrics(8);
        let text = encode(&registry).unwrap();
        for line in [
            "tracer_tcp_handshake_duration_seconds_count{mode=\"active\",port=\"other\"} 0",
            "tracer_tcp_handshake_duration_seconds_count{mode=\"passive\",port=\"other\"} 0",
            "tracer_tcp_handshake_failures_total{mode=\"active\",namespace=\"\",pod=\"\",port=\"other\",reason=\"refused\"} 0",
            "tracer_tcp_teardown_duration_seconds_count{mode=\"passive\",port=\"other\"} 0",
            "tracer_tcp_connection_duration_seconds_count{mode=\"active\",port=\"other\"} 0",
            "tracer_events_total 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // A port given a value for a failed connect gets its failure and handshake series.
        m.record(&Observation::HandshakeFailure {
            reason: Failure::Timeout,
            port: 5432,
            netns: 0,
            cgroup: 0,
        });
        m.flush(1);
        let text = encode(&registry).unwrap();
        assert!(text.contains(
            "tracer_tcp_handshake_failures_total{mode=\"active\",namespace=\"\",pod=\"\",port=\"5432\",reason=\"refused\"} 0"
        ));
        assert!(text.contains(
            "tracer_tcp_handshake_failures_total{mode=\"active\",namespace=\"\",pod=\"\",port=\"5432\",reason=\"timeout\"} 1"
        ));
        assert!(text.contains(
            "tracer_tcp_handshake_duration_seconds_count{mode=\"active\",port=\"5432\"} 0"
        ));
    }

    fn handshake(mode: Mode, port: u16) -> Observation {
        Observation::Handshake {
            mode,
            port,
            netns: 0,
            ns: 50_000,
            cgroup: 0,
        }
    }

    fn count(text: &str, mode: &str, port: &str) -> u64 {
        let needle = format!(
            "tracer_tcp_handshake_duration_seconds_count{{mode=\"{mode}\",port=\"{port}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |n| n.parse().unwrap())
    }

    #[test]
    fn a_service_in_the_ephemeral_range_is_counted_whole_from_its_first_event() {
        // gRPC's 50051, inside the ephemeral range: a client's handshake to it does not give it
        // a value; the server's first passive handshake, just after, does.
        let (registry, mut m) = metrics(8);
        let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        m.count_scrapes(scrapes.clone());
        m.record(&handshake(Mode::Active, 50_051));
        m.flush(1);
        let text = encode(&registry).unwrap();
        assert_eq!(count(&text, "active", "other"), 0, "held, not exported");
        m.record(&handshake(Mode::Passive, 50_051));
        m.record(&handshake(Mode::Active, 50_051));
        m.flush(2);
        let text = encode(&registry).unwrap();
        assert_eq!(
            (
                count(&text, "active", "50051"),
                count(&text, "passive", "50051")
            ),
            (2, 1)
        );
        assert_eq!(count(&text, "active", "other"), 0);
    }

    #[test]
    fn held_samples_of_a_port_that_never_qualifies_go_to_other_once_a_scrape_passed() {
        let (registry, mut m) = metrics(8);
        let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        m.count_scrapes(scrapes.clone());
        m.record(&handshake(Mode::Active, 40_001));
        m.flush(1);
        m.flush(0);
        assert_eq!(count(&encode(&registry).unwrap(), "active", "other"), 0);
        // A scrape came (without them): the next batch puts them under other, for good.
        scrapes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.flush(0);
        let text = encode(&registry).unwrap();
        assert_eq!(count(&text, "active", "other"), 1);
        // Past MAX_HELD_PORTS ports waiting, samples go to other at once, and are counted.
        for port in 0..=MAX_HELD_PORTS as u16 {
            m.record(&handshake(Mode::Active, 40_002 + port));
        }
        m.flush(0);
        let text = encode(&registry).unwrap();
        assert!(
            text.contains("tracer_port_held_overflow_total 1\n"),
            "{text}"
        );
        assert_eq!(count(&text, "active", "other"), 2);
    }
}
