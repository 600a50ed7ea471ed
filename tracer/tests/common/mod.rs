//! Helpers shared by the kernel tests: root checks, the kernel's own ftrace record of
//! `sock/inet_sock_set_state` (the oracle), a running `tracer` process, and real TCP traffic
//! on loopback.
#![allow(dead_code)]

mod cgroups;
#[allow(unused_imports)]
pub use cgroups::{Cgroups, PodLogs};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// True when the kernel tests can run. Without root a kernel test fails (so that `cargo test`
/// as a user is not all green while nothing ran), unless `TRACER_SKIP_KERNEL_TESTS` is set:
/// then it is skipped and says so. In CI (which runs as root) it always fails.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: kernel tests need root, and CI runs them as root");
    }
    if std::env::var_os("TRACER_SKIP_KERNEL_TESTS").is_none() {
        panic!(
            "{test}: needs root to load eBPF programs: run `sudo cargo xtask test`, or set \
             TRACER_SKIP_KERNEL_TESTS=1 to skip the kernel tests"
        );
    }
    eprintln!("SKIPPED {test}: needs root to load eBPF programs (TRACER_SKIP_KERNEL_TESTS is set)");
    false
}

/// Says (on stdout, which the kernel matrix reads) that this kernel cannot give a figure the
/// test would otherwise check, and why; the test then checks what the agent does instead.
pub fn unsupported(feature: &str, why: &str) {
    println!("UNSUPPORTED {feature}: {why}");
}

/// True (and says so, as the kernel matrix reads it) when this test runs in the kernel
/// matrix (`cargo xtask kernels`, which sets TRACER_KERNEL_MATRIX) and checks something that
/// does not depend on the kernel: it then runs on the host only, by `cargo xtask test`.
pub fn host_only(test: &str, why: &str) -> bool {
    if std::env::var_os("TRACER_KERNEL_MATRIX").is_none() {
        return false;
    }
    println!("SKIPPED {test}: {why}; it runs on the host kernel (cargo xtask test)");
    true
}

/// One transition as (sport, dport, old, new): what the tracer and ftrace are compared on.
pub type Key = (u16, u16, String, String);

/// Counts of each distinct key.
pub fn multiset(keys: impl IntoIterator<Item = Key>) -> BTreeMap<Key, usize> {
    let mut m = BTreeMap::new();
    for k in keys {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

/// A private ftrace instance recording `sock/inet_sock_set_state` for a set of ports.
pub struct Ftrace {
    dir: PathBuf,
}

impl Ftrace {
    /// Starts recording transitions of TCP sockets with any of `ports` on either side.
    pub fn start(name: &str, ports: &[u16]) -> Ftrace {
        let root = PathBuf::from("/sys/kernel/tracing");
        assert!(
            root.join("instances").exists(),
            "tracefs is not mounted at /sys/kernel/tracing (cargo xtask test mounts it)"
        );
        let dir = root
            .join("instances")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("creating an ftrace instance");
        let ft = Ftrace { dir };
        ft.write("buffer_size_kb", "32768");
        // CLOCK_MONOTONIC, the probe's clock (bpf_ktime_get_ns), so that times compare.
        ft.write("trace_clock", "mono");
        let filter = ports
            .iter()
            .map(|p| format!("sport == {p} || dport == {p}"))
            .collect::<Vec<_>>()
            .join(" || ");
        ft.write(
            "events/sock/inet_sock_set_state/filter",
            &format!("protocol == 6 && ({filter})"),
        );
        ft.write("events/sock/inet_sock_set_state/enable", "1");
        ft
    }

    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("writing {value:?} to {file}: {e}"));
    }

    /// Stops recording and returns every transition recorded, asserting none was overwritten.
    pub fn stop(&self) -> Vec<Key> {
        self.stop_timed().into_iter().map(|(_, k)| k).collect()
    }

    /// As [`Ftrace::stop`], each transition with the time ftrace recorded it at
    /// (CLOCK_MONOTONIC, seconds).
    pub fn stop_timed(&self) -> Vec<(f64, Key)> {
        self.write("events/sock/inet_sock_set_state/enable", "0");
        for entry in std::fs::read_dir(self.dir.join("per_cpu")).expect("per_cpu") {
            let stats = std::fs::read_to_string(entry.expect("cpu dir").path().join("stats"))
                .expect("per-cpu stats");
            let overrun = stats
                .lines()
                .find_map(|l| l.strip_prefix("overrun: "))
                .unwrap_or("0");
            assert_eq!(overrun.trim(), "0", "the ftrace oracle itself lost events");
        }
        let text = std::fs::read_to_string(self.dir.join("trace")).expect("reading trace");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (head, _) = l.split_once(" inet_sock_set_state: ")?;
                let time = head.split_whitespace().last()?.trim_end_matches(':');
                Some((time.parse().ok()?, parse_ftrace_line(l)?))
            })
            .collect()
    }
}

