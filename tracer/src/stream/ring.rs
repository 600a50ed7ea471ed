//! The probe's per-CPU ring buffers, read as one stream in kernel time order.
//!
//! Owns: waiting for any ring (one epoll set, registered with tokio), draining them, and the
//! merge. Does not own: creating the rings (`probe`) or what the events mean.
//!
//! Each CPU writes its own ring, so a socket's transitions can sit in two rings (a connect on
//! one CPU, the answer processed on another). The agent needs no order across them (each event
//! is complete: [`EventRings::drain_unordered`]); `watch`, whose lines people read in time
//! order, does: [`EventRings::drain`] collects every ring, sorts by kernel timestamp, and
//! hands over only events older than [`HOLD_BACK_NS`]: a CPU that was still writing an
//! earlier event when the rings were read has committed it by then.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::io::{unix::AsyncFd, Interest};

use crate::stream::event::{self, Transition};

/// How long an event waits before it is handed over, so that events of other CPUs stamped
/// earlier are read first. The probe commits an event within microseconds of stamping it.
pub const HOLD_BACK_NS: u64 = 2_000_000;

/// Every CPU's ring, and the events read but not yet handed over.
pub struct EventRings {
    rings: Vec<RingBuf<MapData>>,
    /// An epoll set of every ring, readable when the probe woke any of them.
    ready: AsyncFd<OwnedFd>,
    /// Read, not yet handed over.
    pending: Pending,
}

impl EventRings {
    /// Takes the rings (one per CPU) and registers them with the current tokio runtime.
    pub fn new(rings: Vec<RingBuf<MapData>>) -> Result<EventRings> {
        // SAFETY: epoll_create1 has no preconditions; the result is checked before use.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error()).context("creating an epoll set");
        }
        // SAFETY: a new descriptor that nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        for (i, ring) in rings.iter().enumerate() {
            let mut interest = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: both descriptors are open; `interest` is a valid epoll_event.
            let rc = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    ring.as_raw_fd(),
                    &mut interest,
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error())
                    .context("adding a ring buffer to epoll");
            }
        }
        // SAFETY: `epoll` is owned by the AsyncFd, which keeps it open while it is registered.
        let ready = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }
            .map_err(std::io::Error::from)
            .context("registering the ring buffers with tokio")?;
        Ok(EventRings {
            rings,
            ready,
            pending: Pending::default(),
        })
    }

    /// Waits until the probe wakes the reader (a ring is a quarter full). Drain on a short
    /// timer as well: the probe wakes nobody below that.
    pub async fn woken(&self) -> Result<()> {
        let mut guard = self
            .ready
            .readable()
            .await
            .context("waiting for the ring buffers")?;
        // Empty the epoll set's ready list; the rings themselves are drained by the caller.
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: `events` has room for the 8 entries that epoll_wait may write.
        unsafe { libc::epoll_wait(self.ready.get_ref().as_raw_fd(), events.as_mut_ptr(), 8, 0) };
        guard.clear_ready();
        Ok(())
    }

    /// Reads every ring and hands `f` the events older than [`HOLD_BACK_NS`] (all of them
    /// when `flush`), oldest first; `f` returns false to stop early (the rest are dropped).
    /// Returns the cutoff: every event stamped up to it has been handed over.
    ///
    /// The cutoff is taken before the rings are read: an event stamped before it was
    /// committed (within microseconds of its stamp) before the reading began, so it is read
    /// now, however long reading the rings takes. A cutoff taken after reading could pass an
    /// event that a CPU committed to a ring already read, and it would come out of order.
    pub fn drain(&mut self, flush: bool, f: impl FnMut(&Transition) -> bool) -> u64 {
        let cutoff = if flush {
            u64::MAX
        } else {
            monotonic_ns().saturating_sub(HOLD_BACK_NS)
        };
        for ring in &mut self.rings {
            while let Some(item) = ring.next() {
                if let Some(t) = event::decode(&item) {
                    self.pending.events.push(t);
                }
            }
        }
        self.pending.hand_over(cutoff, f);
        cutoff
    }
}

