//! `tracer top` on real traffic: its plain table (`--once`, on its own probe and against a
//! running agent) and its full screen in a real terminal (tmux), checked against what the
//! traffic was made of and against `ss`.
//!
//! The traffic, on loopback, runs for the whole of each check: 10 connections a second to a
//! service on port 7431, 5 a second to one on 7432 that sends 1,000 bytes on each, 2 connects
//! a second refused on 7433 (nothing listens), and 3 connections to 7434 that its server
//! never closes after the clients sent their FIN (CLOSE_WAIT leaks, stuck after 1 s).
//! Both ends of each connection are this test's, so a port's row counts both handshakes.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// The tests share the service ports: one at a time.
static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

const PLAIN: u16 = 7431;
const SENDS: u16 = 7432;
const REFUSED: u16 = 7433;
const LEAKS: u16 = 7434;

/// The traffic above, until dropped.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The leaked connections' client ends (kept open, their FIN sent).
    _leaks: Vec<TcpStream>,
    _leaked: Vec<TcpStream>,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Traffic {
    fn start() -> Traffic {
        let lock = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (port, per_second, send) in [(PLAIN, 10, 0usize), (SENDS, 5, 1_000)] {
            let listener = TcpListener::bind((V4, port)).expect("bind a service port");
            let stop_server = stop.clone();
            listener.set_nonblocking(true).unwrap();
            threads.push(std::thread::spawn(move || {
                while !stop_server.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            let _ = s.write_all(&vec![b'x'; send]);
                            // The client closes first; then the server.
                            let mut buf = [0u8; 64];
                            while matches!(s.read(&mut buf), Ok(k) if k > 0) {}
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
            let stop_client = stop.clone();
            threads.push(std::thread::spawn(move || {
                paced(&stop_client, per_second, || {
                    let mut s = TcpStream::connect((V4, port)).expect("connect");
                    let mut got = vec![0u8; send];
                    s.read_exact(&mut got).expect("the service's bytes");
                })
            }));
        }
        let stop_refused = stop.clone();
        threads.push(std::thread::spawn(move || {
            paced(&stop_refused, 2, || {
                let err = TcpStream::connect((V4, REFUSED)).expect_err("nothing listens on 7433");
                assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
            })
        }));
        // The leaks: accepted, never closed by the server; the clients send their FIN.
        let listener = TcpListener::bind((V4, LEAKS)).expect("bind 7434");
        let mut leaks = Vec::new();
        let mut leaked = Vec::new();
        for _ in 0..3 {
            let c = TcpStream::connect((V4, LEAKS)).unwrap();
            let (s, _) = listener.accept().unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            leaks.push(c);
            leaked.push(s);
        }
        drop(listener);
        Traffic {
            stop,
            threads,
            _leaks: leaks,
            _leaked: leaked,
            _lock: lock,
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Calls `f` `per_second` times a second until `stop` (at most 2 minutes).
fn paced(stop: &AtomicBool, per_second: u32, mut f: impl FnMut()) {
    let period = Duration::from_secs(1) / per_second;
    let started = Instant::now();
    let mut next = started;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
        f();
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// One row of the table: its name and its figures by column title.
#[derive(Debug)]
struct Row {
    name: String,
    cells: Vec<(String, String)>,
}

impl Row {
    fn get(&self, title: &str) -> &str {
        &self.cells.iter().find(|(t, _)| t == title).unwrap().1
    }
    fn number(&self, title: &str) -> f64 {
        let text = self.get(title).trim_end_matches(['K', 'M', 'B']);
        text.parse()
            .unwrap_or_else(|_| panic!("{title} of {}: {:?}", self.name, self.get(title)))
    }
    /// Bytes per second.
    fn bytes(&self, title: &str) -> f64 {
        let text = self.get(title);
        let scale = match text.chars().last() {
            Some('K') => 1024.0,
            Some('M') => 1024.0 * 1024.0,
            _ => 1.0,
        };
        self.number(title) * scale
    }
}

/// The figure columns, left to right, as the table heads them.
const TITLES: [&str; 10] = [
    "CONN/s", "FAIL/s", "OPEN", "STUCK", "RETR/s", "TX/s", "RX/s", "HS p50", "HS p99", "RTT",
];

/// The rows of a table grouped by port: see [`rows_under`].
fn rows(text: &str) -> Vec<Row> {
    rows_under(text, "PORT")
}

/// The rows of a table whose heading starts with `title`: the last ten words of a line are
/// its figures (no figure has a space), what is before them its name.
fn rows_under(text: &str, title: &str) -> Vec<Row> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(title));
    let heading = lines
        .next()
        .unwrap_or_else(|| panic!("no heading in:\n{text}"));
    assert!(heading.contains("RTT"), "every column shown:\n{text}");
    lines
        .filter(|l| !l.trim().is_empty() && !l.starts_with("q quit"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let (name, figures) = words.split_at(words.len() - TITLES.len());
            Row {
                name: name.join(" "),
                cells: TITLES
                    .iter()
                    .zip(figures)
                    .map(|(t, f)| (t.to_string(), f.to_string()))
                    .collect(),
            }
        })
        .collect()
}

fn row<'a>(rows: &'a [Row], name: &str, text: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no row {name} in:\n{text}"))
}

/// Sockets of `port` that `ss` shows open (every state but LISTEN and TIME-WAIT).
fn ss_open(port: u16) -> usize {
    ss_lines(&format!("( sport = :{port} or dport = :{port} )"))
        .iter()
        .filter(|l| !l.starts_with("LISTEN") && !l.starts_with("TIME-WAIT"))
        .count()
}

/// What the traffic must show: each port's row, its figures within a quarter of the rates
/// made (the table's window is one or two intervals, and the pacing is a thread's sleep), the
/// leaks exact and equal to `ss`.
fn check(text: &str) {
    let rows = rows(text);
    let plain = row(&rows, "7431", text);
    let sends = row(&rows, "7432", text);
    let refused = row(&rows, "7433", text);
    let leaks = row(&rows, "7434", text);
    let near = |got: f64, want: f64, what: &str| {
        assert!(
            (got - want).abs() <= want * 0.25,
            "{what}: {got}, not within 25% of {want}, in:\n{text}"
        );
    };
    // Both ends' handshakes: 20 a second on 7431, 10 on 7432; 2 connects refused on 7433.
    near(plain.number("CONN/s"), 20.0, "7431 CONN/s");
    near(sends.number("CONN/s"), 10.0, "7432 CONN/s");
    near(refused.number("FAIL/s"), 2.0, "7433 FAIL/s");
    assert_eq!(plain.number("FAIL/s"), 0.0, "{text}");
    // 1,000 bytes on each of 5 connections a second: sent by the server, received by the
    // client, both under 7432.
    near(sends.bytes("TX/s"), 5_000.0, "7432 TX/s");
    near(sends.bytes("RX/s"), 5_000.0, "7432 RX/s");
    assert_eq!(plain.bytes("TX/s"), 0.0, "{text}");
    assert_ne!(plain.get("HS p50"), "-", "{text}");
    // The leaks: 3 servers' sockets in CLOSE_WAIT past 1 s, and their 3 clients in FIN_WAIT2
    // (open, not stuck before 60 s): 6 open, as ss counts them, 3 stuck.
    assert_eq!(
        leaks.number("OPEN") as usize,
        ss_open(LEAKS),
        "ss and {text}"
    );
    assert_eq!(leaks.number("OPEN"), 6.0, "{text}");
    assert_eq!(leaks.number("STUCK"), 3.0, "{text}");
    assert_eq!(leaks.number("CONN/s"), 0.0, "{text}");
}

/// `tracer top ARGS --once --group port`, its plain table on stdout.
fn top_once(args: &[&str]) -> String {
    top_once_by("port", args)
}

/// `tracer top ARGS --once --group GROUP`.
fn top_once_by(group: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .arg("top")
        .args(args)
        .args(["--once", "--group", group])
        .env("COLUMNS", "200")
        .stdin(Stdio::null())
        .output()
        .expect("tracer top");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "tracer top failed: {stderr}\n{stdout}"
    );
    stdout
}

#[test]
fn top_once_on_its_own_probe_shows_each_port_as_the_traffic_made_it() {
    let test = "top_once_on_its_own_probe_shows_each_port_as_the_traffic_made_it";
    if !require_root(test) {
        return;
    }
    let _traffic = Traffic::start();
    // Past the leaks' 1 s threshold before the first census.
    std::thread::sleep(Duration::from_millis(1_200));
    let text = top_once(&["--interval", "2s", "--stuck-after", "close_wait=1s"]);
    println!("{text}");
    check(&text);
    // The header: the host's figures and the probe's, nothing lost.
    assert!(text.contains("; by port, sorted by CONN/s"), "{text}");
    assert!(text.contains(", 0 lost, "), "{text}");
}

#[test]
fn top_once_against_a_running_agent_shows_the_same_without_a_probe_of_its_own() {
    let test = "top_once_against_a_running_agent_shows_the_same_without_a_probe_of_its_own";
    if !require_root(test)
        || host_only(
            test,
            "the agent's /top answer, not the kernel's (top's own probe is top_once_on_its_own_probe's on every kernel)",
        )
    {
        return;
    }
    let agent = Agent::start(&["--stuck-after", "close_wait=1s"]);
    let _traffic = Traffic::start();
    std::thread::sleep(Duration::from_millis(1_200));
    let programs_before = loaded_programs();
    let url = format!("http://{}", agent.addr);
    let text = top_once(&["--interval", "2s", "--agent", &url]);
    println!("{text}");
    check(&text);
    assert!(
        text.starts_with(&format!("tracer top: agent {url};")),
        "{text}"
    );
    // It loaded nothing: the same BPF programs before and after (the agent's).
    assert_eq!(loaded_programs(), programs_before);

    // By process, only this one: every connection above is this test's, both ends (the
    // passive ones too: the probe names the listener's owner).
    let me = std::process::id().to_string();
    let text = top_once_by(
        "process",
        &["--interval", "2s", "--agent", &url, "--pid", &me],
    );
    println!("{text}");
    let mine = rows_under(&text, "PROCESS");
    assert!(
        !mine.is_empty() && mine.iter().all(|r| r.name.starts_with(&format!("{me} "))),
        "{text}"
    );
    let sum = |title: &str| mine.iter().map(|r| r.number(title)).sum::<f64>();
    let near = |got: f64, want: f64, what: &str| {
        assert!(
            (got - want).abs() <= want * 0.25,
            "{what}: {got}, not within 25% of {want}:\n{text}"
        );
    };
    near(sum("CONN/s"), 30.0, "CONN/s of this process");
    near(sum("FAIL/s"), 2.0, "FAIL/s of this process");
    // The leaks' 6 sockets are this process's (the clients' ends are kept open, their FIN
    // sent), and at most the one connection each pacer has open at the census.
    assert!((6.0..=8.0).contains(&sum("OPEN")), "{text}");
    assert_eq!(sum("STUCK"), 3.0, "{text}");

    // An agent that is not there: one line, and a failure.
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["top", "--once", "--agent", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("tracer: no agent answers at http://127.0.0.1:9"),
        "{stderr}"
    );
    drop(agent);
}

/// Ids of the BPF programs loaded now (`bpftool` is not on every host: from /proc, the
/// programs this process's children hold are not visible, so ask the kernel by id).
fn loaded_programs() -> Vec<u32> {
    let mut ids = Vec::new();
    let mut id = 0u32;
    loop {
        // SAFETY: BPF_PROG_GET_NEXT_ID reads and writes the attr union we own.
        let mut attr = [0u32; 4];
        attr[0] = id;
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                11, // BPF_PROG_GET_NEXT_ID
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if r != 0 {
            break;
        }
        id = attr[1];
        ids.push(id);
    }
    ids
}

/// A tmux session running `tracer top`, killed by name when dropped.
struct Tmux {
    session: String,
}

impl Tmux {
    fn start(session: &str, command: &str) -> Tmux {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", session])
            .output();
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                session,
                "-x",
                "200",
                "-y",
                "30",
                command,
            ])
            .status()
            .expect("tmux");
        assert!(ok.success());
        Tmux {
            session: session.to_owned(),
        }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let ok = Command::new("tmux")
            .args(["send-keys", "-t", &self.session, keys])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.session])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits until the screen shows `what` and traffic rates (two censuses), up to `limit`.
    fn wait_for(&self, what: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let has_rates = |screen: &str| {
            screen.contains("PORT")
                && rows(screen)
                    .iter()
                    .any(|r| r.name == SENDS.to_string() && r.get("TX/s") != "-")
        };
        loop {
            let screen = self.screen();
            if screen.contains(what) && has_rates(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?} on the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .output();
    }
}

#[test]
fn top_in_a_real_terminal_follows_the_keys_and_quits_on_q() {
    let test = "top_in_a_real_terminal_follows_the_keys_and_quits_on_q";
    if !require_root(test)
        || host_only(
            test,
            "the terminal's handling does not depend on the kernel",
        )
    {
        return;
    }
    if Command::new("tmux").arg("-V").output().is_err() {
        panic!("{test}: tmux is missing: run `cargo xtask setup`");
    }
    let _traffic = Traffic::start();
    std::thread::sleep(Duration::from_millis(1_200));
    let command = format!(
        "{} top --group port --interval 2s --stuck-after close_wait=1s",
        env!("CARGO_BIN_EXE_tracer")
    );
    let tmux = Tmux::start("tracer-top-test", &command);
    // Sorted by connections: 7431's row first. Two censuses give the traffic figures.
    let screen = tmux.wait_for("sorted by CONN/s", Duration::from_secs(20));
    println!("{screen}");
    check(&screen);
    let first = |screen: &str| rows(screen).first().map(|r| r.name.clone());
    assert_eq!(first(&screen).as_deref(), Some("7431"), "{screen}");
    // `>` sorts by failures: the refused port first.
    tmux.keys(">");
    let screen = tmux.wait_for("sorted by FAIL/s", Duration::from_secs(5));
    assert_eq!(first(&screen).as_deref(), Some("7433"), "{screen}");
    // `>` twice more, then `<`: by OPEN, whose largest is the leaks' port.
    tmux.keys(">");
    tmux.keys(">");
    tmux.keys("<");
    let screen = tmux.wait_for("sorted by OPEN", Duration::from_secs(5));
    assert_eq!(first(&screen).as_deref(), Some("7434"), "{screen}");
    // `q` quits, and tmux's session ends with it.
    tmux.keys("q");
    let deadline = Instant::now() + Duration::from_secs(5);
    while tmux.alive() {
        assert!(
            Instant::now() < deadline,
            "top did not quit on q:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pod's service, on a port of its own.
const POD_PORT: u16 = 7435;

#[test]
fn top_once_groups_a_pods_connections_under_its_pod() {
    let test = "top_once_groups_a_pods_connections_under_its_pod";
    if !require_root(test)
        || host_only(
            test,
            "top's grouping by pod, not the kernel's (pods' own tests name them on every kernel)",
        )
    {
        return;
    }
    let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut tree = Cgroups::new();
    let uid = "7c2e9a1b-4d5f-4a6b-9c8d-1e2f3a4b5c6d";
    let dir = tree.make(&format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
         cri-containerd-{}.scope",
        uid.replace('-', "_"),
        "ab".repeat(32)
    ));
    let logs = PodLogs::new(&[("shop", "web-0", uid)]);
    // The pod's server: its listener made in the pod's cgroup, so every socket it accepts is
    // the pod's. It keeps the first 3 connections open and closes the others after their
    // clients did.
    tree.enter(&dir);
    let listener = TcpListener::bind((V4, POD_PORT)).expect("bind 7435");
    tree.leave();
    let stop = Arc::new(AtomicBool::new(false));
    let server = std::thread::spawn(move || {
        let mut kept = Vec::new();
        for s in listener.incoming() {
            let Ok(mut s) = s else { break };
            if kept.len() < 3 {
                kept.push(s);
                continue;
            }
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf);
            if buf.starts_with(b"stop") {
                break;
            }
        }
    });
    let held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect((V4, POD_PORT)).unwrap())
        .collect();
    let stop_client = stop.clone();
    let client = std::thread::spawn(move || {
        paced(&stop_client, 10, || {
            drop(TcpStream::connect((V4, POD_PORT)).expect("connect to the pod"));
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    let root = tree.root.to_str().unwrap().to_owned();
    let mut args = vec!["--interval", "2s", "--pod-logs-dir", logs.dir()];
    if tree.mounted {
        args.extend(["--cgroup-root", root.as_str()]);
    }
    let kubepods = tree.kubepods_args();
    args.extend(kubepods.iter().map(String::as_str));
    let text = top_once_by("pod", &args);
    println!("{text}");
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let mut last = TcpStream::connect((V4, POD_PORT)).unwrap();
    last.write_all(b"stop").unwrap();
    server.join().unwrap();
    drop(held);

    let rows = rows_under(&text, "POD");
    let pod = row(&rows, "shop/web-0", &text);
    // Its side of each connection: 10 handshakes a second, and the 3 it keeps open (and at
    // most the one the pacer has open at the census).
    let got = pod.number("CONN/s");
    assert!(
        (got - 10.0).abs() <= 2.5,
        "shop/web-0 CONN/s {got}:\n{text}"
    );
    assert!((3.0..=4.0).contains(&pod.number("OPEN")), "{text}");
    // The clients' side is the host's, not the pod's.
    let host = row(&rows, "-", &text);
    assert!(host.number("CONN/s") >= 7.5, "{text}");
}

/// A pseudo-terminal of `cols` x `rows`: (master, slave).
fn pty(cols: u16, rows: u16) -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors we then own; the name and termios are not asked.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are open and ours alone.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

/// The thread of `pid` named `name`.
fn thread_named(pid: u32, name: &str) -> Option<i32> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return dir.file_name()?.to_str()?.parse().ok();
        }
    }
    None
}

/// The state letter of a thread (`R`, `S`, `t` for stopped by a tracer...).
fn thread_state(pid: u32, tid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // After the command in parentheses, which may hold spaces.
    stat.rsplit_once(") ").unwrap().1.chars().next().unwrap()
}

#[test]
fn a_screen_that_cannot_draw_costs_top_no_event() {
    let test = "a_screen_that_cannot_draw_costs_top_no_event";
    if !require_root(test)
        || host_only(
            test,
            "the terminal's handling does not depend on the kernel",
        )
    {
        return;
    }
    let _traffic = Traffic::start();
    let (master, slave) = pty(120, 30);
    let mut top = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["top", "--group", "port", "--interval", "1s"])
        // A 16 KiB ring a CPU (78 events) holds about a second of this traffic's events
        // (some 140 a second over two CPUs): plenty while they are read every 10 ms, and
        // overflowed within the stall were a stalled screen to hold up the reading.
        .args(["--ring-buffer-size", "16K"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tracer top");
    drop(slave);
    let pid = top.id();
    // The terminal is read, as a terminal is.
    let mut reader = master.try_clone().unwrap();
    let drained = std::thread::spawn(move || {
        let (mut all, mut buf) = (0usize, [0u8; 1 << 16]);
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            all += n;
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let screen = loop {
        if let Some(tid) = thread_named(pid, "screen") {
            break tid;
        }
        assert!(Instant::now() < deadline, "no screen thread");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(2));
    // The screen thread alone frozen for 4 s, as by a write to a terminal that never returns
    // (a stopped ssh session, a terminal scrolled back): ptrace stops one thread, not the
    // process.
    // SAFETY: ptrace requests on a thread of our own child; waitpid on it.
    unsafe {
        assert_eq!(
            libc::ptrace(libc::PTRACE_SEIZE, screen, 0, 0),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, screen, 0, 0), 0);
        let mut status = 0;
        assert_eq!(libc::waitpid(screen, &mut status, libc::__WALL), screen);
    }
    assert_eq!(
        thread_state(pid, screen),
        't',
        "the screen thread is stopped"
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(top.try_wait().unwrap().is_none(), "top is running");
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, screen, 0, 0), 0);
    }
    std::thread::sleep(Duration::from_secs(1));
    (&master).write_all(b"q").unwrap();
    let status = loop {
        if let Some(status) = top.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "top did not quit on q"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(master);
    let drawn = drained.join().unwrap();
    let mut stderr = String::new();
    top.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    println!("{drawn} bytes drawn; {stderr}");
    assert!(status.success(), "{stderr}");
    // tracer: N events read, 0 lost (ring buffer full), M missed
    let summary = stderr
        .lines()
        .find(|l| l.contains("events read"))
        .unwrap_or_else(|| panic!("no summary: {stderr}"));
    let words: Vec<&str> = summary.split_whitespace().collect();
    let read: u64 = words[1].parse().unwrap();
    assert!(read >= 500, "events flowed during the stall: {summary}");
    assert_eq!(words[4], "0", "nothing lost: {summary}");
}
