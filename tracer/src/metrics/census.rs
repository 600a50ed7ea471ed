//! The census metrics, built at scrape time from the last published census (a Prometheus
//! `Collector`, as node_exporter and ebpf_exporter build scrape-time figures): nothing is kept
//! by hand between scrapes, and a scrape never sees half of one census and half of another.
//!
//! Owns: names, help and labels of every census-based metric, and folding service ports into
//! `port` label values (ports without one are `other`). Does not own: the census or the join.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use tracer_common::state;

use crate::census::failure::Failure;
use crate::census::scrape::{Published, Report};
use crate::census::stuck::DEFAULT_THRESHOLDS;
use crate::metrics::pods::PodLabels;
use crate::metrics::ports::{LabelledPorts, OTHER};
use crate::stream::event::state_name;
use parking_lot::Mutex;

/// One scrape's census metrics (made anew for each scrape).
struct CensusMetrics {
    sockets: IntGaugeVec,
    namespaces: IntGaugeVec,
    errors: IntCounter,
    failing: IntGaugeVec,
    timestamp: Gauge,
    duration: Gauge,
    corrections: IntCounterVec,
    stuck: IntGaugeVec,
    oldest_age: GaugeVec,
    time_wait: IntGaugeVec,
    zero_window: IntGaugeVec,
    ephemeral: Gauge,
    listen_queue: IntGaugeVec,
    listen_queue_limit: IntGaugeVec,
    listen_overflows: IntCounter,
    listen_drops: IntCounter,
    segments_sent: IntCounter,
    cgroups_unresolved: Gauge,
    cgroup_walks: IntCounterVec,
    pod_labels: IntGaugeVec,
    tracked: IntGauge,
    tracked_bytes: IntGauge,
}

impl CensusMetrics {
    fn new() -> prometheus::Result<CensusMetrics> {
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        Ok(CensusMetrics {
            sockets: gauges(
                "tracer_tcp_sockets",
                "TCP sockets per state at the last census, from sock_diag in every network \
                 namespace (request sockets count as syn_recv, as in ss).",
                &["state"],
            )?,
            namespaces: gauges(
                "tracer_census_namespaces",
                "Network namespaces in the last sock_diag census: visited, or unreachable (no \
                 permission to enter them: their sockets are missing).",
                &["result"],
            )?,
            errors: IntCounter::new(
                "tracer_census_errors_total",
                "Censuses that failed (the last successful one stays published).",
            )?,
            failing: gauges(
                "tracer_census_failing",
                "1 for the reason the last census failed (sock_diag_missing: no tcp_diag in the \
                 kernel; permission_denied; other), 0 for the others; all 0 while it works. The \
                 agent's log says what to do, at most once a minute.",
                &["reason"],
            )?,
            timestamp: Gauge::new(
                "tracer_census_timestamp_seconds",
                "When the census behind the census metrics began, Unix time in seconds.",
            )?,
            duration: Gauge::new(
                "tracer_census_duration_seconds",
                "How long the last census and its join with the probe's storage took; seconds.",
            )?,
            corrections: IntCounterVec::new(
                Opts::new(
                    "tracer_census_corrections_total",
                    "What a census found that the probe's socket storage did not tell, once per \
                     socket: state_corrected (a socket in a state the probe did not see it \
                     enter), added (a socket without storage), owner_found (a socket whose owner the \
                     probe does not know, found holding it in /proc).",
                ),
                &["action"],
            )?,
            stuck: gauges(
                "tracer_tcp_stuck_sockets",
                "Sockets older than their state's --stuck-after threshold at the last census, \
                 from sock_diag joined with inet_sock_set_state, every network namespace, by the \
                 Kubernetes namespace and pod of the socket's cgroup (empty outside pods).",
                &["state", "port", "namespace", "pod"],
            )?,
            oldest_age: GaugeVec::new(
                Opts::new(
                    "tracer_tcp_oldest_socket_age_seconds",
                    "Age in its state of the oldest socket in each state at the last census, \
                     every network namespace (lower bounds included); seconds.",
                ),
                &["state"],
            )?,
            time_wait: gauges(
                "tracer_tcp_time_wait_sockets",
                "TIME-WAIT sockets by service port at the last census, from sock_diag, every \
                 network namespace.",
                &["port"],
            )?,
            zero_window: gauges(
                "tracer_tcp_zero_window_sockets",
                "Connections whose peer advertises a zero receive window at the last census \
                 (tcp_info's tcpi_snd_wnd 0, in ESTABLISHED or CLOSE_WAIT), by service port, \
                 every network namespace: the peer's application has stopped reading, and \
                 this side cannot send until it does. Linux 5.4+.",
                &["port"],
            )?,
            ephemeral: Gauge::new(
                "tracer_tcp_ephemeral_port_utilization",
                "Fraction (0 to 1) of ip_local_port_range in use toward the busiest destination \
                 (local address, remote address and port) at the last census; GET /sockets \
                 names it.",
            )?,
            listen_queue: gauges(
                "tracer_tcp_listen_queue",
                "Connections waiting in listeners' accept queues by port, from sock_diag.",
                &["port"],
            )?,
            listen_queue_limit: gauges(
                "tracer_tcp_listen_queue_limit",
                "Accept queue limit (listen backlog) of listeners by port, from sock_diag.",
                &["port"],
            )?,
            listen_overflows: IntCounter::new(
                "tracer_tcp_listen_overflows_total",
                "Times a listener's accept queue was full (TcpExt ListenOverflows), every \
                 network namespace.",
            )?,
            listen_drops: IntCounter::new(
                "tracer_tcp_listen_drops_total",
                "SYNs dropped by listeners (TcpExt ListenDrops), every network namespace.",
            )?,
            segments_sent: IntCounter::new(
                "tracer_tcp_segments_sent_total",
                "TCP segments sent (Tcp OutSegs), every network namespace, read by each census: \
                 the denominator of the retransmission ratio.",
            )?,
            cgroups_unresolved: Gauge::new(
                "tracer_cgroups_unresolved",
                "Cgroup ids of the last census's sockets that no walk of the cgroup v2 tree \
                 found: their sockets name no container or pod (check --cgroup-root).",
            )?,
            cgroup_walks: IntCounterVec::new(
                Opts::new(
                    "tracer_cgroup_walks_total",
                    "Walks of the cgroup v2 tree by the census thread to resolve new cgroup \
                     ids: all, or truncated (more cgroups than the 65,536 kept).",
                ),
                &["result"],
            )?,
            pod_labels: gauges(
                "tracer_pod_labels",
                "Pods with their own namespace and pod label values (own, at most \
                 --max-pods), and pods counted under other (other).",
                &["result"],
            )?,
            // From the census each scrape's other census figures come from (they were set once
            // a second, so a scrape could pair a new census's sockets with the last one's).
            tracked: IntGauge::new(
                "tracer_tracked_sockets",
                "Sockets with the probe's state on them (BPF socket storage), at the last \
                 census.",
            )?,
            tracked_bytes: IntGauge::new(
                "tracer_tracked_sockets_bytes",
                "Kernel memory charged to the sockets with the probe's state (their option \
                 memory, sk_omem_alloc, where the storage is), at the last census; bytes.",
            )?,
        })
    }

