//! Connection records: one per connection when it closes, and an update each
//! `--record-interval` while it lives, with what it did since the last one and its totals
//! (updates and close add up to the totals). What `watch --connections` prints and the OTLP
//! export sends.

use std::net::IpAddr;

use tracer_common::{AF_INET, AF_INET6, COMM_LEN};

use crate::stream::event::{self, Transition};
use crate::stream::live::Update;
use crate::stream::{Closed, Ending, Flow, Interval, Mode};

/// Which kind a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The connection is open: what it did over the last interval.
    Update,
    /// It closed: how it ended, and what it did since its last update.
    Close,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Update => "update",
            Kind::Close => "close",
        }
    }
}

/// One connection record. Times are CLOCK_MONOTONIC nanoseconds; what the probe did not see
/// is None.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub time_ns: u64,
    /// The socket's cookie: the same for every record of one connection.
    pub cookie: u64,
    pub pid: u32,
    pub comm: [u8; COMM_LEN],
    pub family: u16,
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub netns: u32,
    pub cgroup: u64,
    /// Service port (0: not known).
    pub port: u16,
    pub mode: Option<Mode>,
    pub opened_ns: Option<u64>,
    pub handshake_ns: Option<u64>,
    /// Passive connections: how long it waited in the accept queue.
    pub accept_wait_ns: Option<u64>,
    /// From ESTABLISHED to now (an update) or to CLOSE.
    pub lifetime_ns: Option<u64>,
    /// Totals since it opened.
    pub bytes_sent: Option<u64>,
    pub bytes_received: u64,
    pub retransmits: u64,
    pub srtt_us: u32,
    pub rtt_min_us: u32,
    /// Time sending and what limited it, spurious retransmissions: totals since it opened
    /// (the kernel counts them from the start, for a connection older than the agent too).
    pub flow: Flow,
    /// Update records only: the window the peer advertises now (0: a zero window, its
    /// application not reading), where the kernel tells.
    pub snd_wnd: Option<u32>,
    /// Since the previous record of this connection (or its opening).
    pub interval: Interval,
    /// Close records only: how it ended, `sk_err`, and why the kernel reset it.
    pub ending: Option<Ending>,
    pub sk_err: u16,
    pub reset_reason: Option<u16>,
}

impl Record {
    /// The close record of the connection whose transition to CLOSE is `t`.
    pub fn close(t: &Transition, c: &Closed) -> Record {
        Record {
            kind: Kind::Close,
            time_ns: t.time_ns,
            cookie: t.cookie,
            pid: t.pid,
            comm: t.comm,
            family: t.family,
            local: event::local_addr(t),
            local_port: t.sport,
            remote: event::remote_addr(t),
            remote_port: t.dport,
            netns: c.netns,
            cgroup: c.cgroup,
            port: c.port,
            mode: c.mode,
            opened_ns: c.opened_ns,
            handshake_ns: c.handshake_ns,
            accept_wait_ns: c.accept_wait_ns,
            lifetime_ns: c.lifetime_ns,
            bytes_sent: c.bytes_sent,
            bytes_received: c.bytes_received,
            retransmits: u64::from(c.retransmits),
            srtt_us: c.srtt_us,
            rtt_min_us: c.rtt_min_us,
            flow: c.flow,
            snd_wnd: None,
            interval: c.interval,
            ending: Some(c.ending),
            sk_err: c.sk_err,
            reset_reason: c.reset_reason,
        }
    }

