//! The agent's HTTP endpoints: `/metrics` (Prometheus text format), `/sockets`, `/healthz`
//! and `/`, served on a thread of their own.
//!
//! Owns: routing, and the HTTP thread. Does not own: what the metrics mean (`*_metrics`), the
//! listing (`listing`), or the census (`scrape`): every request reads the last published
//! census, so no request waits for a census or starts one, and concurrent requests share it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use tokio::sync::Semaphore;

use crate::listing::SocketFilter;
use crate::scrape::Published;

/// How long the event reader may be silent before `/healthz` says 503. It drains every 10 ms,
/// so this is only exceeded when the agent is stuck.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the server waits for the first census before it answers anyway.
const FIRST_CENSUS_WAIT: Duration = Duration::from_secs(30);

/// `/sockets` renderings at once: each sorts up to every socket of the host.
const HEAVY_REQUESTS: usize = 2;

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

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub health: Arc<Health>,
    pub published: Arc<Published>,
    pub heavy: Arc<Semaphore>,
}

/// Serves on a new thread with its own runtime, once the first census is published (so that
/// the first scrape has every series), until the process ends. An error that stops the server
/// is sent on `failed`.
pub fn spawn(
    listener: std::net::TcpListener,
    registry: Registry,
    health: Arc<Health>,
    published: Arc<Published>,
    failed: tokio::sync::oneshot::Sender<std::io::Error>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let state = AppState {
        registry,
        health,
        published,
        heavy: Arc::new(Semaphore::new(HEAVY_REQUESTS)),
    };
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let waited = Instant::now();
            while state.published.latest().is_none()
                && state.published.errors.load(Ordering::Relaxed) == 0
                && waited.elapsed() < FIRST_CENSUS_WAIT
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|rt| rt.block_on(serve(listener, state)));
            if let Err(e) = result {
                let _ = failed.send(e);
            }
        })?;
    Ok(())
}

async fn serve(listener: std::net::TcpListener, state: AppState) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
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
    match crate::event_metrics::encode(&state.registry) {
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

/// `GET /sockets?state=close_wait&port=8080&older_than=30s&limit=50`: sockets of every
/// namespace at the last census, oldest first, as JSON (`listing::Listing`).
async fn sockets(
    State(state): State<AppState>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let filter = match SocketFilter::from_query(&q) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let Some(report) = state.published.latest() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no socket census yet; see the agent's log\n",
        )
            .into_response();
    };
    let Ok(_permit) = state.heavy.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let listing = filter.render(&report, crate::ring::monotonic_ns());
    match serde_json::to_string(&listing) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
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