/// A private ftrace instance recording one event (`system/name`) that passes `filter`, on
/// CLOCK_MONOTONIC (the probe's clock).
pub struct EventTrace {
    dir: PathBuf,
    event: String,
}

impl EventTrace {
    pub fn start(name: &str, event: &str, filter: &str) -> EventTrace {
        let dir = PathBuf::from("/sys/kernel/tracing/instances")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("creating an ftrace instance");
        let t = EventTrace {
            dir,
            event: event.to_owned(),
        };
        let write = |file: &str, value: &str| {
            std::fs::write(t.dir.join(file), value)
                .unwrap_or_else(|e| panic!("writing {value:?} to {file}: {e}"))
        };
        write("trace_clock", "mono");
        write(&format!("events/{event}/filter"), filter);
        write(&format!("events/{event}/enable"), "1");
        t
    }

    /// Every event recorded so far (recording goes on): its time (CLOCK_MONOTONIC, seconds)
    /// and its fields (`name=value` words).
    pub fn events(&self) -> Vec<(f64, String)> {
        let text = std::fs::read_to_string(self.dir.join("trace")).expect("reading trace");
        let (_, name) = self.event.split_once('/').unwrap_or(("", &self.event));
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (head, fields) = l.split_once(&format!(" {name}: "))?;
                let time = head.split_whitespace().last()?.trim_end_matches(':');
                Some((time.parse().ok()?, fields.to_owned()))
            })
            .collect()
    }
}

impl Drop for EventTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join(format!("events/{}/enable", self.event)), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// CLOCK_MONOTONIC now, seconds.
pub fn monotonic_now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

impl Drop for Ftrace {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/sock/inet_sock_set_state/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Parses `... inet_sock_set_state: family=AF_INET protocol=IPPROTO_TCP sport=1 dport=2 ...
/// oldstate=TCP_CLOSE newstate=TCP_SYN_SENT`.
fn parse_ftrace_line(line: &str) -> Option<Key> {
    let (_, fields) = line.split_once("inet_sock_set_state: ")?;
    let get = |key: &str| {
        fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    let state = |v: &str| v.trim_start_matches("TCP_").to_ascii_lowercase();
    Some((
        get("sport")?.parse().ok()?,
        get("dport")?.parse().ok()?,
        state(get("oldstate")?),
        state(get("newstate")?),
    ))
}

/// A `tracer` process started by a test; killed (by PID) if the test ends without stopping it.
pub struct Tracer {
    child: Child,
    stdout: Option<JoinHandle<Vec<String>>>,
    start_stdout: Option<mpsc::Sender<()>>,
    stderr_lines: mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
}

/// What a stopped tracer printed.
pub struct Output {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub status: std::process::ExitStatus,
}

impl Tracer {
    /// Starts `tracer ARGS` and waits until it says it is attached. With `read_stdout` false,
    /// nobody reads its stdout until [`Tracer::read_stdout`]: its pipe fills and it stalls,
    /// which is how a test makes its ring buffer overflow on purpose.
    pub fn start(args: &[&str], read_stdout: bool) -> Tracer {
        Tracer::start_with_env(args, &[], read_stdout)
    }

    /// [`Tracer::start`] with these environment variables set (e.g. `RUST_LOG`).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)], read_stdout: bool) -> Tracer {
        // The accept-queue wait's trampoline (fexit) only where a test asks for it: a Debian
        // 6.1 guest under QEMU's emulation hung once (both vCPUs spinning, no kernel message)
        // in the first test of a boot when every agent attached it, and not again since; the
        // tests of the accept queue pass `--accept-wait` themselves.
        let mut args = args.to_vec();
        if matches!(args.first(), Some(&"run" | &"watch")) && !args.contains(&"--accept-wait") {
            args.extend(["--accept-wait", "off"]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_tracer"))
            .args(&args)
            .envs(env.iter().copied())
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tracer");
        let mut stdout = child.stdout.take().expect("stdout");
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let stdout = std::thread::spawn(move || {
            let _ = go_rx.recv();
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text.lines().map(str::to_owned).collect()
        });
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tracer = Tracer {
            child,
            stdout: Some(stdout),
            start_stdout: Some(go_tx),
            stderr_lines: rx,
            stderr_seen: Vec::new(),
        };
        if read_stdout {
            tracer.read_stdout();
        }
        // Loading and verifying the probe takes a few seconds in an emulated guest, and took
        // over 30 s there once while the host was busy: 60 s before calling it a failure.
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tracer.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    let attached = line.starts_with("tracer: attached");
                    tracer.stderr_seen.push(line);
                    if attached {
                        // Where a guest's minutes go (docs/tests.md): each start is here.
                        eprintln!("tracer {} attached in {:.2?}", args[0], started.elapsed());
                        break;
                    }
                }
                Err(_) => {
                    let _ = tracer.child.kill();
                    let _ = tracer.child.wait();
                    panic!("tracer did not attach; stderr: {:?}", tracer.stderr_seen);
                }
            }
        }
        tracer
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line the tracer has printed on stderr so far, after waiting `wait` for more.
    pub fn stderr_after(&mut self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        while let Ok(line) = self
            .stderr_lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.stderr_seen.push(line);
        }
        self.stderr_seen.clone()
    }

