//! `tracer run --otlp-endpoint`: connection records as OTLP log records, received by a real
//! OpenTelemetry collector (`rotel-agent`, which prints every record it takes with each
//! attribute and its type), checked against what the test sent, exactly.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// `n` connections to `port` in `ns`, connection `i` (from 1) carrying `i * up` bytes from
/// the client and `i * down` back; the client closes first. Returns each one's client port.
fn connections(ns: &Netns, port: u16, n: u64, up: u64, down: u64) -> Vec<u16> {
    ns.run(move || {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        (1..=n)
            .map(|i| {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let (mut s, _) = listener.accept().unwrap();
                c.write_all(&vec![1u8; (i * up) as usize]).unwrap();
                s.read_exact(&mut vec![0u8; (i * up) as usize]).unwrap();
                s.write_all(&vec![2u8; (i * down) as usize]).unwrap();
                c.read_exact(&mut vec![0u8; (i * down) as usize]).unwrap();
                let client_port = c.local_addr().unwrap().port();
                drop(c);
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                client_port
            })
            .collect()
    })
}

/// The records of connections in `ns` (its namespace inode) of `kind`.
fn of(received: &[Received], ns: &Netns, kind: &str) -> Vec<Received> {
    received
        .iter()
        .filter(|r| {
            r.int("tracer.netns") == Some(ns.inode()) && r.str("tracer.record") == Some(kind)
        })
        .cloned()
        .collect()
}