    fn collectors(&self) -> [&dyn Collector; 22] {
        [
            &self.sockets,
            &self.namespaces,
            &self.errors,
            &self.failing,
            &self.timestamp,
            &self.duration,
            &self.corrections,
            &self.stuck,
            &self.oldest_age,
            &self.time_wait,
            &self.zero_window,
            &self.ephemeral,
            &self.listen_queue,
            &self.listen_queue_limit,
            &self.listen_overflows,
            &self.listen_drops,
            &self.segments_sent,
            &self.cgroups_unresolved,
            &self.cgroup_walks,
            &self.pod_labels,
            &self.tracked,
            &self.tracked_bytes,
        ]
    }

    /// Pods with label values and pods counted under `other`, as they are now.
    fn count_pod_labels(&self, pods: &Mutex<PodLabels>) {
        let pods = pods.lock();
        self.pod_labels
            .with_label_values(&["own"])
            .set(pods.len() as i64);
        self.pod_labels
            .with_label_values(&["other"])
            .set(pods.refused() as i64);
    }

    /// Fills every metric from `report` (none yet: the series that exist at 0).
    fn fill(
        &self,
        report: Option<&Report>,
        ports: &LabelledPorts,
        pods: &Mutex<PodLabels>,
        errors: u64,
        failure: Option<Failure>,
    ) {
        self.errors.inc_by(errors);
        for f in Failure::ALL {
            self.failing
                .with_label_values(&[f.label()])
                .set(i64::from(failure == Some(f)));
        }
        for result in ["visited", "unreachable"] {
            self.namespaces.with_label_values(&[result]);
        }
        for action in ["state_corrected", "added", "owner_found"] {
            self.corrections.with_label_values(&[action]);
        }
        for result in ["all", "truncated"] {
            self.cgroup_walks.with_label_values(&[result]);
        }
        // The label values known now, at 0: panels and alerts show 0, not "No data".
        let mut values: Vec<String> = ports.ports().iter().map(u16::to_string).collect();
        values.push(OTHER.to_owned());
        for (s, _) in DEFAULT_THRESHOLDS {
            self.oldest_age.with_label_values(&[state_name(s)]);
            for v in &values {
                self.stuck.with_label_values(&[state_name(s), v, "", ""]);
            }
        }
        for v in &values {
            self.time_wait.with_label_values(&[v]);
            self.zero_window.with_label_values(&[v]);
        }
        let Some(r) = report else {
            self.count_pod_labels(pods);
            return;
        };
        let j = &r.joined;
        self.tracked.set(j.figures.stored as i64);
        self.tracked_bytes.set(j.figures.stored_bytes as i64);
        for (s, &n) in j.figures.by_state.iter().enumerate().skip(1) {
            if s != state::NEW_SYN_RECV as usize {
                self.sockets
                    .with_label_values(&[state_name(s as u8)])
                    .set(n as i64);
            }
        }
        self.namespaces
            .with_label_values(&["visited"])
            .set(r.visited as i64);
        self.namespaces
            .with_label_values(&["unreachable"])
            .set(r.unreachable as i64);
        let unix = r
            .taken_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.timestamp.set(unix.as_secs_f64());
        self.duration.set(r.duration.as_secs_f64());
        for (action, n) in [
            ("state_corrected", r.state_corrected),
            ("added", r.added),
            ("owner_found", r.owner_found),
        ] {
            self.corrections.with_label_values(&[action]).inc_by(n);
        }
        let stuck = {
            let mut pods = pods.lock();
            fold(&j.figures.stuck, |&(s, port, cgroup)| {
                (s, ports.label(port), pods.label(r.workload(cgroup)))
            })
        };
        for ((s, port, (namespace, pod)), n) in stuck {
            self.stuck
                .with_label_values(&[state_name(s), &port, &namespace, &pod])
                .set(n);
        }
        // After the labels this census gave: the counts of the same scrape.
        self.count_pod_labels(pods);
        for (&s, age) in &j.figures.oldest {
            self.oldest_age
                .with_label_values(&[state_name(s)])
                .set(age.as_secs_f64());
        }
        for (port, n) in fold(&j.figures.time_wait, |&p| ports.label(p)) {
            self.time_wait.with_label_values(&[&port]).set(n);
        }
        for (port, n) in fold(&j.figures.zero_window, |&p| ports.label(p)) {
            self.zero_window.with_label_values(&[&port]).set(n);
        }
        self.ephemeral.set(
            j.figures
                .destinations
                .first()
                .map_or(0.0, |d| d.utilization()),
        );
        let queues: BTreeMap<u16, u64> = j
            .figures
            .listen_queue
            .iter()
            .map(|(&p, &(q, _))| (p, q))
            .collect();
        let limits: BTreeMap<u16, u64> = j
            .figures
            .listen_queue
            .iter()
            .map(|(&p, &(_, l))| (p, l))
            .collect();
        for (port, n) in fold(&queues, |&p| ports.label(p)) {
            self.listen_queue.with_label_values(&[&port]).set(n);
        }
        for (port, n) in fold(&limits, |&p| ports.label(p)) {
            self.listen_queue_limit.with_label_values(&[&port]).set(n);
        }
        self.cgroups_unresolved.set(r.cgroups.unresolved as f64);
        self.cgroup_walks
            .with_label_values(&["all"])
            .inc_by(r.cgroups.walks);
        self.cgroup_walks
            .with_label_values(&["truncated"])
            .inc_by(r.cgroups.truncated_walks);
        self.listen_overflows.inc_by(r.listen_overflows);
        self.listen_drops.inc_by(r.listen_drops);
        self.segments_sent.inc_by(r.segments_sent);
    }
}

