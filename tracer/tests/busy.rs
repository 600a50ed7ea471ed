//! The agent on a host in the state production hosts are in: TIME-WAIT piles left from before
//! it started, events lost on purpose (tiny rings and a stopped reader), and the defaults the
//! deployment files use (no `--port`).

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;

/// A free loopback port below the ephemeral range: where services listen.
fn service_port() -> SocketAddr {
    closed_port(V4)
}

/// Every value of the `port` label in a Prometheus text exposition.
fn port_label_values(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once("port=\"").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once('"').map(|(v, _)| v.to_owned()))
        .collect()
}

/// Ports something listens on in this namespace, as `ss -ltn` shows them.
fn listening_ports() -> BTreeSet<String> {
    let out = std::process::Command::new("ss")
        .args(["-Hltn"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| local.rsplit_once(':').map(|(_, p)| p.to_owned()))
        .collect()
}

#[test]
fn a_service_started_after_thousands_of_time_waits_gets_its_own_port_label() {
    if !require_root("a_service_started_after_thousands_of_time_waits_gets_its_own_port_label") {
        return;
    }
    let (lo, hi) = ephemeral_range();
    // Before the agent: 3,000 connections to a throwaway listener on an ephemeral port, closed
    // by the server first, then the listener closed: 3,000 TIME-WAIT sockets whose ports are
    // all ephemeral (the case that used to take every label value).
    let old = Server::start(V4, 3_000, Closer::Server);
    let old_port = old.addr.port();
    connect_many(old.addr, 3_000, Closer::Server);
    old.join();
    let tw = ss_lines(&format!("state time-wait ( sport = :{old_port} )")).len();
    // (A few connects may reuse a TIME-WAIT socket over a second old on a slow machine.)
    assert!(tw >= 2_000, "TIME-WAIT left before the agent: {tw}");

    let agent = Agent::start(&[]); // the deployment's defaults: no --port
    let addr = service_port();
    let port = addr.port().to_string();
    let server = Server::start_at(addr, 200, Closer::Client);
    connect_many(addr, 200, Closer::Client);
    server.join();
    settle();
    let text = agent.metrics_until("200 handshakes each side", |t| {
        let count = |mode| {
            sample(
                t,
                "tracer_tcp_handshake_duration_seconds_count",
                &[("mode", mode), ("port", &port)],
            )
        };
        count("active") == Some(200.0) && count("passive") == Some(200.0)
    });
    assert_eq!(
        sample(&text, "tracer_port_label_info", &[("port", &port)]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "tracer_port_label_overflow_total", &[]),
        Some(0.0)
    );
    // The old TIME-WAIT sockets are counted, under `other`: their ports are no services.
    let other_tw = sample(&text, "tracer_tcp_time_wait_sockets", &[("port", "other")]).unwrap();
    assert!(
        other_tw >= tw as f64,
        "TIME-WAIT under other: {other_tw}, ss {tw}"
    );
    // No label value in the ephemeral range, but for a port something listens on (a listening
    // port is a service by rule; this host's own daemons may have some).
    let listening = listening_ports();
    let ephemeral: Vec<String> = port_label_values(&text)
        .into_iter()
        .filter(|v| v.parse::<u16>().is_ok_and(|p| (lo..=hi).contains(&p)))
        .filter(|v| !listening.contains(v))
        .collect();
    assert!(
        ephemeral.is_empty(),
        "ephemeral ports with a label value: {ephemeral:?}"
    );
    assert!(!port_label_values(&text).contains(&old_port.to_string()));
}

#[test]
fn a_close_wait_leak_whose_transitions_were_lost_is_flagged_with_a_lower_bound_age() {
    if !require_root(
        "a_close_wait_leak_whose_transitions_were_lost_is_flagged_with_a_lower_bound_age",
    ) {
        return;
    }
    let addr = service_port();
    let port = addr.port().to_string();
    // One page per CPU: 42 transitions fill a ring.
    let agent = Agent::start(&[
        "--ring-buffer-size",
        "4K",
        "--stuck-after",
        "close_wait=2s",
        "--port",
        &port,
    ]);
    let listener = TcpListener::bind(addr).unwrap();
    settle();
    let before = agent.metrics_now();
    let lost_before = sample(&before, "tracer_events_lost_total", &[]).unwrap();

    // Stop the reader, fill the rings with a burst, then leak 25 connections: every
    // transition of the leak finds the rings full.
    let pid = agent.tracer.pid() as i32;
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let burst = Server::start(V4, 500, Closer::Client);
    connect_many(burst.addr, 500, Closer::Client);
    burst.join();
    let mut kept = Vec::new();
    for _ in 0..25 {
        let c = TcpStream::connect(addr).unwrap();
        kept.push(listener.accept().unwrap().0);
        drop(c);
    }
    settle();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);

    let query = format!("state=close_wait&port={port}");
    // The first census after the burst finds them; the next one adds them to the table (a
    // socket must be found twice, so that one closing during a census never comes back).
    let _ = sockets_json(&agent, &query);
    let listed = sockets_json(&agent, &query)["sockets"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(listed.len(), 25, "{listed:?}");
    // The probe's loss counters are read once a second.
    let lost = |t: &str| sample(t, "tracer_events_lost_total", &[]).unwrap() - lost_before;
    let text = agent.metrics_until("the burst's losses", |t| lost(t) >= 4_500.0);
    assert!(lost(&text) >= 4_500.0);
    for s in &listed {
        // The agent never saw them enter CLOSE_WAIT: the census's lower bound.
        assert_eq!(s["age_source"], "census", "{s}");
        assert_eq!(s["age_is_lower_bound"], true, "{s}");
        assert_eq!(s["stuck"], false, "{s}");
    }
    assert!(
        sample(
            &text,
            "tracer_census_corrections_total",
            &[("action", "added")]
        )
        .unwrap()
            >= 25.0
    );

    // Past the threshold, counted from the census that found them: flagged.
    std::thread::sleep(Duration::from_millis(2_300));
    let listed = sockets_json(&agent, &query)["sockets"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(listed.len(), 25);
    for s in &listed {
        assert_eq!(
            (s["stuck"].as_bool(), s["age_source"].as_str()),
            (Some(true), Some("census")),
            "{s}"
        );
        assert!(s["age_seconds"].as_f64().unwrap() >= 2.0, "{s}");
    }
    let text = agent.metrics();
    assert_eq!(
        sample(
            &text,
            "tracer_tcp_stuck_sockets",
            &[("state", "close_wait"), ("port", &port)]
        ),
        Some(25.0)
    );
    // Burst sockets whose CLOSE was lost are dropped from the table, not kept until evicted.
    assert!(
        sample(
            &text,
            "tracer_census_corrections_total",
            &[("action", "dropped")]
        )
        .unwrap()
            >= 1.0,
        "{text}"
    );
    drop((kept, listener));
}

#[test]
fn every_metric_dashboards_and_alerts_use_is_exported_right_after_start() {
    if !require_root("every_metric_dashboards_and_alerts_use_is_exported_right_after_start") {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut names = BTreeSet::new();
    let mut files = vec![root.join("dashboards/tracer.json")];
    for dir in ["deploy/prometheus", "deploy/kubernetes"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("tracer_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            // Alert names and the like are CamelCase; metric names are lowercase.
            if name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                names.insert(name);
            }
        }
    }
    assert!(names.len() >= 15, "metric names found: {names:?}");
    let agent = Agent::start(&["--census-interval", "1h"]);
    let text = agent.metrics_now(); // the first scrape: nothing happened yet
    let exported: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    // Reset reasons exist from Linux 6.10 on: before, the kernel names none to export.
    let reasons = sample(
        &text,
        "tracer_feature_enabled",
        &[("feature", "reset_reason")],
    );
    if reasons == Some(0.0) {
        unsupported(
            "reset_reason",
            "tracer_tcp_reset_reasons_total has no series on this kernel",
        );
    }
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .filter(|n| !(reasons == Some(0.0) && *n == "tracer_tcp_reset_reasons_total"))
        .collect();
    assert!(missing.is_empty(), "not exported at start: {missing:?}");
    // The per-port ones have their `other` series.
    for name in [
        "tracer_tcp_stuck_sockets",
        "tracer_tcp_synack_retransmits_total",
        "tracer_tcp_handshake_failures_total",
        "tracer_tcp_time_wait_sockets",
        "tracer_tcp_handshake_duration_seconds_count",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains("port=\"other\"")),
            "{name} has no port=\"other\" series"
        );
    }
}

