//! What the periodic reports of open connections deliver: how many were made, and how many
//! connections the agent follows for them (their bytes and RTTs are counted by the event
//! metrics, as a close's are).

use anyhow::Result;
use prometheus::{IntCounter, IntGauge, Registry};

pub struct LiveMetrics {
    pub reports: IntCounter,
    pub followed: IntGauge,
}

impl LiveMetrics {
    /// Registers the metrics in `registry`, at 0.
    pub fn new(registry: &Registry) -> Result<LiveMetrics> {
        let reports = IntCounter::new(
            "tracer_connection_reports_total",
            "Update records of open connections, one per connection each --record-interval \
             (taken by the census; their bytes and RTT count in the metrics at every census).",
        )?;
        let followed = IntGauge::new(
            "tracer_connection_reports_followed",
            "Open connections the agent follows (counted at each census: those established \
             more than 1 s, and those older than the agent), at the last census.",
        )?;
        registry.register(Box::new(reports.clone()))?;
        registry.register(Box::new(followed.clone()))?;
        Ok(LiveMetrics { reports, followed })
    }
}
