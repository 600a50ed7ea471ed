//! The metrics read from the probe's own counters once a second: what was lost, what the probe
//! costs, the kernel events it counts in maps (SYN-ACK retransmissions, resets), its tables
//! running full, and the sockets with the probe's state on them.
//!
//! Owns: turning the probe's cumulative kernel counters into counter increments. Does not own:
//! reading them (`probe`).

use std::collections::HashMap;

use anyhow::Result;
use prometheus::{CounterVec, IntCounter, IntCounterVec, Opts, Registry};

use crate::metrics::pods::PodAttribution;
use crate::metrics::ports::{LabelledPorts, OTHER};
use crate::stream::btf::EnumName;
use crate::stream::event::state_name;
use crate::stream::probe::{ProbeReadings, RESET_STATES};
use crate::stream::Direction;
use tracer_common::retransmit;

/// The probe's tables that can run full, by the `table` label of `tracer_probe_table_full_total`.
const TABLES: [&str; 3] = ["synack_ports", "retransmit_ports", "drop_ports"];

/// What can go wrong in the probe besides a full table, by the `error` label of
/// `tracer_probe_errors_total`.
const PROBE_ERRORS: [&str; 3] = ["field_read", "address_family", "no_storage"];

/// Kernel-counter metrics and the sockets with the probe's state.
pub struct KernelMetrics {
    synack: IntCounterVec,
    retransmits: IntCounterVec,
    resets: IntCounterVec,
    reset_reasons: IntCounterVec,
    drops: IntCounterVec,
    /// The kernel's names of drop reasons, indexed by value (empty: drops not counted).
    drop_names: Vec<String>,
    /// The pods of the sockets dropped packets were for.
    pods: PodAttribution,
    /// The kernel's names of reset reasons, indexed by value (empty: no reasons).
    reason_names: Vec<String>,
    events_lost: IntCounter,
    probe_runs: IntCounterVec,
    probe_run_seconds: CounterVec,
    probe_runs_missed: IntCounterVec,
    table_full: IntCounterVec,
    probe_errors: IntCounterVec,
    skipped: IntCounter,
    /// Last kernel totals seen, to turn them into counter increments.
    last: KernelTotals,
}

#[derive(Default)]
struct KernelTotals {
    lost: u64,
    /// Per program: (runs, run nanoseconds, runs missed).
    programs: HashMap<&'static str, (u64, u64, u64)>,
    synack: HashMap<u16, u64>,
    /// By (port, kind); SYN-ACKs of request sockets come from `synack`.
    retransmits: HashMap<(u16, u16), u64>,
    resets: [[u64; RESET_STATES as usize]; 2],
    reset_reasons: Vec<u64>,
    table_full: [u64; 3],
    /// By (reason, port, cgroup).
    drops: HashMap<(u16, u16, u64), u64>,
    probe_errors: [u64; 3],
    skipped: u64,
}

