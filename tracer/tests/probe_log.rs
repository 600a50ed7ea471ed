//! The probe's rare paths, on the real kernel: what it cannot do is counted exactly, exported,
//! and said on stderr through aya-log, rate-limited, at the level `RUST_LOG` picks.
//!
//! The rare path provoked here is a socket the kernel gives no storage: the probe keeps each
//! socket's state in BPF socket storage, which the kernel charges to the socket's option
//! memory, capped by `net.core.optmem_max` (per network namespace since Linux 6.9). In a test
//! namespace whose cap is 0, every transition that would make storage finds none; the events
//! are still delivered, without owner or times. The other is a transition the probe missed,
//! told by the socket's storage.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// Connections made in the namespace.
const CONNECTIONS: usize = 40;
/// The transitions that look for storage to make, stated here on purpose rather than taken
/// from the code: the listener's CLOSE -> LISTEN, and per connection the client's CLOSE ->
/// SYN_SENT -> ESTABLISHED -> FIN_WAIT1 -> FIN_WAIT2 and the child's LISTEN -> SYN_RECV ->
/// ESTABLISHED -> CLOSE_WAIT -> LAST_ACK (a transition to CLOSE makes none).
const NO_STORAGE: usize = 1 + 8 * CONNECTIONS;
/// A service port below the ephemeral range.
const PORT: u16 = 2_049;
const LOG_LINE: &str = "tracer: probe warn: the kernel gave a socket on port";

#[test]
fn sockets_without_storage_are_counted_exactly_and_logged_at_most_once_a_second_per_cpu() {
    if !require_root("sockets_without_storage_are_counted_exactly_and_logged") {
        return;
    }
    let started = Instant::now();
    let Some((agent, _netns)) = agent_after_sockets_without_storage("warn") else {
        return;
    };
    let text = agent.metrics_now();
    let elapsed = started.elapsed().as_secs_f64();
    for error in ["field_read", "address_family"] {
        assert_eq!(
            sample(&text, "tracer_probe_errors_total", &[("error", error)]),
            Some(0.0),
            "tracer_probe_errors_total{{error={error}}}"
        );
    }
    let out = agent.tracer.stop_with(libc::SIGTERM);
    let lines: Vec<&String> = out
        .stderr
        .iter()
        .filter(|l| l.starts_with(LOG_LINE))
        .collect();
    // All of them came within one burst: at most one line per CPU and second.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = cpus * (elapsed.ceil() as usize + 1);
    assert!(
        !lines.is_empty() && lines.len() <= most,
        "expected 1 to {most} lines starting {LOG_LINE:?}; stderr: {:#?}",
        out.stderr
    );
    for line in lines {
        // The port named is the service's or a client's (whose port is 0 at SYN_SENT).
        let port: u16 = line
            .split("on port ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        assert!(port == PORT || port == 0 || port >= 10_000, "{line}");
    }
}

#[test]
fn rust_log_off_silences_the_probe_but_not_its_counters() {
    if !require_root("rust_log_off_silences_the_probe_but_not_its_counters") {
        return;
    }
    let Some((agent, _netns)) = agent_after_sockets_without_storage("off") else {
        return;
    };
    let out = agent.tracer.stop_with(libc::SIGTERM);
    let said: Vec<&String> = out
        .stderr
        .iter()
        .filter(|l| l.starts_with("tracer: probe"))
        .collect();
    assert!(said.is_empty(), "RUST_LOG=off, yet: {said:#?}");
}

/// A transition the probe did not see is told by the socket's own state and counted, and no
/// duration is made up across it.
///
/// The kernel skips a BPF program's run nested in itself on one CPU, and the rescue program
/// delivers it; a transition lost to both is what this stands for. It cannot be provoked at
/// will, so the test plays it on the probe's own storage: it writes the server side's storage
/// back to SYN_RECV, with no ESTABLISHED time, as if the probe had missed SYN_RECV ->
/// ESTABLISHED, through the agent's `SOCKETS` map (as `bpftool map update` would). The
/// server's next transition, ESTABLISHED -> CLOSE_WAIT, finds its storage in SYN_RECV: one
/// skipped transition, and the server side's lifetime is not measured (it starts at the
/// transition missed), while the client's is and both teardowns still are.
#[test]
fn a_transition_the_probe_missed_is_counted_and_makes_no_duration() {
    if !require_root("a_transition_the_probe_missed_is_counted_and_makes_no_duration") {
        return;
    }
    const SERVICE: u16 = 2_050;
    let port = SERVICE.to_string();
    let agent = Agent::start(&["--port", &port]);
    let listener =
        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, SERVICE)).expect("listen");
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    let skipped = Figure::sample("tracer_transitions_skipped_total", &[]);
    agent.metrics_exactly(
        &format!("1 connection to port {port}, nothing rewritten yet"),
        &[(handshakes(&port), 2.0), (skipped.clone(), 0.0)],
    );

    let mut storage = agent_sockets_map();
    let mut state = storage.get(&server, 0).expect("the server side's storage");
    assert_eq!(state.state, tracer_common::state::ESTABLISHED, "{state:?}");
    state.state = tracer_common::state::SYN_RECV;
    state.established_ns = 0;
    storage
        .insert(&server, state, 0)
        .expect("rewrite the storage");

    client.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    server
        .read_to_end(&mut rest)
        .expect("read the client's FIN");
    drop(server);
    client
        .read_to_end(&mut rest)
        .expect("read the server's FIN");
    drop(client);
    // The probe's counters reach the metrics once a second, the events at once.
    let what = format!(
        "1 connection to port {port} closed, its server side's storage rewritten to SYN_RECV"
    );
    let text = agent.metrics_exactly(
        &what,
        &[
            (teardowns("active", &port), 1.0),
            (teardowns("passive", &port), 1.0),
            (skipped, 1.0),
        ],
    );
    let lifetime = |mode| {
        Figure::sample(
            "tracer_tcp_connection_duration_seconds_count",
            &[("mode", mode), ("port", &port)],
        )
    };
    assert_figures(
        &text,
        &what,
        &[(lifetime("active"), 1.0), (lifetime("passive"), 0.0)],
    );
}

