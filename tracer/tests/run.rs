//! `tracer run` against real sockets: what the agent serves on /metrics must count exactly the
//! connections the tests make, land in the right buckets, and agree with `ss`.
//!
//! Kernel tests: run one at a time (`cargo xtask test` passes `--test-threads=1`). Each test
//! names its ports with `--port` so that other traffic on the machine cannot take their labels.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;

const HS: &str = "tracer_tcp_handshake_duration_seconds";

fn count(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, &format!("{metric}_count"), labels).unwrap_or(0.0)
}

fn bucket(text: &str, metric: &str, labels: &[(&str, &str)], le: &str) -> f64 {
    let mut l = labels.to_vec();
    l.push(("le", le));
    sample(text, &format!("{metric}_bucket"), &l).unwrap_or(0.0)
}

#[test]
fn handshakes_teardowns_and_lifetimes_are_counted_per_port() {
    if !require_root("handshakes_teardowns_and_lifetimes_are_counted_per_port") {
        return;
    }
    let client_first = closed_port(V4);
    let server_first = closed_port(V4);
    let (p, q) = (
        client_first.port().to_string(),
        server_first.port().to_string(),
    );
    let agent = Agent::start(&["--port", &p, "--port", &q]);
    let a = Server::start_at(client_first, 200, Closer::Client);
    connect_many(client_first, 200, Closer::Client);
    let b = Server::start_at(server_first, 100, Closer::Server);
    connect_many(server_first, 100, Closer::Server);
    a.join();
    b.join();
    settle();
    // Every handshake, teardown and lifetime (the last clients' teardowns end when the server
    // closes its side, just before it returns). Both ends are on this host: every connection
    // has one active and one passive opener, and one active and one passive closer.
    let mut figures = Vec::new();
    for (port, n) in [(&p, 200.0), (&q, 100.0)] {
        for mode in ["active", "passive"] {
            for family in [
                HS,
                "tracer_tcp_teardown_duration_seconds",
                "tracer_tcp_connection_duration_seconds",
            ] {
                let l = [("mode", mode), ("port", port.as_str())];
                figures.push((Figure::sample(&format!("{family}_count"), &l), n));
            }
        }
    }
    let text = agent.metrics_exactly(
        &format!(
            "200 connections to port {p} closed by the client, 100 to port {q} closed by the \
             server: each counted once per side"
        ),
        &figures,
    );
    // Loopback handshakes take tens of microseconds. (A busy shared machine may delay a few,
    // and a burst can overflow the test server's accept queue and make a SYN wait 1 s.)
    let fast = bucket(&text, HS, &[("mode", "active"), ("port", &p)], "0.01");
    assert!(
        fast >= 190.0,
        "active handshakes under 10 ms: {fast} of 200"
    );
    assert_eq!(sample(&text, "tracer_events_lost_total", &[]), Some(0.0));
    assert!(
        sample(
            &text,
            "tracer_tcp_transitions_total",
            &[("from", "syn_sent"), ("to", "established")]
        )
        .unwrap_or(0.0)
            >= 300.0
    );
    // The port got its failure series at 0 with its label value: no refusal.
    assert_eq!(
        sample(
            &text,
            "tracer_tcp_handshake_failures_total",
            &[("mode", "active"), ("reason", "refused"), ("port", &p)]
        ),
        Some(0.0)
    );
}

