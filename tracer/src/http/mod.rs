//! The agent's HTTP endpoints: `/metrics` (Prometheus text format), `/sockets`, `/healthz`
//! and `/`, served on a thread of their own, over TLS and with basic authentication when the
//! web configuration file asks for them (`web_config`).
//!
//! Owns: routing, who may read what, the bounds on connections, and the HTTP thread. Does not
//! own: what the metrics mean (`*_metrics`), the listing (`listing`), or the census
//! (`scrape`): every request reads the last published census, so no request waits for a
//! census or starts one, and concurrent requests share it.
//!
//! Bounds, so that no client can starve `/healthz` or grow the agent's memory:
//! - at most [`MAX_CONNECTIONS`] connections; a new one past it makes the oldest give way
//!   (it has [`GIVE_WAY_GRACE`] to finish what it is sending, and a request it sends
//!   meanwhile is answered 503 with `Retry-After`, `/healthz` excepted), and so does running
//!   out of file descriptors: a liveness probe always gets in;
//! - every answer's bytes, from rendering until freed, count against a budget
//!   (`limits`), and a write that makes no progress for its timeout closes the
//!   connection: a client that never reads holds a bounded amount, for a bounded time;
//! - a request's headers must arrive within [`HEADER_TIMEOUT`], which also closes a kept-alive
//!   connection that sends nothing for that long (slowloris, idle clients);
//! - a TLS handshake must end within [`HEADER_TIMEOUT`];
//! - `/sockets` renderings run off the server thread, [`HEAVY_REQUESTS`] at a time; so do
//!   password checks (bcrypt), [`PASSWORD_CHECKS`] at a time.

pub mod limits;
pub mod web_config;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::http::{header, HeaderName, HeaderValue, Request, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore};
use tower::Service as _;

use crate::census::listing::{SocketFilter, MAX_BODY_BYTES, RENDER_BYTES_PER_SOCKET};
use crate::census::scrape::Published;
use crate::http::limits::{Budget, Deadline, Refusals, METRICS_BUDGET, SOCKETS_BUDGET};
use crate::http::web_config::WebConfig;

/// How long the event reader may be silent before `/healthz` says 503. It drains every 10 ms,
/// so this is only exceeded when the agent is stuck.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the server waits for the first census before it answers anyway.
const FIRST_CENSUS_WAIT: Duration = Duration::from_secs(30);

/// `/sockets` renderings at once: each sorts up to every socket of the host.
const HEAVY_REQUESTS: usize = 2;

/// Connections served at once (each holds a few KiB of buffers).
pub const MAX_CONNECTIONS: usize = 256;

/// Time a client has to send a request's headers, or a TLS handshake to end; a kept-alive
/// connection that sends no new request for this long is closed too.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// bcrypt checks of unknown credentials at once (each about 50 ms of CPU at cost 10).
const PASSWORD_CHECKS: usize = 2;

/// How long a connection that gave way to a newer one may go on (finishing an answer).
pub const GIVE_WAY_GRACE: Duration = Duration::from_secs(2);

/// Largest buffer hyper keeps for a connection's request (headers included; the smallest it
/// takes): a request past it is refused with 431.
const READ_BUFFER: usize = 16 << 10;

/// Proof of life of the event reader: when it last drained the ring buffer.
#[derive(Default)]
pub struct Health {
    last_drain_ms: AtomicU64,
    /// `/metrics` requests so far, counted before each gathers: the event path's held samples
    /// of ports without a label value go to `other` once a scrape has passed them
    /// (`metrics::event`).
    pub scrapes: Arc<AtomicU64>,
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
    crate::stream::ring::monotonic_ns() / 1_000_000
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub health: Arc<Health>,
    pub published: Arc<Published>,
    pub heavy: Arc<Semaphore>,
    pub sockets_budget: Budget,
    /// The event thread's last `tracer top` snapshot.
    pub top: Arc<crate::top::Latest>,
    pub metrics_budget: Budget,
    /// The size of the last `/metrics` answer, to reserve the next one by.
    pub metrics_size: Arc<AtomicU64>,
    pub refusals: Refusals,
}

