//! Stuck sockets, built for real: a CLOSE_WAIT leak (here and in a namespace of its own),
//! TIME-WAIT piles, a narrowed ephemeral port range, a full accept queue, half-open handshakes.
//! Every figure is compared with what `ss` or `/proc/net/netstat` say at the same moment.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;

fn array(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["sockets"].as_array().cloned().unwrap_or_default()
}

/// `n` clients close; the server keeps listening and keeps every accepted socket: `n`
/// CLOSE_WAIT.
fn leak(addr: std::net::SocketAddr, n: usize) -> (TcpListener, Vec<TcpStream>) {
    let listener = TcpListener::bind(addr).unwrap();
    let mut kept = Vec::new();
    for _ in 0..n {
        let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        kept.push(listener.accept().unwrap().0);
        drop(c);
    }
    (listener, kept)
}

#[test]
fn a_close_wait_leak_is_listed_with_its_owner_and_flagged_after_its_threshold() {
    if !require_root("a_close_wait_leak_is_listed_with_its_owner_and_flagged_after_its_threshold") {
        return;
    }
    let addr = closed_port(V4);
    let port = addr.port().to_string();
    let agent = Agent::start(&["--stuck-after", "close_wait=2s", "--port", &port]);
    let kept = leak(addr, 25); // listen() runs on this thread: it owns the sockets
    let ns = Netns::new("leak");
    let kept_in_ns = ns.run(move || leak("127.0.0.1:18081".parse().unwrap(), 25));
    settle();

    let query = format!("state=close_wait&port={port}");
    let first = sockets_json(&agent, &query);
    let listed = array(&first);
    assert_eq!(listed.len(), 25, "{first}");
    assert_eq!(
        listed.len() as u64,
        ss_lines(&format!("state close-wait ( sport = :{port} )")).len() as u64
    );
    let thread = std::thread::current().name().unwrap_or_default().to_owned();
    for s in &listed {
        assert_eq!(s["pid"], std::process::id(), "{s}");
        assert_eq!(s["comm"], thread[..thread.len().min(15)], "{s}");
        assert_eq!(s["age_is_lower_bound"], false);
        // Flagged exactly when its age (at the request) passed the 2 s threshold: on a fast
        // machine none is yet; under full emulation the first listing can come later.
        let age = s["age_seconds"].as_f64().unwrap();
        assert_eq!(
            s["stuck"],
            age >= 2.0,
            "age {age} s against a 2 s threshold: {s}"
        );
    }
    let age0 = listed[0]["age_seconds"].as_f64().unwrap();

    std::thread::sleep(Duration::from_millis(2_200));
    let later = array(&sockets_json(&agent, &query));
    let age1 = later[0]["age_seconds"].as_f64().unwrap();
    assert!(age1 >= age0 + 2.0, "age grows: {age0} then {age1}");
    assert!(later
        .iter()
        .all(|s| s["stuck"] == true && s["reason"].as_str().unwrap().contains("close()")));
    let text = agent.metrics();
    assert_eq!(
        sample(
            &text,
            "tracer_tcp_stuck_sockets",
            &[("state", "close_wait"), ("port", &port)]
        ),
        Some(25.0)
    );
    let oldest = sample(
        &text,
        "tracer_tcp_oldest_socket_age_seconds",
        &[("state", "close_wait")],
    )
    .unwrap();
    assert!(oldest >= age1, "oldest {oldest} >= {age1}");

    // The same leak in its own network namespace is found there and named by it.
    let in_ns = array(&sockets_json(&agent, "state=close_wait&port=18081"));
    assert_eq!(in_ns.len(), 25);
    assert!(in_ns.iter().all(|s| s["netns"] == ns.inode()), "{in_ns:?}");
    let ss_in_ns = ns
        .exec(&["ss", "-tan", "state", "close-wait"])
        .lines()
        .count()
        - 1;
    assert_eq!(ss_in_ns, 25);

    // The command-line view of the same listing.
    let url = format!("http://{}", agent.addr);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args([
            "sockets",
            "--agent",
            &url,
            "--state",
            "close_wait",
            "--port",
            &port,
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each row names the owner: the process and thread that called listen().
    let (pid, comm) = (
        std::process::id().to_string(),
        &thread[..thread.len().min(15)],
    );
    assert_eq!(
        table
            .lines()
            .filter(|l| l.contains("close_wait") && l.contains("stuck:"))
            .filter(|l| l.split_whitespace().any(|w| w == pid) && l.contains(comm))
            .count(),
        25,
        "{table}"
    );
    drop((kept, kept_in_ns));
}

#[test]
fn time_wait_per_port_matches_ss_and_a_narrow_port_range_shows_its_use() {
    if !require_root("time_wait_per_port_matches_ss_and_a_narrow_port_range_shows_its_use") {
        return;
    }
    let addr = closed_port(V4);
    let port = addr.port().to_string();
    let agent = Agent::start(&["--port", &port]);
    let server = Server::start_at(addr, 40, Closer::Client);
    connect_many(addr, 40, Closer::Client);
    server.join();
    settle();
    // Client-closed connections leave TIME-WAIT on the client side: 40 of them, unless the
    // machine is so slow (a kernel under emulation) that a connect reused a TIME-WAIT socket
    // over a second old (tcp_tw_reuse, on loopback): then a few fewer. The agent must count
    // what ss counts, before and after its census.
    let time_waits = || {
        ss_lines(&format!(
            "state time-wait ( dport = :{port} or sport = :{port} )"
        ))
        .len()
    };
    let before = time_waits();
    let text = agent.metrics();
    let ss = time_waits();
    assert_eq!(before, ss, "TIME-WAIT changed during the census");
    assert!(
        (30..=40).contains(&ss),
        "{ss} TIME-WAIT sockets of 40 connections"
    );
    assert_eq!(
        sample(&text, "tracer_tcp_time_wait_sockets", &[("port", &port)]),
        Some(ss as f64)
    );

    // Ten ephemeral ports in a namespace, five of them held toward one destination: 0.5.
    let ns = Netns::new("ports");
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40009"]);
    let held = ns.run(|| {
        let l = TcpListener::bind("127.0.0.1:7000").unwrap();
        let conns: Vec<_> = (0..5)
            .map(|_| TcpStream::connect("127.0.0.1:7000").unwrap())
            .collect();
        (l, conns)
    });
    let text = agent.metrics();
    assert_eq!(
        sample(&text, "tracer_tcp_ephemeral_port_utilization", &[]),
        Some(0.5)
    );
    let worst = &sockets_json(&agent, "limit=1")["busiest_destinations"][0];
    assert_eq!(
        (
            worst["remote_port"].as_u64(),
            worst["ephemeral_ports_used"].as_u64()
        ),
        (Some(7000), Some(5))
    );
    assert_eq!(worst["netns"], ns.inode());
    drop(held);
}

fn listen_overflows() -> f64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap();
    tracer::census::parse_netstat(&text, "TcpExt")["ListenOverflows"] as f64
}

#[test]
fn a_full_accept_queue_shows_its_length_limit_and_overflows() {
    if !require_root("a_full_accept_queue_shows_its_length_limit_and_overflows") {
        return;
    }
    let addr = closed_port(V4);
    let port = addr.port().to_string();
    let agent = Agent::start(&["--port", &port]);
    let before = agent.metrics_until("the first listen counters", |t| {
        sample(t, "tracer_tcp_listen_overflows_total", &[]).is_some()
    });
    let agent_before = sample(&before, "tracer_tcp_listen_overflows_total", &[]).unwrap();
    let proc_before = listen_overflows();
    let listener = TcpListener::bind(addr).unwrap();
    // SAFETY: listen on a valid socket: a backlog of 2.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 2) }, 0);
    // Never accepted: the queue fills (Linux queues one more than the backlog), and the
    // kernel drops the SYNs after that, counting ListenOverflows.
    let attempts: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(1500))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let ss = ss_lines(&format!("state listening ( sport = :{port} )"));
    let cols: Vec<&str> = ss[0].split_whitespace().collect();
    let (ss_queue, ss_limit): (f64, f64) = (cols[0].parse().unwrap(), cols[1].parse().unwrap());
    let text = agent.metrics();
    let queue = sample(&text, "tracer_tcp_listen_queue", &[("port", &port)]).unwrap();
    let limit = sample(&text, "tracer_tcp_listen_queue_limit", &[("port", &port)]).unwrap();
    assert_eq!(
        (queue, limit),
        (ss_queue, ss_limit),
        "tracer vs ss (Recv-Q, Send-Q)"
    );
    assert_eq!(limit, 2.0);
    assert!(queue >= limit, "the queue is full: {queue} of {limit}");
    let proc_after = listen_overflows();
    assert!(proc_after > proc_before, "the kernel counted overflows");
    // The agent sums every namespace, the host's /proc/net/netstat is one: at least as many.
    let after = agent.metrics_at_least(
        &format!(
            "ListenOverflows of the host grew by {} with 6 connects to port {port} (backlog 2)",
            proc_after - proc_before
        ),
        &[(
            Figure::sample("tracer_tcp_listen_overflows_total", &[]),
            agent_before + proc_after - proc_before,
        )],
    );
    let drops = Figure::sample("tracer_tcp_listen_drops_total", &[]);
    assert!(drops.read(&after) > 0.0, "{}", drops.lines(&after));
    for a in attempts {
        let _ = a.join();
    }
    drop(listener);
}