impl KernelMetrics {
    /// Registers the metrics in `registry`, each series a panel or alert reads at 0.
    /// `reason_names` are the kernel's reset reasons (see `Probe::reset_reasons`).
    /// `drop_names` are the kernel's packet drop reasons (see `Probe::drop_reasons`).
    pub fn new(
        registry: &Registry,
        reason_names: &[String],
        drop_names: &[String],
        pods: PodAttribution,
    ) -> Result<KernelMetrics> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let single = |name: &str, help: &str| -> Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let synack = counter(
            "tracer_tcp_synack_retransmits_total",
            "SYN-ACK retransmissions, from tcp/tcp_retransmit_synack, by listening port.",
            &["port"],
        )?;
        synack.with_label_values(&[OTHER]);
        let retransmits = counter(
            "tracer_tcp_retransmits_total",
            "Segments retransmitted (tcp/tcp_retransmit_skb and tcp/tcp_retransmit_synack; \
             all kinds together are the kernel's TcpRetransSegs), by service port (the local \
             port of an accepted connection or listener, else the remote one) and kind: \
             timeout (the retransmission timer fired, and the segments resent in the slow \
             start after it), fast (a segment found lost while the flow went on: duplicate \
             ACKs, SACK, RACK), tail_loss_probe, syn, synack, other.",
            &["port", "kind"],
        )?;
        for kind in retransmit::NAMES {
            retransmits.with_label_values(&[OTHER, kind]);
        }
        let resets = counter(
            "tracer_tcp_resets_total",
            "TCP resets, from tcp/tcp_send_reset and tcp/tcp_receive_reset, by the socket's state \
             (none: a reset that answered no socket).",
            &["direction", "state"],
        )?;
        for (direction, state) in [
            (Direction::Sent, "none"),
            (Direction::Sent, "established"),
            (Direction::Received, "syn_sent"),
            (Direction::Received, "established"),
        ] {
            resets.with_label_values(&[direction.label(), state]);
        }
        let reset_reasons = counter(
            "tracer_tcp_reset_reasons_total",
            "TCP resets sent, by the kernel's reason (enum sk_rst_reason, from tcp/tcp_send_reset; \
             Linux 6.10+, see tracer_feature_enabled{feature=\"reset_reason\"}).",
            &["reason"],
        )?;
        // Every reason this kernel names, so that a rate over any of them starts at 0.
        for name in reason_names.iter().filter(|n| !n.is_empty() && *n != "max") {
            reset_reasons.with_label_values(&[name]);
        }
        let drops = counter(
            "tracer_tcp_drops_total",
            "TCP packets the kernel dropped, from skb/kfree_skb, by its reason (enum \
             skb_drop_reason: netfilter_drop for a firewall rule, tcp_csum, no_socket, \
             socket_rcvbuff...) and service port (of the packet's two ports, the one outside \
             the ephemeral range), and by the Kubernetes namespace and pod of the socket a \
             received packet was for where the kernel names it (Linux 6.11+, \
             tracer_feature_enabled{feature=\"drop_socket\"}); Linux 5.17+, see \
             tracer_feature_enabled{feature=\"drop_reason\"}.",
            &["reason", "port", "namespace", "pod"],
        )?;
        // Every reason this kernel names, under `other`, so that a rate starts at 0.
        for name in drop_names.iter().filter(|n| !n.is_empty() && *n != "max") {
            drops.with_label_values(&[name, OTHER, "", ""]);
        }
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
        let probe_run_seconds = CounterVec::new(
            Opts::new(
                "tracer_probe_run_seconds_total",
                "Kernel CPU time spent in each eBPF program, counted only while the sysctl \
                 kernel.bpf_stats_enabled is 1 (0 otherwise).",
            ),
            &["program"],
        )?;
        registry.register(Box::new(probe_run_seconds.clone()))?;
        let probe_runs_missed = counter(
            "tracer_probe_runs_missed_total",
            "Runs of each eBPF program that the kernel skipped because the same program was \
             already running on that CPU (bpf_prog_info.recursion_misses, Linux 5.12+; \
             counted whatever kernel.bpf_stats_enabled says): for the counting programs, \
             retransmissions, resets or drops not counted; inet_sock_set_state's, less those \
             the rescue program delivered, are in tracer_events_lost_total.",
            &["program"],
        )?;
        for (name, _) in crate::stream::probe::PROGRAMS {
            probe_runs.with_label_values(&[name]);
            probe_run_seconds.with_label_values(&[name]);
            probe_runs_missed.with_label_values(&[name]);
        }
        let table_full = counter(
            "tracer_probe_table_full_total",
            "Times a probe map was full: synack_ports (a SYN-ACK retransmission of a new \
             listening port was not counted), retransmit_ports (retransmitted segments of a \
             new service port and kind were not counted), drop_ports (dropped packets of a new \
             reason and port were not counted).",
            &["table"],
        )?;
        for table in TABLES {
            table_full.with_label_values(&[table]);
        }
        let probe_errors = counter(
            "tracer_probe_errors_total",
            "Problems the probe met on its rare paths, each also logged (rate-limited): \
             field_read (a kernel field could not be read; it was reported as 0), \
             address_family (a TCP socket neither IPv4 nor IPv6), no_storage (the kernel gave \
             a socket no storage: its events carry no owner, times or service port).",
            &["error"],
        )?;
        for error in PROBE_ERRORS {
            probe_errors.with_label_values(&[error]);
        }
        let skipped = single(
            "tracer_transitions_skipped_total",
            "Transitions whose old state was not the state the probe saw the socket enter: the \
             kernel changed it without the inet_sock_set_state tracepoint, or a run of the \
             probe was missed; the time in that state is not measured.",
        )?;
        Ok(KernelMetrics {
            synack,
            retransmits,
            resets,
            reset_reasons,
            reason_names: reason_names.to_vec(),
            drops,
            drop_names: drop_names.to_vec(),
            pods,
            events_lost,
            probe_runs,
            probe_run_seconds,
            probe_runs_missed,
            table_full,
            probe_errors,
            skipped,
            last: KernelTotals::default(),
        })
    }

    /// Brings the kernel-side counters into the metrics (once a second).
    /// `ports` says which ports have a label value; SYN-ACK counts only look them up.
    pub fn sync(&mut self, probe: &ProbeReadings, ports: &LabelledPorts) {
        let lost = probe.counters.lost_total();
        self.events_lost.inc_by(lost.saturating_sub(self.last.lost));
        self.last.lost = self.last.lost.max(lost);
        for p in &probe.programs {
            let (runs, ns, missed) = self
                .last
                .programs
                .insert(p.name, (p.runs, p.run_ns, p.missed))
                .unwrap_or((0, 0, 0));
            self.probe_runs_missed
                .with_label_values(&[p.name])
                .inc_by(p.missed.saturating_sub(missed));
            self.probe_runs
                .with_label_values(&[p.name])
                .inc_by(p.runs.saturating_sub(runs));
            let secs = p.run_ns.saturating_sub(ns) as f64 / 1e9;
            self.probe_run_seconds
                .with_label_values(&[p.name])
                .inc_by(secs);
        }
        for port in ports.ports() {
            // Listening ports with a value show 0 until their first retransmission.
            self.synack.with_label_values(&[&port.to_string()]);
        }
        for &(port, total) in &probe.synack {
            let before = self.last.synack.insert(port, total).unwrap_or(0);
            if total > before {
                let label = ports.label(port);
                self.synack
                    .with_label_values(&[&label])
                    .inc_by(total - before);
                self.retransmits
                    .with_label_values(&[&label, retransmit::name(retransmit::SYNACK)])
                    .inc_by(total - before);
            }
        }
        for &(port, kind, total) in &probe.retransmits {
            let before = self
                .last
                .retransmits
                .insert((port, kind), total)
                .unwrap_or(0);
            if total > before {
                self.retransmits
                    .with_label_values(&[&ports.label(port), retransmit::name(kind)])
                    .inc_by(total - before);
            }
        }
        for direction in Direction::ALL {
            let d = direction as usize;
            for (state, &total) in probe.resets[d].iter().enumerate() {
                let before = std::mem::replace(&mut self.last.resets[d][state], total);
                if total > before {
                    let name = if state == 0 {
                        "none"
                    } else {
                        state_name(state as u8)
                    };
                    self.resets
                        .with_label_values(&[direction.label(), name])
                        .inc_by(total - before);
                }
            }
        }
        self.last.reset_reasons.resize(probe.reset_reasons.len(), 0);
        for (i, &total) in probe.reset_reasons.iter().enumerate() {
            let before = std::mem::replace(&mut self.last.reset_reasons[i], total);
            if total > before {
                let name = EnumName::new(&self.reason_names, i).to_string();
                self.reset_reasons
                    .with_label_values(&[&name])
                    .inc_by(total - before);
            }
        }
        let c = &probe.counters;
        let full = [
            c.synack_ports_full,
            c.retransmit_ports_full,
            c.drop_ports_full,
        ];
        for &(key, total) in &probe.drops {
            let (reason, port) = (key.reason, key.port);
            let before = self
                .last
                .drops
                .insert((reason, port, key.cgroup), total)
                .unwrap_or(0);
            if total > before {
                let name = EnumName::new(&self.drop_names, usize::from(reason)).to_string();
                let slot = self.pods.slot(key.cgroup);
                let (namespace, pod) = self.pods.label(slot);
                self.drops
                    .with_label_values(&[name.as_str(), &ports.label(port), namespace, pod])
                    .inc_by(total - before);
            }
        }
        add_growth(&self.table_full, &TABLES, &mut self.last.table_full, full);
        let errors = [c.read_failed, c.unknown_family, c.no_storage];
        self.skipped
            .inc_by(c.skipped.saturating_sub(self.last.skipped));
        self.last.skipped = self.last.skipped.max(c.skipped);
        add_growth(
            &self.probe_errors,
            &PROBE_ERRORS,
            &mut self.last.probe_errors,
            errors,
        );
    }
}

