//! The agent's HTTP endpoints: `/metrics` (Prometheus text format), `/healthz`, and `/`.
//!
//! Owns: routing and the scrape (census, then encode). Does not own: what the metrics mean
//! (`metrics`) or how the census is taken (`census`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{IntCounter, Registry};
use tokio::sync::{mpsc, oneshot};

use crate::census::HostCensus;
use crate::event::{parse_state, state_name};
use crate::metrics::Metrics;
use crate::stuck::{AgeSource, Snapshot, SocketView};

/// How long the event reader may be silent before `/healthz` says 503. It drains every 10 ms,
/// so this is only exceeded when the agent is stuck.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Proof of life of the event reader: when it last drained the ring buffer.
#[derive(Default)]
pub struct Health {
    last_drain_ms: AtomicU64,
}

impl Health {
    /// Called by the reader after each drain.
    pub fn beat(&self) {
        self.beat_at(now_ms());
    }

    /// True when the reader drained recently.
    pub fn alive(&self) -> bool {
        self.alive_at(now_ms())
    }

    fn beat_at(&self, ms: u64) {
        self.last_drain_ms.store(ms, Ordering::Relaxed);
    }

    fn alive_at(&self, now_ms: u64) -> bool {
        let last = self.last_drain_ms.load(Ordering::Relaxed);
        last != 0 && now_ms.saturating_sub(last) < HEALTH_TIMEOUT.as_millis() as u64
    }
}

/// CLOCK_MONOTONIC in milliseconds (never 0 once the machine has been up a millisecond):
/// a wall-clock step must not make the agent look stalled.
fn now_ms() -> u64 {
    crate::ring::monotonic_ns() / 1_000_000
}

/// A census for the event loop to join with its socket table; it answers with the snapshot.
pub struct CensusRequest {
    pub census: HostCensus,
    pub reply: oneshot::Sender<Snapshot>,
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub census_errors: IntCounter,
    pub health: Arc<Health>,
    pub requests: mpsc::Sender<CensusRequest>,
}

/// Takes the census of every namespace (off the event loop) and has the loop join it with the
/// socket table and update the census metrics. A failure is counted and reported; the caller
/// goes on without it.
async fn take_census(state: &AppState) -> Option<Snapshot> {
    let census = match tokio::task::spawn_blocking(crate::census::all_namespaces).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            state.census_errors.inc();
            eprintln!("tracer: socket census failed: {e:#}");
            return None;
        }
        Err(_) => {
            state.census_errors.inc();
            return None;
        }
    };
    let (reply, answer) = oneshot::channel();
    state
        .requests
        .send(CensusRequest { census, reply })
        .await
        .ok()?;
    answer.await.ok()
}

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/sockets", get(sockets))
        .with_state(state);
    axum::serve(listener, app).await
}

async fn index() -> Html<&'static str> {
    Html(
        "<!doctype html><title>tracer</title><h1>tracer</h1>\
         <p>TCP connections followed with eBPF.</p>\
         <ul><li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/healthz\">/healthz</a></li>\
         <li><a href=\"/sockets?older_than=10s\">/sockets</a> (state, port, older_than, limit)</li></ul>",
    )
}

