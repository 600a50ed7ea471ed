//! The `port` label: which ports get a value of their own, by a rule rather than by arrival.
//!
//! Owns: the label budget, who may spend it, and the record of which ports have a value
//! (shared, lock-free, with the scrape path). Does not own: the metrics that use the label.
//!
//! The rule (also in docs/metrics.md):
//! - `--port` given: exactly those ports, nothing else.
//! - Otherwise at most `--max-ports` values, given for good (a value never moves once given):
//!   - a *local* port because something listens on it: when a passive handshake completes on
//!     it, or when a socket starts listening on it outside the namespace's ephemeral range
//!     (`ip_local_port_range`; listeners inside it, often throwaway ones, wait for a handshake);
//!   - a *remote* port because this host opens connections to it (an active handshake or a
//!     failed one) and it lies outside the ephemeral range of the socket's namespace;
//!   - at start, the listening ports and remote service ports that the first census shows are
//!     ranked by how many sockets use them (volume), and the busiest take the free values.
//! - Everything else only looks a port up and never spends the budget: census gauges,
//!   TIME-WAIT counts, SYN-ACK retransmissions, teardowns of sockets whose opening was not
//!   seen. Ports without a value are `other`; events of a port that qualified for a value when
//!   the budget was already spent are counted (`tracer_port_label_overflow_total`).
//! - Samples of a port without a value are held by the event metrics until the next scrape
//!   (`metrics::event`), so that a port that qualifies just after its first events counts them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntGaugeVec, Opts};

/// The label value of ports without one of their own.
pub const OTHER: &str = "other";

/// Linux's default `ip_local_port_range`, for namespaces whose range is not known yet.
pub const DEFAULT_EPHEMERAL: (u16, u16) = (32_768, 60_999);

/// Which ports have a label value: written by the event path, read by the scrape path.
pub struct LabelledPorts {
    bits: Vec<AtomicU64>,
    /// Events that went to `other` because the budget was spent.
    overflow: AtomicU64,
}

impl LabelledPorts {
    fn new() -> LabelledPorts {
        LabelledPorts {
            bits: (0..1024).map(|_| AtomicU64::new(0)).collect(),
            overflow: AtomicU64::new(0),
        }
    }

    /// True when `port` has a label value of its own.
    pub fn contains(&self, port: u16) -> bool {
        self.bits[port as usize / 64].load(Ordering::Relaxed) & (1 << (port % 64)) != 0
    }

    fn insert(&self, port: u16) {
        self.bits[port as usize / 64].fetch_or(1 << (port % 64), Ordering::Relaxed);
    }

    /// The label value of `port`: its number, or `other`.
    pub fn label(&self, port: u16) -> String {
        if port != 0 && self.contains(port) {
            port.to_string()
        } else {
            OTHER.to_owned()
        }
    }

    /// Every port with a value, ascending.
    pub fn ports(&self) -> Vec<u16> {
        (1..=u16::MAX).filter(|&p| self.contains(p)).collect()
    }
}

/// Why a port is being labelled, which decides whether it may get a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// A passive handshake completed on this local port: something listens there.
    Accepted,
    /// A socket started listening on this local port, in namespace `netns`.
    Listening { netns: u32 },
    /// This host opened (or tried to open) a connection to this remote port from `netns`.
    Connected { netns: u32 },
    /// Anything else: look the port up, never give it a value.
    Counted,
}

/// The event path's side of the label: slots for label handles, and the budget.
pub struct PortLabels {
    /// Slot of each port, 0 = no value ("other").
    slot_of: Vec<u16>,
    /// Label value of each slot; slot 0 is "other".
    names: Vec<String>,
    max: usize,
    fixed: bool,
    /// `ip_local_port_range` by network namespace inode, as the census last read it.
    ranges: HashMap<u32, (u16, u16)>,
    /// The range of namespaces not in `ranges` (the agent's own).
    default_range: (u16, u16),
    shared: Arc<LabelledPorts>,
    /// Ports given a value since [`PortLabels::take_new`] was last called, and why.
    new: Vec<(u16, Use)>,
}

