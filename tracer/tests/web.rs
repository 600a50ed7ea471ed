//! The agent's endpoints on a shared node: TLS and basic authentication from an exporter-toolkit
//! web configuration file (checked with a real Prometheus too), who may read `/sockets`, and
//! the bounds that keep `/healthz` answering whatever clients do.
//!
//! Certificates are made per test with `openssl` ([`Pki`]: a CA, the agent's certificate for
//! 127.0.0.1 and 10.231.0.1, a client certificate); the bcrypt hash with the `bcrypt` crate.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The user of `deploy/web-config.yml`.
const USER: &str = "prometheus";
const PASSWORD: &str = "correct horse battery staple";

/// `basic_auth_users` with [`USER`] and a bcrypt hash of [`PASSWORD`].
fn users() -> String {
    let hash = bcrypt::hash(PASSWORD, 10).unwrap();
    format!("basic_auth_users:\n  {USER}: '{hash}'\n")
}

/// An HTTPS client trusting the test CA, with a client certificate when `client` is set.
fn https_client(pki: &Pki, client: bool) -> ureq::Agent {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let ca = Certificate::from_pem(&std::fs::read(pki.path("ca.crt")).unwrap())
        .unwrap()
        .to_owned();
    let mut tls = TlsConfig::builder().root_certs(RootCerts::new_with_certs(&[ca]));
    if client {
        let cert = Certificate::from_pem(&std::fs::read(pki.path("client.crt")).unwrap())
            .unwrap()
            .to_owned();
        let key = PrivateKey::from_pem(&std::fs::read(pki.path("client.key")).unwrap())
            .unwrap()
            .to_owned();
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&[cert], key)));
    }
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(tls.build())
        .build()
        .into()
}

/// GET `url`, optionally with basic auth; (status, body), or the error as text.
fn get(
    client: &ureq::Agent,
    url: &str,
    auth: Option<(&str, &str)>,
) -> Result<(u16, String), String> {
    let mut request = client.get(url);
    if let Some((user, password)) = auth {
        use base64::Engine as _;
        let credential =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request = request.header("Authorization", format!("Basic {credential}"));
    }
    let mut response = request.call().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

#[test]
fn https_and_a_password_guard_metrics_and_sockets_and_plain_http_gets_nothing() {
    let test = "https_and_a_password_guard_metrics_and_sockets";
    if !require_root(test)
        || host_only(
            test,
            "the HTTP server's TLS and passwords, not the kernel's",
        )
    {
        return;
    }
    let pki = Pki::new("auth");
    // The example the deployment files use, with its placeholder replaced by a real hash.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = std::fs::read_to_string(root.join("deploy/web-config.yml")).unwrap();
    assert!(
        example.contains("prometheus: REPLACE-WITH-A-BCRYPT-HASH"),
        "{example}"
    );
    let hash = bcrypt::hash(PASSWORD, 10).unwrap();
    let example = example.replace("REPLACE-WITH-A-BCRYPT-HASH", &format!("'{hash}'"));
    let config = pki.path("web.yml");
    std::fs::write(&config, example).unwrap();
    std::fs::copy(pki.path("server.crt"), pki.path("tls.crt")).unwrap();
    std::fs::copy(pki.path("server.key"), pki.path("tls.key")).unwrap();
    let agent = Agent::start(&["--web-config", config.to_str().unwrap()]);
    let base = format!("https://{}", agent.addr);
    let client = https_client(&pki, false);
    let right = Some((USER, PASSWORD));

    let (code, body) = get(&client, &format!("{base}/metrics"), right).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("tracer_build_info{"), "{body}");
    let (code, body) = get(&client, &format!("{base}/sockets?limit=1"), right).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"sockets\""), "{body}");
    for (path, auth) in [
        ("/metrics", None),
        ("/metrics", Some((USER, "wrong"))),
        ("/metrics", Some(("nobody", PASSWORD))),
        ("/sockets", None),
    ] {
        let (code, _) = get(&client, &format!("{base}{path}"), auth).unwrap();
        assert_eq!(code, 401, "{path} with {auth:?}");
    }
    // A liveness probe carries no password.
    assert_eq!(
        get(&client, &format!("{base}/healthz"), None).unwrap().0,
        200
    );
    // Plain HTTP on the TLS port gets no metrics.
    let plain = get(
        &https_client(&pki, false),
        &format!("http://{}/metrics", agent.addr),
        right,
    );
    assert!(
        !matches!(&plain, Ok((200, _))),
        "plain HTTP answered: {plain:?}"
    );
    // tracer sockets reaches the secured agent with the same CA and user.
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["sockets", "--agent", &base, "--ca-file"])
        .arg(pki.path("ca.crt"))
        .args(["--user", USER])
        .env("TRACER_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("       AGE STATE"));
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["sockets", "--agent", &base, "--ca-file"])
        .arg(pki.path("ca.crt"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("wants a user and password"), "{stderr}");
    // tracer top --agent too: its plain table, then the same one line without the user.
    let top = |user: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tracer"));
        cmd.args(["top", "--once", "--agent", &base, "--ca-file"])
            .arg(pki.path("ca.crt"));
        if user {
            cmd.args(["--user", USER]).env("TRACER_PASSWORD", PASSWORD);
        }
        cmd.output().unwrap()
    };
    let out = top(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&format!("tracer top: agent {base};")),
        "{stdout}"
    );
    assert!(stdout.contains("\nPROCESS "), "{stdout}");
    let out = top(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("wants a user and password"), "{stderr}");
    drop(agent);
}