#[test]
fn concurrent_requests_share_the_published_census_and_start_none() {
    if !require_root("concurrent_requests_share_the_published_census_and_start_none") {
        return;
    }
    // The first census runs at start; with an hour's interval no other runs during the test.
    let agent = Agent::start(&["--census-interval", "1h"]);
    let stamp = |t: &str| sample(t, "tracer_census_timestamp_seconds", &[]).unwrap();
    let first = stamp(&agent.metrics_now());
    let addr = agent.addr;
    let clients: Vec<_> = (0..40)
        .map(|i| {
            std::thread::spawn(move || {
                for _ in 0..10 {
                    let path = if i % 2 == 0 {
                        "/sockets?limit=1"
                    } else {
                        "/metrics"
                    };
                    let (code, _) = http_get(addr, path);
                    assert_eq!(code, 200, "{path}");
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    // 400 requests answered, every one from the census taken at start.
    let text = agent.metrics_now();
    assert_eq!(stamp(&text), first, "a request started a census");
    let listing = http_get(addr, "/sockets?limit=1").1;
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing["census_timestamp_seconds"].as_f64(), Some(first));
    // Bad queries are refused, not reinterpreted.
    for bad in ["limit=0", "state=bogus", "older=1s"] {
        assert_eq!(http_get(addr, &format!("/sockets?{bad}")).0, 400, "{bad}");
    }
}