    /// Lets the tracer's stdout flow.
    pub fn read_stdout(&mut self) {
        if let Some(tx) = self.start_stdout.take() {
            let _ = tx.send(());
        }
    }

    /// Sends `signal` by PID and collects everything the tracer printed.
    pub fn stop_with(mut self, signal: i32) -> Output {
        self.read_stdout();
        // SAFETY: kill on our own child's PID, which we have not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.wait()
    }

    /// Sends `signal` by PID without ever reading stdout, and returns how long the tracer took
    /// to exit and how; None when it was still running after `limit` (it is then killed).
    pub fn signal_and_time_exit(
        &mut self,
        signal: i32,
        limit: Duration,
    ) -> Option<(Duration, std::process::ExitStatus)> {
        let sent = Instant::now();
        // SAFETY: kill on our own child's PID, which we have not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        while sent.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("waiting for tracer") {
                return Some((sent.elapsed(), status));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        None
    }

    /// Waits for the tracer to exit by itself (`--count`, `--duration`).
    pub fn wait(mut self) -> Output {
        self.read_stdout();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for tracer") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tracer did not exit within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = self
            .stdout
            .take()
            .expect("stdout thread")
            .join()
            .expect("stdout reader");
        let mut stderr = std::mem::take(&mut self.stderr_seen);
        while let Ok(line) = self.stderr_lines.recv_timeout(Duration::from_secs(2)) {
            stderr.push(line);
        }
        Output {
            stdout,
            stderr,
            status,
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Output {
    /// Parsed `--json` lines.
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.stdout
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
            .collect()
    }

    /// The (sport, dport, old, new) of each JSON line.
    pub fn keys(&self) -> Vec<Key> {
        self.json().iter().map(key_of).collect()
    }

    /// The `received, printed, lost` figures of the final stderr summary line.
    pub fn summary(&self) -> (u64, u64, u64) {
        let line = self
            .stderr
            .iter()
            .rev()
            .find(|l| l.contains("events received"))
            .unwrap_or_else(|| panic!("no summary line in {:?}", self.stderr));
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("number"))
            .collect();
        assert_eq!(nums.len(), 3, "summary line {line:?}");
        (nums[0], nums[1], nums[2])
    }
}

pub fn key_of(v: &serde_json::Value) -> Key {
    (
        v["sport"].as_u64().expect("sport") as u16,
        v["dport"].as_u64().expect("dport") as u16,
        v["old"].as_str().expect("old").to_owned(),
        v["new"].as_str().expect("new").to_owned(),
    )
}

/// Which side closes an accepted connection first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closer {
    Client,
    Server,
}

/// A listener on loopback that accepts `n` connections and closes each one as `closer` says.
pub struct Server {
    pub addr: SocketAddr,
    thread: JoinHandle<()>,
}

impl Server {
    /// Binds now (so the port is known before tracing starts); serves `n` connections.
    pub fn start(ip: &str, n: usize, closer: Closer) -> Server {
        let addr = SocketAddr::new(ip.parse().expect("ip"), 0);
        Server::start_at(addr, n, closer)
    }