/// Starts a connect to 127.0.0.1:9 without waiting for it; the socket closes when dropped.
fn connect_in_background() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: socket() has no preconditions; the result is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 9u16.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_in of the length given.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let err = std::io::Error::last_os_error();
    assert!(
        rc == -1 && err.raw_os_error() == Some(libc::EINPROGRESS),
        "connect: {err}"
    );
    fd
}

#[test]
fn half_open_handshakes_are_listed_and_a_black_holed_connect_is_flagged() {
    if !require_root("half_open_handshakes_are_listed_and_a_black_holed_connect_is_flagged") {
        return;
    }
    let ns = Netns::new("halfopen");
    // Every handshake ACK to port 18082 and every SYN to port 9 is dropped in the namespace.
    ns.nft(
        "table inet t {\n chain out {\n type filter hook output priority 0;\n \
         tcp dport 18082 tcp flags == ack drop\n tcp dport 9 drop\n }\n}\n",
    );
    let agent = Agent::start(&[
        "--stuck-after",
        "syn_sent=2s",
        "--stuck-after",
        "syn_recv=2s",
        "--port",
        "18082",
        "--port",
        "9",
    ]);
    let comm = std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim_end()
        .to_owned();
    // The kernel's own record of each SYN-ACK resent (CLOCK_MONOTONIC), by client port.
    let synacks = EventTrace::start("synack", "tcp/tcp_retransmit_synack", "sport == 18082");
    let (listener, clients) = ns.run(|| {
        let l = TcpListener::bind("127.0.0.1:18082").unwrap();
        // connect() returns once the SYN-ACK arrives; the server never sees the final ACK.
        let c: Vec<_> = (0..3)
            .map(|_| TcpStream::connect("127.0.0.1:18082").unwrap())
            .collect();
        (l, c)
    });
    // A non-blocking connect: it stays in SYN_SENT (retrying for minutes) until closed at the
    // end, however slowly the machine runs (a kernel under emulation, a busy CI host).
    let black_hole = ns.run(connect_in_background);
    // Each request socket's SYN-ACK resent twice (at 1 s and 3 s, later on a busy host, whose
    // timers fire late): from then on its age is at least 1 + 2 s, past the 2 s threshold
    // however late they fired (the age is the timer's periods so far, a lower bound).
    let resent = |port: u16| {
        let mine = format!("dport={port} ");
        synacks
            .events()
            .into_iter()
            .filter(|(_, f)| f.contains(&mine))
            .map(|(t, _)| t)
            .collect::<Vec<f64>>()
    };
    let ports: Vec<u16> = clients
        .iter()
        .map(|c| c.local_addr().unwrap().port())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ports.iter().any(|&p| resent(p).len() < 2) {
        assert!(
            Instant::now() < deadline,
            "SYN-ACKs resent: {:?}",
            synacks.events()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Both clocks now, to turn the listing's ages into CLOCK_MONOTONIC times.
    let (mono, unix) = (monotonic_now(), unix_now());
    let answer = sockets_json(&agent, "state=syn_recv&port=18082");
    let half_open = array(&answer);
    let ss_half_open = ns
        .exec(&["ss", "-tan", "state", "syn-recv"])
        .lines()
        .count()
        - 1;
    assert_eq!(half_open.len(), 3, "{half_open:?}");
    assert_eq!(ss_half_open, 3);
    // Request sockets never pass through the tracepoint: their age comes from the SYN-ACK
    // timer as sock_diag shows it (retransmissions so far, time to the next): the sum of
    // the periods so far minus what is left, which makes the request `2^k - 1` s old at its
    // k-th resend. So it entered SYN_RECV `2^k - 1` s before the last resend ftrace recorded
    // before the census. The agent's figure is a lower bound of that: it takes the timer as
    // of the end of the namespace's dump, and the kernel read it some time before, which on
    // a busy host is up to the time the census thread waited for a CPU (69 ms seen with both
    // CPUs busy); never more, but for sock_diag's jiffies (a few ms each).
    let census_mono = answer["census_timestamp_seconds"].as_f64().unwrap() - unix + mono;
    let answered_mono = census_mono + answer["census_age_seconds"].as_f64().unwrap();
    for s in &half_open {
        let port = s["remote_port"].as_u64().unwrap() as u16;
        let times = resent(port);
        let before: Vec<f64> = times
            .iter()
            .copied()
            .filter(|&t| t <= census_mono)
            .collect();
        let (k, last) = (before.len(), *before.last().unwrap());
        let entered = last - f64::from((1u32 << k) - 1);
        let age = s["age_seconds"].as_f64().unwrap();
        let inputs =
            format!("{k} SYN-ACKs resent at {times:?} before the census at {census_mono}: {s}");
        let expected = answered_mono - entered;
        assert!(
            age <= expected + 0.01 && age >= expected - 0.5,
            "age {age} s where {expected} s or a little less was expected (answered at \
             {answered_mono}); {inputs}"
        );
        assert_eq!(
            (s["age_source"].as_str(), s["age_is_lower_bound"].as_bool()),
            (Some("synack_timer"), Some(true)),
            "{s}"
        );
        assert!(s["netns"] == ns.inode() && s["stuck"] == true, "{s}");
        // Owned by the listener's process (its thread inherited this thread's name).
        assert!(
            s["pid"] == std::process::id() && s["comm"] == comm.as_str(),
            "{s}"
        );
    }
    let text = agent.metrics();
    let stuck_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tracer_tcp_stuck_sockets{") && !l.ends_with(" 0"))
        .collect();
    assert_eq!(
        sample(
            &text,
            "tracer_tcp_stuck_sockets",
            &[("state", "syn_recv"), ("port", "18082")]
        ),
        Some(3.0),
        "{stuck_lines:?}"
    );

    let syn_sent = array(&sockets_json(&agent, "state=syn_sent&port=9"));
    assert_eq!(syn_sent.len(), 1, "{syn_sent:?}");
    assert_eq!(syn_sent[0]["stuck"], true, "{syn_sent:?}");
    assert!(syn_sent[0]["age_seconds"].as_f64().unwrap() >= 2.0);
    let text = agent.metrics();
    assert_eq!(
        sample(
            &text,
            "tracer_tcp_stuck_sockets",
            &[("state", "syn_sent"), ("port", "9")]
        ),
        Some(1.0)
    );
    drop((listener, clients, black_hole));
}

#[test]
fn a_process_name_made_of_escape_sequences_is_printed_escaped() {
    if !require_root("a_process_name_made_of_escape_sequences_is_printed_escaped")
        || host_only(
            "a_process_name_made_of_escape_sequences_is_printed_escaped",
            "the escaping of names, not the kernel's",
        )
    {
        return;
    }
    // Any user can name a thread so (prctl PR_SET_NAME): erase a line, move up, hide text.
    const NAME: &str = "\x1b[2K\x1b[1A\x1b[8m";
    const ESCAPED: &str = r"\x1b[2K\x1b[1A\x1b[8m";
    let addr = closed_port(V4);
    let port = addr.port().to_string();
    let agent = Agent::start(&["--port", &port]);
    let watch = Tracer::start(&["watch", "--port", &port], true);
    let kept = std::thread::spawn(move || {
        let name = std::ffi::CString::new(NAME).unwrap();
        // SAFETY: PR_SET_NAME with a NUL-terminated string of at most 16 bytes.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) }, 0);
        leak(addr, 25)
    })
    .join()
    .unwrap();
    settle();
    let listing = sockets_json(&agent, &format!("state=close_wait&port={port}"));
    assert_eq!(
        array(&listing)[0]["comm"],
        NAME,
        "JSON keeps the name, escaped by JSON"
    );
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["sockets", "--agent", &format!("http://{}", agent.addr)])
        .args(["--state", "close_wait", "--port", &port])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let out = watch.stop_with(libc::SIGTERM);
    let lines = out.stdout.join("\n");
    for (what, text) in [("tracer sockets", &table), ("tracer watch", &lines)] {
        assert!(
            !text.contains('\x1b'),
            "{what} printed a raw ESC:\n{text:?}"
        );
        assert!(
            text.contains(ESCAPED),
            "{what} should show {ESCAPED}:\n{text}"
        );
    }
    assert_eq!(table.matches(ESCAPED).count(), 25, "{table}");
    drop(kept);
}

/// Pid of each socket `ss -tnp` lists for local port `port` in `state` (its first user).
fn ss_pids(state: &str, port: u16) -> Vec<u32> {
    let lines = ss_lines(&format!("-p state {state} ( sport = :{port} )"));
    lines
        .iter()
        .filter_map(|l| {
            let users = l.split("pid=").nth(1)?;
            users
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn a_leak_older_than_the_agent_is_named_by_the_process_that_holds_it_as_ss_p_names_it() {
    let test = "a_leak_older_than_the_agent_is_named_by_the_process_that_holds_it_as_ss_p_names_it";
    if !require_root(test) {
        return;
    }
    // A service that listens and keeps every connection it accepts, started before the agent.
    let addr = closed_port(V4);
    const SERVICE: &str = "import socket, sys, threading\n\
        l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        l.bind(('127.0.0.1', int(sys.argv[1]))); l.listen(64); kept = []\n\
        threading.Thread(target=lambda: [kept.append(l.accept()[0]) for _ in range(6)], daemon=True).start()\n\
        print('ready', flush=True); sys.stdin.read()\n";
    let (mut service, ready) = python_ready(SERVICE, &[&addr.port().to_string()]);
    assert_eq!(ready.trim(), "ready");
    // Five clients half-close: five CLOSE_WAIT in the service, before the agent starts.
    let half_close = || {
        let c = TcpStream::connect(addr).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        c
    };
    let mut clients: Vec<TcpStream> = (0..5).map(|_| half_close()).collect();
    settle();
    let port = addr.port().to_string();
    let agent = Agent::start(&["--stuck-after", "close_wait=1s", "--port", &port]);
    // A sixth after the agent started, accepted by the listener it never saw open.
    clients.push(half_close());
    settle();
    let pid = service.id();
    let listing = sockets_json(&agent, &format!("port={port}&state=close_wait,listen"));
    let listed = array(&listing);
    let by_state = |s: &str| -> Vec<(u32, String)> {
        listed
            .iter()
            .filter(|v| v["state"] == s && v["local_port"] == addr.port())
            .map(|v| {
                (
                    v["pid"].as_u64().unwrap() as u32,
                    v["comm"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        by_state("listen"),
        vec![(pid, "python3".to_owned())],
        "{listing}"
    );
    assert_eq!(
        by_state("close_wait"),
        vec![(pid, "python3".to_owned()); 6],
        "{listing}"
    );
    // The oracle: who ss -p says holds them.
    assert_eq!(ss_pids("close-wait", addr.port()), vec![pid; 6]);
    assert_eq!(ss_pids("listening", addr.port()), vec![pid]);
    // The five older than the agent are aged from its start at most (a lower bound).
    let sources: Vec<&str> = listed
        .iter()
        .filter(|v| v["state"] == "close_wait")
        .map(|v| v["age_source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources.iter().filter(|s| **s == "agent_start").count(),
        5,
        "{sources:?}"
    );
    let text = agent.metrics();
    let named = sample(
        &text,
        "tracer_census_corrections_total",
        &[("action", "owner_found")],
    );
    // The probe's storage names them all (seeded at start, and the sixth copied from its
    // seeded listener): the census needs no walk of /proc.
    assert_eq!(named, Some(0.0));
    // And `tracer sockets` shows the process.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["sockets", "--agent", &format!("http://{}", agent.addr)])
        .args(["--port", &port, "--state", "close_wait"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = table.lines().filter(|l| l.contains("close_wait")).collect();
    assert_eq!(rows.len(), 6, "{table}");
    assert!(
        rows.iter().all(|r| r.contains(&format!(" {pid} python3 "))),
        "{table}"
    );
    drop(service.stdin.take());
    let _ = service.wait();
    drop(clients);
}