/// Serves on a new thread with its own runtime, once the first census is published (so that
/// the first scrape has every series), until the process ends. An error that stops the server
/// is sent on `failed`.
pub fn spawn(
    listener: std::net::TcpListener,
    web: WebConfig,
    registry: Registry,
    health: Arc<Health>,
    published: Arc<Published>,
    top: Arc<crate::top::Latest>,
    failed: tokio::sync::oneshot::Sender<std::io::Error>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let (held, refusals) =
        crate::http::limits::register(&registry).map_err(std::io::Error::other)?;
    let state = AppState {
        registry,
        health,
        published,
        heavy: Arc::new(Semaphore::new(HEAVY_REQUESTS)),
        sockets_budget: Budget::new(SOCKETS_BUDGET, held.clone()),
        top,
        metrics_budget: Budget::new(METRICS_BUDGET, held),
        metrics_size: Arc::new(AtomicU64::new(0)),
        refusals,
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
                .max_blocking_threads(PASSWORD_CHECKS + HEAVY_REQUESTS)
                .build()
                .and_then(|rt| rt.block_on(serve(listener, web, state)));
            if let Err(e) = result {
                let _ = failed.send(e);
            }
        })?;
    Ok(())
}

/// True for this host's loopback addresses, also as a dual-stack listener (`[::]:PORT`) sees
/// IPv4 clients: `::ffff:127.0.0.1`.
fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// What the server knows of a request's client, for [`authorize`] (and, in the request's
/// extensions, for the handlers of heavy answers).
#[derive(Clone, Copy)]
struct Client {
    loopback: bool,
    /// A client certificate verified against the configured CA was presented.
    certified: bool,
    /// Its TCP socket, open for as long as its connection is served (which outlasts every
    /// request on it).
    fd: std::os::fd::RawFd,
}

impl Client {
    /// True when the client has closed or reset its connection: what is left to read is the
    /// end. A request waiting its turn for a heavy answer is then not worth rendering (a
    /// client that gave up is not served a `/sockets` of the whole host; a crowd of them
    /// would delay every live client's turn for as long as their renderings take).
    fn gone(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: recv into one byte we own, on a descriptor the connection keeps open;
        // MSG_PEEK leaves what it sees for hyper.
        let n = unsafe {
            libc::recv(
                self.fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => true,
            n if n > 0 => false,
            _ => !matches!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EAGAIN | libc::EINTR)
            ),
        }
    }
}

/// The open connections, oldest first, each with the signal that makes it give way, and
/// those giving way (at most [`MAX_CONNECTIONS`] more: past that, the oldest of them closes at
/// once, so a flood of new connections cannot pile them up).
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, Arc<GiveWay>>,
    leaving: BTreeMap<u64, Arc<GiveWay>>,
}

/// Tells a connection that it is past the connection limit, and then that its time is up.
#[derive(Default)]
struct GiveWay {
    notify: Notify,
    told: std::sync::atomic::AtomicBool,
    now: Notify,
}

impl GiveWay {
    fn told(&self) -> bool {
        self.told.load(Ordering::Relaxed)
    }
}

impl Connections {
    /// Registers a new connection; past `MAX_CONNECTIONS`, tells the oldest to give way.
    fn add(&mut self) -> (u64, Arc<GiveWay>) {
        if self.open.len() >= MAX_CONNECTIONS {
            self.give_way();
        }
        let id = self.next;
        self.next += 1;
        let slot = Arc::new(GiveWay::default());
        self.open.insert(id, slot.clone());
        (id, slot)
    }

    /// Tells the oldest connection to finish within [`GIVE_WAY_GRACE`] and answer 503 to any
    /// request it has not begun answering.
    fn give_way(&mut self) {
        if let Some((id, oldest)) = self.open.pop_first() {
            oldest.told.store(true, Ordering::Relaxed);
            oldest.notify.notify_one();
            self.leaving.insert(id, oldest);
        }
        if self.leaving.len() > MAX_CONNECTIONS {
            self.close_one_leaving();
        }
    }

