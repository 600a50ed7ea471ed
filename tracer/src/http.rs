//! The agent's HTTP endpoints: `/metrics` (Prometheus text format), `/healthz`, and `/`.
//!
//! Owns: routing and the scrape (census, then encode). Does not own: what the metrics mean
//! (`metrics`) or how the census is taken (`census`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{IntCounter, IntGaugeVec, Registry};

use crate::metrics::Metrics;

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
        self.last_drain_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// True when the reader drained recently.
    pub fn alive(&self) -> bool {
        let last = self.last_drain_ms.load(Ordering::Relaxed);
        last != 0 && now_ms().saturating_sub(last) < HEALTH_TIMEOUT.as_millis() as u64
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub sockets: IntGaugeVec,
    pub census_errors: IntCounter,
    pub health: Arc<Health>,
}

/// Serves until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state);
    axum::serve(listener, app).await
}

async fn index() -> Html<&'static str> {
    Html(
        "<!doctype html><title>tracer</title><h1>tracer</h1>\
         <p>TCP connections followed with eBPF.</p>\
         <ul><li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/healthz\">/healthz</a></li></ul>",
    )
}

async fn healthz(State(state): State<AppState>) -> Response {
    if state.health.alive() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "event reader stalled or probe detached\n").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    // The census is a netlink dump: run it off the event loop. A failed census is counted and
    // the scrape goes on with the rest.
    match tokio::task::spawn_blocking(crate::census::dump_tcp).await {
        Ok(Ok(records)) => Metrics::set_census(&state.sockets, &crate::census::count_by_state(&records)),
        Ok(Err(e)) => {
            state.census_errors.inc();
            eprintln!("tracer: socket census failed: {e:#}");
        }
        Err(_) => state.census_errors.inc(),
    }
    match Metrics::encode(&state.registry) {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
    }
}