#[test]
fn prometheus_scrapes_over_https_with_the_same_web_config_settings() {
    let test = "prometheus_scrapes_over_https_with_the_same_web_config_settings";
    if !require_root(test) || host_only(test, "the HTTP server's TLS, not the kernel's") {
        return;
    }
    let pki = Pki::new("prom");
    let config = pki.web_config(&users());
    let agent = Agent::start(&["--web-config", config.to_str().unwrap()]);
    let scrape = format!(
        "    scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      username: {USER}\n      password: '{PASSWORD}'\n",
        pki.path("ca.crt").display()
    );
    // Prometheus waits for up == 1: it scraped over TLS with the password.
    let prometheus = Prometheus::start_with(agent.addr, &scrape);
    prometheus.wait_for("tracer_build_info", "tracer_build_info", 1.0);
    drop(prometheus);
    drop(agent);
}

#[test]
fn client_certificates_are_verified_and_sockets_off_loopback_need_them() {
    let test = "client_certificates_are_verified_and_sockets_off_loopback_need_them";
    if !require_root(test) || host_only(test, "the HTTP server's TLS and rules, not the kernel's") {
        return;
    }
    let pki = Pki::new("mtls");
    // Certificates verified if given: without one, /metrics is open (no users) but /sockets is
    // not, from off loopback.
    let config = pki.web_config(&format!(
        "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {}\n",
        pki.path("ca.crt").display()
    ));
    // A test namespace reaches the agent over a veth pair, from 10.231.0.2: not loopback.
    let ns = Netns::new("web");
    let veth = format!("trw{}", std::process::id() % 100_000);
    run_ok(
        "ip",
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ],
    );
    run_ok("ip", &["addr", "add", "10.231.0.1/30", "dev", &veth]);
    run_ok("ip", &["link", "set", &veth, "up"]);
    ns.exec(&["ip", "addr", "add", "10.231.0.2/30", "dev", "eth0"]);
    ns.exec(&["ip", "link", "set", "eth0", "up"]);
    let port = closed_port(V4).port();
    let listen = format!("10.231.0.1:{port}");
    let agent = Agent::start_at(&listen, &["--web-config", config.to_str().unwrap()]);
    let base = format!("https://{listen}");
    let (without, with) = (https_client(&pki, false), https_client(&pki, true));
    let asks = ns.run(move || {
        [
            get(&without, &format!("{base}/metrics"), None).map(|r| r.0),
            get(&without, &format!("{base}/sockets"), None).map(|r| r.0),
            get(&with, &format!("{base}/sockets"), None).map(|r| r.0),
            get(&without, &format!("{base}/top"), None).map(|r| r.0),
            get(&with, &format!("{base}/top"), None).map(|r| r.0),
        ]
    });
    // /top lists every process's connections too: the same rule as /sockets (let in, the
    // first request is answered 503 while the agent starts counting for it).
    assert_eq!(asks, [Ok(200), Ok(403), Ok(200), Ok(403), Ok(503)]);
    drop(agent);

    // Required: no certificate, no TLS session.
    let config = pki.web_config(&format!(
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n",
        pki.path("ca.crt").display()
    ));
    let agent = Agent::start(&["--web-config", config.to_str().unwrap()]);
    let base = format!("https://{}", agent.addr);
    assert!(get(&https_client(&pki, false), &format!("{base}/metrics"), None).is_err());
    assert_eq!(
        get(&https_client(&pki, true), &format!("{base}/metrics"), None).map(|r| r.0),
        Ok(200)
    );
    let _ = Command::new("ip").args(["link", "del", &veth]).status();
}