impl EventRings {
    /// Reads every ring and hands `f` each event as it comes, ring by ring: for a reader that
    /// needs no order across CPUs (each event is complete in itself). Returns how many.
    pub fn drain_unordered(&mut self, mut f: impl FnMut(&Transition)) -> u64 {
        let mut n = 0;
        for ring in &mut self.rings {
            while let Some(item) = ring.next() {
                if let Some(t) = event::decode(&item) {
                    f(&t);
                    n += 1;
                }
            }
        }
        n
    }
}

/// Events read but not handed over, with the buffers that order them. Every buffer is reused:
/// no allocation per event once they have grown.
#[derive(Default)]
struct Pending {
    events: Vec<Transition>,
    /// (time, index into `events`), sorted: sorting these 16-byte keys instead of the events
    /// (200 bytes each once decoded) is what keeps the merge cheap.
    order: Vec<(u64, u32)>,
    /// The events kept for the next drain, swapped with `events` after each one.
    kept: Vec<Transition>,
}

impl Pending {
    /// Hands `f` the events stamped at or before `cutoff`, oldest first, and keeps the newer
    /// ones. When `f` returns false, the rest are dropped too.
    fn hand_over(&mut self, cutoff: u64, mut f: impl FnMut(&Transition) -> bool) {
        if self.events.is_empty() {
            return;
        }
        self.order.clear();
        self.order.extend(
            self.events
                .iter()
                .enumerate()
                .map(|(i, t)| (t.time_ns, i as u32)),
        );
        // Each ring is (nearly always) in time order already, and so are the kept events: the
        // stable sort finds these runs and merges them in about linear time.
        self.order.sort();
        let ready = self.order.partition_point(|&(time, _)| time <= cutoff);
        self.kept.clear();
        let mut stopped = false;
        for &(_, i) in &self.order[..ready] {
            if !f(&self.events[i as usize]) {
                stopped = true;
                break;
            }
        }
        if !stopped {
            let events = &self.events;
            self.kept
                .extend(self.order[ready..].iter().map(|&(_, i)| events[i as usize]));
        }
        std::mem::swap(&mut self.events, &mut self.kept);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::event::tests::transition;

    #[test]
    fn events_of_two_cpus_come_out_in_time_order_and_recent_ones_wait() {
        // As drained: CPU 0's ring, then CPU 1's, each in its own order.
        let events = [10, 40, 70, 20, 30, 90]
            .iter()
            .map(|&ns| transition(1, ns, 2, 1))
            .collect();
        let mut pending = Pending {
            events,
            ..Default::default()
        };
        let mut seen = Vec::new();
        pending.hand_over(50, |t| {
            seen.push(t.time_ns);
            true
        });
        assert_eq!(seen, [10, 20, 30, 40]);
        let left: Vec<u64> = pending.events.iter().map(|t| t.time_ns).collect();
        assert_eq!(
            left,
            [70, 90],
            "events newer than the cutoff wait for the next drain"
        );

        // A later drain brings an event stamped before the held ones: it goes first.
        pending.events.push(transition(1, 60, 2, 1));
        seen.clear();
        pending.hand_over(u64::MAX, |t| {
            seen.push(t.time_ns);
            true
        });
        assert_eq!(seen, [60, 70, 90]);
        assert!(pending.events.is_empty());
    }

    #[test]
    fn a_consumer_that_stops_drops_the_rest() {
        let events = (1..=5).map(|ns| transition(1, ns, 2, 1)).collect();
        let mut pending = Pending {
            events,
            ..Default::default()
        };
        let mut n = 0;
        pending.hand_over(u64::MAX, |_| {
            n += 1;
            n < 2
        });
        assert_eq!(n, 2);
        assert!(pending.events.is_empty());
    }
}