/// Sums counts whose keys map to the same label values.
fn fold<K, L: Ord>(counts: &BTreeMap<K, u64>, mut label: impl FnMut(&K) -> L) -> BTreeMap<L, i64> {
    let mut out = BTreeMap::new();
    for (k, &n) in counts {
        *out.entry(label(k)).or_default() += n as i64;
    }
    out
}

/// The collector registered with the agent's registry.
pub struct CensusCollector {
    published: Arc<Published>,
    ports: Arc<LabelledPorts>,
    /// The pod label budget, shared with the event metrics.
    pods: Arc<Mutex<PodLabels>>,
    descs: Vec<Desc>,
}

impl CensusCollector {
    pub fn new(
        published: Arc<Published>,
        ports: Arc<LabelledPorts>,
        pods: Arc<Mutex<PodLabels>>,
    ) -> prometheus::Result<Self> {
        let template = CensusMetrics::new()?;
        let descs = template
            .collectors()
            .iter()
            .flat_map(|c| c.desc())
            .cloned()
            .collect();
        Ok(CensusCollector {
            published,
            ports,
            pods,
            descs,
        })
    }
}

impl Collector for CensusCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // The names were checked when the collector was made.
        let Ok(m) = CensusMetrics::new() else {
            return Vec::new();
        };
        let report = self.published.latest();
        m.fill(
            report.as_deref(),
            &self.ports,
            &self.pods,
            self.published.errors.load(Ordering::Relaxed),
            self.published.failure().map(|(f, _)| f),
        );
        m.collectors().iter().flat_map(|c| c.collect()).collect()
    }
}