#[test]
fn client_closes_first_is_an_active_teardown_on_the_client_side() {
    if !require_root("client_closes_first_is_an_active_teardown_on_the_client_side") {
        return;
    }
    // Both ends are on this host and the tracepoint sees both: the client's socket is the
    // active closer, the server's child the passive one. The server keeps its side open
    // 200 ms after the client's FIN: that is the passive teardown (CLOSE_WAIT). How long the
    // active one lasts is the kernel's choice: usually the client's closed socket ends as
    // soon as its FIN is acknowledged (tcp_close swaps it for a timewait socket: FIN_WAIT2 ->
    // CLOSE), but when the acknowledgement is handled while the closing thread still owns
    // the socket, tcp_rcv_state_process keeps the full socket in FIN_WAIT2 on its timer, and
    // it reaches CLOSE only with the server's FIN, 200 ms later (seen in an emulated 6.1
    // guest). So both teardowns are compared with the kernel's own record of this
    // connection's transitions (ftrace), whichever way it went.
    let addr = closed_port(V4);
    let port = addr.port().to_string();
    let agent = Agent::start(&["--port", &port]);
    let ftrace = Ftrace::start("teardown", &[addr.port()]);
    let listener = TcpListener::bind(addr).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16];
        while matches!(std::io::Read::read(&mut s, &mut buf), Ok(n) if n > 0) {}
        std::thread::sleep(Duration::from_millis(200));
    });
    let c = TcpStream::connect(addr).unwrap();
    let client_port = c.local_addr().unwrap().port();
    drop(c);
    server.join().unwrap();
    settle();
    let text = agent.metrics_until("two teardowns", |t| {
        count(
            t,
            "tracer_tcp_teardown_duration_seconds",
            &[("mode", "active"), ("port", &port)],
        ) >= 1.0
            && count(
                t,
                "tracer_tcp_teardown_duration_seconds",
                &[("mode", "passive"), ("port", &port)],
            ) >= 1.0
    });
    let record = ftrace.stop_timed();
    // When the kernel recorded a socket (by its ports) entering `state`.
    let entered = |sport: u16, dport: u16, state: &str| {
        let times: Vec<f64> = record
            .iter()
            .filter(|(_, k)| k.0 == sport && k.1 == dport && k.3 == state)
            .map(|&(t, _)| t)
            .collect();
        assert_eq!(times.len(), 1, "{state} of {sport}->{dport} in {record:?}");
        times[0]
    };
    let kernel_active =
        entered(client_port, addr.port(), "close") - entered(client_port, addr.port(), "fin_wait1");
    let kernel_passive = entered(addr.port(), client_port, "close")
        - entered(addr.port(), client_port, "close_wait");
    let teardowns = |mode| {
        let labels = [("mode", mode), ("port", port.as_str())];
        (
            count(&text, "tracer_tcp_teardown_duration_seconds", &labels),
            sample(&text, "tracer_tcp_teardown_duration_seconds_sum", &labels).unwrap(),
        )
    };
    let (active, passive) = (teardowns("active"), teardowns("passive"));
    let inputs = format!(
        "client port {client_port}: tracer active {active:?} passive {passive:?} (count, \
         seconds); ftrace active {kernel_active} s, passive {kernel_passive} s"
    );
    assert_eq!((active.0, passive.0), (1.0, 1.0), "{inputs}");
    assert!(
        (0.15..0.4).contains(&kernel_passive),
        "the server held CLOSE_WAIT 200 ms: {inputs}"
    );
    // The probe and ftrace read the same clock (CLOCK_MONOTONIC) in the same tracepoint
    // calls, one after the other: a few microseconds apart, unless the CPU is taken from
    // between them. On a host, only an interrupt can (the tracepoint runs with preemption
    // off): 1 ms allows that. In the matrix's emulated guests a virtual CPU is
    // a host thread, and the host deschedules it whenever it likes, between the two readings
    // too, for as long as the host's other threads (the other guest's, the host's own tests)
    // keep its CPUs: 1.03 ms seen on 6.12 in CI. There 50 ms: what the guests check is
    // which way the kernel went (a few ms, or the server's 200 ms), the host the precision.
    let tolerance = if std::env::var_os("TRACER_KERNEL_MATRIX").is_some() {
        0.050
    } else {
        0.001
    };
    assert!((active.1 - kernel_active).abs() < tolerance, "{inputs}");
    assert!((passive.1 - kernel_passive).abs() < tolerance, "{inputs}");
    let dwell = count(
        &text,
        "tracer_tcp_state_duration_seconds",
        &[("state", "close_wait")],
    );
    assert!(dwell >= 1.0, "close_wait dwell observed");
}

