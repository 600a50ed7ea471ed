//! `tracer watch --connections`: one record per connection when it closes, checked against
//! what the test itself sent and against the kernel's own figures in a network namespace of
//! the test's (`ss -ti` for round-trip times, `nstat` for retransmitted segments).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

use common::*;

const PORT: u16 = 18090;

/// Starts `tracer watch --connections --json` on `ports`.
fn records(ports: &[u16]) -> Tracer {
    let mut args = vec!["watch".to_owned(), "--connections".into(), "--json".into()];
    for p in ports {
        args.extend(["--port".to_owned(), p.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Tracer::start(&args, true)
}

/// Records by (local port, remote port).
fn by_ports(out: &Output) -> BTreeMap<(u64, u64), serde_json::Value> {
    out.json()
        .into_iter()
        .map(|r| {
            (
                (r["sport"].as_u64().unwrap(), r["dport"].as_u64().unwrap()),
                r,
            )
        })
        .collect()
}

/// `rtt:SRTT/VAR` and `minrtt:MIN` (milliseconds) of the socket on `local` in `ss -ti`.
fn ss_rtts(ns: &Netns, local: u16) -> (f64, f64) {
    let text = ns.exec(&[
        "ss",
        "-tinH",
        "state",
        "established",
        "sport",
        "=",
        &format!(":{local}"),
    ]);
    let field = |name: &str| -> f64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in ss -ti: {text}"))
    };
    (field("rtt:"), field("minrtt:"))
}

#[test]
fn a_connections_record_has_its_bytes_rtts_and_who_closed_first() {
    if !require_root("a_connections_record_has_its_bytes_rtts_and_who_closed_first") {
        return;
    }
    let ns = Netns::new("records");
    let watch = records(&[PORT]);
    // The client sends 100,000 bytes, the server 250,000 back; the client closes first.
    let (sent, answered) = (100_000usize, 250_000usize);
    let (c, client_port, server) = ns.run(move || {
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = vec![0u8; sent];
            s.read_exact(&mut got).unwrap();
            s.write_all(&vec![7u8; answered]).unwrap();
            // Wait for the client's FIN, then close: this side closes second.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
        });
        let mut c = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        c.write_all(&vec![1u8; sent]).unwrap();
        let mut got = vec![0u8; answered];
        c.read_exact(&mut got).unwrap();
        let local = c.local_addr().unwrap().port();
        (c, local, server)
    });
    // RTTs as the kernel shows them just before the close.
    let rtts = (ss_rtts(&ns, client_port), ss_rtts(&ns, PORT));
    c.shutdown(Shutdown::Both).unwrap();
    drop(c);
    server.join().unwrap();
    settle();
    let out = watch.stop_with(libc::SIGINT);
    let records = by_ports(&out);
    let client = &records[&(u64::from(client_port), u64::from(PORT))];
    let server = &records[&(u64::from(PORT), u64::from(client_port))];
    assert_eq!(records.len(), 2, "{records:?}");

    // Bytes: exactly what each side wrote and read.
    assert_eq!(client["bytes_sent"], sent as u64, "{client}");
    assert_eq!(client["bytes_received"], answered as u64, "{client}");
    assert_eq!(server["bytes_sent"], answered as u64, "{server}");
    assert_eq!(server["bytes_received"], sent as u64, "{server}");
    // Who opened, who closed first, in which namespace.
    assert_eq!(client["mode"], "active");
    assert_eq!(server["mode"], "passive");
    assert_eq!(client["ending"], "closed_here_first", "{client}");
    assert_eq!(server["ending"], "closed_by_peer_first", "{server}");
    // Loopback loses nothing, but a loaded host can delay an ACK past a tail loss probe: the
    // records' retransmissions are what the (new) namespace's own TcpRetransSegs counted.
    let retransmitted = |r: &serde_json::Value| r["segments_retransmitted"].as_u64().unwrap();
    assert_eq!(
        retransmitted(client) + retransmitted(server),
        netstat_retrans(&ns),
        "{client} {server}"
    );
    for r in [client, server] {
        assert_eq!(r["netns"], ns.inode(), "{r}");
        assert_eq!(r["reset_reason"], serde_json::Value::Null, "{r}");
        let (handshake, lifetime) = (r["handshake_ns"].as_u64(), r["lifetime_ns"].as_u64());
        assert!(handshake.is_some_and(|h| h > 0 && h < 500_000_000), "{r}");
        assert!(lifetime.is_some_and(|l| l > 0), "{r}");
        assert!(r["opened_ns"].as_u64().is_some(), "{r}");
    }
    // RTTs: the minimum can only have fallen since `ss` read it (the FIN exchange is one more
    // sample), and by at most the granularity ss prints (1 us); the smoothed RTT moves by an
    // eighth of each new sample's difference, so it stays within a factor of 2 here.
    for (r, (srtt_ms, min_ms)) in [(client, rtts.0), (server, rtts.1)] {
        let (srtt, min) = (
            r["srtt_us"].as_f64().unwrap(),
            r["rtt_min_us"].as_f64().unwrap(),
        );
        assert!(
            min > 0.0 && min <= min_ms * 1000.0 + 1.0,
            "min {min} us, ss {min_ms} ms: {r}"
        );
        let ss_srtt = srtt_ms * 1000.0;
        assert!(
            srtt > 0.0 && srtt <= 2.0 * ss_srtt + 5.0 && srtt >= ss_srtt / 2.0 - 5.0,
            "srtt {srtt} us, ss {ss_srtt} us: {r}"
        );
    }
}