    /// Like [`Server::start`], on a given address (listen() runs on the calling thread).
    pub fn start_at(addr: SocketAddr, n: usize, closer: Closer) -> Server {
        let listener = TcpListener::bind(addr).expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let thread = std::thread::spawn(move || {
            for _ in 0..n {
                let (mut s, _) = listener.accept().expect("accept");
                if closer == Closer::Client {
                    // Wait for the client's FIN, then close: the server closes second.
                    let mut buf = [0u8; 64];
                    while matches!(s.read(&mut buf), Ok(k) if k > 0) {}
                }
                drop(s);
            }
            // The listener closes here, after the last connection.
        });
        Server { addr, thread }
    }

    pub fn join(self) {
        self.thread.join().expect("server thread");
    }
}

/// Makes `n` connections to `addr`, each closed as `closer` says.
pub fn connect_many(addr: SocketAddr, n: usize, closer: Closer) {
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).expect("connect");
        if closer == Closer::Server {
            let mut buf = [0u8; 64];
            while matches!(s.read(&mut buf), Ok(k) if k > 0) {}
        }
        drop(s);
    }
}

/// Attempts `n` connections to `addr`, where nothing listens; each must be refused.
pub fn connect_refused(addr: SocketAddr, n: usize) {
    for _ in 0..n {
        let err = TcpStream::connect(addr).expect_err("connect to a closed port must fail");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
}

/// `ip_local_port_range` of this namespace: where the kernel picks ports for `connect()` and
/// `bind(0)`.
pub fn ephemeral_range() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("ip_local_port_range");
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<u16>().expect("port"));
    (it.next().expect("low"), it.next().expect("high"))
}

/// A loopback port with nothing listening, below the ephemeral range, where services listen.
///
/// A port from `bind(0)` would come from the ephemeral range: once released, the kernel may hand
/// it to any `connect()` on the host (Prometheus scraping the agent, the test's own clients) or to
/// the next `bind(0)`, and the test's later `bind` fails with "address in use". Below the range
/// only explicit binds take a port; each call here takes the next one, from a start that depends
/// on the process, so tests in one process or in parallel processes do not meet.
pub fn closed_port(ip: &str) -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let (lo, _) = ephemeral_range();
    let span = u32::from(lo).saturating_sub(FIRST).max(1);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if let Ok(l) = TcpListener::bind((ip, port as u16)) {
            return l.local_addr().expect("addr");
        }
    }
    panic!("no free port in {FIRST}..{lo}");
}

pub const V4: &str = "127.0.0.1";
pub fn v6() -> String {
    Ipv6Addr::LOCALHOST.to_string()
}

/// Gives the kernel time to finish the last handshakes and teardowns on loopback.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

/// A free loopback port for the agent's `--listen`.
pub fn free_listen_addr() -> SocketAddr {
    closed_port(V4)
}

/// `GET path` on loopback, with the project's HTTP client; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut response = client
        .get(&format!("http://{addr}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path} from the agent at {addr}: {e}"));
    let code = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("reading {path}: {e}"));
    (code, body)
}

/// The value of the sample `name{labels}` (labels matched exactly, in any order; a label with
/// an empty value counts as absent, as in Prometheus) in a Prometheus text exposition; None
/// when absent.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let mut got: Vec<(String, String)> = rest
                .split(',')
                .filter(|p| !p.is_empty())
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                // An empty value is no label at all, to Prometheus.
                .filter(|(_, v)| !v.is_empty())
                .collect();
            got.sort();
            (got == want).then(|| value.parse().ok()).flatten()
        })
}

/// The sum of every series of `name` that has `labels` (and any others).
pub fn sum_of(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let rest = rest.strip_suffix('}')?;
            let has_all = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|p| p == format!("{k}=\"{v}\"")));
            (metric == name && has_all).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The metric name and labels of one sample line of an exposition (`name{k="v",...} value`);
/// None for comments and lines that do not parse.
fn series_of(line: &str) -> Option<(&str, Vec<(String, String)>)> {
    if line.starts_with('#') {
        return None;
    }
    let (series, _) = line.rsplit_once(' ')?;
    let (metric, rest) = match series.split_once('{') {
        Some((m, r)) => (m, r.strip_suffix('}')?),
        None => (series, ""),
    };
    let labels = rest
        .split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect();
    Some((metric, labels))
}

/// One figure a test reads from a scrape: the sample `name{labels}`, or the sum of every
/// series of `name` that has `labels`; 0 when absent. It knows which lines of the exposition
/// show it, so that a failure prints those rather than the whole scrape.
#[derive(Clone, Debug)]
pub struct Figure {
    name: String,
    labels: Vec<(String, String)>,
    sum: bool,
}