#[test]
fn refused_connects_count_as_refused_failures() {
    if !require_root("refused_connects_count_as_refused_failures") {
        return;
    }
    let closed = closed_port(V4);
    let port = closed.port().to_string();
    let agent = Agent::start(&["--port", &port]);
    connect_refused(closed, 50);
    let refused = [
        ("mode", "active"),
        ("reason", "refused"),
        ("port", port.as_str()),
    ];
    // Resets are kernel counters the agent reads once a second: wait for them too.
    let resets = |t: &str, direction, state| {
        sample(
            t,
            "tracer_tcp_resets_total",
            &[("direction", direction), ("state", state)],
        )
        .unwrap_or(0.0)
    };
    // Some kernels do not report a reset that answers no socket: the agent says so.
    let sent_none = sample(
        &agent.metrics_now(),
        "tracer_feature_enabled",
        &[("feature", "resets_sent_without_socket")],
    ) == Some(1.0);
    let failures = Figure::sample("tracer_tcp_handshake_failures_total", &refused);
    let reset = |direction, state| {
        Figure::sample(
            "tracer_tcp_resets_total",
            &[("direction", direction), ("state", state)],
        )
    };
    let mut figures = vec![
        (failures.clone(), 50.0),
        (reset("received", "syn_sent"), 50.0),
    ];
    if sent_none {
        figures.push((reset("sent", "none"), 50.0));
    }
    let what = format!("50 connects to port {port}, where nothing listens");
    let text = agent.metrics_at_least(&what, &figures);
    assert_figures(
        &text,
        &what,
        &[
            (failures, 50.0),
            (
                Figure::sample(
                    &format!("{HS}_count"),
                    &[("mode", "active"), ("port", &port)],
                ),
                0.0,
            ),
        ],
    );
    // Each refusal is a RST sent for no socket and received by a socket in SYN_SENT (other
    // traffic on the machine may add more).
    assert!(resets(&text, "received", "syn_sent") >= 50.0);
    if sent_none {
        assert!(resets(&text, "sent", "none") >= 50.0);
    } else {
        assert_eq!(resets(&text, "sent", "none"), 0.0);
        unsupported(
            "resets_sent_without_socket",
            "this kernel's tcp_send_reset tracepoint does not fire for resets that answer no \
             socket; the agent exports tracer_feature_enabled 0 and the counter stays 0",
        );
    }
}

#[test]
fn a_first_syn_dropped_by_a_full_accept_queue_makes_the_active_handshake_one_second() {
    if !require_root(
        "a_first_syn_dropped_by_a_full_accept_queue_makes_the_active_handshake_one_second",
    ) {
        return;
    }
    let addr = closed_port(V4);
    let port = addr.port().to_string();
    let agent = Agent::start(&["--port", &port]);
    let listener = TcpListener::bind(addr).unwrap();
    // Backlog 0: one queued connection fills the accept queue, and the kernel drops the next
    // SYN (ListenOverflows). Calling listen() again on a listening socket sets its backlog.
    // SAFETY: listen on a valid socket fd.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let first = TcpStream::connect(addr).unwrap();
    let second = std::thread::spawn(move || {
        let start = Instant::now();
        let s = TcpStream::connect(addr).unwrap();
        (start.elapsed(), s)
    });
    std::thread::sleep(Duration::from_millis(300));
    let (a, _) = listener.accept().unwrap(); // frees the queue before the SYN is retried
    let (waited, s2) = second.join().unwrap();
    let (b, _) = listener.accept().unwrap();
    assert!(
        (0.9..1.6).contains(&waited.as_secs_f64()),
        "connect waited {waited:?}"
    );
    drop((first, s2, a, b));
    let active = [("mode", "active"), ("port", port.as_str())];
    let passive = [("mode", "passive"), ("port", port.as_str())];
    let text = agent.metrics_exactly(
        &format!("2 connections to port {port}, whose accept queue held 1"),
        &[
            (Figure::sample(&format!("{HS}_count"), &active), 2.0),
            (Figure::sample(&format!("{HS}_count"), &passive), 2.0),
        ],
    );
    assert_eq!(
        bucket(&text, HS, &active, "0.5"),
        1.0,
        "the first connect was fast"
    );
    assert_eq!(
        bucket(&text, HS, &active, "1"),
        1.0,
        "the second waited for its retried SYN"
    );
    assert_eq!(
        bucket(&text, HS, &active, "1.5"),
        2.0,
        "one retry lands in (1, 1.5]"
    );
    // The server's sample starts at its first SYN-ACK, after the dropped SYN: no 1 s in it
    // (under full emulation a loopback SYN-ACK to ACK can take over 10 ms).
    assert_eq!(
        bucket(&text, HS, &passive, "0.5"),
        2.0,
        "the server never saw the dropped SYN"
    );
}

