//! What the HTTP side may hold for its clients, whatever they do: a budget of bytes for the
//! answers it renders and has not yet sent ([`Budget`]), and a deadline on each write, so a
//! client that stops reading lets go of what it holds ([`Deadline`]).
//!
//! Owns: the accounting. An answer's bytes are reserved before it is rendered (its largest
//! size plus what rendering takes), cut to what it really holds once rendered, and given back
//! only when the last byte of it is freed: the body is a [`Bytes`] that owns the reservation,
//! so bytes hyper still has queued for a slow client stay counted. A request that finds no
//! room within [`RESERVE_WAIT`] is answered 503 with `Retry-After`. Does not own: routing or
//! who may read what (`http`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of `/sockets` answers held at once (rendering and unsent alike): four answers of the
/// largest size (`listing::MAX_BODY_BYTES`), or one rendering over a million sockets.
pub const SOCKETS_BUDGET: usize = 32 << 20;

/// Bytes of `/metrics` answers held at once: its own budget, so that `/sockets` clients never
/// keep Prometheus out.
pub const METRICS_BUDGET: usize = 16 << 20;

/// How long a request waits for room in its budget before it is answered 503.
pub const RESERVE_WAIT: Duration = Duration::from_secs(1);

/// How long a write to a client may make no progress before the connection is closed (and
/// what it held freed): a client that stops reading.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The kernel send buffer of each connection (`SO_SNDBUF`; the kernel doubles it): what a
/// client that stops reading holds in the kernel, charged to the agent's memory cgroup. The
/// default autotuning lets it grow to `tcp_wmem`'s maximum, 4 MiB.
pub const SEND_BUFFER: usize = 64 << 10;

/// Bytes reserved for answers, up to a total.
#[derive(Clone)]
pub struct Budget {
    room: Arc<Semaphore>,
    total: usize,
    held: IntGauge,
}

impl Budget {
    pub fn new(total: usize, held: IntGauge) -> Budget {
        Budget {
            room: Arc::new(Semaphore::new(total)),
            total,
            held,
        }
    }

    /// Reserves `bytes` (at most the whole budget), waiting up to [`RESERVE_WAIT`] for room;
    /// None when there is none.
    pub async fn reserve(&self, bytes: usize) -> Option<Held> {
        let n = u32::try_from(bytes.clamp(1, self.total)).unwrap_or(u32::MAX);
        let wanted = self.room.clone().acquire_many_owned(n);
        let permit = tokio::time::timeout(RESERVE_WAIT, wanted)
            .await
            .ok()?
            .ok()?;
        self.held.add(permit.num_permits() as i64);
        Some(Held {
            permit,
            held: self.held.clone(),
        })
    }
}

/// A reservation: given back when dropped.
pub struct Held {
    permit: OwnedSemaphorePermit,
    held: IntGauge,
}

impl Held {
    /// Gives back all but `bytes` of the reservation (never grows it).
    pub fn shrink_to(&mut self, bytes: usize) {
        let extra = self.permit.num_permits().saturating_sub(bytes.max(1));
        if let Some(given_back) = self.permit.split(extra) {
            self.held.sub(given_back.num_permits() as i64);
        }
    }

    /// `data` as an answer's body that keeps the reservation, cut to the buffer's capacity,
    /// until its last byte is freed.
    pub fn into_body(mut self, data: Vec<u8>) -> Bytes {
        self.shrink_to(data.capacity());
        Bytes::from_owner(Owned { data, _held: self })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held.sub(self.permit.num_permits() as i64);
    }
}

/// A body's bytes and the reservation they are counted in.
struct Owned {
    data: Vec<u8>,
    _held: Held,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// Why the HTTP side refused or cut a client, counted in `tracer_http_refused_total{reason}`.
#[derive(Clone)]
pub struct Refusals {
    pub memory: prometheus::IntCounter,
    pub connections: prometheus::IntCounter,
    pub write_timeout: prometheus::IntCounter,
    /// `/sockets` and `/top` requests not answered: their client had gone when their turn
    /// came.
    pub client_gone: prometheus::IntCounter,
}

/// The HTTP side's own metrics: bytes held now, and refusals by reason (every series from the
/// first scrape).
pub fn register(registry: &Registry) -> prometheus::Result<(IntGauge, Refusals)> {
    let held = IntGauge::new(
        "tracer_http_held_bytes",
        "Bytes of answers the agent's HTTP server holds now, rendering or not yet sent, within \
         its budgets.",
    )?;
    let refused = IntCounterVec::new(
        Opts::new(
            "tracer_http_refused_total",
            "Requests answered 503 (memory: no room in the answer budget within 1 s; \
             connections: past the connection limit), connections closed because the \
             client read nothing for 10 s (write_timeout), and /sockets and /top requests \
             not rendered because their client had gone when their turn came \
             (client_gone).",
        ),
        &["reason"],
    )?;
    registry.register(Box::new(held.clone()))?;
    registry.register(Box::new(refused.clone()))?;
    let refusals = Refusals {
        memory: refused.with_label_values(&["memory"]),
        connections: refused.with_label_values(&["connections"]),
        write_timeout: refused.with_label_values(&["write_timeout"]),
        client_gone: refused.with_label_values(&["client_gone"]),
    };
    Ok((held, refusals))
}

/// A stream whose writes fail with `TimedOut` once one has made no progress for
/// [`WRITE_TIMEOUT`]; reads pass through.
pub struct Deadline<S> {
    inner: S,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    timeouts: prometheus::IntCounter,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, timeouts: prometheus::IntCounter) -> Self {
        Deadline {
            inner,
            stalled: None,
            timeouts,
        }
    }

    /// What a write (or flush) that returned `poll` means, with the deadline applied.
    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        ready!(sleep.as_mut().poll(cx));
        self.timeouts.inc();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing for 10 s",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn bytes_stay_counted_until_the_last_copy_of_the_body_is_freed() {
        let gauge = IntGauge::new("held", "held").unwrap();
        let budget = Budget::new(1000, gauge.clone());
        let mut a = budget.reserve(800).await.unwrap();
        assert_eq!(gauge.get(), 800);
        assert!(
            budget.reserve(300).await.is_none(),
            "no room: refused after the wait"
        );
        a.shrink_to(100);
        assert_eq!(gauge.get(), 100);
        let body = a.into_body(vec![7; 150]);
        assert_eq!(gauge.get(), 100, "a reservation is never grown");
        let queued = body.clone();
        drop(body);
        let b = budget.reserve(850).await.unwrap();
        assert_eq!(gauge.get(), 950);
        assert_eq!(&queued[..2], &[7, 7]);
        drop(queued);
        assert_eq!(gauge.get(), 850, "given back with the last copy");
        drop(b);
        assert_eq!(gauge.get(), 0);
        let whole = budget.reserve(5000).await.unwrap();
        assert_eq!(gauge.get(), 1000, "at most the whole budget");
        drop(whole);
    }
}
