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

/// The handshakes of `mode` counted under `port` in a scrape.
fn handshakes(mode: &str, port: &str) -> Figure {
    Figure::sample(
        "tracer_tcp_handshake_duration_seconds_count",
        &[("mode", mode), ("port", port)],
    )
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
    if !require_root("a_service_started_after_thousands_of_time_waits_gets_its_own_port_label")
        || host_only(
            "a_service_started_after_thousands_of_time_waits_gets_its_own_port_label",
            "the agent's port labels, not the kernel's (its TIME-WAIT census is time_wait_per_port_matches_ss's on every kernel)",
        )
    {
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
    let text = agent.metrics_exactly(
        &format!("200 connections to port {port}, after 3,000 TIME-WAIT on port {old_port}"),
        &[
            (handshakes("active", &port), 200.0),
            (handshakes("passive", &port), 200.0),
        ],
    );
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
fn a_service_listening_inside_the_ephemeral_range_is_counted_whole_under_its_own_port() {
    if !require_root("a_service_listening_inside_the_ephemeral_range_is_counted_whole")
        || host_only(
            "a_service_listening_inside_the_ephemeral_range_is_counted_whole",
            "the agent's port labels, not the kernel's (its listeners come from the census, which socket_census_agrees_with_ss checks on every kernel)",
        )
    {
        return;
    }
    // gRPC's default 50051 is such a port: here, one the kernel picks from the range. Its
    // listening does not give it a value (throwaway listeners live there too), nor do the
    // client's handshakes to it (an ephemeral remote port); its first passive handshake does,
    // just after the first client's: every handshake of both sides counts under the port.
    let (lo, hi) = ephemeral_range();
    let agent = Agent::start(&[]); // the deployment's defaults: no --port
    let server = Server::start(V4, 200, Closer::Client);
    let port = server.addr.port();
    assert!((lo..=hi).contains(&port), "{port} outside {lo}-{hi}");
    connect_many(server.addr, 200, Closer::Client);
    server.join();
    let port = port.to_string();
    let text = agent.metrics_exactly(
        &format!("200 connections to port {port}, inside the ephemeral range {lo}-{hi}"),
        &[
            (handshakes("active", &port), 200.0),
            (handshakes("passive", &port), 200.0),
        ],
    );
    for mode in ["active", "passive"] {
        let other = handshakes(mode, "other").read(&text);
        // Other sockets of the machine may count there, but not ours: at most a handful.
        assert!(other < 200.0, "{mode} under other: {other}");
    }
    assert_eq!(
        sample(&text, "tracer_port_held_overflow_total", &[]),
        Some(0.0)
    );
}

#[test]
fn a_close_wait_leak_made_while_the_agent_was_stopped_has_its_exact_age_and_owner() {
    if !require_root("a_close_wait_leak_made_while_the_agent_was_stopped_has_its_exact_age") {
        return;
    }
    let addr = service_port();
    let port = addr.port().to_string();
    // One page per CPU: 24 transitions fill a ring.
    let agent = Agent::start(&[
        "--ring-buffer-size",
        "4K",
        "--stuck-after",
        "close_wait=2s",
        "--port",
        &port,
    ]);
    let listener = TcpListener::bind(addr).unwrap();
    // The listener was made by this thread: it owns the leaks, as `ss -p` would say.
    let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
    settle();
    let before = agent.metrics_now();
    let counter = |t: &str, name: &str| sample(t, name, &[]).unwrap();
    let (events_before, lost_before) = (
        counter(&before, "tracer_events_total"),
        counter(&before, "tracer_events_lost_total"),
    );

    // Stop the agent (as a throttled container is), fill the rings with a burst, then leak
    // 25 connections: every transition of the leak finds the rings full.
    let pid = agent.tracer.pid() as i32;
    let burst = Server::start(V4, 500, Closer::Client);
    let ftrace = Ftrace::start("stopped", &[addr.port(), burst.addr.port()]);
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    connect_many(burst.addr, 500, Closer::Client);
    burst.join();
    let mut kept = Vec::new();
    // When each leak began, bracketed by the test's clock: on loopback the FIN is handled
    // within close(), so the server's socket enters CLOSE_WAIT between the two readings
    // (however long this thread waits for a CPU between them: an emulated guest on a busy
    // host once took 62 ms).
    let mut leaked_at = Vec::new();
    for _ in 0..25 {
        let c = TcpStream::connect(addr).unwrap();
        kept.push(listener.accept().unwrap().0);
        let before = unix_now();
        drop(c);
        leaked_at.push((before, unix_now()));
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let truth = ftrace.stop();

    // One census: what the probe keeps on each socket says it all, whatever was lost.
    let query = format!("state=close_wait&port={port}");
    let answer = sockets_json(&agent, &query);
    // Ages are given as of the answer: the census's start plus its age then.
    let answered_at = answer["census_timestamp_seconds"].as_f64().unwrap()
        + answer["census_age_seconds"].as_f64().unwrap();
    let listed = answer["sockets"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 25, "{listed:?}");
    let mut ages: Vec<f64> = listed
        .iter()
        .map(|s| {
            assert_eq!(
                (s["age_source"].as_str(), s["age_is_lower_bound"].as_bool()),
                (Some("transition"), Some(false)),
                "{s}"
            );
            assert_eq!(
                (s["pid"].as_u64(), s["comm"].as_str()),
                (Some(u64::from(std::process::id())), Some(comm.trim_end())),
                "{s}"
            );
            assert_eq!(s["stuck"], true, "past 2 s: {s}");
            s["age_seconds"].as_f64().unwrap()
        })
        .collect();
    ages.sort_by(f64::total_cmp);
    // Oldest leak last, as the ages are sorted: (youngest, oldest) each could be.
    let mut truths: Vec<(f64, f64)> = leaked_at
        .iter()
        .map(|(before, after)| (answered_at - after, answered_at - before))
        .collect();
    truths.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (age, (youngest, oldest)) in ages.iter().zip(&truths) {
        // 2 ms for the agent's own clocks: the census's wall-clock start is taken from its
        // monotonic one, each read once.
        assert!(
            (youngest - 0.002..=oldest + 0.002).contains(age),
            "age {age:.3} s where the leak is {youngest:.3} to {oldest:.3} s old"
        );
    }
    let what = format!(
        "500 connections and 25 CLOSE_WAIT leaks on port {port} while the agent was stopped"
    );
    let text = agent.metrics_at_least(
        &what,
        &[(
            Figure::sample("tracer_events_lost_total", &[]),
            lost_before + 4_000.0,
        )],
    );
    assert_figures(
        &text,
        &what,
        &[(
            Figure::sample(
                "tracer_tcp_stuck_sockets",
                &[("state", "close_wait"), ("port", &port)],
            ),
            25.0,
        )],
    );
    // Every transition the kernel made is either received or counted lost; none counted twice.
    let received = counter(&text, "tracer_events_total") - events_before;
    let lost = counter(&text, "tracer_events_lost_total") - lost_before;
    assert!(
        received + lost >= truth.len() as f64,
        "{received} received + {lost} lost < {} transitions",
        truth.len()
    );
    let handshakes = sample(
        &text,
        "tracer_tcp_handshake_duration_seconds_count",
        &[("mode", "passive"), ("port", &port)],
    )
    .unwrap_or(0.0);
    assert!(handshakes <= 25.0, "{handshakes} handshakes counted of 25");
    for action in ["added", "state_corrected"] {
        assert_eq!(
            sample(
                &text,
                "tracer_census_corrections_total",
                &[("action", action)]
            ),
            Some(0.0),
            "{action}: nothing to repair"
        );
    }
    drop((kept, listener));
}

#[test]
fn every_metric_dashboards_and_alerts_use_is_exported_right_after_start() {
    if !require_root("every_metric_dashboards_and_alerts_use_is_exported_right_after_start")
        || host_only(
            "every_metric_dashboards_and_alerts_use_is_exported_right_after_start",
            "the metrics' registration, not the kernel's",
        )
    {
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
    if !require_root("concurrent_requests_share_the_published_census_and_start_none")
        || host_only(
            "concurrent_requests_share_the_published_census_and_start_none",
            "the agent's sharing of a census, not the kernel's",
        )
    {
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