impl PortLabels {
    /// `explicit` non-empty: exactly those ports; else at most `max` by the rule above.
    pub fn new(explicit: &[u16], max: usize, default_range: (u16, u16)) -> PortLabels {
        let mut labels = PortLabels {
            slot_of: vec![0; 65_536],
            names: vec![OTHER.to_owned()],
            max,
            fixed: !explicit.is_empty(),
            ranges: HashMap::new(),
            default_range,
            shared: Arc::new(LabelledPorts::new()),
            new: Vec::new(),
        };
        for &p in explicit {
            labels.assign(p, Use::Counted);
        }
        labels
    }

    /// What the scrape path reads.
    pub fn shared(&self) -> Arc<LabelledPorts> {
        self.shared.clone()
    }

    /// The slot (index into [`PortLabels::name`]) of `port`, giving it one when `why`
    /// qualifies it and the budget allows.
    pub fn slot(&mut self, port: u16, why: Use) -> usize {
        let slot = self.slot_of[port as usize] as usize;
        if slot != 0 || port == 0 || self.fixed || !self.qualifies(port, why) {
            return slot;
        }
        if self.names.len() > self.max {
            self.shared.overflow.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        self.assign(port, why)
    }

    /// True while a port without a value may still get one (no `--port`, budget left).
    pub fn may_grow(&self) -> bool {
        !self.fixed && self.names.len() <= self.max
    }

    /// The label value of a slot.
    pub fn name(&self, slot: usize) -> &str {
        &self.names[slot]
    }

    /// Records the ephemeral port ranges of the namespaces a census visited.
    pub fn set_ranges(&mut self, ranges: HashMap<u32, (u16, u16)>) {
        self.ranges = ranges;
    }

    /// Gives the free values to `candidates`, busiest first: (port, sockets using it, why
    /// it qualifies). The census at start calls this; the caller has applied the rule.
    pub fn seed(&mut self, mut candidates: Vec<(u16, u64, Use)>) {
        if self.fixed {
            return;
        }
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (port, _, why) in candidates {
            if self.names.len() > self.max {
                break;
            }
            if port != 0 {
                self.assign(port, why);
            }
        }
    }

    /// Ports given a value since the last call and why, so that their series can be made at 0.
    pub fn take_new(&mut self) -> Vec<(u16, Use)> {
        std::mem::take(&mut self.new)
    }

    /// True when `port` lies in the ephemeral range of namespace `netns`.
    pub fn is_ephemeral(&self, port: u16, netns: u32) -> bool {
        let (lo, hi) = self
            .ranges
            .get(&netns)
            .copied()
            .unwrap_or(self.default_range);
        (lo..=hi).contains(&port)
    }

    fn qualifies(&self, port: u16, why: Use) -> bool {
        match why {
            Use::Accepted => true,
            Use::Listening { netns } | Use::Connected { netns } => !self.is_ephemeral(port, netns),
            Use::Counted => false,
        }
    }

    fn assign(&mut self, port: u16, why: Use) -> usize {
        if self.slot_of[port as usize] == 0 {
            self.slot_of[port as usize] = self.names.len() as u16;
            self.names.push(port.to_string());
            self.shared.insert(port);
            self.new.push((port, why));
        }
        self.slot_of[port as usize] as usize
    }
}

/// Exports the policy's state at scrape time: `tracer_port_label_info{port}` and
/// `tracer_port_label_overflow_total`.
pub struct PortLabelCollector {
    shared: Arc<LabelledPorts>,
    descs: Vec<Desc>,
}

impl PortLabelCollector {
    pub fn new(shared: Arc<LabelledPorts>) -> prometheus::Result<PortLabelCollector> {
        let (info, overflow) = Self::metrics()?;
        let descs = info
            .desc()
            .into_iter()
            .chain(overflow.desc())
            .cloned()
            .collect();
        Ok(PortLabelCollector { shared, descs })
    }