async fn healthz(State(state): State<AppState>) -> Response {
    if state.health.alive() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "event reader stalled or probe detached\n",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let _ = take_census(&state).await;
    match Metrics::encode(&state.registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// Default and largest `limit` of `/sockets`.
const SOCKETS_LIMIT: usize = 100;
const SOCKETS_MAX_LIMIT: usize = 10_000;

/// `GET /sockets?state=close_wait&port=8080&older_than=30s&limit=50`: sockets of every
/// namespace, oldest first, as JSON.
async fn sockets(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let filter = match SocketFilter::from_query(&q) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let Some(snap) = take_census(&state).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "socket census failed; see the agent's log\n",
        )
            .into_response();
    };
    let body = filter.render(&snap);
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The query of `/sockets`.
#[derive(Debug, Default)]
pub struct SocketFilter {
    pub states: Vec<u8>,
    pub port: Option<u16>,
    pub older_than: Option<Duration>,
    pub limit: usize,
}

impl SocketFilter {
    /// Reads the query parameters; an error names the bad one.
    pub fn from_query(q: &HashMap<String, String>) -> Result<SocketFilter, String> {
        let mut f = SocketFilter {
            limit: SOCKETS_LIMIT,
            ..Default::default()
        };
        if let Some(states) = q.get("state") {
            for name in states.split(',').filter(|s| !s.is_empty()) {
                f.states
                    .push(parse_state(name).ok_or_else(|| format!("unknown state {name:?}"))?);
            }
        }
        if let Some(p) = q.get("port") {
            f.port = Some(
                p.parse()
                    .map_err(|_| format!("port {p:?} is not a port number"))?,
            );
        }
        if let Some(d) = q.get("older_than") {
            f.older_than = Some(crate::cli::parse_duration(d)?);
        }
        if let Some(l) = q.get("limit") {
            let n: usize = l
                .parse()
                .map_err(|_| format!("limit {l:?} is not a number"))?;
            f.limit = n.clamp(1, SOCKETS_MAX_LIMIT);
        }
        Ok(f)
    }

    /// The matching sockets, oldest first (unknown ages last), and the busiest destinations.
    pub fn render(&self, snap: &Snapshot) -> serde_json::Value {
        let mut matched: Vec<&SocketView> = snap
            .sockets
            .iter()
            .filter(|s| self.states.is_empty() || self.states.contains(&s.state))
            .filter(|s| {
                self.port
                    .is_none_or(|p| s.local.port() == p || s.remote.port() == p)
            })
            .filter(|s| {
                self.older_than
                    .is_none_or(|d| s.age.is_some_and(|a| a >= d))
            })
            .collect();
        matched.sort_by_key(|s| std::cmp::Reverse(s.age));
        let total = matched.len();
        let sockets: Vec<serde_json::Value> = matched
            .into_iter()
            .take(self.limit)
            .map(|s| {
                serde_json::json!({
                    "state": state_name(s.state),
                    "age_seconds": s.age.map(|a| a.as_secs_f64()),
                    "age_is_lower_bound": matches!(s.age_source, AgeSource::AgentStart | AgeSource::SynAckTimer),
                    "age_source": s.age_source.name(),
                    "local_addr": s.local.ip().to_string(),
                    "local_port": s.local.port(),
                    "remote_addr": s.remote.ip().to_string(),
                    "remote_port": s.remote.port(),
                    "service_port": s.port,
                    "pid": s.pid,
                    "comm": crate::stuck::comm_string(&s.comm),
                    "netns": s.netns,
                    "stuck": s.stuck.is_some(),
                    "reason": s.stuck,
                })
            })
            .collect();
        let destinations: Vec<serde_json::Value> = snap
            .destinations
            .iter()
            .map(|d| {
                serde_json::json!({
                    "netns": d.netns,
                    "local_addr": d.local_ip.to_string(),
                    "remote_addr": d.remote.ip().to_string(),
                    "remote_port": d.remote.port(),
                    "ephemeral_ports_used": d.used,
                    "ephemeral_port_range": d.range,
                    "utilization": d.utilization(),
                })
            })
            .collect();
        serde_json::json!({
            "total": total,
            "sockets": sockets,
            "busiest_destinations": destinations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_fails_when_the_reader_stops_draining() {
        let h = Health::default();
        assert!(!h.alive_at(1_000), "not alive before the first drain");
        h.beat_at(1_000);
        assert!(h.alive_at(1_000 + 4_999));
        assert!(!h.alive_at(1_000 + 5_000), "5 s without a drain is a stall");
        h.beat_at(7_000);
        assert!(h.alive_at(7_010));
    }
}