    /// Out of file descriptors: one is freed now (a connection giving way, else the oldest).
    fn free_one(&mut self) {
        if !self.close_one_leaving() {
            self.give_way();
            self.close_one_leaving();
        }
    }

    /// Closes the oldest connection that is giving way, if there is one.
    fn close_one_leaving(&mut self) -> bool {
        match self.leaving.pop_first() {
            Some((_, oldest)) => {
                oldest.now.notify_one();
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, id: u64) {
        self.open.remove(&id);
        self.leaving.remove(&id);
    }
}

async fn serve(
    listener: std::net::TcpListener,
    web: WebConfig,
    state: AppState,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/sockets", get(sockets))
        .route("/top", get(top))
        .with_state(state.clone());
    let state_refusals = state.refusals.clone();
    let tls = web.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let web = Arc::new(web);
    let checks = Arc::new(Semaphore::new(PASSWORD_CHECKS));
    let connections = Arc::new(Mutex::new(Connections::default()));
    let refusals = state_refusals;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors (or another transient failure): free one and retry,
            // so that the next liveness probe gets in.
            Err(_) => {
                if let Ok(mut c) = connections.lock() {
                    c.free_one();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok((id, give_way)) = connections.lock().map(|mut c| c.add()) else {
            continue;
        };
        let (app, tls, web, checks, connections) = (
            app.clone(),
            tls.clone(),
            web.clone(),
            checks.clone(),
            connections.clone(),
        );
        // What a client that stops reading holds in the kernel, charged to the agent's
        // memory cgroup, stays small (a failure only leaves the kernel's default).
        let _ =
            socket2::SockRef::from(&stream).set_send_buffer_size(crate::http::limits::SEND_BUFFER);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let stream = Deadline::new(stream, refusals.write_timeout.clone());
        let refused = refusals.connections.clone();
        tokio::spawn(async move {
            let loopback = is_loopback(peer.ip());
            match tls {
                None => {
                    let client = Client {
                        loopback,
                        certified: false,
                        fd,
                    };
                    connection(stream, client, app, web, checks, &give_way, refused).await;
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream));
                    let stream = tokio::select! {
                        done = handshake => done.ok().and_then(Result::ok),
                        _ = give_way.notify.notified() => None,
                        _ = give_way.now.notified() => None,
                    };
                    if let Some(stream) = stream {
                        let certified = stream.get_ref().1.peer_certificates().is_some();
                        let client = Client {
                            loopback,
                            certified,
                            fd,
                        };
                        connection(stream, client, app, web, checks, &give_way, refused).await;
                    }
                }
            }
            if let Ok(mut c) = connections.lock() {
                c.remove(id);
            }
        });
    }
}

/// Serves HTTP/1.1 on one connection until the client closes it, a timeout, or
/// [`GIVE_WAY_GRACE`] after `give_way`.
async fn connection<S>(
    stream: S,
    client: Client,
    app: Router,
    web: Arc<WebConfig>,
    checks: Arc<Semaphore>,
    give_way: &Arc<GiveWay>,
    refused: prometheus::IntCounter,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let told = give_way.clone();
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let (mut app, web, checks) = (app.clone(), web.clone(), checks.clone());
        let (told, refused) = (told.clone(), refused.clone());
        async move {
            let past_limit = told.told();
            let mut response = if past_limit && request.uri().path() != "/healthz" {
                refused.inc();
                busy("too many connections to the agent")
            } else {
                match authorize(&request, client, &web, &checks).await {
                    Ok(()) => {
                        let mut request = request.map(Body::new);
                        request.extensions_mut().insert(client);
                        app.call(request).await?
                    }
                    Err(refusal) => refusal,
                }
            };
            if past_limit {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            for (name, value) in &web.headers {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::try_from(name.as_str()),
                    HeaderValue::try_from(value.as_str()),
                ) {
                    response.headers_mut().insert(n, v);
                }
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(READ_BUFFER);
    let conn = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = give_way.notify.notified() => {}
    }
    // Not hyper's graceful shutdown: it closes a connection whose request has not arrived
    // yet, which its client sees as an empty reply. Its request is answered 503 instead.
    tokio::select! {
        _ = tokio::time::timeout(GIVE_WAY_GRACE, conn) => {}
        _ = give_way.now.notified() => {}
    }
}

/// 503 with `Retry-After: 1`, saying why.
fn busy(why: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "1")],
        format!("{why}: retry in a second\n"),
    )
        .into_response()
}