/// Exported for tests: the text of the census metrics for `report`.
#[cfg(test)]
fn text(report: Option<Report>, ports: Arc<LabelledPorts>) -> String {
    let published = Arc::new(Published::default());
    if let Some(r) = report {
        published.publish(r);
    }
    let registry = prometheus::Registry::new();
    registry
        .register(Box::new(
            CensusCollector::new(published, ports, Arc::new(Mutex::new(PodLabels::new(8))))
                .unwrap(),
        ))
        .unwrap();
    crate::metrics::event::encode(&registry).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::join::Joined;
    use crate::metrics::ports::{PortLabels, Use, DEFAULT_EPHEMERAL};
    use std::time::{Duration, SystemTime};

    #[test]
    fn every_series_a_panel_reads_is_there_before_the_first_census() {
        let mut labels = PortLabels::new(&[], 8, DEFAULT_EPHEMERAL);
        labels.slot(8080, Use::Accepted);
        let t = text(None, labels.shared());
        for line in [
            "tracer_tcp_stuck_sockets{namespace=\"\",pod=\"\",port=\"other\",state=\"close_wait\"} 0\n",
            "tracer_tcp_stuck_sockets{namespace=\"\",pod=\"\",port=\"8080\",state=\"syn_sent\"} 0\n",
            "tracer_tcp_time_wait_sockets{port=\"other\"} 0\n",
            "tracer_tcp_oldest_socket_age_seconds{state=\"close_wait\"} 0\n",
            "tracer_tcp_listen_overflows_total 0\n",
            "tracer_census_errors_total 0\n",
            "tracer_census_corrections_total{action=\"added\"} 0\n",
            "tracer_census_failing{reason=\"sock_diag_missing\"} 0\n",
            "tracer_tcp_ephemeral_port_utilization 0\n",
        ] {
            assert!(t.contains(line), "{line} missing from:\n{t}");
        }
    }

    #[test]
    fn ports_without_a_value_fold_into_other() {
        let mut labels = PortLabels::new(&[], 8, DEFAULT_EPHEMERAL);
        labels.slot(5432, Use::Connected { netns: 0 });
        let mut joined = Joined::default();
        joined.figures.time_wait = [(5432, 3), (40_001, 2), (40_002, 5)].into();
        joined.figures.stuck = [((state::CLOSE_WAIT, 40_003, 0), 1)].into();
        joined.figures.by_state[state::TIME_WAIT as usize] = 10;
        (joined.figures.stored, joined.figures.stored_bytes) = (7, 448);
        let report = Report {
            taken_ns: 0,
            taken_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_millis(250),
            visited: 2,
            unreachable: 0,
            joined,
            listen_overflows: 4,
            listen_drops: 5,
            segments_sent: 0,
            state_corrected: 1,
            added: 2,
            owner_found: 6,
            thresholds: Default::default(),
            workloads: Default::default(),
            cgroups: Default::default(),
        };
        let t = text(Some(report), labels.shared());
        for line in [
            "tracer_tcp_time_wait_sockets{port=\"5432\"} 3\n",
            "tracer_tcp_time_wait_sockets{port=\"other\"} 7\n",
            "tracer_tcp_stuck_sockets{namespace=\"\",pod=\"\",port=\"other\",state=\"close_wait\"} 1\n",
            "tracer_tcp_sockets{state=\"time_wait\"} 10\n",
            "tracer_census_timestamp_seconds 1700000000\n",
            "tracer_tracked_sockets 7\n",
            "tracer_tracked_sockets_bytes 448\n",
            "tracer_census_duration_seconds 0.25\n",
            "tracer_census_corrections_total{action=\"added\"} 2\n",
            "tracer_census_corrections_total{action=\"owner_found\"} 6\n",
            "tracer_tcp_listen_drops_total 5\n",
        ] {
            assert!(t.contains(line), "{line} missing from:\n{t}");
        }
        assert!(!t.contains("40001"), "{t}");
    }
}