#[test]
fn a_dropped_handshake_ack_makes_the_passive_handshake_one_second() {
    if !require_root("a_dropped_handshake_ack_makes_the_passive_handshake_one_second") {
        return;
    }
    const PORT: u16 = 18_080;
    let ns = Netns::new("ackdrop");
    // Drops exactly the client's handshake ACK: the second packet of the connection in the
    // original direction. The server retransmits its SYN-ACK after ~1 s; the client answers.
    ns.nft(&format!(
        "table inet t {{\n chain out {{\n type filter hook output priority 0;\n \
         tcp dport {PORT} tcp flags == ack ct original packets 2 drop\n }}\n}}\n"
    ));
    let port = PORT.to_string();
    let agent = Agent::start(&["--port", &port]);
    let waited = ns.run(|| {
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        let server = std::thread::spawn(move || {
            let start = Instant::now();
            let (s, _) = listener.accept().unwrap();
            (start.elapsed(), s)
        });
        let c = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        let (waited, s) = server.join().unwrap();
        drop((c, s));
        waited
    });
    assert!(
        (0.9..1.6).contains(&waited.as_secs_f64()),
        "accept waited {waited:?}"
    );
    let active = [("mode", "active"), ("port", port.as_str())];
    let passive = [("mode", "passive"), ("port", port.as_str())];
    let text = agent.metrics_exactly(
        &format!("1 connection to port {port}, its handshake ACK dropped"),
        &[
            (Figure::sample(&format!("{HS}_count"), &active), 1.0),
            (Figure::sample(&format!("{HS}_count"), &passive), 1.0),
        ],
    );
    // The client's connect returned at the SYN-ACK: no 1 s in it (under full emulation a
    // loopback handshake can take over 10 ms).
    assert_eq!(
        bucket(&text, HS, &active, "0.5"),
        1.0,
        "the client saw a fast handshake"
    );
    // The retransmission timer counts jiffies (4 ms at HZ=250) from the tick before the first
    // SYN-ACK, so the kernel's sample can come out a few ms under 1 s (seen on 6.12 under
    // emulation): above 0.5 s, at most 1.5 s.
    assert_eq!(
        bucket(&text, HS, &passive, "0.5"),
        0.0,
        "the server waited for its retransmit"
    );
    assert_eq!(
        bucket(&text, HS, &passive, "1.5"),
        1.0,
        "one SYN-ACK retransmit: (0.5, 1.5]"
    );
    agent.metrics_exactly(
        &format!("1 connection to port {port}, its handshake ACK dropped once"),
        &[(
            Figure::sample("tracer_tcp_synack_retransmits_total", &[("port", &port)]),
            1.0,
        )],
    );
}

#[test]
fn a_connection_held_500ms_has_a_lifetime_within_20_percent() {
    if !require_root("a_connection_held_500ms_has_a_lifetime_within_20_percent")
        || host_only(
            "a_connection_held_500ms_has_a_lifetime_within_20_percent",
            "a duration between transitions handshakes_teardowns_and_lifetimes checks on every kernel",
        )
    {
        return;
    }
    let addr = closed_port(V4);
    let port = addr.port().to_string();
    let agent = Agent::start(&["--port", &port]);
    let server = Server::start_at(addr, 1, Closer::Client);
    let c = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(c);
    server.join();
    let l = [("mode", "active"), ("port", port.as_str())];
    let text = agent.metrics_exactly(
        &format!("1 connection to port {port}, held 500 ms"),
        &[(
            Figure::sample("tracer_tcp_connection_duration_seconds_count", &l),
            1.0,
        )],
    );
    let secs = sample(&text, "tracer_tcp_connection_duration_seconds_sum", &l).unwrap();
    assert!(
        (0.4..=0.6).contains(&secs),
        "held 500 ms, lifetime {secs} s"
    );
}

/// Every other network namespace on the host (as the agent finds them), by one path each.
fn other_namespaces() -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    let mut seen = std::collections::BTreeMap::new();
    let procs = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("ns/net"));
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    for path in procs.chain(named) {
        if let Ok(m) = std::fs::metadata(&path) {
            seen.entry(m.ino()).or_insert(path.display().to_string());
        }
    }
    seen.into_iter()
        .filter(|(ino, _)| *ino != own)
        .map(|(_, p)| p)
        .collect()
}

/// Counts `ss -tan FILTER` lines by state, with the agent's state names, in this namespace
/// and (with `everywhere`) in every other one through nsenter.
fn ss_counts_everywhere(filter: &str) -> std::collections::BTreeMap<String, f64> {
    let mut total = ss_counts_in(None, filter);
    for ns in other_namespaces() {
        for (state, n) in ss_counts_in(Some(&ns), "") {
            *total.entry(state).or_default() += n;
        }
    }
    total
}