#[test]
fn twenty_connections_reach_the_collector_as_forty_records_with_exact_bytes() {
    if !require_root("twenty_connections_reach_the_collector_as_forty_records_with_exact_bytes")
        || host_only(
            "twenty_connections_reach_the_collector_as_forty_records_with_exact_bytes",
            "the OTLP encoding; the live tests check the kernel's counters",
        )
    {
        return;
    }
    const PORT: u16 = 18_095;
    let rotel = Rotel::start("records", None);
    let endpoint = format!("http://{}", rotel.addr);
    let agent = Agent::start(&["--otlp-endpoint", &endpoint, "--record-interval", "1s"]);
    let ns = Netns::new("otlp");
    let clients = connections(&ns, PORT, 20, 1_000, 300);

    // One more, held open past two intervals: reported while it is open.
    let (mut c, mut s) = ns.run(|| {
        let listener = TcpListener::bind(("127.0.0.1", PORT + 1)).unwrap();
        let c = TcpStream::connect(("127.0.0.1", PORT + 1)).unwrap();
        (c, listener.accept().unwrap().0)
    });
    c.write_all(&[3u8; 5_000]).unwrap();
    s.read_exact(&mut [0u8; 5_000]).unwrap();
    let updates = rotel.wait_for("updates of the open connection", 20, 4, |got| {
        of(got, &ns, "update").len()
    });
    let updates = of(&updates, &ns, "update");
    assert!(
        updates
            .iter()
            .all(|u| u.event_name == "tracer.connection.update"),
        "{updates:?}"
    );
    s.write_all(&[4u8; 2_000]).unwrap();
    c.read_exact(&mut [0u8; 2_000]).unwrap();
    drop(c);
    drop(s);

    let got = rotel.wait_for("42 close records", 30, 42, |got| {
        of(got, &ns, "close").len()
    });
    std::thread::sleep(Duration::from_millis(500));
    let closes = of(&rotel.received(), &ns, "close");
    assert_eq!(closes.len(), 42, "{closes:#?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let pid = u64::from(std::process::id());
    for (i, &client_port) in clients.iter().enumerate() {
        let i = i as u64 + 1;
        let side = |local: u16| {
            let mine: Vec<_> = closes
                .iter()
                .filter(|r| r.int("network.local.port") == Some(u64::from(local)))
                .filter(|r| {
                    r.int("network.peer.port")
                        == Some(u64::from(if local == PORT { client_port } else { PORT }))
                })
                .collect();
            assert_eq!(mine.len(), 1, "{local}: {mine:#?}");
            mine[0].clone()
        };
        let (client, server) = (side(client_port), side(PORT));
        assert_eq!(
            client.int("tracer.bytes_sent"),
            Some(i * 1_000),
            "{client:#?}"
        );
        assert_eq!(
            client.int("tracer.bytes_received"),
            Some(i * 300),
            "{client:#?}"
        );
        assert_eq!(
            server.int("tracer.bytes_sent"),
            Some(i * 300),
            "{server:#?}"
        );
        assert_eq!(
            server.int("tracer.bytes_received"),
            Some(i * 1_000),
            "{server:#?}"
        );
        assert_eq!(client.str("tracer.mode"), Some("active"));
        assert_eq!(server.str("tracer.mode"), Some("passive"));
        assert_eq!(client.str("tracer.ending"), Some("closed_here_first"));
        assert_eq!(server.str("tracer.ending"), Some("closed_by_peer_first"));
        for r in [&client, &server] {
            // The semantic conventions' names and types.
            assert_eq!(r.str("network.transport"), Some("tcp"), "{r:#?}");
            assert_eq!(r.str("network.type"), Some("ipv4"), "{r:#?}");
            assert_eq!(r.str("network.local.address"), Some("127.0.0.1"), "{r:#?}");
            assert_eq!(r.str("network.peer.address"), Some("127.0.0.1"), "{r:#?}");
            assert_eq!(r.int("process.pid"), Some(pid), "{r:#?}");
            assert_eq!(
                r.int("tracer.service_port"),
                Some(u64::from(PORT)),
                "{r:#?}"
            );
            assert_eq!(r.event_name, "tracer.connection.close");
            assert_eq!(
                r.resource.get("host.name").map(String::as_str),
                Some(&*format!("Str({})", host.trim()))
            );
            // No update came before the close: the whole connection is its interval.
            assert_eq!(
                r.int("tracer.interval.bytes_sent"),
                r.int("tracer.bytes_sent"),
                "{r:#?}"
            );
        }
    }
    // The held connection: its updates and its close add up to what it carried.
    for (local_is_client, sent, received) in [(true, 5_000u64, 2_000u64), (false, 2_000, 5_000)] {
        let mine = |r: &&Received| {
            let local = r.int("network.local.port") == Some(u64::from(PORT + 1));
            r.int("tracer.service_port") == Some(u64::from(PORT + 1)) && local != local_is_client
        };
        let close: Vec<_> = closes.iter().filter(mine).collect();
        assert_eq!(close.len(), 1, "{close:#?}");
        let ups: Vec<_> = of(&got, &ns, "update")
            .into_iter()
            .filter(|r| mine(&r))
            .collect();
        let all_updates: Vec<_> = of(&rotel.received(), &ns, "update")
            .into_iter()
            .filter(|r| mine(&r))
            .collect();
        assert!(ups.len() >= 2, "{ups:#?}");
        let sum = |key: &str| -> u64 {
            all_updates.iter().map(|u| u.int(key).unwrap()).sum::<u64>()
                + close[0].int(key).unwrap()
        };
        assert_eq!(close[0].int("tracer.bytes_sent"), Some(sent));
        assert_eq!(close[0].int("tracer.bytes_received"), Some(received));
        assert_eq!(
            sum("tracer.interval.bytes_sent"),
            sent,
            "{all_updates:#?} {close:#?}"
        );
        assert_eq!(sum("tracer.interval.bytes_received"), received);
    }
    let text = agent.metrics();
    for reason in ["queue_full", "rejected", "shutdown"] {
        assert_eq!(
            sample(&text, "tracer_records_dropped_total", &[("reason", reason)]),
            Some(0.0),
            "{reason}"
        );
    }
}

#[test]
fn a_collector_away_for_ten_seconds_loses_nothing_within_the_queue_and_drops_are_counted() {
    let test = "a_collector_away_for_ten_seconds_loses_nothing_within_the_queue";
    if !require_root(test) || host_only(test, "the export's queue and retries, not the kernel's") {
        return;
    }
    const PORT: u16 = 18_097;
    let rotel = Rotel::start("away-before", None);
    let addr = rotel.addr;
    let endpoint = format!("http://{addr}");
    let agent = Agent::start(&["--otlp-endpoint", &endpoint, "--otlp-queue-size", "30"]);
    let ns = Netns::new("away");
    connections(&ns, PORT, 10, 100, 100);
    rotel.wait_for("the first 20 records", 20, 20, |got| {
        of(got, &ns, "close").len()
    });

    // Away for ten seconds, while 25 connections close: 50 records for a queue of 30. The
    // collector's own sockets close too (killed, then started again): connections of this
    // host, whose records the export counts like any other. An independent watch of every
    // close is the oracle for those.
    let oracle = Tracer::start(&["watch", "--connections", "--json"], true);
    let agent_pid = u64::from(agent.tracer.pid());
    let killed_at = unix_now();
    drop(rotel);
    let away = Instant::now();
    connections(&ns, PORT, 25, 100, 100);
    std::thread::sleep(Duration::from_secs(10).saturating_sub(away.elapsed()));
    let rotel = Rotel::start("away-after", Some(addr));
    let got = rotel.wait_for("the 30 queued records", 30, 30, |got| got.len());
    // Nothing more comes: the rest were dropped, and counted.
    std::thread::sleep(Duration::from_secs(2));
    let got_now = rotel.received();
    // Before the scrape: its own connection's records come after its answer.
    let checked_at = unix_now();
    let text = agent.metrics_now();
    let seen = oracle.stop_with(libc::SIGTERM);
    assert_eq!(got_now.len(), 30, "{got:#?}");
    assert_eq!(of(&got_now, &ns, "close").len(), 30, "{got_now:#?}");
    // Other records made while the queue was full: neither the test's connections nor the
    // agent's own (which it does not export).
    let others: Vec<_> = seen
        .json()
        .into_iter()
        .filter(|r| {
            let t = r["time_ns"].as_f64().unwrap() / 1e9;
            t > killed_at && t < checked_at && r["netns"] != ns.inode() && r["pid"] != agent_pid
        })
        .collect();
    let others = others.len() as f64;
    assert_eq!(
        sample(
            &text,
            "tracer_records_dropped_total",
            &[("reason", "queue_full")]
        ),
        Some(20.0 + others),
        "50 records of 25 connections for a queue of 30, and {others} other records: {}",
        Figure::sample("tracer_records_dropped_total", &[]).lines(&text)
    );
    assert_eq!(
        sample(
            &text,
            "tracer_records_dropped_total",
            &[("reason", "rejected")]
        ),
        Some(0.0)
    );
    assert!(
        sample(
            &text,
            "tracer_otlp_requests_total",
            &[("result", "retried")]
        )
        .unwrap()
            >= 1.0
    );
}

/// A TLS front for the collector (Python's `ssl`, OpenSSL): it requires a client certificate
/// from the test's CA, notes each request's path, encoding, `x-tenant` header and client,
/// and passes the request on to the collector as it came. Prints its port, then serves until
/// its stdin closes.
const TLS_FRONT: &str = r#"
import http.server, json, ssl, sys, threading, urllib.request
ca, cert, key, upstream, notes = sys.argv[1:6]
class Front(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        subject = dict(x[0] for x in self.connection.getpeercert()["subject"])
        with open(notes, "a") as f:
            f.write(json.dumps({"path": self.path, "encoding": self.headers.get("Content-Encoding"),
                                "tenant": self.headers.get("x-tenant"), "client": subject.get("commonName")}) + "\n")
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "content-encoding")}
        with urllib.request.urlopen(urllib.request.Request(upstream + self.path, data=body, headers=headers)) as r:
            answer, status = r.read(), r.status
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def log_message(self, *args):
        pass
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
context.load_verify_locations(ca)
context.verify_mode = ssl.CERT_REQUIRED
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Front)
server.socket = context.wrap_socket(server.socket, server_side=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1], flush=True)
sys.stdin.read()
"#;

