//! Long-lived connections, seen while they live: their bytes and RTTs count in the metrics
//! at each census while they are open (whatever `--record-interval` says, which governs
//! records only), and `watch --connections` prints update
//! records whose intervals add up, with the close record's, to the connection's totals. Both
//! checked against what the test sent and against the kernel's own counters (`ss -ti`), in a
//! network namespace of the test's.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;

/// Moves `n` bytes from `from` to `to`.
fn carry(from: &mut TcpStream, to: &mut TcpStream, n: usize) {
    let mut writer = from.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&vec![5u8; n]).unwrap());
    let mut got = vec![0u8; n];
    to.read_exact(&mut got).unwrap();
    sender.join().unwrap();
}

/// A client and server connection on `port` in `ns`, with `up` bytes sent by the client and
/// `down` by the server.
fn connection(ns: &Netns, port: u16, up: usize, down: usize) -> (TcpStream, TcpStream) {
    ns.run(move || {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        carry(&mut c, &mut s, up);
        carry(&mut s, &mut c, down);
        (c, s)
    })
}

/// `bytes_acked` and `bytes_received` of each established socket on `port` in `ss -ti`, by
/// local port: the kernel's own counters (sequence space: a SYN counts one).
fn ss_bytes(ns: &Netns, port: u16) -> BTreeMap<u16, (u64, u64)> {
    let text = ns.exec(&["ss", "-tinH", "state", "established"]);
    let mut out = BTreeMap::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote)) = (cols.get(2), cols.get(3)) else {
            continue;
        };
        let port_of = |a: &str| a.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        let (l, r) = (port_of(local), port_of(remote));
        let info = lines.next().unwrap_or_default();
        if l != port && r != port {
            continue;
        }
        let field = |name: &str| {
            info.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map_or(0, |v| v.parse().unwrap())
        };
        out.insert(l, (field("bytes_acked:"), field("bytes_received:")));
    }
    out
}

fn bytes(direction: &str, port: u16) -> Figure {
    Figure::sample(
        "tracer_tcp_bytes_total",
        &[("direction", direction), ("port", &port.to_string())],
    )
}