fn ss_counts_in(netns: Option<&str>, filter: &str) -> std::collections::BTreeMap<String, f64> {
    let mut cmd = match netns {
        Some(path) => {
            let mut c = std::process::Command::new("nsenter");
            c.arg(format!("--net={path}")).arg("ss");
            c
        }
        None => std::process::Command::new("ss"),
    };
    let out = cmd
        .arg("-tan")
        .args(filter.split_whitespace())
        .output()
        .expect("ss");
    let mut counts = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().skip(1) {
        let name = match line.split_whitespace().next() {
            Some("ESTAB") => "established",
            Some("SYN-SENT") => "syn_sent",
            Some("SYN-RECV") => "syn_recv",
            Some("FIN-WAIT-1") => "fin_wait1",
            Some("FIN-WAIT-2") => "fin_wait2",
            Some("TIME-WAIT") => "time_wait",
            Some("CLOSE-WAIT") => "close_wait",
            Some("LAST-ACK") => "last_ack",
            Some("LISTEN") => "listen",
            Some("CLOSING") => "closing",
            Some("UNCONN") | Some("CLOSE") => "close",
            _ => continue,
        };
        *counts.entry(name.to_owned()).or_insert(0.0) += 1.0;
    }
    counts
}

#[test]
fn socket_census_agrees_with_ss() {
    if !require_root("socket_census_agrees_with_ss") {
        return;
    }
    let agent = Agent::start(&[]);
    // Some of every common state: listeners, established pairs, and TIME_WAIT from
    // client-closed connections.
    let server = Server::start(V4, 10, Closer::Client);
    connect_many(server.addr, 10, Closer::Client);
    let listener = TcpListener::bind((V4, 0)).unwrap();
    let held: Vec<_> = (0..5)
        .map(|_| TcpStream::connect(listener.local_addr().unwrap()).unwrap())
        .collect();
    // Three sockets only bound (no listen, no connect): Linux 6.8+ keeps them in the TCP
    // hash as TCP_BOUND_INACTIVE, which ss does not show; nor may the agent.
    let bound: Vec<socket2::Socket> = (0..3)
        .map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&closed_port(V4).into()).unwrap();
            s
        })
        .collect();
    server.join();
    settle();
    let states = [
        "close",
        "established",
        "syn_sent",
        "syn_recv",
        "fin_wait1",
        "fin_wait2",
        "time_wait",
        "close_wait",
        "last_ack",
        "listen",
        "closing",
    ];
    // The agent's own port (its listener and the scrapes' connections) changes with every
    // request: left out on both sides. Everything else is compared exactly, in every
    // namespace, with ss taken before and after a census (and unchanged in between).
    let agent_port = agent.addr.port();
    let ours_filter = format!("( sport = :{agent_port} or dport = :{agent_port} )");
    let mut last = String::new();
    for _ in 0..5 {
        let before = ss_counts_everywhere(&format!("not {ours_filter}"));
        let asked = unix_now();
        let listing = sockets_json(&agent, "limit=10000");
        assert!(listing["census_timestamp_seconds"].as_f64().unwrap() > asked);
        let after = ss_counts_everywhere(&format!("not {ours_filter}"));
        let total = listing["total"].as_u64().unwrap();
        let listed = listing["sockets"].as_array().unwrap();
        assert_eq!(
            total as usize,
            listed.len(),
            "more than 10,000 sockets on this host"
        );
        let mut all = std::collections::BTreeMap::<String, f64>::new();
        let mut ours = std::collections::BTreeMap::<String, f64>::new();
        for s in listed {
            let state = s["state"].as_str().unwrap().to_owned();
            *all.entry(state.clone()).or_default() += 1.0;
            let agents = [&s["local_port"], &s["remote_port"]]
                .iter()
                .any(|p| p.as_u64() == Some(u64::from(agent_port)));
            if !agents {
                *ours.entry(state).or_default() += 1.0;
            }
        }
        let theirs: std::collections::BTreeMap<String, f64> = states
            .iter()
            .filter_map(|s| before.get(*s).map(|&n| (s.to_string(), n)))
            .collect();
        // The gauges come from the same census as the listing.
        let text = agent.metrics_now();
        let same_census = sample(&text, "tracer_census_timestamp_seconds", &[])
            == listing["census_timestamp_seconds"].as_f64();
        if before == after && ours == theirs && same_census {
            for s in states {
                assert_eq!(
                    sample(&text, "tracer_tcp_sockets", &[("state", s)]),
                    Some(all.get(s).copied().unwrap_or(0.0)),
                    "tracer_tcp_sockets{{state={s}}} against the listing of the same census"
                );
            }
            assert!(
                ours["time_wait"] >= 10.0 && ours["established"] >= 10.0,
                "{ours:?}"
            );
            drop((held, bound));
            return;
        }
        last = format!(
            "tracer {ours:?}\nss     {theirs:?}\nss after {after:?}\nsame census {same_census}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("census and ss disagree five times:\n{last}");
}

#[test]
fn health_index_and_sigterm() {
    if !require_root("health_index_and_sigterm")
        || host_only(
            "health_index_and_sigterm",
            "the HTTP endpoints and signal handling, not the kernel's",
        )
    {
        return;
    }
    let agent = Agent::start(&[]);
    assert_eq!(http_get(agent.addr, "/healthz"), (200, "ok\n".to_owned()));
    let (code, index) = http_get(agent.addr, "/");
    assert_eq!(code, 200);
    assert!(
        index.contains("/metrics") && index.contains("/healthz"),
        "{index}"
    );
    let text = agent.metrics();
    assert_eq!(
        sample(
            &text,
            "tracer_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    // Error counters exist at 0 from the first scrape.
    for zero in ["tracer_events_lost_total", "tracer_census_errors_total"] {
        assert_eq!(sample(&text, zero, &[]), Some(0.0), "{zero}");
    }
    assert!(sample(&text, "process_resident_memory_bytes", &[]).unwrap_or(0.0) > 0.0);
    let start = Instant::now();
    let out = agent.tracer.stop_with(libc::SIGTERM);
    assert!(out.status.success(), "{:?}", out.stderr);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "stopped in {:?}",
        start.elapsed()
    );
}

#[test]
fn every_socket_keeps_its_state_in_the_kernel_and_max_sockets_does_nothing() {
    if !require_root("every_socket_keeps_its_state_in_the_kernel_and_max_sockets_does_nothing") {
        return;
    }
    // An old flag still starts the agent, which says it does nothing now.
    let agent = Agent::start(&["--max-sockets", "10"]);
    let ns = Netns::new("stored");
    // The baseline once two censuses agree: a probe that a previous test loaded frees its own
    // storage on the sockets still open some time after it exits (seen on 6.1), which would
    // lower the bytes of sockets counted before.
    let figures = |t: &str| {
        (
            sample(t, "tracer_tracked_sockets", &[]).unwrap(),
            sample(t, "tracer_tracked_sockets_bytes", &[]).unwrap(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = figures(&agent.metrics());
    let (tracked_before, bytes_before) = loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = figures(&agent.metrics());
        if now == last || Instant::now() > deadline {
            break now;
        }
        last = now;
    };
    // 2,000 held connections: 4,000 sockets with the probe's state on them.
    const HELD: usize = 2_000;
    raise_open_files(2 * HELD as u64 + 1_024);
    let held = ns.run(|| {
        let listener = TcpListener::bind((V4, 2_049)).unwrap();
        let held: Vec<_> = (0..HELD)
            .map(|_| {
                let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                (c, listener.accept().unwrap().0)
            })
            .collect();
        (listener, held)
    });
    // The oracle: the option memory the kernel charges each of them (`ss -m`'s `o`), where
    // their storage is.
    let ss = ns.exec(&["ss", "-Htanm", "state", "established"]);
    let optmem: Vec<u64> = ss
        .split("skmem:(")
        .skip(1)
        .filter_map(|m| m.split(',').find_map(|f| f.strip_prefix('o')?.parse().ok()))
        .collect();
    assert_eq!(optmem.len(), 2 * HELD, "{ss}");
    let per_socket = optmem[0];
    assert!(
        optmem.iter().all(|&o| o == per_socket) && per_socket > 0,
        "{optmem:?}"
    );
    // The gauges follow the last census, read once a second.
    let n = (2 * HELD) as f64;
    let text = agent.metrics_until("the held sockets tracked", |t| {
        sample(t, "tracer_tracked_sockets", &[]).unwrap() - tracked_before >= n - 20.0
    });
    let tracked = sample(&text, "tracer_tracked_sockets", &[]).unwrap() - tracked_before;
    let bytes = sample(&text, "tracer_tracked_sockets_bytes", &[]).unwrap() - bytes_before;
    // Other sockets of the machine come and go meanwhile (the scrapes' own among them).
    assert!(
        (n - 20.0..=n + 50.0).contains(&tracked),
        "tracked {tracked}"
    );
    let expected = n * per_socket as f64;
    assert!(
        (bytes - expected).abs() <= 50.0 * per_socket as f64,
        "{bytes} bytes for {n} sockets of {per_socket}"
    );
    drop(held);
    let out = agent.tracer.stop_with(libc::SIGTERM);
    assert!(
        out.stderr
            .iter()
            .any(|l| l.starts_with("tracer: --max-sockets has no effect any more")),
        "{:?}",
        out.stderr
    );
}

#[test]
fn after_start_run_keeps_only_the_census_capabilities_and_watch_none() {
    if !require_root("after_start_run_keeps_only_the_census_capabilities_and_watch_none") {
        return;
    }
    // CAP_SYS_PTRACE (19) and CAP_SYS_ADMIN (21), from include/uapi/linux/capability.h.
    const CENSUS: u64 = (1 << 19) | (1 << 21);
    let ns = Netns::new("caps");
    let agent = Agent::start(&[]);
    let threads = capabilities_of_every_thread(agent.tracer.pid());
    assert!(threads.len() >= 3, "{threads:?}");
    for (tid, (effective, permitted, bounding, no_new_privs)) in &threads {
        assert!(
            effective | CENSUS == CENSUS && permitted | CENSUS == CENSUS,
            "thread {tid} of run has {effective:#x} / {permitted:#x}"
        );
        assert_eq!(bounding | CENSUS, CENSUS, "bounding set of thread {tid}");
        assert!(*no_new_privs, "thread {tid} may gain privileges");
    }
    let main = threads[&agent.tracer.pid()];
    assert_eq!(
        (main.0, main.1, main.2),
        (CENSUS, CENSUS, CENSUS),
        "run's event thread"
    );
    // With only those, the census still enters every namespace, the test's included.
    let text = agent.metrics();
    let visited = sample(&text, "tracer_census_namespaces", &[("result", "visited")]);
    let unreachable = sample(
        &text,
        "tracer_census_namespaces",
        &[("result", "unreachable")],
    );
    assert!(visited.unwrap_or(0.0) >= 2.0, "{visited:?}");
    assert_eq!(unreachable, Some(0.0));
    drop((agent, ns));

    let watch = Tracer::start(&["watch", "--port", "1"], true);
    for (tid, (effective, permitted, bounding, _)) in capabilities_of_every_thread(watch.pid()) {
        assert_eq!(
            (effective, permitted, bounding),
            (0, 0, 0),
            "thread {tid} of watch"
        );
    }
}

/// For each thread of `pid`: its effective, permitted and bounding capability sets and
/// whether it set no_new_privs, from `/proc/PID/task/TID/status`.
fn capabilities_of_every_thread(
    pid: u32,
) -> std::collections::BTreeMap<u32, (u64, u64, u64, bool)> {
    let mut out = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid: u32 = task.file_name().to_string_lossy().parse().unwrap();
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // a thread that just ended
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        let hex = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        out.insert(
            tid,
            (
                hex("CapEff:"),
                hex("CapPrm:"),
                hex("CapBnd:"),
                field("NoNewPrivs:") == "1",
            ),
        );
    }
    out
}

#[test]
fn sigterm_during_start_up_stops_the_agent_with_0_within_a_second() {
    if !require_root("sigterm_during_start_up_stops_the_agent_with_0_within_a_second") {
        return;
    }
    // 64 MiB rings on every CPU: loading takes a few hundred ms, and the signal comes during it.
    let listen = free_listen_addr().to_string();
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["run", "--listen", &listen, "--ring-buffer-size", "64M"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once its handler is installed (SigCgt), the first thing main does: before that, under
    // full emulation, exec and dynamic loading alone can take longer than a fixed pause.
    let caught = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", agent.id()));
        status.ok().and_then(|s| {
            let mask = s.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
    };
    let waiting = Instant::now();
    while caught().unwrap_or(0) & (1 << (libc::SIGTERM - 1)) == 0 {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "no SIGTERM handler"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let sent = Instant::now();
    // SAFETY: kill on our own child's PID, not yet reaped.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "stopped {took:?} after SIGTERM"
    );
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Restores `kernel.modprobe` (the helper the kernel runs to load a module) when dropped.
struct ModprobeHelper(String);

impl ModprobeHelper {
    const PATH: &'static str = "/proc/sys/kernel/modprobe";

    /// Points the kernel's module loader at nothing, so that no module can be loaded.
    fn disable() -> ModprobeHelper {
        let old = std::fs::read_to_string(Self::PATH).expect("reading kernel.modprobe");
        std::fs::write(Self::PATH, "/nonexistent/modprobe\n").expect("writing kernel.modprobe");
        ModprobeHelper(old)
    }
}

impl Drop for ModprobeHelper {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

#[test]
fn a_census_without_tcp_diag_says_modprobe_once_and_recovers_when_it_is_loaded() {
    let test = "a_census_without_tcp_diag_says_modprobe_once_and_recovers_when_it_is_loaded";
    if !require_root(test) {
        return;
    }
    // Loaded now if it is a module at all (ss's dump loads it).
    let _ = std::process::Command::new("ss").arg("-tanH").output();
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    if !modules.lines().any(|l| l.starts_with("tcp_diag ")) {
        unsupported(
            "census_failure",
            "tcp_diag is built into this kernel (not in /proc/modules): no census can be made \
             to fail for want of it; the Debian kernels of the matrix have it as a module",
        );
        return;
    }
    // Unloaded, and not loadable again: sock_diag answers every TCP dump with ENOENT, as on a
    // host whose kernel has no tcp_diag module at hand.
    let helper = ModprobeHelper::disable();
    let name = std::ffi::CString::new("tcp_diag").unwrap();
    // SAFETY: delete_module with a NUL-terminated name and flags; it only unloads a module.
    let unloaded =
        unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
    assert_eq!(
        unloaded,
        0,
        "rmmod tcp_diag: {}",
        std::io::Error::last_os_error()
    );
    // A census every 200 ms (Agent::start's), each one failing: waits for ten failures
    // (counted by the agent) rather than a fixed time, as a census takes longer than its
    // interval in an emulated guest (8 in 3 s seen there), and then every line said so far
    // must be the one line.
    let mut agent = Agent::start(&[]);
    let errors_total = |t: &str| sample(t, "tracer_census_errors_total", &[]).unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = agent.metrics_now();
        if errors_total(&text) >= 10.0 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let errors = errors_total(&text);
    assert!(errors >= 10.0, "{errors} failed censuses in 30 s:\n{text}");
    let said: Vec<String> = agent
        .tracer
        .stderr_after(Duration::ZERO)
        .into_iter()
        .filter(|l| l.contains("census"))
        .collect();
    assert_eq!(
        said.len(),
        1,
        "one line for {errors} failed censuses: {said:?}"
    );
    assert!(
        said[0]
            .starts_with("tracer: socket census failed: this kernel has no TCP socket diagnostics")
            && said[0].contains("run `modprobe tcp_diag`"),
        "{said:?}"
    );
    let (code, body) = http_get(agent.addr, "/sockets");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("no socket census yet: this kernel has no TCP socket diagnostics"),
        "{body}"
    );
    let text = agent.metrics_now();
    let failing = |t: &str, reason| sample(t, "tracer_census_failing", &[("reason", reason)]);
    assert_eq!(failing(&text, "sock_diag_missing"), Some(1.0), "{text}");
    assert_eq!(failing(&text, "other"), Some(0.0), "{text}");

    // Loadable again: the next census loads it (sock_diag asks the kernel to) and works.
    drop(helper);
    let text = agent.metrics_until("a census that works", |t| {
        failing(t, "sock_diag_missing") == Some(0.0)
    });
    assert_eq!(failing(&text, "sock_diag_missing"), Some(0.0));
    let (code, body) = http_get(agent.addr, "/sockets");
    assert_eq!(code, 200, "{body}");
    let said = agent.tracer.stderr_after(Duration::from_millis(200));
    assert!(
        said.iter()
            .any(|l| l == "tracer: socket census works again"),
        "{said:?}"
    );
}
