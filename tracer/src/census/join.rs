//! The census join: every socket a census found, with what the probe keeps on it (its socket
//! storage, read in the same sock_diag dump): exact ages, owners and service ports, however
//! many events were lost on the way to the agent.
//!
//! One walk of the census: each socket's view (`view`) is made and added to the census's
//! figures (`figures`) as it is met; a namespace's listeners are read first, as every other
//! socket's service port and every request socket's owner depend on them. Owns: that walk,
//! and what it leaves the next census ([`Sightings`]). Does not own: taking the census
//! (`census`), when it runs (`scrape`), what is stuck (`stuck`).

use std::collections::{HashMap, HashSet};

pub use crate::census::figures::{Corrections, Destination, Figures};
pub use crate::census::view::{name_owners, AgeSource, Sightings, SocketView};

use crate::census::figures::Summing;
use crate::census::stuck::Thresholds;
use crate::census::view::{view, Listeners};
use crate::census::HostCensus;

/// Everything a census tells, joined with what the probe keeps: each socket's view, and the
/// figures summed over them.
#[derive(Clone, Debug, Default)]
pub struct Joined {
    pub sockets: Vec<SocketView>,
    pub figures: Figures,
}

/// Joins `census` with what the probe keeps on each socket. `now_ns` is CLOCK_MONOTONIC, the
/// probe's clock.
pub fn join(
    census: &HostCensus,
    sightings: &mut Sightings,
    thresholds: &Thresholds,
    now_ns: u64,
) -> Joined {
    let first = sightings.censuses == 0;
    sightings.censuses += 1;
    let mut sockets = Vec::new();
    // Sized once: a vector grown by doubling would hold up to twice the sockets' memory.
    sockets.reserve_exact(census.namespaces.iter().map(|n| n.sockets.len()).sum());
    let mut figures = Summing::new(thresholds, now_ns);
    let mut unaged_now = HashMap::new();
    let mut present = HashSet::new();
    for ns in &census.namespaces {
        let listeners = Listeners::of(ns, sightings);
        for r in &ns.sockets {
            present.insert(r.cookie);
            let v = view(ns, r, &listeners, sightings, first);
            if let Some(unaged) = v.unaged {
                unaged_now.insert(r.cookie, unaged);
            }
            let local_is_service = listeners.contains(r.local.port());
            figures.add(ns, r, &v.view, local_is_service, v.finding);
            sockets.push(v.view);
        }
    }
    // What is kept lasts as long as its socket: a census that could not visit every
    // namespace keeps what it did not see.
    if census.unreachable == 0 {
        sightings.unaged = unaged_now;
        sightings
            .owners
            .retain(|cookie, _| present.contains(cookie));
    } else {
        sightings.unaged.extend(unaged_now);
    }
    Joined {
        sockets,
        figures: figures.finish(census),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::census::{NetnsCensus, SocketRecord};
    use crate::stream::event::comm_text;
    use std::time::Duration;
    use tracer_common::SocketState;
    use tracer_common::{socket, state};

    const S: u64 = 1_000_000_000;
    const NS: u64 = 4026531840;
    /// When the probe was attached, in these tests.
    const STARTED: u64 = 9 * S;

    fn rec(state: u8, local: &str, remote: &str, cookie: u64) -> SocketRecord {
        SocketRecord {
            state,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            rqueue: 0,
            wqueue: 0,
            inode: 1,
            cookie,
            retransmit: None,
            cgroup: 0,
            storage: None,
            optmem: 0,
            tcp: None,
            full: !matches!(state, state::TIME_WAIT),
        }
    }

    /// Storage the probe wrote when it saw the socket enter `state` at `since_ns`.
    fn seen(state: u8, since_ns: u64, pid: u32, port: u16) -> Option<SocketState> {
        Some(SocketState {
            state,
            since_ns,
            pid,
            comm: *b"leaky\0\0\0\0\0\0\0\0\0\0\0",
            port,
            flags: socket::SINCE_SEEN,
            ..Default::default()
        })
    }

    fn census(sockets: Vec<SocketRecord>, dumped_at_ns: u64) -> HostCensus {
        HostCensus {
            namespaces: vec![NetnsCensus {
                netns: NS,
                sockets,
                port_range: (40000, 40009),
                dumped_at_ns,
                dumped_until_ns: dumped_at_ns,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A join with no earlier census.
    fn join_once(census: &HostCensus, now_ns: u64) -> Joined {
        join(
            census,
            &mut Sightings::new(STARTED),
            &Thresholds::default(),
            now_ns,
        )
    }

    #[test]
    fn a_close_wait_the_probe_saw_entering_gets_its_exact_age_owner_and_is_stuck_past_the_threshold(
    ) {
        // Accepted on 8080, the peer closed at 10 s: the probe's storage says so, whatever
        // the agent read of its events.
        let mut leak = rec(state::CLOSE_WAIT, "127.0.0.1:8080", "127.0.0.1:40001", 2);
        leak.storage = seen(state::CLOSE_WAIT, 10 * S, 77, 8080);
        let c = census(
            vec![rec(state::LISTEN, "127.0.0.1:8080", "0.0.0.0:0", 1), leak],
            74 * S,
        );
        let j = join_once(&c, 75 * S);
        let v = &j.sockets[1];
        assert_eq!(
            (
                v.age(75 * S),
                v.age_source,
                v.pid,
                &*comm_text(&v.comm),
                v.port
            ),
            (
                Some(Duration::from_secs(65)),
                AgeSource::Transition,
                77,
                "leaky",
                8080
            )
        );
        assert_eq!(j.figures.stuck.get(&(state::CLOSE_WAIT, 8080, 0)), Some(&1));
        assert_eq!(
            j.figures.oldest.get(&state::CLOSE_WAIT),
            Some(&Duration::from_secs(65))
        );
        assert_eq!(j.figures.corrections, Corrections::default());
    }

    #[test]
    fn sockets_from_before_the_agent_are_at_least_its_uptime() {
        // One seeded at start (its owner, no state: no transition since), one without storage
        // (an orphan no process holds); both were there before the probe.
        let mut seeded = rec(state::CLOSE_WAIT, "127.0.0.1:9000", "127.0.0.1:50000", 5);
        seeded.storage = Some(SocketState {
            pid: 41,
            flags: socket::SEEDED,
            ..Default::default()
        });
        let orphan = rec(state::FIN_WAIT2, "127.0.0.1:9000", "127.0.0.1:50001", 6);
        let listener = rec(state::LISTEN, "127.0.0.1:9000", "0.0.0.0:0", 7);
        let c = census(vec![seeded, orphan, listener], 30 * S);
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        let j = join(&c, &mut sightings, &thresholds, 30 * S);
        assert_eq!(j.sockets[0].age_source, AgeSource::AgentStart);
        assert_eq!(j.sockets[1].age_source, AgeSource::AgentStart);
        assert_eq!((j.sockets[0].pid, j.sockets[1].pid), (41, 0));
        // Seventy seconds later a census sees them still there: at least 91 s old, stuck.
        let later = census(c.namespaces[0].sockets.clone(), 100 * S);
        let j = join(&later, &mut sightings, &thresholds, 100 * S);
        for v in &j.sockets[..2] {
            assert_eq!(
                (v.age(100 * S), v.age_source),
                (Some(Duration::from_secs(91)), AgeSource::AgentStart)
            );
        }
        assert_eq!(j.figures.stuck.get(&(state::CLOSE_WAIT, 9000, 0)), Some(&1));
        assert_eq!(j.figures.corrections, Corrections::default());
    }

    #[test]
    fn a_socket_that_moves_on_while_the_dump_runs_is_no_correction() {
        // The dump started at 20 s and read FIN_WAIT1; by the time it read the storage the
        // probe had seen the socket enter FIN_WAIT2 (20.000001 s): nothing was missed.
        let mut r = rec(state::FIN_WAIT1, "127.0.0.1:40003", "127.0.0.1:8080", 4);
        r.storage = seen(state::FIN_WAIT2, 20 * S + 1_000, 77, 8080);
        let j = join_once(&census(vec![r], 20 * S), 20 * S);
        assert_eq!(j.figures.corrections, Corrections::default());
        let v = &j.sockets[0];
        assert_eq!(
            (v.state, v.age_source, v.age(20 * S), v.pid),
            (state::FIN_WAIT1, AgeSource::Unknown, None, 77)
        );
    }

    #[test]
    fn a_state_the_probe_did_not_see_entered_gets_a_lower_bound_from_the_census_that_found_it() {
        // The probe saw it enter ESTABLISHED at 1 s; its ESTABLISHED -> CLOSE_WAIT was
        // skipped by the kernel.
        let mut r = rec(state::CLOSE_WAIT, "127.0.0.1:40002", "127.0.0.1:8080", 3);
        r.storage = seen(state::ESTABLISHED, S, 77, 8080);
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        let j = join(
            &census(vec![r.clone()], 20 * S),
            &mut sightings,
            &thresholds,
            20 * S,
        );
        assert_eq!(j.figures.corrections.state_corrected, 1);
        let v = &j.sockets[0];
        assert_eq!(
            (v.state, v.age_source, v.age(20 * S)),
            (state::CLOSE_WAIT, AgeSource::Census, Some(Duration::ZERO))
        );
        assert!(j.figures.stuck.is_empty());
        // The next censuses keep the lower bound from the first one: past 60 s, it is stuck,
        // and it is counted once.
        let j = join(
            &census(vec![r], 81 * S),
            &mut sightings,
            &thresholds,
            81 * S,
        );
        assert_eq!(j.figures.corrections, Corrections::default());
        assert_eq!(j.sockets[0].age(81 * S), Some(Duration::from_secs(61)));
        assert_eq!(
            j.figures.stuck.get(&(state::CLOSE_WAIT, 8080, 0)),
            Some(&1),
            "service port from the storage"
        );
    }

    #[test]
    fn a_socket_found_without_storage_after_start_is_counted_once_and_aged_from_then() {
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        join(&census(vec![], 10 * S), &mut sightings, &thresholds, 10 * S);
        let leak = rec(state::CLOSE_WAIT, "127.0.0.1:8080", "127.0.0.1:40001", 9);
        let j = join(
            &census(vec![leak.clone()], 20 * S),
            &mut sightings,
            &thresholds,
            20 * S,
        );
        assert_eq!(j.figures.corrections.added, 1);
        let j = join(
            &census(vec![leak], 30 * S),
            &mut sightings,
            &thresholds,
            80 * S,
        );
        assert_eq!(j.figures.corrections.added, 0);
        let v = &j.sockets[0];
        assert_eq!(
            (v.age_source, v.age(80 * S)),
            (AgeSource::Census, Some(Duration::from_secs(60)))
        );
        // No storage, nothing listening on 8080 here, but 8080 is outside the ephemeral
        // range and 40001 inside it: accepted here, so 8080 is the service's.
        assert_eq!(j.figures.stuck.get(&(state::CLOSE_WAIT, 8080, 0)), Some(&1));
        // Gone: nothing is kept of it.
        join(&census(vec![], 40 * S), &mut sightings, &thresholds, 40 * S);
        assert!(sightings.unaged.is_empty());
    }

    #[test]
    fn sockets_the_probe_knows_no_owner_of_are_named_by_who_holds_them() {
        let mut listener = rec(state::LISTEN, "0.0.0.0:5432", "0.0.0.0:0", 11);
        let mut leak = rec(state::CLOSE_WAIT, "127.0.0.1:5432", "127.0.0.1:40001", 12);
        let mut orphan = rec(state::FIN_WAIT2, "127.0.0.1:5432", "127.0.0.1:40002", 13);
        (listener.inode, leak.inode, orphan.inode) = (501, 502, 0);
        let c = census(vec![listener, leak, orphan], 10 * S);
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        let mut j = join(&c, &mut sightings, &thresholds, 10 * S);
        assert!(j.sockets.iter().all(|v| v.pid == 0));
        let comm = *b"postgres\0\0\0\0\0\0\0\0";
        let mut asked = HashSet::new();
        let named = name_owners(&mut j, &mut sightings, |wanted| {
            asked = wanted.clone();
            HashMap::from([(501, (40, comm)), (502, (41, comm))])
        });
        // The orphan (no file holds it: inode 0) is not looked for.
        assert_eq!((named, asked), (2, HashSet::from([501, 502])));
        let pids: Vec<(u64, u32)> = j.sockets.iter().map(|v| (v.cookie, v.pid)).collect();
        assert_eq!(pids, vec![(11, 40), (12, 41), (13, 0)]);
        // Kept: the next census names them without looking.
        let mut again = join(&c, &mut sightings, &thresholds, 11 * S);
        assert_eq!(
            name_owners(&mut again, &mut sightings, |_| unreachable!()),
            0
        );
        assert_eq!(again.sockets[1].pid, 41);
        // One that no process shows is looked for once, then not while it lasts.
        let mut hidden = rec(state::ESTABLISHED, "127.0.0.1:5432", "127.0.0.1:40003", 14);
        hidden.inode = 503;
        let c = census(vec![hidden], 12 * S);
        let mut looks = 0;
        for _ in 0..3 {
            let mut j = join(&c, &mut sightings, &thresholds, 12 * S);
            name_owners(&mut j, &mut sightings, |_| {
                looks += 1;
                HashMap::new()
            });
        }
        assert_eq!((looks, sightings.not_found.len()), (1, 1));
        let mut gone = join(&census(vec![], 13 * S), &mut sightings, &thresholds, 13 * S);
        name_owners(&mut gone, &mut sightings, |_| unreachable!());
        assert!(sightings.not_found.is_empty(), "forgotten once gone");
        assert!(sightings.owners.is_empty(), "forgotten once gone");
    }

    #[test]
    fn request_sockets_are_aged_by_their_synack_timer_and_owned_by_their_listener() {
        let mut r = rec(state::SYN_RECV, "127.0.0.1:9000", "127.0.0.1:50001", 6);
        (r.inode, r.retransmit, r.full) = (0, Some((Duration::from_millis(500), 3)), false);
        let mut l = rec(state::LISTEN, "127.0.0.1:9000", "0.0.0.0:0", 1);
        l.storage = seen(state::LISTEN, 0, 42, 9000);
        l.storage.as_mut().unwrap().comm = *b"srv\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let j = join_once(&census(vec![l, r], 20 * S), 20 * S);
        let v = &j.sockets[1];
        assert_eq!((v.pid, &*comm_text(&v.comm)), (42, "srv"));
        // 1+2+4+8-0.5 = 14.5 s old: past the 10 s threshold.
        assert_eq!(
            (v.state, v.age(20 * S), v.age_source),
            (
                state::SYN_RECV,
                Some(Duration::from_millis(14_500)),
                AgeSource::SynAckTimer
            )
        );
        assert_eq!(j.figures.stuck.get(&(state::SYN_RECV, 9000, 0)), Some(&1));
    }

    #[test]
    fn time_wait_ports_ephemeral_use_and_service_candidates() {
        let c = census(
            vec![
                rec(state::LISTEN, "127.0.0.1:80", "0.0.0.0:0", 1),
                // Server side closed first: TIME-WAIT on the listening port.
                rec(state::TIME_WAIT, "127.0.0.1:80", "127.0.0.1:40003", 2),
                // Client side closed first: TIME-WAIT toward remote port 5432, from ephemeral ports.
                rec(state::TIME_WAIT, "127.0.0.1:40001", "127.0.0.2:5432", 3),
                rec(state::TIME_WAIT, "127.0.0.1:40002", "127.0.0.2:5432", 4),
                rec(state::ESTABLISHED, "127.0.0.1:40004", "127.0.0.2:5432", 5),
                // Outside the range: not an ephemeral port.
                rec(state::ESTABLISHED, "127.0.0.1:30000", "127.0.0.2:5432", 6),
                // Between two ephemeral ports: no service at all.
                rec(state::TIME_WAIT, "127.0.0.1:40005", "127.0.0.1:40006", 7),
            ],
            S,
        );
        let j = join_once(&c, S);
        assert_eq!(j.figures.time_wait.get(&80), Some(&1));
        assert_eq!(j.figures.time_wait.get(&5432), Some(&2));
        let worst = &j.figures.destinations[0];
        assert_eq!(
            (worst.remote.port(), worst.used, worst.range),
            (5432, 3, 10)
        );
        let mut services = j.figures.services.clone();
        services.sort();
        assert_eq!(services, vec![(80, 1, true), (5432, 3, false)]);
        assert_eq!(j.figures.by_state[state::TIME_WAIT as usize], 4);
        assert!(j
            .sockets
            .iter()
            .filter(|v| v.state == state::TIME_WAIT)
            .all(|v| v.age_source == AgeSource::Unknown));
    }

    #[test]
    fn a_time_wait_socket_in_its_fin_wait2_substate_is_no_socket_found_without_storage() {
        // As sock_diag shows a socket that entered TIME-WAIT from FIN_WAIT2: that state, no
        // inode, no memory figures.
        let mut tw = rec(state::FIN_WAIT2, "127.0.0.1:40001", "127.0.0.1:8080", 4);
        (tw.inode, tw.full) = (0, false);
        let mut sightings = Sightings::new(STARTED);
        let thresholds = Thresholds::default();
        join(&census(vec![], S), &mut sightings, &thresholds, S);
        let j = join(&census(vec![tw], 2 * S), &mut sightings, &thresholds, 2 * S);
        assert_eq!(j.figures.corrections, Corrections::default());
        assert_eq!(
            (
                j.sockets[0].age_source,
                j.figures.by_state[state::FIN_WAIT2 as usize]
            ),
            (AgeSource::Unknown, 1)
        );
        assert!(sightings.unaged.is_empty());
    }

    #[test]
    fn listen_queues_are_read_per_port() {
        let mut l = rec(state::LISTEN, "127.0.0.1:7000", "0.0.0.0:0", 1);
        l.rqueue = 2;
        l.wqueue = 1;
        let j = join_once(&census(vec![l], S), S);
        assert_eq!(j.figures.listen_queue.get(&7000), Some(&(2, 1)));
    }
}
