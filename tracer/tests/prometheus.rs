//! A real Prometheus (Debian's package) scrapes a real agent; PromQL over what it stored must
//! agree with the traffic the test sent.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn promql_over_scraped_metrics_matches_the_traffic() {
    if !require_root("promql_over_scraped_metrics_matches_the_traffic")
        || host_only(
            "promql_over_scraped_metrics_matches_the_traffic",
            "Prometheus's reading of the exposition, not the kernel's",
        )
    {
        return;
    }
    let server_addr = closed_port(V4);
    let refused_addr = closed_port(V4);
    let (p, r) = (
        server_addr.port().to_string(),
        refused_addr.port().to_string(),
    );
    let agent = Agent::start(&["--port", &p, "--port", &r]);
    let prom = Prometheus::start(agent.addr);

    // The series exist at 0 from the agent's start (rate() and increase() cannot see the
    // first sample of a series as an increase, so a counter born at its first event would
    // lose it): Prometheus stores the 0 before the traffic.
    let refused = format!("tracer_tcp_handshake_failures_total{{reason=\"refused\",port=\"{r}\"}}");
    let zero = prom.wait_for("the zero to be scraped", &refused, 0.0);
    assert_eq!(zero, 0.0, "{refused} before any connect to port {r}");
    std::thread::sleep(Duration::from_millis(1500));

    let server = Server::start_at(server_addr, 100, Closer::Client);
    connect_many(server_addr, 100, Closer::Client);
    connect_refused(refused_addr, 20);
    server.join();
    let scraped = prom.wait_for("the traffic to be scraped", &refused, 20.0);
    assert_eq!(scraped, 20.0, "{refused} after 20 connects to port {r}");
    std::thread::sleep(Duration::from_millis(1500));

    // Exactly what was sent, from the stored samples...
    let exact = prom
        .query(&format!(
            "max_over_time({refused}[1m]) - min_over_time({refused}[1m])"
        ))
        .expect("exact increase");
    assert_eq!(exact, 20.0, "refused failures stored");
    // ...and through rate(), which extrapolates to the window's edges: at least what was sent,
    // at most 1.5x (the series is younger than the window, so Prometheus stretches it).
    let rate = prom
        .query(&format!("rate({refused}[1m]) * 60"))
        .expect("rate");
    assert!(
        (20.0..=30.0).contains(&rate),
        "rate of refused failures x 60 s: {rate}, sent 20"
    );
    let handshakes = prom
        .query(&format!(
            "sum(increase(tracer_tcp_handshake_duration_seconds_count{{port=\"{p}\"}}[1m]))"
        ))
        .expect("handshake increase");
    assert!(
        (200.0..=300.0).contains(&handshakes),
        "handshakes: {handshakes}, made 100 x 2 sides"
    );
    let median = prom
        .query(&format!(
            "histogram_quantile(0.5, sum by (le) (increase(\
             tracer_tcp_handshake_duration_seconds_bucket{{mode=\"active\",port=\"{p}\"}}[1m])))"
        ))
        .expect("median");
    assert!(
        (0.000_005..0.01).contains(&median),
        "median loopback handshake {median} s"
    );
    let events = prom
        .query("rate(tracer_events_total[30s])")
        .expect("event rate");
    assert!(events > 0.0, "event rate {events}");
}