#[test]
fn records_reach_the_collector_over_tls_with_a_client_certificate_gzip_and_headers() {
    let test = "records_reach_the_collector_over_tls_with_a_client_certificate";
    if !require_root(test) || host_only(test, "the export's TLS, not the kernel's") {
        return;
    }
    const PORT: u16 = 18_099;
    let pki = Pki::new("otlp");
    let rotel = Rotel::start("tls", None);
    let notes = pki.path("notes.jsonl");
    let path = |name: &str| pki.path(name).display().to_string();
    let upstream = format!("http://{}", rotel.addr);
    let (mut front, port) = python_ready(
        TLS_FRONT,
        &[
            &path("ca.crt"),
            &path("server.crt"),
            &path("server.key"),
            &upstream,
            &notes.display().to_string(),
        ],
    );
    let endpoint = format!("https://127.0.0.1:{}", port.trim());
    let agent = Agent::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", &path("ca.crt")),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &path("client.crt")),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &path("client.key")),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme%20corp"),
        ],
    );
    let ns = Netns::new("otlp-tls");
    connections(&ns, PORT, 5, 700, 70);
    let got = rotel.wait_for("the 10 close records", 30, 10, |got| {
        of(got, &ns, "close").len()
    });
    let closes = of(&got, &ns, "close");
    assert_eq!(closes.len(), 10, "{closes:#?}");
    let sent: u64 = closes
        .iter()
        .map(|r| r.int("tracer.bytes_sent").unwrap())
        .sum();
    assert_eq!(sent, (1..=5).map(|i| i * 770).sum::<u64>());
    // Every request came over TLS with the client's certificate, gzipped, with the header.
    let notes = std::fs::read_to_string(&notes).unwrap();
    assert!(!notes.is_empty());
    for line in notes.lines() {
        let n: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(n["path"], "/v1/logs", "{n}");
        assert_eq!(n["encoding"], "gzip", "{n}");
        assert_eq!(n["tenant"], "acme corp", "{n}");
        assert_eq!(n["client"], "client", "{n}");
    }
    let text = agent.metrics();
    assert_eq!(
        sample(
            &text,
            "tracer_otlp_requests_total",
            &[("result", "rejected")]
        ),
        Some(0.0)
    );
    drop(front.stdin.take());
    let _ = front.wait();
}