impl Figure {
    /// The sample `name{labels}` (labels matched exactly, as [`sample`] does).
    pub fn sample(name: &str, labels: &[(&str, &str)]) -> Figure {
        Figure::new(name, labels, false)
    }

    /// The sum of every series of `name` that has `labels` and any others (as [`sum_of`]).
    pub fn sum(name: &str, labels: &[(&str, &str)]) -> Figure {
        Figure::new(name, labels, true)
    }

    fn new(name: &str, labels: &[(&str, &str)], sum: bool) -> Figure {
        Figure {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            sum,
        }
    }

    /// Its value in `text`.
    pub fn read(&self, text: &str) -> f64 {
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if self.sum {
            sum_of(text, &self.name, &labels)
        } else {
            sample(text, &self.name, &labels).unwrap_or(0.0)
        }
    }

    /// The lines of `text` that show this figure and its neighbours: the series of its family
    /// (a histogram's `_count` and `_sum`, its buckets only for a bucket) on the same port, or
    /// with the same labels where it has no port.
    pub fn lines(&self, text: &str) -> String {
        let family = ["_count", "_sum", "_bucket"]
            .iter()
            .find_map(|s| self.name.strip_suffix(s))
            .unwrap_or(&self.name);
        let buckets = self.name.ends_with("_bucket");
        let port = self.labels.iter().find(|(k, _)| k == "port");
        let wanted: Vec<&(String, String)> = match port {
            Some(p) => vec![p],
            None => self.labels.iter().filter(|(k, _)| k != "le").collect(),
        };
        let shown: Vec<&str> = text
            .lines()
            .filter(|line| {
                let Some((metric, labels)) = series_of(line) else {
                    return false;
                };
                let of_family = metric == family
                    || metric.strip_prefix(family).is_some_and(|suffix| {
                        suffix == "_count" || suffix == "_sum" || (buckets && suffix == "_bucket")
                    });
                of_family && wanted.iter().all(|w| labels.contains(w))
            })
            .collect();
        if shown.is_empty() {
            let with: Vec<String> = wanted.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("    (no series of {family} with {{{}}})", with.join(","))
        } else {
            shown
                .iter()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
    }
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        let series = if labels.is_empty() {
            self.name.clone()
        } else {
            format!("{}{{{}}}", self.name, labels.join(","))
        };
        if self.sum {
            write!(f, "sum({series})")
        } else {
            f.write_str(&series)
        }
    }
}

