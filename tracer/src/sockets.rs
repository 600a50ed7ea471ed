//! The table of live sockets: which state each one is in and since when, keyed by the kernel
//! address of its `struct sock`.
//!
//! Pure code, fed one [`Transition`] at a time and unit-tested with hand-made sequences.
//! It is bounded: when full, the socket seen longest ago is evicted, and evictions are counted.
//! A socket the tracer did not see entering its state (one older than the tracer, or evicted)
//! has no known dwell time: nothing here invents one.

use std::collections::{HashMap, VecDeque};

use tracer_common::state;

use crate::event::Transition;

/// What the table remembers of one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    /// The state the socket is in now.
    state: u8,
    /// When it entered that state (CLOSE_MONOTONIC ns, the probe's clock).
    since_ns: u64,
    /// When the table first saw the socket; ties the eviction queue to this entry.
    first_seen_ns: u64,
}

/// Bounded table of live sockets.
pub struct SocketTable {
    entries: HashMap<u64, Entry>,
    /// Sockets in the order they were first seen, for evicting the oldest; entries whose socket
    /// has since closed are skipped (and dropped) when reached.
    order: VecDeque<(u64, u64)>,
    capacity: usize,
    evicted: u64,
}

impl SocketTable {
    /// A table for at most `capacity` sockets, allocated up front.
    pub fn new(capacity: usize) -> SocketTable {
        let capacity = capacity.max(1);
        SocketTable {
            entries: HashMap::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
            capacity,
            evicted: 0,
        }
    }

    /// Follows one transition. Returns how long (ns) the socket stayed in `t.oldstate`, when the
    /// table saw it enter that state.
    pub fn observe(&mut self, t: &Transition) -> Option<u64> {
        let known = self.entries.get(&t.skaddr).copied();
        let dwell = known
            .filter(|e| e.state == t.oldstate && t.time_ns >= e.since_ns)
            .map(|e| t.time_ns - e.since_ns);
        if t.newstate == state::CLOSE {
            self.entries.remove(&t.skaddr);
            return dwell;
        }
        match known {
            Some(e) => {
                let entry = Entry { state: t.newstate, since_ns: t.time_ns, ..e };
                self.entries.insert(t.skaddr, entry);
            }
            None => {
                if self.entries.len() >= self.capacity {
                    self.evict_oldest();
                }
                let entry =
                    Entry { state: t.newstate, since_ns: t.time_ns, first_seen_ns: t.time_ns };
                self.entries.insert(t.skaddr, entry);
                self.order.push_back((t.skaddr, t.time_ns));
                self.compact_order();
            }
        }
        dwell
    }

    /// Number of sockets followed now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no socket is followed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sockets evicted because the table was full, since it was made.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn evict_oldest(&mut self) {
        while let Some((skaddr, first_seen)) = self.order.pop_front() {
            if self.entries.get(&skaddr).is_some_and(|e| e.first_seen_ns == first_seen) {
                self.entries.remove(&skaddr);
                self.evicted += 1;
                return;
            }
        }
    }

    /// Drops queue entries of closed sockets once they outnumber live ones, so that the queue
    /// stays within twice the capacity.
    fn compact_order(&mut self) {
        if self.order.len() <= 2 * self.capacity {
            return;
        }
        let entries = &self.entries;
        self.order.retain(|(skaddr, first)| {
            entries.get(skaddr).is_some_and(|e| e.first_seen_ns == *first)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::transition;
    use tracer_common::state::*;

    #[test]
    fn dwell_is_the_time_between_entering_and_leaving_a_state() {
        let mut table = SocketTable::new(16);
        assert_eq!(table.observe(&transition(1, 1_000, CLOSE, SYN_SENT)), None);
        assert_eq!(table.observe(&transition(1, 1_500, SYN_SENT, ESTABLISHED)), Some(500));
        assert_eq!(table.observe(&transition(1, 301_500, ESTABLISHED, FIN_WAIT1)), Some(300_000));
        assert_eq!(table.observe(&transition(1, 301_600, FIN_WAIT1, FIN_WAIT2)), Some(100));
        assert_eq!(table.observe(&transition(1, 301_700, FIN_WAIT2, CLOSE)), Some(100));
        assert!(table.is_empty(), "CLOSE forgets the socket");
    }

    #[test]
    fn sockets_older_than_the_tracer_get_no_invented_dwell() {
        let mut table = SocketTable::new(16);
        // First sighting leaves ESTABLISHED: when it entered is unknown.
        assert_eq!(table.observe(&transition(7, 5_000, ESTABLISHED, CLOSE_WAIT)), None);
        assert_eq!(table.observe(&transition(7, 9_000, CLOSE_WAIT, LAST_ACK)), Some(4_000));
        // A passive child's LISTEN -> SYN_RECV: the child itself was never in LISTEN.
        assert_eq!(table.observe(&transition(8, 9_000, LISTEN, SYN_RECV)), None);
    }

    #[test]
    fn a_state_the_table_did_not_record_gives_no_dwell() {
        let mut table = SocketTable::new(16);
        table.observe(&transition(1, 1_000, CLOSE, SYN_SENT));
        // A transition out of a state other than the recorded one means events were lost.
        assert_eq!(table.observe(&transition(1, 2_000, FIN_WAIT1, FIN_WAIT2)), None);
    }

    #[test]
    fn full_table_evicts_the_oldest_socket_and_counts_it() {
        let mut table = SocketTable::new(2);
        table.observe(&transition(1, 10, CLOSE, SYN_SENT));
        table.observe(&transition(2, 20, CLOSE, SYN_SENT));
        table.observe(&transition(3, 30, CLOSE, SYN_SENT));
        assert_eq!(table.len(), 2);
        assert_eq!(table.evicted(), 1);
        // Socket 1 was evicted: its dwell is unknown; socket 2 is still followed.
        assert_eq!(table.observe(&transition(1, 40, SYN_SENT, ESTABLISHED)), None);
        assert_eq!(table.observe(&transition(3, 50, SYN_SENT, ESTABLISHED)), Some(20));
    }

    #[test]
    fn closed_sockets_are_not_evicted_twice_and_the_queue_stays_bounded() {
        let mut table = SocketTable::new(4);
        for i in 0..1_000u64 {
            table.observe(&transition(i, i * 10, CLOSE, SYN_SENT));
            table.observe(&transition(i, i * 10 + 5, SYN_SENT, CLOSE));
        }
        assert_eq!(table.evicted(), 0);
        assert!(table.order.len() <= 8, "queue length {}", table.order.len());
    }
}