/// Adds to the series `labels[i]` of `counter` what the kernel total `now[i]` grew by since
/// `last[i]`, and remembers `now`.
fn add_growth<const N: usize>(
    counter: &IntCounterVec,
    labels: &[&str; N],
    last: &mut [u64; N],
    now: [u64; N],
) {
    for (i, label) in labels.iter().enumerate() {
        let before = std::mem::replace(&mut last[i], now[i]);
        counter
            .with_label_values(&[label])
            .inc_by(now[i].saturating_sub(before));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ports::{PortLabels, Use, DEFAULT_EPHEMERAL};
    use crate::stream::probe::{ProbeCounters, ProgramStats};
    use tracer_common::DropKey;

    #[test]
    fn kernel_counters_become_increments() {
        let registry = Registry::new();
        let reasons = ["not_specified", "no_socket", "tcp_abort_on_close"].map(String::from);
        let drop_names = ["not_specified", "no_socket", "netfilter_drop"].map(String::from);
        let pods = PodAttribution::new(None, Default::default());
        let mut m = KernelMetrics::new(&registry, &reasons, &drop_names, pods).unwrap();
        let mut labels = PortLabels::new(&[], 8, DEFAULT_EPHEMERAL);
        labels.slot(8080, Use::Accepted);
        let ports = labels.shared();
        let mut resets = [[0; RESET_STATES as usize]; 2];
        resets[0][0] = 3;
        let counters = ProbeCounters {
            lost: 2,
            missed: 1,
            synack_ports_full: 4,
            read_failed: 5,
            skipped: 6,
            ..Default::default()
        };
        let stats = |runs, run_ns| {
            vec![ProgramStats {
                name: "inet_sock_set_state",
                runs,
                run_ns,
                missed: 0,
            }]
        };
        let mut probe = ProbeReadings {
            counters,
            synack: vec![(8080, 5), (9999, 2)],
            retransmits: vec![(8080, retransmit::TIMEOUT, 3), (8080, retransmit::FAST, 1)],
            drops: [(2, 4), (9, 1)]
                .map(|(reason, n)| {
                    let key = DropKey {
                        reason,
                        port: 8080,
                        ..Default::default()
                    };
                    (key, n)
                })
                .to_vec(),
            resets,
            reset_reasons: vec![0, 4, 0],
            programs: stats(10, 1_000),
        };
        m.sync(&probe, &ports);
        probe.synack = vec![(8080, 6), (9999, 2)];
        probe.retransmits = vec![(8080, retransmit::TIMEOUT, 5), (8080, retransmit::FAST, 1)];
        probe.programs = stats(30, 5_000);
        probe.reset_reasons = vec![0, 4, 1];
        m.sync(&probe, &ports);
        let text = crate::metrics::event::encode(&registry).unwrap();
        for line in [
            "tracer_events_lost_total 3\n",
            "tracer_tcp_synack_retransmits_total{port=\"8080\"} 6\n",
            // A port without a value is counted under other, never given one.
            "tracer_tcp_synack_retransmits_total{port=\"other\"} 2\n",
            // SYN-ACKs are a kind of retransmission too; kinds never seen read 0.
            "tracer_tcp_retransmits_total{kind=\"synack\",port=\"8080\"} 6\n",
            "tracer_tcp_retransmits_total{kind=\"timeout\",port=\"8080\"} 5\n",
            "tracer_tcp_retransmits_total{kind=\"fast\",port=\"8080\"} 1\n",
            "tracer_tcp_retransmits_total{kind=\"tail_loss_probe\",port=\"other\"} 0\n",
            "tracer_tcp_drops_total{namespace=\"\",pod=\"\",port=\"8080\",reason=\"netfilter_drop\"} 4\n",
            "tracer_tcp_drops_total{namespace=\"\",pod=\"\",port=\"8080\",reason=\"reason_9\"} 1\n",
            "tracer_tcp_drops_total{namespace=\"\",pod=\"\",port=\"other\",reason=\"no_socket\"} 0\n",
            "tracer_tcp_resets_total{direction=\"sent\",state=\"none\"} 3\n",
            "tracer_tcp_resets_total{direction=\"received\",state=\"syn_sent\"} 0\n",
            "tracer_tcp_reset_reasons_total{reason=\"no_socket\"} 4\n",
            "tracer_tcp_reset_reasons_total{reason=\"not_specified\"} 0\n",
            "tracer_tcp_reset_reasons_total{reason=\"tcp_abort_on_close\"} 1\n",
            "tracer_probe_runs_total{program=\"inet_sock_set_state\"} 30\n",
            "tracer_probe_table_full_total{table=\"synack_ports\"} 4\n",
            "tracer_probe_table_full_total{table=\"retransmit_ports\"} 0\n",
            "tracer_transitions_skipped_total 6\n",
            "tracer_probe_errors_total{error=\"no_storage\"} 0\n",
            "tracer_probe_errors_total{error=\"field_read\"} 5\n",
            "tracer_probe_errors_total{error=\"address_family\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!ports.contains(9999));
        // Gone with the agent's socket table: nothing is evicted from the kernel's storage.
        assert!(
            !text.contains("tracer_tracked_sockets_evicted_total"),
            "{text}"
        );
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
