//! The probe's rare paths, on the real kernel: a map that runs full is counted exactly,
//! exported, and said on stderr through aya-log, rate-limited, at the level `RUST_LOG` picks.
//!
//! The map filled here is the probe's listener table (16,384 listening ports per host, kept so
//! that accepted sockets inherit their listener's owner). Its first entry is the agent's own
//! HTTP listener (bound after the probe is attached); then a test namespace gets 16 listening
//! ports more than the table holds, so exactly the last 17 cannot be recorded.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

use common::*;

/// The probe's listener table size (`tracer_common::MAX_LISTENERS`), stated here again on
/// purpose: the test should not take its expectation from the code it checks.
const TABLE: usize = 16_384;
/// Listening ports opened past the table's size.
const OVER: usize = 16;
/// The listens that find the table full: those, and one more for the agent's own listener.
const FULL: usize = OVER + 1;
/// The first port listened on in the test namespace (nothing else listens there).
const FIRST_PORT: u16 = 1_024;
const LOG_LINE: &str = "tracer: probe warn: listener table full (16384 listening ports)";

#[test]
fn a_full_listener_table_is_counted_exactly_and_logged_at_most_once_a_second_per_cpu() {
    if !require_root("a_full_listener_table_is_counted_exactly_and_logged") {
        return;
    }
    let started = Instant::now();
    let (agent, _netns, listeners) = agent_with_a_full_listener_table("warn");
    // Let a second pass, in which no more fail, to see that the count stays exact.
    std::thread::sleep(Duration::from_millis(1_100));
    let text = agent.metrics_now();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(table_full(&text), FULL as f64);
    for error in ["field_read", "address_family"] {
        assert_eq!(
            sample(&text, "tracer_probe_errors_total", &[("error", error)]),
            Some(0.0),
            "tracer_probe_errors_total{{error={error}}}"
        );
    }
    drop(listeners);
    let out = agent.tracer.stop_with(libc::SIGTERM);
    let lines: Vec<&String> = out
        .stderr
        .iter()
        .filter(|l| l.starts_with(LOG_LINE))
        .collect();
    // All 17 failures came within one burst: at most one line per CPU and second.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = cpus * (elapsed.ceil() as usize + 1);
    assert!(
        !lines.is_empty() && lines.len() <= most.min(FULL),
        "expected 1 to {} lines starting {LOG_LINE:?}; stderr: {:#?}",
        most.min(FULL),
        out.stderr
    );
    // The port named is one of the 17 that found the table full: the last ones opened.
    let overflowed = (FIRST_PORT as usize + TABLE - 1)..(FIRST_PORT as usize + TABLE + OVER);
    for line in lines {
        let port: usize = line
            .split("on port ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        assert!(
            overflowed.contains(&port),
            "{port} not in {overflowed:?}: {line}"
        );
    }
}

#[test]
fn rust_log_off_silences_the_probe_but_not_its_counters() {
    if !require_root("rust_log_off_silences_the_probe_but_not_its_counters") {
        return;
    }
    let (agent, _netns, listeners) = agent_with_a_full_listener_table("off");
    drop(listeners);
    let out = agent.tracer.stop_with(libc::SIGTERM);
    let said: Vec<&String> = out
        .stderr
        .iter()
        .filter(|l| l.starts_with("tracer: probe"))
        .collect();
    assert!(said.is_empty(), "RUST_LOG=off, yet: {said:#?}");
}

/// Starts an agent with `RUST_LOG=level`, then opens 16 listening ports more than the probe's
/// listener table holds, in a new namespace; returns once the agent counts exactly the 17
/// listens that found the table full.
fn agent_with_a_full_listener_table(level: &str) -> (Agent, Netns, Vec<TcpListener>) {
    let agent = Agent::start_with_env(&[], &[("RUST_LOG", level)]);
    let netns = Netns::new(&format!("log{level}"));
    let listeners = listen_on_many(&netns, TABLE + OVER);
    // The probe's counters are read once a second, apart from any census: no census is
    // waited for (with 16,400 listeners a census under full emulation takes seconds).
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = agent.metrics_now();
        if table_full(&text) >= FULL as f64 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(table_full(&text), FULL as f64, "{text}");
    (agent, netns, listeners)
}

fn table_full(text: &str) -> f64 {
    sample(
        text,
        "tracer_probe_table_full_total",
        &[("table", "listener_owners")],
    )
    .expect("tracer_probe_table_full_total{table=listener_owners} exported")
}

/// Opens `n` listening sockets on consecutive ports of 127.0.0.1 in `netns`, in port order.
fn listen_on_many(netns: &Netns, n: usize) -> Vec<TcpListener> {
    raise_open_files(n as u64 + 1_024);
    netns.run(move || {
        (0..n)
            .map(|i| {
                let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, FIRST_PORT + i as u16);
                TcpListener::bind(addr).unwrap_or_else(|e| panic!("listen on {addr}: {e}"))
            })
            .collect()
    })
}