/// The running agent's `SOCKETS` map (there is one agent at a time in these tests).
fn agent_sockets_map() -> aya::maps::SkStorage<aya::maps::MapData, tracer_common::SocketState> {
    let info = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| {
            m.name_as_str() == Some("SOCKETS")
                && matches!(m.map_type(), Ok(aya::maps::MapType::SkStorage))
        })
        .max_by_key(|m| m.id())
        .expect("the agent's SOCKETS map is loaded");
    let data = aya::maps::MapData::from_id(info.id()).expect("open SOCKETS");
    aya::maps::SkStorage::try_from(aya::maps::Map::SkStorage(data)).expect("SOCKETS")
}

/// Handshakes of both modes on `port`.
fn handshakes(port: &str) -> Figure {
    Figure::sum(
        "tracer_tcp_handshake_duration_seconds_count",
        &[("port", port)],
    )
}

/// Teardowns of `mode` on `port`.
fn teardowns(mode: &str, port: &str) -> Figure {
    Figure::sample(
        "tracer_tcp_teardown_duration_seconds_count",
        &[("mode", mode), ("port", port)],
    )
}

/// Starts an agent with `RUST_LOG=level`, then makes [`CONNECTIONS`] connections in a new
/// namespace whose `net.core.optmem_max` is 0; returns once the agent counts exactly the
/// [`NO_STORAGE`] transitions that found no storage, and the events all arrived. None (said
/// loudly) on a kernel where the cap is not per namespace.
fn agent_after_sockets_without_storage(level: &str) -> Option<(Agent, Netns)> {
    let agent = Agent::start_with_env(&[], &[("RUST_LOG", level)]);
    let netns = Netns::new(&format!("log{level}"));
    // Before Linux 6.9 the cap is the host's: absent from other namespaces' sysctls.
    let namespaced = std::process::Command::new("ip")
        .args(["netns", "exec", &netns.name, "test", "-e"])
        .arg("/proc/sys/net/core/optmem_max")
        .status()
        .is_ok_and(|s| s.success());
    if !namespaced {
        unsupported(
            "no_storage",
            "net.core.optmem_max is not per network namespace on this kernel (Linux 6.9+): \
             the rare path is not provoked here",
        );
        return None;
    }
    netns.exec(&["sysctl", "-qw", "net.core.optmem_max=0"]);
    let before = events(&agent.metrics_now());
    netns.run(|| {
        let listener =
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT)).expect("listen");
        for _ in 0..CONNECTIONS {
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).expect("connect");
            let (mut server, _) = listener.accept().expect("accept");
            client.write_all(b"x").expect("write");
            client.shutdown(Shutdown::Write).expect("shutdown");
            // The client's FIN has arrived when the server reads the end: it closes second.
            let mut got = Vec::new();
            server.read_to_end(&mut got).expect("read");
            assert_eq!(got, b"x");
            drop(server);
            let mut rest = Vec::new();
            client
                .read_to_end(&mut rest)
                .expect("read the server's FIN");
        }
    });
    // Each connection is 10 transitions, and the listener's two.
    let expected_events = before + 2.0 + 10.0 * CONNECTIONS as f64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = agent.metrics_now();
        let done = no_storage(&text) >= NO_STORAGE as f64 && events(&text) >= expected_events;
        if done || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_figures(
        &text,
        &format!(
            "{CONNECTIONS} connections on port {PORT} in a namespace whose optmem_max is 0, \
             {NO_STORAGE} of their transitions without storage"
        ),
        &[(
            Figure::sample("tracer_probe_errors_total", &[("error", "no_storage")]),
            NO_STORAGE as f64,
        )],
    );
    assert!(
        events(&text) >= expected_events,
        "every event delivered: {} of at least {expected_events}",
        events(&text)
    );
    Some((agent, netns))
}

fn no_storage(text: &str) -> f64 {
    sample(
        text,
        "tracer_probe_errors_total",
        &[("error", "no_storage")],
    )
    .expect("tracer_probe_errors_total{error=no_storage} exported")
}

fn events(text: &str) -> f64 {
    sample(text, "tracer_events_total", &[]).expect("tracer_events_total exported")
}
