//! Why a connection is slow: retransmissions by kind (per port and in each connection's
//! close record), each cause made on purpose with nftables in a network namespace of the
//! test's and each figure compared with the kernel's own counters there (`nstat`:
//! `/proc/net/netstat` and `/proc/net/snmp`).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// Service ports, one per cause: SYNs dropped, a black hole after the handshake, one data
/// segment dropped in a bulk transfer, the handshake's last ACK dropped.
const SYN_PORT: u16 = 7_401;
const BLACK_HOLE_PORT: u16 = 7_402;
const BULK_PORT: u16 = 7_403;
const SYNACK_PORT: u16 = 7_404;

/// The namespace's TCP counters (`nstat -a`'s `Tcp*` and `TcpExt*`), by nstat's names.
fn kernel_counters(ns: &Netns) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (file, prefix) in [("/proc/net/snmp", "Tcp"), ("/proc/net/netstat", "TcpExt")] {
        let text = ns.exec(&["cat", file]);
        for (name, value) in tracer::census::parse_netstat(&text, prefix) {
            let nstat_name = match prefix {
                "Tcp" => format!("Tcp{name}"),
                _ => name.to_string(),
            };
            out.insert(nstat_name, value);
        }
    }
    out
}

/// How much each counter grew from `before` to `after`.
fn growth(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// `tracer_tcp_retransmits_total{port, kind}`, 0 where there is no series.
fn retransmits(text: &str, port: u16, kind: &str) -> u64 {
    sample(
        text,
        "tracer_tcp_retransmits_total",
        &[("port", &port.to_string()), ("kind", kind)],
    )
    .unwrap_or(0.0) as u64
}

const KINDS: [&str; 6] = [
    "timeout",
    "fast",
    "tail_loss_probe",
    "syn",
    "synack",
    "other",
];

#[test]
fn retransmissions_by_kind_equal_the_kernels_own_counters() {
    let test = "retransmissions_by_kind_equal_the_kernels_own_counters";
    if !require_root(test) {
        return;
    }
    let ns = Netns::new("kinds");
    ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"]);
    let ports = [SYN_PORT, BLACK_HOLE_PORT, BULK_PORT, SYNACK_PORT].map(|p| p.to_string());
    let mut args = Vec::new();
    for p in &ports {
        args.extend(["--port", p.as_str()]);
    }
    let agent = Agent::start(&args);
    let mut watch_args = vec!["watch", "--connections", "--json"];
    watch_args.extend(args.iter().copied());
    let watch = Tracer::start(&watch_args, true);
    settle();
    let start = kernel_counters(&ns);
    let mut per_cause = Vec::new();

    // 1. SYNs vanish on arrival: the retries tcp_syn_retries=1 allows (its time, 3 s, takes
    //    two on current kernels), then the connect times out.
    ns.nft(&format!(
        "table inet syn {{\n chain in {{\n type filter hook input priority 0;\n \
         tcp dport {SYN_PORT} drop\n }}\n}}\n"
    ));
    let before = kernel_counters(&ns);
    let err = ns
        .run(|| TcpStream::connect(("127.0.0.1", SYN_PORT)))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    per_cause.push((SYN_PORT, growth(&before, &kernel_counters(&ns))));
    ns.nft("delete table inet syn\n");

    // 2. A black hole after the handshake: everything toward the server is dropped on arrival
    //    while the client has 10 kB in flight (a tail loss probe, then timeouts), for 1.5 s;
    //    then the path comes back and the data is delivered.
    let before = kernel_counters(&ns);
    let got = ns.run(|| {
        let listener = TcpListener::bind(("127.0.0.1", BLACK_HOLE_PORT)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", BLACK_HOLE_PORT)).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // This thread is in the namespace: so is the nft it starts.
        nft_here(&format!(
            "table inet hole {{\n chain in {{\n type filter hook input priority 0;\n \
             tcp dport {BLACK_HOLE_PORT} drop\n }}\n}}\n"
        ));
        c.write_all(&[7u8; 10_000]).unwrap();
        std::thread::sleep(Duration::from_millis(1_500));
        nft_here("delete table inet hole\n");
        let mut got = vec![0u8; 10_000];
        s.read_exact(&mut got).unwrap();
        got.len()
    });
    assert_eq!(got, 10_000);
    per_cause.push((BLACK_HOLE_PORT, growth(&before, &kernel_counters(&ns))));

    // 3. One large data segment of a 4 MB transfer dropped on arrival (the 20th): the flow
    //    goes on, SACKs tell the sender, which resends it fast.
    ns.nft(&format!(
        "table inet one {{\n chain in {{\n type filter hook input priority 0;\n \
         tcp sport {BULK_PORT} meta length > 1000 numgen inc mod 1000000 == 19 counter drop\n \
         }}\n}}\n"
    ));
    let before = kernel_counters(&ns);
    let got = ns.run(|| {
        let listener = TcpListener::bind(("127.0.0.1", BULK_PORT)).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", BULK_PORT)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let writer = std::thread::spawn(move || s.write_all(&vec![3u8; 4_000_000]).unwrap());
        let mut got = vec![0u8; 4_000_000];
        c.read_exact(&mut got).unwrap();
        writer.join().unwrap();
        got.len()
    });
    assert_eq!(got, 4_000_000);
    per_cause.push((BULK_PORT, growth(&before, &kernel_counters(&ns))));
    assert!(
        ns.exec(&["nft", "list", "table", "inet", "one"])
            .contains("packets 1 "),
        "the rule dropped exactly one segment"
    );
    ns.nft("delete table inet one\n");

    // 4. The handshake's last ACK lost: the server resends its SYN-ACK after 1 s; the client
    //    stays silent until the connection is established on the server's side.
    ns.nft(&format!(
        "table inet ack {{\n chain in {{\n type filter hook input priority 0;\n \
         tcp dport {SYNACK_PORT} tcp flags == ack numgen inc mod 1000000 == 0 drop\n }}\n}}\n"
    ));
    let before = kernel_counters(&ns);
    let waited = ns.run(|| {
        let listener = TcpListener::bind(("127.0.0.1", SYNACK_PORT)).unwrap();
        let _c = TcpStream::connect(("127.0.0.1", SYNACK_PORT)).unwrap();
        let started = Instant::now();
        let _s = listener.accept().unwrap();
        started.elapsed()
    });
    assert!(
        waited >= Duration::from_millis(900),
        "accepted after {waited:?}"
    );
    per_cause.push((SYNACK_PORT, growth(&before, &kernel_counters(&ns))));
    ns.nft("delete table inet ack\n");

    // Every kind on every port is what the kernel counted, cause by cause.
    let total = growth(&start, &kernel_counters(&ns));
    let kernel = |g: &BTreeMap<String, u64>, name: &str| g.get(name).copied().unwrap_or(0);
    let ours = |t: &str| -> u64 {
        [SYN_PORT, BLACK_HOLE_PORT, BULK_PORT, SYNACK_PORT]
            .iter()
            .flat_map(|&p| KINDS.map(|k| retransmits(t, p, k)))
            .sum()
    };
    // A retransmission whose program run the kernel skipped (the same program already running
    // on that CPU: a softirq's retransmission during a process-context one) is not counted,
    // but counted as missed: the two add up to the kernel's count.
    let missed = |t: &str| -> u64 {
        ["tcp_retransmit_skb", "tcp_retransmit_synack"]
            .iter()
            .map(|p| {
                sample(t, "tracer_probe_runs_missed_total", &[("program", p)]).unwrap_or(0.0) as u64
            })
            .sum()
    };
    let kernel_total = kernel(&total, "TcpRetransSegs");
    let text = agent.metrics_until("every retransmission, counted or missed", |t| {
        ours(t) + missed(t) >= kernel_total
    });
    let (counted, skipped) = (ours(&text), missed(&text));
    assert_eq!(
        counted + skipped,
        kernel_total,
        "retransmissions counted {counted} and missed {skipped}, against the namespace's \
         TcpRetransSegs {kernel_total}: {per_cause:?}"
    );
    let seen: Vec<(u16, BTreeMap<&str, u64>)> = per_cause
        .iter()
        .map(|(port, _)| {
            let kinds = KINDS
                .iter()
                .map(|&k| (k, retransmits(&text, *port, k)))
                .filter(|(_, n)| *n > 0)
                .collect();
            (*port, kinds)
        })
        .collect();
    let all = format!("tracer: {seen:?}\nkernel: {per_cause:?}");
    if skipped > 0 {
        // Which port's runs were skipped is not known: the per-port figures can only be
        // compared where nothing was.
        println!("the kernel skipped {skipped} retransmission runs: {all}");
    }
    for ((port, g), (_, kinds)) in per_cause.iter().zip(&seen).filter(|_| skipped == 0) {
        let ours = |k: &str| kinds.get(k).copied().unwrap_or(0);
        let sum: u64 = kinds.values().sum();
        assert_eq!(sum, kernel(g, "TcpRetransSegs"), "port {port}: {all}");
        assert_eq!(ours("other"), 0, "port {port}: {all}");
        match *port {
            SYN_PORT => {
                assert_eq!(ours("syn"), kernel(g, "TCPSynRetrans"), "{all}");
                assert!(ours("syn") >= 1, "{all}");
            }
            BLACK_HOLE_PORT => {
                // Each timeout resends one segment; none is resent in slow start after it
                // (nothing arrives meanwhile) but after the path came back.
                assert_eq!(
                    ours("timeout"),
                    kernel(g, "TCPTimeouts") + kernel(g, "TCPSlowStartRetrans"),
                    "{all}"
                );
                assert!(ours("timeout") >= 2, "{all}");
                assert_eq!(ours("tail_loss_probe"), kernel(g, "TCPLossProbes"), "{all}");
            }
            BULK_PORT => {
                assert_eq!(ours("fast"), kernel(g, "TCPFastRetrans"), "{all}");
                assert!(ours("fast") >= 1, "{all}");
            }
            _ => assert_eq!(
                (ours("synack"), kernel(g, "TCPSynRetrans")),
                (1, 1),
                "{all}"
            ),
        }
    }

    // The same kinds connection by connection, in the close records: what the probe counted
    // on each socket adds up to the port's counts, and to each connection's own total.
    settle();
    let records = watch.stop_with(libc::SIGINT).json();
    for (port, kinds) in &seen {
        let closes: Vec<&serde_json::Value> = records
            .iter()
            .filter(|r| r["record"] == "close" && (r["sport"] == *port || r["dport"] == *port))
            .collect();
        // No listener on the SYN port: the client's socket alone.
        let sockets = if *port == SYN_PORT { 1 } else { 2 };
        assert_eq!(closes.len(), sockets, "port {port}: {closes:?}");
        let mut sum: BTreeMap<&str, u64> = BTreeMap::new();
        for r in &closes {
            let of = |k: &str| r["retransmits_by_kind"][k].as_u64().unwrap();
            let total: u64 = KINDS.iter().map(|&k| of(k)).sum();
            assert_eq!(Some(total), r["segments_retransmitted"].as_u64(), "{r}");
            for k in KINDS {
                *sum.entry(k).or_default() += of(k);
            }
        }
        sum.retain(|_, n| *n > 0);
        assert_eq!(&sum, kinds, "port {port}: close records {closes:?}");
    }
}

/// The service port of the dropped-packets test.
const DROP_PORT: u16 = 7_406;

#[test]
fn an_nftables_drop_rule_gives_exactly_its_drops_with_the_netfilter_reason() {
    let test = "an_nftables_drop_rule_gives_exactly_its_drops_with_the_netfilter_reason";
    if !require_root(test) {
        return;
    }
    let ns = Netns::new("drops");
    // SYNs to the port vanish on arrival: the connect's SYN and its retries, every one a
    // drop by the rule (its own counter says how many).
    ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"]);
    ns.nft(&format!(
        "table inet blackhole {{\n chain in {{\n type filter hook input priority 0;\n \
         tcp dport {DROP_PORT} counter drop\n }}\n}}\n"
    ));
    let port = DROP_PORT.to_string();
    let agent = Agent::start(&["--port", &port]);
    let enabled = sample(
        &agent.metrics_now(),
        "tracer_feature_enabled",
        &[("feature", "drop_reason")],
    );
    let drops = Figure::sample(
        "tracer_tcp_drops_total",
        &[("reason", "netfilter_drop"), ("port", &port)],
    );
    let before = drops.read(&agent.metrics_now());
    let kfree = SkbDrops::start();
    let err = ns
        .run(|| TcpStream::connect(("127.0.0.1", DROP_PORT)))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    let traced = kfree.stop();
    let listed = ns.exec(&["nft", "list", "table", "inet", "blackhole"]);
    let counted: u64 = listed
        .split("packets ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {listed}"));
    assert!(counted >= 2, "{listed}");
    if enabled != Some(1.0) {
        unsupported(
            "drop_reason",
            "this kernel's skb/kfree_skb has no drop reason",
        );
        return;
    }
    // The kernel's own record of its drops (ftrace, host-wide: none other is a netfilter
    // drop of TCP here) says the same.
    assert_eq!(
        traced, counted,
        "ftrace's kfree_skb netfilter drops vs the rule's counter"
    );
    agent.metrics_exactly(
        &format!(
            "the rule's counter: {counted} SYNs to port {DROP_PORT} dropped, after {before} \
             counted before the connect"
        ),
        &[(drops, before + counted as f64)],
    );
}

/// The kernel's `skb/kfree_skb` events with reason NETFILTER_DROP (IPv4 and IPv6), counted in
/// a private ftrace instance.
struct SkbDrops {
    dir: std::path::PathBuf,
}

impl SkbDrops {
    fn start() -> SkbDrops {
        let dir = std::path::PathBuf::from(format!(
            "/sys/kernel/tracing/instances/tracer-drops-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("ftrace instance");
        let event = dir.join("events/skb/kfree_skb");
        std::fs::write(event.join("enable"), "1").expect("enable kfree_skb");
        SkbDrops { dir }
    }

    fn stop(self) -> u64 {
        let event = self.dir.join("events/skb/kfree_skb");
        std::fs::write(event.join("enable"), "0").expect("disable kfree_skb");
        let trace = std::fs::read_to_string(self.dir.join("trace")).expect("trace");
        trace
            .lines()
            .filter(|l| l.contains("kfree_skb:") && l.contains("NETFILTER_DROP"))
            .filter(|l| l.contains("protocol=2048") || l.contains("protocol=34525"))
            .count() as u64
    }
}

impl Drop for SkbDrops {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/skb/kfree_skb/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The service port of the flow-limits test.
const FLOW_PORT: u16 = 7_407;

/// What `ss -ti` says of the socket on local port `local` in `ns`: `busy`, `rwnd_limited`
/// and `sndbuf_limited` (milliseconds; 0 where ss prints none) and the time it was asked.
fn ss_flow(ns: &Netns, local: u16) -> ([u64; 3], (f64, f64)) {
    let asked = unix_now();
    let text = ns.exec(&["ss", "-tinH", "sport", "=", &format!(":{local}")]);
    let answered = unix_now();
    let field = |name: &str| -> u64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.split("ms").next())
            .map_or(0, |v| v.parse().unwrap())
    };
    assert!(text.contains("busy:"), "no busy time in ss -ti: {text}");
    (
        [
            field("busy:"),
            field("rwnd_limited:"),
            field("sndbuf_limited:"),
        ],
        (asked, answered),
    )
}

/// The flow-limit times of a connection record, microseconds: busy, receive window, send
/// buffer.
fn flow_of(r: &serde_json::Value) -> [u64; 3] {
    ["busy_us", "rwnd_limited_us", "sndbuf_limited_us"]
        .map(|k| r[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}")))
}

#[test]
fn a_receiver_that_stops_reading_makes_the_sender_window_limited_as_ss_says() {
    let test = "a_receiver_that_stops_reading_makes_the_sender_window_limited_as_ss_says";
    if !require_root(test) {
        return;
    }
    let ns = Netns::new("flow");
    let port = FLOW_PORT.to_string();
    let agent = Agent::start(&[
        "--record-interval",
        "1s",
        "--census-interval",
        "1s",
        "--port",
        &port,
    ]);
    let watch = Tracer::start(
        &[
            "watch",
            "--connections",
            "--json",
            "--record-interval",
            "1s",
            "--port",
            &port,
        ],
        true,
    );
    settle();
    let before = kernel_counters(&ns);
    // A server that accepts and never reads, with a small receive buffer (its children
    // inherit it): its window closes as soon as 64 kB wait unread.
    let (mut c, s) = ns.run(|| {
        let l = TcpListener::bind(("127.0.0.1", FLOW_PORT)).unwrap();
        let size: libc::c_int = 65_536;
        // SAFETY: setsockopt on a valid socket with a pointer to an int and its size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&l),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let c = TcpStream::connect(("127.0.0.1", FLOW_PORT)).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    });
    let client = c.local_addr().unwrap().port();
    // The client writes what it can for 3 s: the peer's window closes and its own send
    // buffer fills; the kernel counts the time as limited by the receiver's window.
    c.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 65_536];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        match c.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    // The kernel's figures, then at least two censuses, then the kernel's again: every
    // update record taken in between lies between the two readings.
    let (first, (_, first_at)) = ss_flow(&ns, client);
    agent.metrics_exactly(
        &format!("one connection to port {FLOW_PORT} whose receiver stopped reading"),
        &[(
            Figure::sample("tracer_tcp_zero_window_sockets", &[("port", &port)]),
            1.0,
        )],
    );
    std::thread::sleep(Duration::from_millis(2_500));
    let (last, (last_at, _)) = ss_flow(&ns, client);
    assert!(first[1] >= 1_000, "ss: rwnd_limited {first:?} ms after 3 s");
    let grown = growth(&before, &kernel_counters(&ns));
    assert!(
        grown.get("TCPToZeroWindowAdv").copied().unwrap_or(0) >= 1,
        "the server advertised no zero window: {grown:?}"
    );
    drop(s);
    drop(c);
    settle();
    let records = watch.stop_with(libc::SIGINT).json();
    let mine: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["sport"] == client && r["dport"] == FLOW_PORT)
        .collect();
    let (close, updates) = mine.split_last().expect("records");
    assert_eq!(close["record"], "close", "{mine:?}");
    // Every record's retransmissions by kind add up to its segments retransmitted, over its
    // life and over its interval (the tail loss probes of the window probes, if any).
    for r in &mine {
        for (kinds, total) in [
            ("retransmits_by_kind", "segments_retransmitted"),
            (
                "interval_retransmits_by_kind",
                "interval_segments_retransmitted",
            ),
        ] {
            let sum: u64 = KINDS.iter().map(|&k| r[kinds][k].as_u64().unwrap()).sum();
            assert_eq!(Some(sum), r[total].as_u64(), "{r}");
            assert_eq!(r[kinds]["other"], 0, "{r}");
        }
    }
    // The ss readings were made some time between the test's clock readings around them
    // (starting ss in the namespace took hundreds of milliseconds in an emulated guest on a
    // busy host, and an update taken after the first clock reading showed less than that
    // first ss reading): an update counts as between them when it was taken after the
    // first ss had answered and before the last was started.
    let between: Vec<_> = updates
        .iter()
        .filter(|u| {
            let at = u["time_ns"].as_f64().unwrap() / 1e9;
            at > first_at && at < last_at
        })
        .collect();
    assert!(
        !between.is_empty(),
        "no update between the two ss readings: {mine:?}"
    );
    for u in between {
        let ours = flow_of(u);
        eprintln!("ss {first:?} .. {last:?} ms; update {ours:?} us");
        for i in 0..3 {
            // ss prints whole milliseconds, truncated.
            assert!(
                ours[i] / 1_000 >= first[i] && ours[i] / 1_000 <= last[i],
                "{i}: {ours:?} us vs ss {first:?} .. {last:?} ms: {u}"
            );
        }
        assert_eq!(u["snd_wnd"], 0, "the peer's window is shut: {u}");
    }
    // The close carries the whole life, at least what ss saw last.
    let total = flow_of(close);
    for i in 0..3 {
        assert!(
            total[i] / 1_000 >= last[i],
            "{total:?} us vs ss {last:?} ms: {close}"
        );
    }
    // The agent's counters add up the records of both ends.
    let both: Vec<_> = records
        .iter()
        .filter(|r| r["record"] == "close" && (r["sport"] == FLOW_PORT || r["dport"] == FLOW_PORT))
        .collect();
    assert_eq!(both.len(), 2, "{records:?}");
    // Retransmissions the peer reported as duplicates (D-SACK), as the kernel counts them.
    let grown = growth(&before, &kernel_counters(&ns));
    let spurious: u64 = both
        .iter()
        .map(|r| r["spurious_retransmits"].as_u64().unwrap())
        .sum();
    assert_eq!(
        spurious,
        grown.get("TCPDSACKRecvSegs").copied().unwrap_or(0),
        "{grown:?}"
    );
    let want = |i: usize| both.iter().map(|r| flow_of(r)[i]).sum::<u64>() as f64 / 1e6;
    let seconds = |by: &str| {
        Figure::sample(
            "tracer_tcp_send_seconds_total",
            &[("limited_by", by), ("port", &port)],
        )
    };
    // The agent and `watch` each load a probe, and each reads the kernel's jiffies at the
    // CLOSE to add the stretch under way: a tick can fall between the two runs (it did in an
    // emulated guest), so each of the two closes may differ by one jiffy.
    let tolerance = 2.0 * jiffy_seconds() + 1e-3;
    let text = agent.metrics_at_least(
        &format!(
            "both closes on port {FLOW_PORT}: the records' receive window limited {} s, \
             less {tolerance} s",
            want(1)
        ),
        &[(seconds("receive_window"), want(1) - tolerance)],
    );
    let read = |by: &str| seconds(by).read(&text);
    let busy = read("network") + read("receive_window") + read("send_buffer");
    for (figure, got, expected) in [
        (
            "busy (network + receive_window + send_buffer)",
            busy,
            want(0),
        ),
        ("receive_window", read("receive_window"), want(1)),
        ("send_buffer", read("send_buffer"), want(2)),
    ] {
        assert!(
            (got - expected).abs() <= tolerance,
            "{figure}: {got} s where the close records of port {FLOW_PORT} say {expected} s \
             (within {tolerance} s):\n{}",
            seconds("network").lines(&text)
        );
    }
}

/// The kernel's tick in seconds (`1 / HZ`: the resolution of the coarse clock).
fn jiffy_seconds() -> f64 {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes one timespec.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) };
    assert_eq!(rc, 0);
    res.tv_sec as f64 + res.tv_nsec as f64 / 1e9
}

/// The listening port of the accept-queue test.
const ACCEPT_PORT: u16 = 7_405;

/// How long the accept-queue test's server sleeps before each `accept()`.
const SLEEP: Duration = Duration::from_millis(300);

#[test]
fn a_server_that_sleeps_300ms_before_each_accept_makes_each_connection_wait_300ms() {
    let test = "a_server_that_sleeps_300ms_before_each_accept_makes_each_connection_wait_300ms";
    if !require_root(test) {
        return;
    }
    let port = ACCEPT_PORT.to_string();
    let auto = ["--accept-wait", "auto"];
    let agent = Agent::start(&[&["--port", &port][..], &auto].concat());
    let watch = Tracer::start(
        &[
            &["watch", "--connections", "--json", "--port", &port][..],
            &auto,
        ]
        .concat(),
        true,
    );
    let enabled = sample(
        &agent.metrics_now(),
        "tracer_feature_enabled",
        &[("feature", "accept_wait")],
    );
    // Five connections, one at a time: each is established at once, then accepted 300 ms
    // later, as a server too busy to call accept() does.
    let listener = TcpListener::bind(("127.0.0.1", ACCEPT_PORT)).unwrap();
    let mut waits = Vec::new();
    for _ in 0..5 {
        // The wait lies between the sleep and what the test's clock saw from before the
        // connect to after the accept (an emulated guest can take milliseconds to return
        // from either call).
        let started = Instant::now();
        let c = TcpStream::connect(("127.0.0.1", ACCEPT_PORT)).unwrap();
        std::thread::sleep(SLEEP);
        let (s, _) = listener.accept().unwrap();
        waits.push(started.elapsed());
        drop((c, s));
    }
    settle();
    let out = watch.stop_with(libc::SIGINT);
    let records = out.json();
    let passive: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["sport"] == ACCEPT_PORT && r["record"] == "close")
        .collect();
    assert_eq!(passive.len(), 5, "{records:?}");
    let accepted = Figure::sample("tracer_tcp_accept_wait_seconds_count", &[("port", &port)]);
    let text = if enabled == Some(1.0) {
        agent.metrics_exactly(
            &format!("5 connections to port {ACCEPT_PORT}, each accepted after {SLEEP:?}"),
            &[(accepted, 5.0)],
        )
    } else {
        agent.metrics()
    };
    if enabled != Some(1.0) {
        unsupported(
            "accept_wait",
            "this kernel does not let the probe trace inet_csk_accept",
        );
        assert_eq!(
            sample(
                &text,
                "tracer_tcp_accept_wait_seconds_count",
                &[("port", &port)]
            ),
            None,
            "no waits where the probe cannot see accept()"
        );
        for r in &passive {
            assert_eq!(r["accept_wait_ns"], serde_json::Value::Null, "{r}");
        }
        // Asked for where the kernel cannot: one line that says so, and no start.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tracer"))
            .args(["watch", "--accept-wait", "on", "--duration", "1s"])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        let said: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("--accept-wait on"))
            .collect();
        assert_eq!(said.len(), 1, "{stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("backtrace"),
            "{stderr}"
        );
        return;
    }
    // Each record says the wait the server made: its sleep (less at most 2 ms, should the
    // handshake's last ACK be handled just after connect() returned), at most what the test's
    // clock saw around it; the active side's records have none.
    let least = (SLEEP - Duration::from_millis(2)).as_nanos() as u64;
    for (r, wait) in passive.iter().zip(&waits) {
        let ns = r["accept_wait_ns"].as_u64().unwrap_or(0);
        eprintln!("accept wait {ns} ns; the test saw {wait:?} around the 300 ms sleep");
        assert!(
            ns >= least && ns <= wait.as_nanos() as u64,
            "{ns} ns where the server slept {SLEEP:?} within {wait:?}: {r}"
        );
    }
    for r in records.iter().filter(|r| r["dport"] == ACCEPT_PORT) {
        assert_eq!(r["accept_wait_ns"], serde_json::Value::Null, "{r}");
    }
    // All five in the histogram's 0.25-0.5 s bucket, their sum within the waits' bounds.
    let bucket = |le: &str| {
        sample(
            &text,
            "tracer_tcp_accept_wait_seconds_bucket",
            &[("port", &port), ("le", le)],
        )
    };
    assert_eq!(
        (bucket("0.25"), bucket("0.5")),
        (Some(0.0), Some(5.0)),
        "5 waits of {SLEEP:?} on port {ACCEPT_PORT}:\n{}",
        Figure::sample(
            "tracer_tcp_accept_wait_seconds_bucket",
            &[("port", &port), ("le", "0.5")]
        )
        .lines(&text)
    );
    let sum = sample(
        &text,
        "tracer_tcp_accept_wait_seconds_sum",
        &[("port", &port)],
    )
    .unwrap();
    let most: f64 = waits.iter().map(Duration::as_secs_f64).sum();
    let least = 5.0 * (SLEEP - Duration::from_millis(2)).as_secs_f64();
    assert!(
        sum >= least && sum <= most,
        "sum {sum} s, waits between {least} and {most} s"
    );
}