/// Asserts that each figure has its expected value in `text`; otherwise panics with `what`
/// (the test's inputs), and each figure's expected and actual value with its lines.
pub fn assert_figures(text: &str, what: &str, figures: &[(Figure, f64)]) {
    let wrong: Vec<String> = figures
        .iter()
        .filter(|(f, expected)| f.read(text) != *expected)
        .map(|(f, expected)| {
            format!(
                "  {f}: expected {expected}, got {}\n{}",
                f.read(text),
                f.lines(text)
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{what}:\n{}", wrong.join("\n"));
}

/// A running `tracer run` agent on a free loopback port.
pub struct Agent {
    pub tracer: Tracer,
    pub addr: SocketAddr,
}

impl Agent {
    pub fn start(extra: &[&str]) -> Agent {
        Agent::start_with_env(extra, &[])
    }

    /// [`Agent::start`] with these environment variables set (e.g. `RUST_LOG`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_full(&free_listen_addr().to_string(), extra, env)
    }

    /// [`Agent::start`] listening on `listen`.
    pub fn start_at(listen: &str, extra: &[&str]) -> Agent {
        Agent::start_full(listen, extra, &[])
    }

    fn start_full(listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let addr: SocketAddr = listen.parse().expect("an ADDR:PORT");
        let mut args = vec!["run", "--listen", listen];
        // A census every 200 ms (the default is 5 s), so that tests see changes at once.
        if !extra.contains(&"--census-interval") {
            args.extend_from_slice(&["--census-interval", "200ms"]);
        }
        args.extend_from_slice(extra);
        let tracer = Tracer::start_with_env(&args, env, true);
        Agent { tracer, addr }
    }

    /// Scrapes /metrics once its census metrics come from a census that began after this
    /// call: the agent publishes a census every `--census-interval` (200 ms here) and answers
    /// from the last one, so a test that just changed sockets waits for the next.
    ///
    /// How long it waits: [`census_wait`].
    pub fn metrics(&self) -> String {
        let asked = unix_now();
        let started = Instant::now();
        loop {
            let body = self.metrics_now();
            if sample(&body, "tracer_census_timestamp_seconds", &[]).unwrap_or(0.0) > asked {
                return body;
            }
            let last = sample(&body, "tracer_census_duration_seconds", &[]).unwrap_or(0.0);
            let limit = census_wait(last);
            assert!(
                started.elapsed() < limit,
                "no census after {asked} within {limit:?} (the last took {last} s)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Scrapes /metrics as it is now.
    pub fn metrics_now(&self) -> String {
        let (code, body) = http_get(self.addr, "/metrics");
        assert_eq!(code, 200, "/metrics: {body}");
        body
    }

    /// Scrapes until each figure has reached at least its expected value, and returns that
    /// scrape: a figure past what was expected ends the wait at once, so that the test's own
    /// check reports the miscount rather than a timeout. After 5 s, panics naming `what`, and
    /// each figure short of its value with the last value seen and its lines.
    pub fn metrics_at_least(&self, what: &str, figures: &[(Figure, f64)]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.metrics();
            let short: Vec<String> = figures
                .iter()
                .filter(|(f, expected)| f.read(&text) < *expected)
                .map(|(f, expected)| {
                    format!(
                        "  {f}: {} where at least {expected} was expected\n{}",
                        f.read(&text),
                        f.lines(&text)
                    )
                })
                .collect();
            if short.is_empty() {
                return text;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after 5 s waiting for {what}; last scrape:\n{}",
                    short.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Agent::metrics_at_least`], then [`assert_figures`]: each figure exactly as expected.
    pub fn metrics_exactly(&self, what: &str, figures: &[(Figure, f64)]) -> String {
        let text = self.metrics_at_least(what, figures);
        assert_figures(&text, what, figures);
        text
    }

    /// Scrapes until `check` passes on the text (the agent drains every 10 ms), or panics with
    /// the last text after 5 s. Prefer [`Agent::metrics_at_least`], whose failures say which
    /// figure is short and by how much.
    pub fn metrics_until(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.metrics();
            if check(&text) {
                return text;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; last scrape:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A network namespace made for one test, removed (with everything in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace with `lo` up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("tracer-{tag}-{}", std::process::id());
        if std::path::Path::new("/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        run_ok("ip", &["netns", "add", &name]);
        run_ok("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Runs `nft -f -` with `rules` inside the namespace.
    pub fn nft(&self, rules: &str) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "nft", "-f", "-"]);
        run_with_input(cmd, rules);
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it makes live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("netns thread")
    }

    /// Like [`Netns::run`], without waiting for `f`.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            use std::os::fd::AsRawFd;
            // SAFETY: setns on a valid namespace fd; it changes only this thread's namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// The namespace's inode number, as the agent reports it.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("netns")
            .ino()
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `nft -f -` with `rules` in the calling thread's network namespace (a child process
/// starts in the namespace of the thread that makes it).
pub fn nft_here(rules: &str) {
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]);
    run_with_input(cmd, rules);
}

/// Runs `cmd` with `input` on its stdin; panics, showing the input, when it fails.
pub fn run_with_input(mut cmd: Command, input: &str) {
    let mut child = cmd.stdin(Stdio::piped()).spawn().expect("spawn");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("input");
    assert!(
        child.wait().expect("wait").success(),
        "{cmd:?} rejected:\n{input}"
    );
}

pub fn run_ok(cmd: &str, args: &[&str]) {
    let status = Command::new(cmd)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(status.success(), "{cmd} {args:?} failed");
}

/// How long a test waits for the next census after one that took `last` seconds: the census
/// may use at most 1/20 of a CPU (`census::scrape`), so the next starts `20 last` later at the
/// earliest, which in an emulated guest with a few thousand sockets was more than 10 s. So 10
/// s, or 25 times the last census's duration where that is longer.
pub fn census_wait(last: f64) -> Duration {
    Duration::from_secs(10).max(Duration::from_secs_f64(25.0 * last))
}

/// `/sockets?query` from a census that began after this call (see [`Agent::metrics`]).
pub fn sockets_json(agent: &Agent, query: &str) -> serde_json::Value {
    let asked = unix_now();
    let started = Instant::now();
    loop {
        let (code, body) = http_get(agent.addr, &format!("/sockets?{query}"));
        assert_eq!(code, 200, "/sockets?{query}: {body}");
        let listing: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        if listing["census_timestamp_seconds"].as_f64().unwrap_or(0.0) > asked {
            return listing;
        }
        if started.elapsed() > Duration::from_secs(10) {
            // The same limit as Agent::metrics's: a fixed 10 s here failed two tests in the
            // 6.12 guest while it ran beside the other guest and the host's tests (its agents
            // took 27 and 29 s to attach; alone, 5 s), where censuses took that much longer.
            let metrics = agent.metrics_now();
            let last = sample(&metrics, "tracer_census_duration_seconds", &[]).unwrap_or(0.0);
            let limit = census_wait(last);
            assert!(
                started.elapsed() < limit,
                "no census after {asked} within {limit:?} (the last took {last} s)"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Now, Unix time in seconds (the unit of `tracer_census_timestamp_seconds`).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Starts `python3 -c SCRIPT ARGS` with stdin and stdout piped, and returns it with the first
/// line it prints (a helper says it is ready that way; it runs until its stdin closes).
pub fn python_ready(script: &str, args: &[&str]) -> (Child, String) {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("the helper's first line");
    (child, line)
}

/// Lines `ss -tan FILTER` prints (the header excluded), in this thread's namespace.
pub fn ss_lines(filter: &str) -> Vec<String> {
    let out = Command::new("ss")
        .arg("-tan")
        .args(filter.split_whitespace())
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect()
}

/// A Prometheus server on loopback with its own config and storage, killed (by PID) on drop.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    pub fn start(target: SocketAddr) -> Prometheus {
        Prometheus::start_with(target, "")
    }

    /// [`Prometheus::start`] with `job` (YAML lines indented 4 spaces, e.g. `scheme: https`)
    /// added to the scrape job.
    pub fn start_with(target: SocketAddr, job: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("tracer-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tracer\n    static_configs:\n      - targets: ['{target}']\n{job}"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let addr = free_listen_addr();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus (cargo xtask setup installs Debian's package)");
        let p = Prometheus { child, addr, dir };
        // `up` is 1 once a scrape succeeded, 0 before.
        p.wait_for("the first successful scrape", "up{job=\"tracer\"}", 1.0);
        p
    }

    /// Evaluates an instant query; Err with Prometheus's message when it does not parse.
    pub fn query_status(&self, promql: &str) -> Result<(), String> {
        let (_, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        );
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if v["status"] == "success" {
            Ok(())
        } else {
            Err(format!("{promql}: {}", v["error"]))
        }
    }

    /// Evaluates an instant query; None when it returns no series.
    pub fn query(&self, promql: &str) -> Option<f64> {
        let (code, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        );
        assert_eq!(code, 200, "{promql}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["status"], "success", "{promql}: {body}");
        let result = v["data"]["result"].as_array()?.first()?.clone();
        // NaN (e.g. a quantile of no traffic) is data too: the series exists.
        result["value"][1].as_str()?.parse().ok()
    }

    /// Queries `promql` until it returns a value of at least `at_least`, and returns that
    /// value (the test checks it is exactly what it expects). After 20 s, panics naming
    /// `what`, the query, the last value and the value waited for.
    pub fn wait_for(&self, what: &str, promql: &str, at_least: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = None;
        loop {
            // Prometheus answers 503 until its storage is open (seconds under emulation).
            let ready = std::net::TcpStream::connect(self.addr).is_ok()
                && http_get(self.addr, "/-/ready").0 == 200;
            if ready {
                last = self.query(promql);
                if let Some(v) = last.filter(|v| *v >= at_least) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus: timed out after 20 s waiting for {what}: {promql} was {}, \
                 where at least {at_least} was expected",
                match (ready, last) {
                    (false, _) => "not asked (Prometheus not ready)".to_owned(),
                    (true, None) => "no series".to_owned(),
                    (true, Some(v)) => v.to_string(),
                }
            );
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
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Raises this process's limit on open files to at least `at_least` (the hard limit too,
/// where the machine lets root raise it).
pub fn raise_open_files(at_least: u64) {
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut now);
        if now.rlim_cur < at_least {
            let limit = libc::rlimit {
                rlim_cur: at_least,
                rlim_max: now.rlim_max.max(at_least),
            };
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
                0,
                "raising RLIMIT_NOFILE to {at_least}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// An OpenTelemetry collector on loopback: `rotel-agent` (PyPI's `rotel`, installed by
/// `cargo xtask setup`) receiving OTLP over HTTP and printing every log record it receives,
/// with each attribute and its type, to a file; killed (by PID) on drop.
pub struct Rotel {
    child: Child,
    pub addr: SocketAddr,
    log: std::path::PathBuf,
}

/// One log record as the collector printed it: its event name, resource attributes and
/// attributes, each value as `Type(value)` (`Str(tcp)`, `Int(443)`).
#[derive(Clone, Debug, Default)]
pub struct Received {
    pub event_name: String,
    pub resource: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
}

impl Received {
    /// An `Int` attribute's value.
    pub fn int(&self, key: &str) -> Option<u64> {
        let v = self.attributes.get(key)?;
        v.strip_prefix("Int(")?.strip_suffix(')')?.parse().ok()
    }

    /// A `Str` attribute's value.
    pub fn str(&self, key: &str) -> Option<&str> {
        let v = self.attributes.get(key)?;
        v.strip_prefix("Str(")?.strip_suffix(')')
    }
}

impl Rotel {
    /// Starts a collector on `addr` (a free loopback port when None), logging to a file of
    /// its own (`tag` names it).
    pub fn start(tag: &str, addr: Option<SocketAddr>) -> Rotel {
        let addr = addr.unwrap_or_else(free_listen_addr);
        let grpc = free_listen_addr();
        let log =
            std::env::temp_dir().join(format!("tracer-rotel-{tag}-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(rotel_agent())
            .args(["start", "--otlp-http-endpoint", &addr.to_string()])
            .args(["--otlp-grpc-endpoint", &grpc.to_string()])
            .args(["--exporter", "blackhole", "--debug-log", "logs"])
            .args(["--debug-log-verbosity", "detailed"])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting rotel-agent (cargo xtask setup installs it)");
        let r = Rotel { child, addr, log };
        // Ready once it says so (not by connecting: a test's own connection would be a
        // record too, and some tests count every record).
        let deadline = Instant::now() + Duration::from_secs(10);
        let started = || std::fs::read_to_string(&r.log).unwrap_or_default();
        while !started().contains("Starting Rotel") {
            assert!(
                Instant::now() < deadline,
                "rotel-agent did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        r
    }

    /// Every log record received so far.
    pub fn received(&self) -> Vec<Received> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        parse_rotel(&text)
    }

    /// Waits (up to `secs` seconds) until `count` of what was received reaches at least
    /// `expected`, and returns everything received then (the test checks the exact count).
    /// On a timeout, panics naming `what`, the last count and the count waited for.
    pub fn wait_for(
        &self,
        what: &str,
        secs: u64,
        expected: usize,
        count: impl Fn(&[Received]) -> usize,
    ) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.received();
            let n = count(&got);
            if n >= expected {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "rotel: timed out after {secs} s waiting for {what}: {n} where at least \
                 {expected} were expected ({} records received in all)",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Where pip put `rotel-agent` (inside the `rotel` package).
fn rotel_agent() -> std::path::PathBuf {
    let out = Command::new("python3")
        .args([
            "-c",
            "import rotel, os; print(os.path.dirname(rotel.__file__))",
        ])
        .output()
        .expect("python3");
    std::path::Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("rotel-agent")
}

/// Reads rotel's detailed debug log: `ResourceLog` blocks with `Resource attributes:`, then
/// `LogRecord #N` blocks with `EventName:` and `Attributes:` (`     -> key: Type(value)`).
pub fn parse_rotel(text: &str) -> Vec<Received> {
    let mut out: Vec<Received> = Vec::new();
    let mut resource = BTreeMap::new();
    let mut in_resource = false;
    for line in text.lines() {
        if line.starts_with("ResourceLog #") {
            resource = BTreeMap::new();
            in_resource = false;
        } else if line.starts_with("Resource attributes:") {
            in_resource = true;
        } else if line.starts_with("LogRecord #") {
            in_resource = false;
            out.push(Received {
                resource: resource.clone(),
                ..Received::default()
            });
        } else if let Some(name) = line.strip_prefix("EventName: ") {
            if let Some(r) = out.last_mut() {
                r.event_name = name.to_owned();
            }
        } else if let Some(kv) = line.trim_start().strip_prefix("-> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            if in_resource {
                resource.insert(k.to_owned(), v.to_owned());
            } else if let Some(r) = out.last_mut() {
                r.attributes.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    out
}

/// A CA, a server certificate and a client certificate, in a fresh directory.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("tracer-web-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        ssl(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=tracer test CA",
            ],
        ]
        .concat());
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1,IP:10.231.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            ssl(&[
                &["req", "-new"][..],
                &ec,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat());
            ssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.crt"),
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes a web configuration file with the server's certificate and `extra` lines.
    pub fn web_config(&self, extra: &str) -> PathBuf {
        let path = self.path("web.yml");
        let text =
            format!("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n{extra}");
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