#[test]
fn an_open_connection_counts_its_bytes_while_open_and_nothing_twice_at_close() {
    if !require_root("an_open_connection_counts_its_bytes_while_open_and_nothing_twice_at_close") {
        return;
    }
    const PORT: u16 = 18_093;
    let ns = Netns::new("live");
    // A census each second; the record interval left at its default (30 s): the metrics
    // follow the census, not the records.
    let agent = Agent::start(&["--census-interval", "1s", "--port", &PORT.to_string()]);
    // 8 MB up and 3 MB down, then the connection stays open.
    let (up, down) = (8_000_000usize, 3_000_000usize);
    let (c, s) = connection(&ns, PORT, up, down);
    let client_port = c.local_addr().unwrap().port();
    // The kernel's own counters: the client's SYN is one of its acknowledged bytes.
    let ss = ss_bytes(&ns, PORT);
    assert_eq!(ss[&client_port], (up as u64 + 1, down as u64), "{ss:?}");
    assert_eq!(ss[&PORT], (down as u64, up as u64), "{ss:?}");
    // Both ends are on this host: each byte is sent by one and received by the other.
    let total = (up + down) as f64;
    // Followed once established 1 s (FOLLOW_AFTER_NS), then counted at the next census: within
    // 2 s and a census's own time.
    let text = agent.metrics_exactly(
        &format!("{up} bytes up and {down} down on one connection to port {PORT}, open"),
        &[
            (bytes("sent", PORT), total),
            (bytes("received", PORT), total),
        ],
    );
    let rtts = Figure::sample(
        "tracer_tcp_rtt_seconds_count",
        &[("port", &PORT.to_string())],
    );
    let reports = Figure::sample("tracer_connection_reports_total", &[]);
    // An RTT sample per side at each census; no update record yet (none due before 30 s).
    assert!(rtts.read(&text) >= 2.0, "{}", rtts.lines(&text));
    assert_eq!(reports.read(&text), 0.0, "{}", reports.lines(&text));
    assert_eq!(ss_bytes(&ns, PORT).len(), 2);

    // More traffic while open: counted at the next census (within its 1 s).
    let (mut c, mut s) = (c, s);
    carry(&mut c, &mut s, 500_000);
    let total = total + 500_000.0;
    agent.metrics_exactly(
        &format!("{up} bytes up, {down} down, then 500,000 up on one connection to port {PORT}"),
        &[
            (bytes("sent", PORT), total),
            (bytes("received", PORT), total),
        ],
    );

    // The close adds what came since the last report: nothing here, and no byte twice.
    drop(c);
    drop(s);
    settle();
    let closed = Figure::sum(
        "tracer_tcp_connection_duration_seconds_count",
        &[("port", &PORT.to_string())],
    );
    let before = rtts.read(&agent.metrics());
    let text = agent.metrics_exactly(
        &format!("one connection to port {PORT} closed, {total} bytes each way in all"),
        &[
            (closed, 2.0),
            (bytes("sent", PORT), total),
            (bytes("received", PORT), total),
        ],
    );
    // Each close samples its RTT too.
    assert!(rtts.read(&text) >= before, "{}", rtts.lines(&text));
    // Closed, they are followed no more (the gauge follows within a second).
    let followed = Figure::sample("tracer_connection_reports_followed", &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while followed.read(&agent.metrics()) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "both ends of the connection to port {PORT} closed, yet after 5 s:\n{}",
            followed.lines(&agent.metrics())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn update_records_and_the_close_record_add_up_to_the_connections_totals() {
    if !require_root("update_records_and_the_close_record_add_up_to_the_connections_totals")
        || host_only(
            "update_records_and_the_close_record_add_up_to_the_connections_totals",
            "the agent's slicing of a connection into records, not the kernel's (its counters are the other live test's on every kernel)",
        )
    {
        return;
    }
    const PORT: u16 = 18_094;
    let ns = Netns::new("updates");
    let watch = Tracer::start(
        &[
            "watch",
            "--connections",
            "--json",
            "--record-interval",
            "1s",
            "--port",
            &PORT.to_string(),
        ],
        true,
    );
    settle();
    let (mut c, mut s) = connection(&ns, PORT, 1_000_000, 250_000);
    let client_port = c.local_addr().unwrap().port();
    // Open longer than two intervals, with more traffic in between.
    std::thread::sleep(Duration::from_millis(2_500));
    carry(&mut c, &mut s, 400_000);
    carry(&mut s, &mut c, 50_000);
    std::thread::sleep(Duration::from_millis(2_500));
    let ss = ss_bytes(&ns, PORT);
    drop(c);
    drop(s);
    settle();
    let out = watch.stop_with(libc::SIGINT);

    let records = out.json();
    for (local, remote, sent, received) in [
        (client_port, PORT, 1_400_000u64, 300_000u64),
        (PORT, client_port, 300_000, 1_400_000),
    ] {
        let mine: Vec<_> = records
            .iter()
            .filter(|r| r["sport"] == local && r["dport"] == remote)
            .collect();
        let (close, updates) = mine.split_last().expect("records");
        assert_eq!(close["record"], "close", "{mine:?}");
        assert!(updates.len() >= 2, "{mine:?}");
        assert!(updates
            .iter()
            .all(|u| u["record"] == "update" && u["ending"].is_null()));
        // Every record of one connection has its cookie.
        assert!(mine.iter().all(|r| r["cookie"] == close["cookie"]));
        // The totals are what was sent, and what the kernel counted (its SYN aside).
        assert_eq!(close["bytes_sent"], sent, "{close}");
        assert_eq!(close["bytes_received"], received, "{close}");
        let syn = u64::from(local == client_port);
        assert_eq!(ss[&local], (sent + syn, received), "{ss:?}");
        // Each record covers what came after the one before it: the intervals add up to
        // the totals, and each update's totals to the intervals so far.
        let (mut up, mut down) = (0, 0);
        let mut start = None;
        for r in &mine {
            if let Some(previous) = start {
                assert_eq!(r["interval_start_ns"], previous, "{r}");
            }
            up += r["interval_bytes_sent"].as_u64().unwrap();
            down += r["interval_bytes_received"].as_u64().unwrap();
            assert_eq!(
                (r["bytes_sent"].as_u64(), r["bytes_received"].as_u64()),
                (Some(up), Some(down)),
                "{r}"
            );
            start = Some(r["time_ns"].clone());
        }
        assert_eq!((up, down), (sent, received));
        // The traffic in the middle shows in one update's interval, not in the first.
        assert!(updates[0]["interval_bytes_sent"].as_u64().unwrap() < sent);
    }
}