    /// The update record of an open connection.
    pub fn update(u: &Update) -> Record {
        let (s, st) = (&u.sample, &u.sample.storage);
        let known = |v: u64| (v != 0).then_some(v);
        let (opened, established) = (known(st.opened_ns), known(st.established_ns));
        Record {
            kind: Kind::Update,
            time_ns: s.time_ns,
            cookie: s.cookie,
            pid: st.pid,
            comm: st.comm,
            family: if s.local.is_ipv6() { AF_INET6 } else { AF_INET },
            local: s.local.ip(),
            local_port: s.local.port(),
            remote: s.remote.ip(),
            remote_port: s.remote.port(),
            netns: s.netns,
            cgroup: if s.cgroup != 0 { s.cgroup } else { st.cgroup },
            port: st.port,
            mode: u.mode,
            opened_ns: opened,
            handshake_ns: opened
                .zip(established)
                .filter(|&(o, e)| e >= o)
                .map(|(o, e)| e - o),
            accept_wait_ns: known(u64::from(st.accept_wait_us) * 1_000),
            lifetime_ns: established
                .filter(|&e| s.time_ns >= e)
                .map(|e| s.time_ns - e),
            bytes_sent: u.mode.map(|_| s.counters.sent),
            bytes_received: s.counters.received,
            retransmits: s.counters.retransmits,
            srtt_us: s.srtt_us,
            rtt_min_us: s.rtt_min_us,
            flow: s.counters.flow,
            snd_wnd: s.snd_wnd,
            interval: u.interval,
            ending: None,
            sk_err: 0,
            reset_reason: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::event::tests::transition;
    use crate::stream::live::{Counters, LiveCensus, Sample, Tracker};
    use crate::stream::Observation;
    use std::time::Duration;
    use tracer_common::{close_flags, socket, state::*, SocketState};

    const S: u64 = 1_000_000_000;

    /// An active connection to port 8080 as a census at `now` sees it: `sent` and
    /// `received` data bytes so far. It opened at 1 s and was established at 2 s.
    fn sample(now: u64, sent: u64, received: u64) -> Sample {
        Sample {
            time_ns: now,
            cookie: 9,
            netns: 1,
            state: ESTABLISHED,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:8080".parse().unwrap(),
            cgroup: 0,
            storage: SocketState {
                flags: socket::ACTIVE,
                opened_ns: S,
                established_ns: 2 * S,
                port: 8080,
                pid: 42,
                ..SocketState::default()
            },
            counters: Counters {
                sent,
                received,
                retransmits: 1,
                flow: Flow::default(),
            },
            srtt_us: 100,
            rtt_min_us: 50,
            snd_wnd: Some(65_535),
        }
    }

    fn census(tracker: &mut Tracker, samples: &[Sample]) -> Vec<Record> {
        let live = LiveCensus {
            samples: samples.to_vec(),
            visited: vec![1],
        };
        let mut out = Vec::new();
        tracker.census(&live, |u| {
            if u.due {
                out.push(Record::update(&u))
            }
        });
        out
    }

    /// The close record of the connection of [`sample`], closing at `now` having sent `sent`
    /// data bytes and received `received` in all.
    fn close(tracker: &mut Tracker, now: u64, sent: u64, received: u64) -> Record {
        let (t, c) = closed(tracker, now, sent, received);
        Record::close(&t, &c)
    }

    /// As [`close`]: the close event and what the tracker made of it.
    fn closed(tracker: &mut Tracker, now: u64, sent: u64, received: u64) -> (Transition, Closed) {
        let mut t = transition(1, now, FIN_WAIT2, CLOSE);
        t.cookie = 9;
        t.socket_flags = socket::ACTIVE;
        t.opened_ns = S;
        t.established_ns = 2 * S;
        // The SYN and both FINs are in the kernel's counters.
        t.bytes_acked = sent + 2;
        t.bytes_received = received + 1;
        t.close_flags = close_flags::FIN_ACKED | close_flags::PEER_FIN;
        t.total_retrans = 1;
        let mut closed = None;
        crate::stream::observe(&t, |o| {
            if let Observation::Closed(c) = o {
                closed = Some(c);
            }
        });
        let mut c = closed.unwrap();
        tracker.close(t.cookie, t.time_ns, &mut c);
        (t, c)
    }

    #[test]
    fn updates_come_each_interval_and_with_the_close_add_up_to_the_totals() {
        let mut tracker = Tracker::new(Duration::from_secs(10));
        // Not yet due: established 2 s, interval 10 s.
        assert!(census(&mut tracker, &[sample(5 * S, 100, 10)]).is_empty());
        let first = census(&mut tracker, &[sample(12 * S, 300, 30)]);
        assert_eq!(first.len(), 1);
        let first = &first[0];
        assert_eq!(first.kind, Kind::Update);
        assert_eq!(first.interval.start_ns, Some(2 * S));
        assert_eq!(first.interval.bytes_sent, Some(300));
        assert_eq!(first.lifetime_ns, Some(10 * S));
        assert_eq!(first.handshake_ns, Some(S));
        assert!(census(&mut tracker, &[sample(17 * S, 500, 40)]).is_empty());
        let second = census(&mut tracker, &[sample(23 * S, 700, 50)]);
        assert_eq!(second[0].interval.start_ns, Some(12 * S));
        assert_eq!(second[0].interval.bytes_sent, Some(400));
        assert_eq!(second[0].interval.bytes_received, 20);
        assert_eq!(second[0].interval.retransmits, 0);
        let close = close(&mut tracker, 30 * S, 1_000, 80);
        assert_eq!(close.kind, Kind::Close);
        assert_eq!(close.interval.start_ns, Some(23 * S));
        let all = [first, &second[0], &close];
        let sent: u64 = all.iter().map(|r| r.interval.bytes_sent.unwrap()).sum();
        let received: u64 = all.iter().map(|r| r.interval.bytes_received).sum();
        assert_eq!((sent, close.bytes_sent), (1_000, Some(1_000)));
        assert_eq!((received, close.bytes_received), (80, 80));
        assert!(tracker.is_empty());
    }

    #[test]
    fn a_census_taken_before_a_close_and_handled_after_it_reports_nothing() {
        let mut tracker = Tracker::new(Duration::from_secs(10));
        let close = close(&mut tracker, 30 * S, 1_000, 80);
        assert_eq!(close.interval.bytes_sent, Some(1_000));
        // Taken at 29 s, read after the close: counted by the close already.
        assert!(census(&mut tracker, &[sample(29 * S, 900, 70)]).is_empty());
        assert!(tracker.is_empty());
    }

    #[test]
    fn a_connection_older_than_the_probe_counts_from_its_first_census() {
        let mut tracker = Tracker::new(Duration::from_secs(10));
        let mut old = sample(5 * S, 5_000, 500);
        old.storage.flags = socket::SEEDED;
        old.storage.established_ns = 0;
        assert!(census(&mut tracker, &[old]).is_empty());
        old.time_ns = 15 * S;
        old.counters.sent = 5_300;
        let update = census(&mut tracker, &[old]);
        assert_eq!(update[0].interval.start_ns, Some(5 * S));
        assert_eq!(update[0].interval.bytes_sent, Some(300));
        assert_eq!(update[0].bytes_sent, None);
        assert_eq!(update[0].mode, None);
    }

    #[test]
    fn a_connection_no_census_finds_any_more_is_forgotten() {
        let mut tracker = Tracker::new(Duration::from_secs(10));
        census(&mut tracker, &[sample(12 * S, 300, 30)]);
        assert_eq!(tracker.len(), 1);
        census(&mut tracker, &[]);
        assert!(tracker.is_empty());
    }

    /// The bytes (sent, received) that a census adds to the metrics.
    fn counted(tracker: &mut Tracker, samples: &[Sample]) -> Vec<(u64, u64)> {
        let live = LiveCensus {
            samples: samples.to_vec(),
            visited: vec![1],
        };
        let mut out = Vec::new();
        tracker.census(&live, |u| {
            out.push((u.counted.bytes_sent.unwrap(), u.counted.bytes_received))
        });
        out
    }

    #[test]
    fn every_census_counts_what_a_connection_did_since_the_last_one_whatever_the_record_interval() {
        let mut tracker = Tracker::new(Duration::from_secs(30));
        // Established at 2 s: not followed before 3 s (FOLLOW_AFTER_NS).
        assert!(counted(&mut tracker, &[sample(2 * S + S / 2, 50, 5)]).is_empty());
        assert_eq!(
            counted(&mut tracker, &[sample(5 * S, 100, 10)]),
            [(100, 10)]
        );
        assert_eq!(
            counted(&mut tracker, &[sample(10 * S, 400, 40)]),
            [(300, 30)]
        );
        assert_eq!(counted(&mut tracker, &[sample(15 * S, 400, 40)]), [(0, 0)]);
        // Its close counts the rest (1,000 and 80 in all), and its record, the first, all.
        let (_, c) = closed(&mut tracker, 20 * S, 1_000, 80);
        assert_eq!(
            (c.counted.bytes_sent, c.counted.bytes_received),
            (Some(600), 40)
        );
        assert_eq!(c.counted.start_ns, Some(15 * S));
        assert_eq!(
            (c.interval.bytes_sent, c.interval.bytes_received),
            (Some(1_000), 80)
        );
        assert_eq!(c.interval.start_ns, Some(2 * S));
    }

    #[test]
    fn a_connection_closing_before_any_report_counts_its_totals_at_close() {
        let mut tracker = Tracker::new(Duration::from_secs(60));
        let c = close(&mut tracker, 30 * S, 1_000, 80);
        assert_eq!(c.interval.start_ns, Some(2 * S));
        assert_eq!(
            (c.interval.bytes_sent, c.interval.bytes_received),
            (Some(1_000), 80)
        );
    }
}