    fn metrics() -> prometheus::Result<(IntGaugeVec, IntCounter)> {
        let info = IntGaugeVec::new(
            Opts::new(
                "tracer_port_label_info",
                "Always 1: this port has a port label value of its own (--port, or a listening \
                 or connected-to service port, by the rule in docs/metrics.md).",
            ),
            &["port"],
        )?;
        let overflow = IntCounter::new(
            "tracer_port_label_overflow_total",
            "Events counted under port=\"other\" because their port qualified for a label value \
             when all --max-ports values were already given.",
        )?;
        Ok((info, overflow))
    }
}

impl Collector for PortLabelCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // Fresh metrics for each scrape: concurrent scrapes never see each other's half-made
        // values. (The names were checked when the collector was made.)
        let Ok((info, overflow)) = Self::metrics() else {
            return Vec::new();
        };
        for port in self.shared.ports() {
            info.with_label_values(&[&port.to_string()]).set(1);
        }
        overflow.inc_by(self.shared.overflow.load(Ordering::Relaxed));
        let mut out = info.collect();
        out.extend(overflow.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: u32 = 4026531840;

    #[test]
    fn ephemeral_client_ports_never_get_a_value() {
        let mut p = PortLabels::new(&[], 4, DEFAULT_EPHEMERAL);
        // A TIME-WAIT count, a connect toward an ephemeral-range port: lookups only.
        assert_eq!(p.slot(40_000, Use::Counted), 0);
        assert_eq!(p.slot(45_000, Use::Connected { netns: NS }), 0);
        let s = p.slot(5432, Use::Connected { netns: NS });
        assert_eq!(p.name(s), "5432");
        // A listener in the ephemeral range waits for its first handshake.
        assert_eq!(p.slot(40_001, Use::Listening { netns: NS }), 0);
        let s = p.slot(40_001, Use::Accepted);
        assert_eq!(p.name(s), "40001");
        assert_eq!(
            p.take_new(),
            vec![
                (5432, Use::Connected { netns: NS }),
                (40_001, Use::Accepted)
            ]
        );
        assert!(p.shared().contains(5432) && !p.shared().contains(40_000));
        assert_eq!(p.shared().label(40_000), "other");
    }

    #[test]
    fn each_namespace_has_its_own_range() {
        let mut p = PortLabels::new(&[], 4, DEFAULT_EPHEMERAL);
        p.set_ranges([(7, (10_000, 10_009))].into());
        assert!(p.is_ephemeral(10_005, 7) && !p.is_ephemeral(10_005, 8));
        assert_eq!(p.slot(10_005, Use::Connected { netns: 7 }), 0);
        assert_ne!(p.slot(40_000, Use::Connected { netns: 7 }), 0);
    }

    #[test]
    fn values_are_kept_once_given_and_the_overflow_is_counted() {
        let mut p = PortLabels::new(&[], 2, DEFAULT_EPHEMERAL);
        let a = p.slot(80, Use::Accepted);
        let b = p.slot(443, Use::Accepted);
        assert_eq!(p.slot(8080, Use::Accepted), 0, "budget spent");
        assert_eq!(p.slot(8080, Use::Counted), 0, "a lookup is no overflow");
        assert_eq!(
            (p.slot(80, Use::Counted), p.slot(443, Use::Counted)),
            (a, b)
        );
        assert_eq!(p.shared().overflow.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_census_seeds_the_busiest_ports_first() {
        let mut p = PortLabels::new(&[], 2, DEFAULT_EPHEMERAL);
        p.seed(vec![
            (22, 1, Use::Accepted),
            (5432, 300, Use::Connected { netns: 0 }),
            (80, 40, Use::Accepted),
        ]);
        assert_eq!(p.shared().ports(), vec![80, 5432]);
    }

    #[test]
    fn an_explicit_list_names_only_those() {
        let mut p = PortLabels::new(&[5432], 10, DEFAULT_EPHEMERAL);
        let s = p.slot(5432, Use::Counted);
        assert_eq!(p.name(s), "5432");
        assert_eq!(p.slot(80, Use::Accepted), 0);
        p.seed(vec![(80, 9, Use::Accepted)]);
        assert_eq!(p.shared().ports(), vec![5432]);
        assert_eq!(p.shared().overflow.load(Ordering::Relaxed), 0);
    }
}