#[test]
fn a_thousand_idle_connections_and_a_slowloris_never_starve_healthz() {
    let test = "a_thousand_idle_connections_and_a_slowloris_never_starve_healthz";
    if !require_root(test) || host_only(test, "the HTTP server's bounds, not the kernel's") {
        return;
    }
    let agent = Agent::start(&[]);
    // The agent raises its own soft limit at start; put it back to the common 1,024, hard
    // limit included, so that 1,100 connections exhaust its descriptors.
    run_ok(
        "prlimit",
        &[
            &format!("--pid={}", agent.tracer.pid()),
            "--nofile=1024:1024",
        ],
    );
    raise_open_files(4_096);
    let idle: Vec<TcpStream> = (0..1_100)
        .map(|_| TcpStream::connect(agent.addr).expect("connect"))
        .collect();
    let asked = Instant::now();
    let (code, _) = http_get(agent.addr, "/healthz");
    let took = asked.elapsed();
    assert_eq!(code, 200);
    assert!(
        took < Duration::from_secs(1),
        "/healthz took {took:?} behind 1,100 idle connections"
    );
    assert!(agent.metrics_now().contains("tracer_build_info"));
    drop(idle);

    // A slowloris: headers one byte a second; the agent closes it within its 10 s timeout.
    let mut slow = TcpStream::connect(agent.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(900)))
        .unwrap();
    let started = Instant::now();
    let closed_after = loop {
        if slow.write_all(b"X").is_err() {
            break started.elapsed();
        }
        let mut buf = [0u8; 256];
        match slow.read(&mut buf) {
            Ok(_) => break started.elapsed(), // closed (0) or an error answer, then closed
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break started.elapsed(),
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the slowloris was never closed"
        );
    };
    assert!(
        closed_after >= Duration::from_secs(9) && closed_after < Duration::from_secs(12),
        "slowloris closed after {closed_after:?}"
    );
    assert_eq!(http_get(agent.addr, "/healthz").0, 200);
}

