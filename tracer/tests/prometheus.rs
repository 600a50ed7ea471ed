//! A real Prometheus (Debian's package) scrapes a real agent; PromQL over what it stored must
//! agree with the traffic the test sent.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A Prometheus server on loopback with its own config and storage, killed (by PID) on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("tracer-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tracer\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = free_listen_addr();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus (cargo xtask setup installs Debian's package)");
        let p = Prometheus { child, addr, dir };
        p.wait_for("the first successful scrape", "up{job=\"tracer\"}", |v| v == 1.0);
        p
    }

    /// Evaluates an instant query; None when it returns no series.
    fn query(&self, promql: &str) -> Option<f64> {
        let (code, body) = http_get(self.addr, &format!("/api/v1/query?query={}", encode(promql)));
        assert_eq!(code, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["status"], "success", "{promql}: {body}");
        let result = v["data"]["result"].as_array()?.first()?.clone();
        result["value"][1].as_str()?.parse().ok()
    }

    fn wait_for(&self, what: &str, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = std::net::TcpStream::connect(self.addr).is_ok();
            if ready {
                if let Some(v) = self.query(promql).filter(|v| ok(*v)) {
                    return v;
                }
            }
            assert!(Instant::now() < deadline, "Prometheus: timed out waiting for {what} ({promql})");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's PID, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn promql_over_scraped_metrics_matches_the_traffic() {
    if !require_root("promql_over_scraped_metrics_matches_the_traffic") {
        return;
    }
    let server_addr = closed_port(V4);
    let refused_addr = closed_port(V4);
    let (p, r) = (server_addr.port().to_string(), refused_addr.port().to_string());
    let agent = Agent::start(&["--port", &p, "--port", &r]);
    let prom = Prometheus::start(agent.addr);

    // One of each first, so that the series exist in Prometheus before the counted traffic:
    // rate() and increase() cannot see the first sample of a series as an increase.
    let server = Server::start_at(server_addr, 101, Closer::Client);
    connect_many(server_addr, 1, Closer::Client);
    connect_refused(refused_addr, 1);
    let refused = format!("tracer_tcp_handshake_failures_total{{reason=\"refused\",port=\"{r}\"}}");
    prom.wait_for("the warm-up to be scraped", &refused, |v| v == 1.0);
    std::thread::sleep(Duration::from_millis(1500));

    connect_many(server_addr, 100, Closer::Client);
    connect_refused(refused_addr, 20);
    server.join();
    prom.wait_for("the traffic to be scraped", &refused, |v| v == 21.0);
    std::thread::sleep(Duration::from_millis(1500));

    // Exactly what was sent, from the stored samples...
    let exact = prom
        .query(&format!("max_over_time({refused}[1m]) - min_over_time({refused}[1m])"))
        .expect("exact increase");
    assert_eq!(exact, 20.0, "refused failures stored");
    // ...and through rate(), which extrapolates to the window's edges: at least what was sent,
    // at most 1.5x (the series is younger than the window, so Prometheus stretches it).
    let rate = prom.query(&format!("rate({refused}[1m]) * 60")).expect("rate");
    assert!((20.0..=30.0).contains(&rate), "rate of refused failures x 60 s: {rate}, sent 20");
    let handshakes = prom
        .query(&format!("sum(increase(tracer_tcp_handshake_duration_seconds_count{{port=\"{p}\"}}[1m]))"))
        .expect("handshake increase");
    assert!((200.0..=300.0).contains(&handshakes), "handshakes: {handshakes}, made 100 x 2 sides");
    let median = prom
        .query(&format!(
            "histogram_quantile(0.5, sum by (le) (increase(\
             tracer_tcp_handshake_duration_seconds_bucket{{mode=\"active\",port=\"{p}\"}}[1m])))"
        ))
        .expect("median");
    assert!((0.000_005..0.01).contains(&median), "median loopback handshake {median} s");
    let events = prom.query("rate(tracer_events_total[30s])").expect("event rate");
    assert!(events > 0.0, "event rate {events}");
}