/// Who may read what:
/// - `/healthz` and `/`: anyone who reaches the port (a liveness probe carries no password);
/// - `/metrics`: with `basic_auth_users` configured, only a user with its password;
/// - `/sockets` (every process's sockets, pids and names, in every namespace: more than `ss`
///   shows an unprivileged user) and `/top` (every process's connections, by pid and name):
///   as `/metrics`, and besides only a client that proved who it is (a password or a
///   verified client certificate) or one on loopback.
async fn authorize(
    request: &Request<hyper::body::Incoming>,
    client: Client,
    web: &WebConfig,
    checks: &Arc<Semaphore>,
) -> Result<(), Response> {
    let path = request.uri().path();
    if path == "/healthz" || path == "/" {
        return Ok(());
    }
    let mut authenticated = client.certified;
    if !web.users.is_empty() {
        let header = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let users = web.users.clone();
        let ok = match checks.clone().acquire_owned().await {
            Ok(permit) => tokio::task::spawn_blocking(move || {
                let _permit = permit;
                users.check(header.as_deref())
            })
            .await
            .unwrap_or(false),
            Err(_) => false,
        };
        if !ok {
            return Err((
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"tracer\"")],
                "a user and password of --web-config's basic_auth_users are needed\n",
            )
                .into_response());
        }
        authenticated = true;
    }
    if (path == "/sockets" || path == "/top") && !authenticated && !client.loopback {
        return Err((
            StatusCode::FORBIDDEN,
            "/sockets and /top list every process's connections: ask from this host's loopback \
             (127.0.0.1 or ::1), or configure basic_auth_users or client certificates in \
             --web-config\n",
        )
            .into_response());
    }
    Ok(())
}

async fn index() -> Html<&'static str> {
    Html(
        "<!doctype html><title>tracer</title><h1>tracer</h1>\
         <p>TCP connections followed with eBPF.</p>\
         <ul><li><a href=\"/metrics\">/metrics</a></li><li><a href=\"/healthz\">/healthz</a></li>\
         <li><a href=\"/sockets?older_than=10s\">/sockets</a> (state, port, older_than, limit)</li>\
         <li><a href=\"/top\">/top</a> (what <code>tracer top --agent</code> reads)</li></ul>",
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
    // Encoding takes about three times the text it makes (the gathered families, the text).
    let last = state.metrics_size.load(Ordering::Relaxed) as usize;
    let Some(held) = state.metrics_budget.reserve(3 * last.max(64 << 10)).await else {
        state.refusals.memory.inc();
        return busy("the agent's answers to slow clients fill its /metrics memory budget");
    };
    state.health.scrapes.fetch_add(1, Ordering::Relaxed);
    match crate::metrics::event::encode(&state.registry) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            {
                state
                    .metrics_size
                    .store(body.len() as u64, Ordering::Relaxed);
                held.into_body(body.into_bytes())
            },
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
    Extension(client): Extension<Client>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let filter = match SocketFilter::from_query(&q) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let Some(report) = state.published.latest() else {
        let why = match state.published.failure() {
            Some((_, text)) => format!("no socket census yet: {text}\n"),
            None => "no socket census yet: the first one is under way\n".to_owned(),
        };
        return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
    };
    let rendering = MAX_BODY_BYTES + RENDER_BYTES_PER_SOCKET * report.joined.sockets.len();
    heavy(&state, client, rendering, move || {
        filter.render_json(&report, crate::stream::ring::monotonic_ns(), MAX_BODY_BYTES)
    })
    .await
}