#[test]
fn refused_timed_out_reset_and_retransmitting_connections_end_as_they_did() {
    if !require_root("refused_timed_out_reset_and_retransmitting_connections_end_as_they_did") {
        return;
    }
    let ns = Netns::new("endings");
    // SYNs to port +1 vanish (a timed-out connect after one retry), and a fifth of the large
    // data segments from PORT is dropped (retransmissions; never a SYN-ACK, FIN or RST, whose
    // loss would only slow the test down). Both on arrival, as a lossy network would: a drop on
    // output is a failed send to TCP, which the kernel counts in TcpRetransSegs but, on kernels
    // whose tcp_retransmit_skb tracepoint has no error argument (6.1), does not trace.
    ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"]);
    ns.nft(&format!(
        "table inet t {{\n chain in {{\n type filter hook input priority 0;\n \
         tcp dport {} drop\n \
         tcp sport {PORT} meta length > 1000 numgen random mod 5 == 0 drop\n }}\n}}\n",
        PORT + 1
    ));
    let retrans_before = netstat_retrans(&ns);
    let watch = records(&[PORT, PORT + 1, PORT + 2]);
    let ports: Vec<String> = (PORT..=PORT + 2).map(|p| p.to_string()).collect();
    let agent = Agent::start(&[
        "--port", &ports[0], "--port", &ports[1], "--port", &ports[2],
    ]);
    let (reset_port, bulk_port, syn_retransmits) = ns.run(move || {
        // Refused: nothing listens on PORT + 2.
        let refused = TcpStream::connect(("127.0.0.1", PORT + 2)).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        // Timed out: the SYN and its retries are dropped.
        let snmp = || std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let before = retrans_segs(&snmp());
        let timed_out = TcpStream::connect(("127.0.0.1", PORT + 1)).unwrap_err();
        let syn_retransmits = retrans_segs(&snmp()) - before;
        assert_eq!(
            timed_out.kind(),
            std::io::ErrorKind::TimedOut,
            "{timed_out}"
        );
        let listener = TcpListener::bind(("127.0.0.1", PORT)).unwrap();
        // Reset: the server closes with SO_LINGER 0, which sends a RST.
        let c = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let (s, _) = listener.accept().unwrap();
        linger_zero(&s);
        let reset_port = c.local_addr().unwrap().port();
        drop(s);
        let mut buf = [0u8; 1];
        let err = (&c).read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        drop(c);
        // Retransmissions: 2 MB from the server with a fifth of its segments dropped.
        let mut c = TcpStream::connect(("127.0.0.1", PORT)).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let bulk_port = c.local_addr().unwrap().port();
        let writer = std::thread::spawn(move || {
            s.write_all(&vec![3u8; 2_000_000]).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 2_000_000);
        drop(c);
        writer.join().unwrap();
        (reset_port, bulk_port, syn_retransmits)
    });
    settle();
    let out = watch.stop_with(libc::SIGINT);
    let all = out.json();
    let ending_of = |pred: &dyn Fn(&serde_json::Value) -> bool| -> Vec<String> {
        all.iter()
            .filter(|r| pred(r))
            .map(|r| r["ending"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ending_of(&|r| r["dport"] == PORT + 2),
        ["refused"],
        "{all:?}"
    );
    assert_eq!(
        ending_of(&|r| r["dport"] == PORT + 1),
        ["timed_out"],
        "{all:?}"
    );
    assert_eq!(
        ending_of(&|r| r["sport"] == reset_port),
        ["reset_received"],
        "{all:?}"
    );
    assert_eq!(
        ending_of(&|r| r["dport"] == reset_port),
        ["reset_sent"],
        "{all:?}"
    );
    let timed_out = all.iter().find(|r| r["dport"] == PORT + 1).unwrap();
    assert_eq!(
        timed_out["segments_retransmitted"], syn_retransmits,
        "the SYN retries TcpRetransSegs counted during the connect: {timed_out}"
    );
    assert_eq!(
        timed_out["lifetime_ns"],
        serde_json::Value::Null,
        "never established"
    );
    // Retransmitted segments: the records' sum equals the namespace's own TcpRetransSegs
    // (both are incremented by the same tcp_skb_pcount in __tcp_retransmit_skb, so segments
    // that GSO/TSO put in one skb count alike on both sides).
    let bulk = all.iter().find(|r| r["dport"] == bulk_port).unwrap();
    assert!(
        bulk["segments_retransmitted"].as_u64().unwrap() > 0,
        "{bulk}"
    );
    let sum: u64 = all
        .iter()
        .map(|r| r["segments_retransmitted"].as_u64().unwrap())
        .sum();
    let kernel = netstat_retrans(&ns) - retrans_before;
    assert_eq!(
        sum, kernel,
        "records {sum}, TcpRetransSegs {kernel}: {all:?}"
    );
    // And so does the agent's tracer_tcp_retransmits_total (from tcp/tcp_retransmit_skb), by
    // service port, all kinds together: the bulk data under PORT (an accepted connection's
    // local port), the SYN retries under PORT + 1 (the remote port of a connect).
    let by_port = |p: &str| Figure::sum("tracer_tcp_retransmits_total", &[("port", p)]);
    let syn = syn_retransmits as f64;
    agent.metrics_exactly(
        &format!(
            "TcpRetransSegs of the namespace counted {kernel}: {syn_retransmits} SYN retries to \
             port {}, the rest of the 2 MB from port {}",
            ports[1], ports[0]
        ),
        &[
            (by_port(&ports[0]), kernel as f64 - syn),
            (by_port(&ports[1]), syn),
            (
                Figure::sample(
                    "tracer_tcp_retransmits_total",
                    &[("port", &ports[1]), ("kind", "syn")],
                ),
                syn,
            ),
        ],
    );
}

/// `Tcp: RetransSegs` of the namespace (what `nstat TcpRetransSegs` reports).
fn netstat_retrans(ns: &Netns) -> u64 {
    retrans_segs(&ns.exec(&["cat", "/proc/net/snmp"]))
}

/// `Tcp: RetransSegs` in the text of a `/proc/net/snmp`.
fn retrans_segs(snmp: &str) -> u64 {
    tracer::census::parse_netstat(snmp, "Tcp")["RetransSegs"]
}

/// Sets an integer socket option; panics naming it on failure.
fn set_int_option(fd: &impl std::os::fd::AsRawFd, level: i32, name: i32, value: i32, what: &str) {
    // SAFETY: setsockopt on an open socket with an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{what}: {}", std::io::Error::last_os_error());
}

/// `SO_LINGER` 0: closing `fd` then resets the connection rather than sending a FIN.
fn linger_zero(fd: &impl std::os::fd::AsRawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// A connection on `listener`: (client, server, client's port).
fn pair(listener: &TcpListener) -> (TcpStream, TcpStream, u16) {
    let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let (s, _) = listener.accept().unwrap();
    let port = c.local_addr().unwrap().port();
    (c, s, port)
}

/// Waits until the peer of `c` has closed its sending side (its FIN arrived and was acked).
fn read_eof(mut c: &TcpStream) {
    let mut buf = [0u8; 16];
    assert_eq!(c.read(&mut buf).unwrap(), 0, "expected the peer's FIN");
}

/// `events/tcp/tcp_send_reset` in a private ftrace instance: the kernel's own record of every
/// reset sent, with its reason, read as (source port, destination port, state, reason).
struct ResetTrace {
    dir: std::path::PathBuf,
}

impl ResetTrace {
    fn start() -> ResetTrace {
        let dir = std::path::PathBuf::from(format!(
            "/sys/kernel/tracing/instances/resets-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("creating an ftrace instance");
        std::fs::write(dir.join("events/tcp/tcp_send_reset/enable"), "1").unwrap();
        ResetTrace { dir }
    }

    fn stop(&self) -> Vec<(u16, u16, String, String)> {
        std::fs::write(self.dir.join("events/tcp/tcp_send_reset/enable"), "0").unwrap();
        let text = std::fs::read_to_string(self.dir.join("trace")).unwrap();
        // `... tcp_send_reset: skbaddr=.. skaddr=.. src=127.0.0.1:18093 dest=127.0.0.1:40000
        // state=TCP_CLOSE reason=TCP_ABORT_ON_CLOSE`
        text.lines()
            .filter_map(|line| {
                let (_, fields) = line.split_once("tcp_send_reset: ")?;
                let get = |key: &str| {
                    fields
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                };
                let port = |v: &str| v.rsplit(':').next()?.parse::<u16>().ok();
                Some((
                    port(get("src")?)?,
                    port(get("dest")?)?,
                    get("state")?
                        .trim_start_matches("TCP_")
                        .to_ascii_lowercase(),
                    get("reason")?.to_ascii_lowercase(),
                ))
            })
            .collect()
    }
}

impl Drop for ResetTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/tcp/tcp_send_reset/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_reset_connection_says_why_the_kernel_reset_it() {
    if !require_root("a_reset_connection_says_why_the_kernel_reset_it") {
        return;
    }
    let port = PORT + 3;
    // The kernel's own word on whether its resets carry a reason (Linux 6.10+).
    let format = std::fs::read_to_string("/sys/kernel/tracing/events/tcp/tcp_send_reset/format")
        .expect("tcp_send_reset format (cargo xtask test mounts tracefs)");
    let reasons = format.contains("sk_rst_reason reason");
    if !reasons {
        unsupported(
            "reset_reason",
            "this kernel's tcp_send_reset has no reason: endings are checked, reasons are not",
        );
    }
    let ns = Netns::new("resets");
    let trace = reasons.then(ResetTrace::start);
    let agent = Agent::start(&[]);
    let keepalive_port = port + 1;
    let watch = records(&[port, keepalive_port]);
    let ports = ns.run(move || {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        // A: the server closes with 100 bytes it never read: the kernel resets.
        let (mut c, s, unread) = pair(&listener);
        c.write_all(&[1u8; 100]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(s);
        assert_eq!(
            c.read(&mut [0u8; 1]).unwrap_err().kind(),
            std::io::ErrorKind::ConnectionReset
        );
        drop(c);
        // B: the same after the server's FIN was acknowledged (FIN_WAIT2): by its states alone
        // this one closed first; in fact it reset.
        let (mut c, s, unread_after_fin) = pair(&listener);
        s.shutdown(Shutdown::Write).unwrap();
        read_eof(&c);
        c.write_all(&[2u8; 10]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(s);
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(c);
        // C: the client closes with SO_LINGER 0.
        let (c, s, zero_linger) = pair(&listener);
        linger_zero(&c);
        drop(c);
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(s);
        // D: the server in FIN_WAIT2 with TCP_LINGER2 -1 closes: reset rather than TIME-WAIT.
        let (c, s, linger2) = pair(&listener);
        s.shutdown(Shutdown::Write).unwrap();
        read_eof(&c);
        set_int_option(&s, libc::IPPROTO_TCP, libc::TCP_LINGER2, -1, "TCP_LINGER2");
        drop(s);
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(c);
        // E: keepalive probes go unanswered (the server's packets are dropped from now on):
        // the kernel resets, then closes with ETIMEDOUT, in that order.
        let listener = TcpListener::bind(("127.0.0.1", keepalive_port)).unwrap();
        let (mut c, _s, keepalive) = pair(&listener);
        for (name, value) in [
            (libc::TCP_KEEPIDLE, 1),
            (libc::TCP_KEEPINTVL, 1),
            (libc::TCP_KEEPCNT, 1),
        ] {
            set_int_option(&c, libc::IPPROTO_TCP, name, value, "keepalive");
        }
        set_int_option(&c, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1, "SO_KEEPALIVE");
        let rules = format!(
            "table inet t {{\n chain in {{\n type filter hook input priority 0;\n \
             tcp sport {keepalive_port} drop\n }}\n}}\n"
        );
        let mut nft = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        nft.stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft");
        assert_eq!(
            c.read(&mut [0u8; 1]).unwrap_err().kind(),
            std::io::ErrorKind::TimedOut
        );
        [unread, unread_after_fin, zero_linger, linger2, keepalive]
    });
    let [unread, unread_after_fin, zero_linger, linger2, keepalive] = ports.map(u64::from);
    let kp = u64::from(keepalive_port);
    settle();
    let out = watch.stop_with(libc::SIGINT);
    let records = by_ports(&out);
    let p = u64::from(port);
    let ending = |key: (u64, u64)| {
        let r = records
            .get(&key)
            .unwrap_or_else(|| panic!("no record {key:?}: {records:?}"));
        (
            r["ending"].as_str().unwrap().to_owned(),
            r["reset_reason"].as_str().map(str::to_owned),
        )
    };
    let sent = |reason: &str| ("reset_sent".to_owned(), Some(reason.to_owned()));
    let received = ("reset_received".to_owned(), None);
    assert_eq!(ending((unread, p)), received);
    assert_eq!(ending((unread_after_fin, p)), received);
    assert_eq!(ending((p, zero_linger)), received);
    assert_eq!(ending((linger2, p)).1, None);
    assert_eq!(ending((kp, keepalive)), received);
    if !reasons {
        assert_eq!(ending((keepalive, kp)), ("timed_out".to_owned(), None));
        // From the states alone: the first and third are right, the others look like an
        // orderly close (the limit the reasons lift).
        assert_eq!(ending((p, unread)), ("reset_sent".to_owned(), None));
        assert_eq!(ending((zero_linger, p)), ("reset_sent".to_owned(), None));
        return;
    }
    assert_eq!(ending((p, unread)), sent("tcp_abort_on_close"));
    assert_eq!(ending((p, unread_after_fin)), sent("tcp_abort_on_close"));
    // A reset before the close keeps the ending the close gives.
    assert_eq!(
        ending((keepalive, kp)),
        (
            "timed_out".to_owned(),
            Some("tcp_keepalive_timeout".to_owned())
        )
    );
    // SO_LINGER 0 (tcp_disconnect) and TCP_LINGER2 -1: the kernel names these reasons as it
    // sees fit (tcp_state and tcp_abort_on_data on 6.18): the oracle below checks them.
    assert_eq!(ending((zero_linger, p)).0, "reset_sent");
    assert_eq!(ending((p, linger2)).0, "reset_sent");

    // The agent counts resets by reason in the kernel. The one of TCP_LINGER2 is rare: its
    // count must be exactly what ftrace saw on the whole host.
    let trace = trace.unwrap();
    let linger2_reason = records[&(p, linger2)]["reset_reason"]
        .as_str()
        .unwrap()
        .to_owned();
    let by_reason =
        |reason: &str| Figure::sample("tracer_tcp_reset_reasons_total", &[("reason", reason)]);
    let all = trace.stop();
    let host_wide = all.iter().filter(|r| r.3 == linger2_reason).count();
    let what = format!(
        "ftrace saw {host_wide} resets with reason {linger2_reason} on the whole host, one of \
         them the test's TCP_LINGER2 -1 close on port {port}"
    );
    // With the test's own two resets of a close with unread data, at least.
    let linger2 = (by_reason(&linger2_reason), host_wide as f64);
    let text = agent.metrics_at_least(
        &what,
        &[linger2.clone(), (by_reason("tcp_abort_on_close"), 2.0)],
    );
    assert_figures(&text, &what, &[linger2]);
    assert_eq!(
        sample(
            &text,
            "tracer_feature_enabled",
            &[("feature", "reset_reason")]
        ),
        Some(1.0)
    );

    // Every reason recorded is the one the kernel traced for that connection, and every reset
    // a connection of ours sent has its record.
    let mut traced: Vec<(u64, u64, String)> = all
        .into_iter()
        .filter(|(s, d, state, _)| {
            [*s, *d].iter().any(|x| [port, keepalive_port].contains(x)) && state != "time_wait"
        })
        .map(|(s, d, _, reason)| (u64::from(s), u64::from(d), reason))
        .collect();
    let mut recorded: Vec<(u64, u64, String)> = records
        .iter()
        .filter_map(|(&(s, d), r)| Some((s, d, r["reset_reason"].as_str()?.to_owned())))
        .collect();
    traced.sort();
    recorded.sort();
    assert_eq!(recorded, traced, "records against ftrace's tcp_send_reset");
}

#[test]
fn records_lost_with_their_events_are_counted_and_none_is_invented() {
    if !require_root("records_lost_with_their_events_are_counted_and_none_is_invented") {
        return;
    }
    let n = 300;
    let server = Server::start(V4, n, Closer::Client);
    let port = server.addr.port();
    let ftrace = Ftrace::start("tracer-records-drops", &[port]);
    let port_arg = port.to_string();
    // One page per CPU: about 30 events fill a ring.
    let mut tracer = Tracer::start(
        &[
            "watch",
            "--connections",
            "--json",
            "--ring-buffer-size",
            "4096",
            "--port",
            &port_arg,
        ],
        true,
    );
    // The reader stops while the traffic runs: its rings overflow.
    let pid = tracer.pid() as i32;
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    connect_many(server.addr, n, Closer::Client);
    server.join();
    settle();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    settle();
    let oracle = ftrace.stop();
    tracer.read_stdout();
    let out = tracer.stop_with(libc::SIGINT);
    assert!(out.status.success(), "{:?}", out.stderr);

    let (received, printed, lost) = out.summary();
    assert!(lost > 0, "expected drops; stderr {:?}", out.stderr);
    // Every event is either received or counted lost (no reset on these connections).
    assert_eq!(received + lost, oracle.len() as u64, "vs ftrace");
    // A record per connection side: the kernel closed 2n sockets; each record missing is
    // among the events counted lost.
    let closes = oracle
        .iter()
        .filter(|k| k.3 == "close" && k.2 != "listen")
        .count() as u64;
    assert_eq!(closes, 2 * n as u64);
    assert_eq!(printed as usize, out.stdout.len());
    assert!(
        printed <= closes && closes - printed <= lost,
        "{printed} records of {closes} closes, {lost} events lost"
    );
    // What the agent did not see is null, never made up.
    for r in out.json() {
        if r["mode"].is_null() {
            for key in ["opened_ns", "handshake_ns", "bytes_sent"] {
                assert!(
                    r[key].is_null(),
                    "{key} of a connection not seen opening: {r}"
                );
            }
        }
        if r["opened_ns"].is_null() {
            assert!(r["handshake_ns"].is_null(), "{r}");
        }
    }
    println!("{printed} records of {closes} closes; {lost} events lost and reported");
}