#[test]
fn forty_clients_with_50000_sockets_on_the_host_stay_under_the_shipped_memory_limit() {
    let test = "forty_clients_with_50000_sockets_on_the_host_stay_under_the_memory_limit";
    if !require_root(test) || host_only(test, "the HTTP server's memory, not the kernel's") {
        return;
    }
    // The DaemonSet's and the unit's memory limit.
    const LIMIT_MIB: u64 = 256;
    // 27,000 connections (54,000 sockets), held by a few processes: one process may hold
    // 20,000 descriptors on these hosts, and 4,096 under the kernel matrix's guests.
    let mut held: Vec<Holder> = Vec::new();
    while held.iter().map(|h| h.connections).sum::<usize>() < 27_000 {
        assert!(held.len() < 40, "cannot hold 27,000 connections");
        held.push(Holder::new(9_000));
    }
    let agent = Agent::start(&[]);
    // The first census, which the sockets held above are in (under full emulation it takes
    // seconds, and the next one waits 20 times that: no later census is asked for).
    let deadline = Instant::now() + Duration::from_secs(60);
    let on_host = loop {
        let on_host: f64 = agent
            .metrics_now()
            .lines()
            .filter(|l| l.starts_with("tracer_tcp_sockets{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if on_host >= 50_000.0 || Instant::now() > deadline {
            break on_host;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(on_host >= 50_000.0, "the census saw {on_host} sockets");
    let addr = agent.addr;
    let until = Instant::now() + Duration::from_secs(10);
    let clients: Vec<_> = (0..40)
        .map(|i| {
            std::thread::spawn(move || {
                let path = if i % 2 == 0 {
                    "/metrics"
                } else {
                    "/sockets?limit=1"
                };
                let mut answered = 0;
                while Instant::now() < until {
                    assert_eq!(http_get(addr, path).0, 200, "{path}");
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let answered: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let peak_kib = vm_hwm_kib(agent.tracer.pid());
    println!(
        "{answered} requests; peak resident memory {} MiB",
        peak_kib / 1024
    );
    assert!(answered >= 40, "{answered} requests answered");
    assert!(
        peak_kib / 1024 < LIMIT_MIB,
        "peak resident memory {} MiB with 40 clients",
        peak_kib / 1024
    );
    drop(held);
}

#[test]
fn a_connection_past_the_limit_answers_503_with_retry_after_and_healthz_still_200() {
    let test = "a_connection_past_the_limit_answers_503_with_retry_after_and_healthz_still_200";
    if !require_root(test) || host_only(test, "the HTTP server's bounds, not the kernel's") {
        return;
    }
    let agent = Agent::start(&[]);
    raise_open_files(4_096);
    // 256 connections that have sent nothing yet, then two more: the two oldest give way.
    let mut idle: Vec<TcpStream> = (0..258)
        .map(|_| TcpStream::connect(agent.addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let ask = |s: &mut TcpStream, path: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        s.write_all(request.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.to_ascii_lowercase()
    };
    let refused = ask(&mut idle[0], "/metrics");
    assert!(
        refused.starts_with("http/1.1 503") && refused.contains("retry-after: 1"),
        "{refused}"
    );
    assert!(refused.contains("connection: close"), "{refused}");
    let health = ask(&mut idle[1], "/healthz");
    assert!(health.starts_with("http/1.1 200"), "{health}");
    // The newest are served as usual.
    let (code, _) = http_get(agent.addr, "/metrics");
    assert_eq!(code, 200);
    let text = agent.metrics_now();
    assert_eq!(
        sample(
            &text,
            "tracer_http_refused_total",
            &[("reason", "connections")]
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn a_dual_stack_listener_serves_sockets_to_ipv4_loopback() {
    let test = "a_dual_stack_listener_serves_sockets_to_ipv4_loopback";
    if !require_root(test) || host_only(test, "the HTTP server's rules, not the kernel's") {
        return;
    }
    let port = closed_port(V4).port();
    let agent = Agent::start_at(&format!("[::]:{port}"), &[]);
    for client in ["127.0.0.1", "[::1]"] {
        let addr: std::net::SocketAddr = format!("{client}:{port}").parse().unwrap();
        let (code, body) = http_get(addr, "/sockets?limit=1");
        assert_eq!(code, 200, "/sockets from {client} over [::]: {body}");
    }
    drop(agent);
}

#[test]
fn five_hundred_clients_that_never_read_leave_the_agent_under_its_memory_limit() {
    let test = "five_hundred_clients_that_never_read_leave_the_agent_under_its_memory_limit";
    if !require_root(test) || host_only(test, "the HTTP server's memory, not the kernel's") {
        return;
    }
    const LIMIT_MIB: u64 = 256;
    // 10,000 sockets in a cgroup whose path is 1,206 characters long (six 200-character
    // names): each socket's JSON is about 1.5 KB, so 10,000 of them pass the 8 MiB bound.
    let mut tree = Cgroups::new();
    let long: Vec<String> = (0..6).map(|i| format!("{i}{}", "x".repeat(199))).collect();
    let deep = tree.make(&long.join("/"));
    tree.enter(&deep);
    let held = Holder::new(5_000);
    tree.leave();
    assert_eq!(held.connections, 5_000);
    let root = tree.root.to_str().unwrap().to_owned();
    let mut args = vec![];
    if tree.mounted {
        args.extend(["--cgroup-root", root.as_str()]);
    }
    let agent = Agent::start(&args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sockets_json(&agent, "limit=1")["total"].as_u64().unwrap() < 10_000 {
        assert!(
            Instant::now() < deadline,
            "the census never saw 10,000 sockets"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    raise_open_files(4_096);

    // 500 clients ask for everything and never read a byte (a 4 KiB receive buffer each,
    // so the answers stay with the agent), for 15 s: past the 10 s write timeout.
    let request = b"GET /sockets?limit=10000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..500 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&agent.addr.into()).unwrap();
        let mut s: TcpStream = s.into();
        s.write_all(request).unwrap();
        clients.push(s);
    }
    let pid = agent.tracer.pid();
    let mut queued_max = 0u64;
    let mut health_max = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(15) {
        let asked = Instant::now();
        let (code, _) = http_get(agent.addr, "/healthz");
        assert_eq!(code, 200, "/healthz under 500 clients that never read");
        health_max = health_max.max(asked.elapsed());
        // What the kernel holds for the agent's connections (ss's skmem w: send queues).
        queued_max = queued_max.max(send_queues(agent.addr.port()));
        std::thread::sleep(Duration::from_millis(500));
    }
    let peak_kib = vm_hwm_kib(pid);
    let text = agent.metrics_now();
    drop(clients);
    let refused = |r: &str| sample(&text, "tracer_http_refused_total", &[("reason", r)]).unwrap();
    println!(
        "peak resident {} MiB, kernel send queues at most {} KiB, /healthz at most {health_max:?}, \
         refused: memory {}, connections {}, write_timeout {}",
        peak_kib / 1024,
        queued_max / 1024,
        refused("memory"),
        refused("connections"),
        refused("write_timeout")
    );
    assert!(
        peak_kib / 1024 + queued_max / (1 << 20) < LIMIT_MIB,
        "peak resident {} MiB and {} MiB queued in the kernel",
        peak_kib / 1024,
        queued_max >> 20
    );
    assert!(
        health_max < Duration::from_secs(2),
        "/healthz took {health_max:?}"
    );
    assert!(refused("memory") > 0.0, "{text}");
    // Once they are gone, what they held is given back (all but the reservation of the
    // /metrics answer being encoded).
    let held_now = || sample(&agent.metrics_now(), "tracer_http_held_bytes", &[]).unwrap();
    let given_back = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while held_now() > (1 << 20) as f64 {
            assert!(
                Instant::now() < deadline,
                "{what}: {} bytes still held",
                held_now()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    given_back("after the 500 clients");

    // One client alone, which gets its 8 MiB answer and never reads: its write makes no
    // progress, and 10 s later the connection is closed and its bytes freed. (Among the 500,
    // whether any answer began before the others gave way or were refused depends on timing.)
    let timeouts = || {
        let text = agent.metrics_now();
        sample(
            &text,
            "tracer_http_refused_total",
            &[("reason", "write_timeout")],
        )
        .unwrap()
    };
    let before = timeouts();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&agent.addr.into()).unwrap();
    let mut stalled: TcpStream = s.into();
    stalled.write_all(request).unwrap();
    let asked = Instant::now();
    while timeouts() == before {
        assert!(
            asked.elapsed() < Duration::from_secs(20),
            "no write timeout after 20 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let timed_out_after = asked.elapsed();
    println!("a client that never read was closed after {timed_out_after:?}");
    assert!(
        timed_out_after >= Duration::from_secs(9),
        "closed after {timed_out_after:?}"
    );
    assert_eq!(timeouts(), before + 1.0);
    given_back("after the write timeout");
    drop(stalled);

    // The documented limit works with the client: the answer stops at its bound, and says so.
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["sockets", "--limit", "10000", "--agent"])
        .arg(format!("http://{}", agent.addr))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = stdout.lines().count();
    assert!(
        stdout.contains("the answer reached its 8 MiB bound") && (3_000..10_000).contains(&rows),
        "{rows} lines: {}",
        stdout.lines().last().unwrap_or("")
    );
    drop(held);
}

/// The peak resident memory of process `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

/// Bytes queued to send on the sockets of local port `port` (`ss -tm`'s `skmem` `w`).
fn send_queues(port: u16) -> u64 {
    ss_lines(&format!("-m ( sport = :{port} )"))
        .iter()
        .filter_map(|l| {
            let skmem = l.split("skmem:(").nth(1)?;
            let w = skmem.split(',').find_map(|f| f.strip_prefix('w'))?;
            w.trim_end_matches(')').parse::<u64>().ok()
        })
        .sum()
}

/// A process holding up to `n` loopback connections open (both ends), as many as its
/// descriptor limit allows, until dropped.
struct Holder {
    child: std::process::Child,
    connections: usize,
}

impl Holder {
    fn new(n: usize) -> Holder {
        const SCRIPT: &str = "import resource, socket, sys\n\
            n = int(sys.argv[1]); soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
            try: resource.setrlimit(resource.RLIMIT_NOFILE, (2 * n + 64, max(hard, 2 * n + 64)))\n\
            except (ValueError, OSError): resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
            n = min(n, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64) // 2)\n\
            l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(4096); kept = []\n\
            for _ in range(n):\n\
            \x20   kept.append(socket.create_connection(l.getsockname())); kept.append(l.accept()[0])\n\
            print('ready', n, flush=True); sys.stdin.read()\n";
        let (child, line) = python_ready(SCRIPT, &[&n.to_string()]);
        let connections = line
            .strip_prefix("ready ")
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("holding connections: {line:?}"));
        Holder { child, connections }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