/// A heavy JSON answer (`/sockets`, `/top`): at most [`HEAVY_REQUESTS`] at a time, none for a
/// client that has gone by its turn, `reserve` bytes of the answer budget held until the
/// answer is freed, and rendered off the server thread (a rendering over many sockets takes
/// tens of milliseconds, which `/healthz` and `/metrics` must not wait behind).
async fn heavy(
    state: &AppState,
    client: Client,
    reserve: usize,
    render: impl FnOnce() -> Vec<u8> + Send + 'static,
) -> Response {
    let Ok(_permit) = state.heavy.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    if client.gone() {
        return gone(state);
    }
    let Some(held) = state.sockets_budget.reserve(reserve).await else {
        state.refusals.memory.inc();
        return busy(
            "the agent's answers to slow clients fill its /sockets and /top memory budget",
        );
    };
    let Ok(body) = tokio::task::spawn_blocking(render).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        held.into_body(body),
    )
        .into_response()
}

/// The answer to a client that left while its request waited: counted, and never read.
fn gone(state: &AppState) -> Response {
    state.refusals.client_gone.inc();
    (StatusCode::SERVICE_UNAVAILABLE, "the client has gone\n").into_response()
}

/// `GET /top`: the event thread's last snapshot for `tracer top --agent`, as JSON.
async fn top(State(state): State<AppState>, Extension(client): Extension<Client>) -> Response {
    let Some(snapshot) = state.top.ask(crate::stream::ring::monotonic_ns()) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "the agent starts counting for /top at the first request: retry in a second\n",
        )
            .into_response();
    };
    // About 400 bytes an entry.
    let rendering = 512 * (snapshot.entries.len() + 1);
    heavy(&state, client, rendering, move || {
        // Plain structs, numbers and strings: their serialization cannot fail.
        serde_json::to_vec(&*snapshot).unwrap_or_default()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_gone_once_it_closed_or_reset_and_not_while_it_waits_or_sends() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = |fd| Client {
            loopback: true,
            certified: false,
            fd,
        };
        // Waiting, then sending more (a pipelined request): still there.
        let mut waiting = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (served, _) = listener.accept().unwrap();
        assert!(!at(served.as_raw_fd()).gone());
        waiting.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!at(served.as_raw_fd()).gone());
        // Closed: the end, once what it sent is read (here: not read, so not yet the end).
        drop(waiting);
        std::thread::sleep(Duration::from_millis(50));
        let mut rest = [0u8; 64];
        let _ = std::io::Read::read(&mut &served, &mut rest).unwrap();
        assert!(at(served.as_raw_fd()).gone());
        // Reset (closed with unread data): gone too.
        let reset = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut served, _) = listener.accept().unwrap();
        served.write_all(b"unread").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(reset);
        std::thread::sleep(Duration::from_millis(50));
        assert!(at(served.as_raw_fd()).gone());
    }

    #[test]
    fn the_oldest_gives_way_and_those_giving_way_stay_bounded() {
        let mut c = Connections::default();
        let slots: Vec<_> = (0..MAX_CONNECTIONS * 3).map(|_| c.add()).collect();
        assert_eq!(
            (c.open.len(), c.leaving.len()),
            (MAX_CONNECTIONS, MAX_CONNECTIONS)
        );
        // The first 256 were told, then closed at once as the next 256 were told.
        assert!(slots[..2 * MAX_CONNECTIONS].iter().all(|(_, s)| s.told()));
        assert!(slots[2 * MAX_CONNECTIONS..].iter().all(|(_, s)| !s.told()));
        assert_eq!(
            c.leaving.first_key_value().map(|(id, _)| *id),
            Some(MAX_CONNECTIONS as u64)
        );
        c.free_one();
        assert_eq!(c.leaving.len(), MAX_CONNECTIONS - 1);
        for (id, _) in &slots {
            c.remove(*id);
        }
        assert!(c.open.is_empty() && c.leaving.is_empty());
    }

    #[test]
    fn loopback_is_loopback_through_ipv4_mapped_addresses() {
        for (ip, want) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:127.9.9.9", true),
            ("::ffff:10.231.0.2", false),
            ("10.231.0.2", false),
            ("::", false),
        ] {
            assert_eq!(is_loopback(ip.parse().unwrap()), want, "{ip}");
        }
    }

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
