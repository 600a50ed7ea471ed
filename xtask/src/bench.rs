//! `cargo xtask bench`: loopback connection churn with and without a tracer, side by side.
//!
//! Each round runs the same load once per mode (no tracer, `tracer watch --json > /dev/null`,
//! `tracer run`, and for reference bpftrace counting transitions in the kernel and bpftrace
//! printing each one), interleaved so that a noisy neighbour hits every mode alike; the report
//! gives medians over rounds, the ratio to the no-tracer median, events handled and lost, and
//! the tracer's CPU per event. Two last phases measure what the probe costs the kernel per run
//! (with `kernel.bpf_stats_enabled=1` for that run only) and hold many connections open under
//! `tracer run` to read its resident memory. It reports figures; it does not pass or fail.
//!
//! The load: a listener on 127.0.0.1, acceptor threads that accept and close at once, and
//! client threads that connect, read to EOF and close, for a fixed time (server closes first). Only
//! loopback is used; every loop ends by itself.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Seconds of load per run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds; each runs every mode once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Connections held open for the memory figure (two tracked sockets each); 0 skips it.
    #[arg(long, default_value_t = 50_000)]
    held: usize,
    /// Leave out the bpftrace reference modes (otherwise Debian's bpftrace is installed).
    #[arg(long)]
    no_bpftrace: bool,
}

const TRACER: &str = "target/release/tracer";
const CLIENTS: usize = 2;
const ACCEPTORS: usize = 2;

/// bpftrace counting TCP transitions in a kernel map (printed at exit).
const BPFTRACE_COUNT: &str = "tracepoint:sock:inet_sock_set_state /args->protocol == 6/ \
     { @[args->oldstate, args->newstate] = count(); }";
/// bpftrace printing every TCP transition.
const BPFTRACE_PRINT: &str = "tracepoint:sock:inet_sock_set_state /args->protocol == 6/ \
     { printf(\"%d %d %d %d %d\\n\", pid, args->sport, args->dport, args->oldstate, args->newstate); }";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Baseline,
    Watch,
    Run,
    BpftraceCount,
    BpftracePrint,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Watch => "watch",
            Mode::Run => "run",
            Mode::BpftraceCount => "bt-count",
            Mode::BpftracePrint => "bt-print",
        }
    }
}

/// One run's figures.
#[derive(Default, Clone, Copy)]
struct Sample {
    conns_per_sec: f64,
    events: u64,
    lost: u64,
    cpu_us_per_event: f64,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tw_reuse = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_tw_reuse").unwrap_or_default();
    println!(
        "bench: {cpus} CPUs, {} s per run, {} rounds, {CLIENTS} client + {ACCEPTORS} acceptor threads, \
         tcp_tw_reuse={}",
        args.seconds,
        args.rounds,
        tw_reuse.trim()
    );
    if tw_reuse.trim() == "0" {
        println!(
            "bench: tcp_tw_reuse is 0: clients may run out of ephemeral ports (counted below)"
        );
    }
    let mut modes = vec![Mode::Baseline, Mode::Watch, Mode::Run];
    if !args.no_bpftrace {
        crate::setup::install_packages(&["bpftrace"])?;
        crate::setup::mount_tracefs()?;
        modes.extend([Mode::BpftraceCount, Mode::BpftracePrint]);
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for round in 1..=args.rounds {
        for (i, &mode) in modes.iter().enumerate() {
            let s = run_once(mode, Duration::from_secs(args.seconds))
                .with_context(|| format!("round {round}, mode {}", mode.name()))?;
            println!(
                "round {round} {:<8} {:>9.0} conn/s  events {:>9}  lost {:>4}  cpu {:.2} us/event",
                mode.name(),
                s.conns_per_sec,
                s.events,
                s.lost,
                s.cpu_us_per_event
            );
            samples[i].push(s);
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let base = median(samples[0].iter().map(|s| s.conns_per_sec).collect());
    println!();
    println!("mode       runs  median conn/s   ratio   events/run (median)   lost (total)   tracer CPU us/event (median)");
    // bpftrace reports no losses of its own here (a map update cannot overflow; its printing
    // reports lost events on stderr, shown above if any).
    for (i, &mode) in modes.iter().enumerate() {
        let rate = median(samples[i].iter().map(|s| s.conns_per_sec).collect());
        if mode == Mode::Baseline {
            println!(
                "{:<10} {:>4}  {:>13.0}   {:>5.3}   {:>19}   {:>12}   {:>6}",
                mode.name(),
                samples[i].len(),
                rate,
                1.0,
                "-",
                "-",
                "-"
            );
            continue;
        }
        let events = median(samples[i].iter().map(|s| s.events as f64).collect());
        let lost: u64 = samples[i].iter().map(|s| s.lost).sum();
        let cpu = median(samples[i].iter().map(|s| s.cpu_us_per_event).collect());
        println!(
            "{:<10} {:>4}  {:>13.0}   {:>5.3}   {:>19.0}   {:>12}   {:>6.2}",
            mode.name(),
            samples[i].len(),
            rate,
            rate / base,
            events,
            lost,
            cpu
        );
    }
    println!(
        "reproduce: cargo xtask bench --seconds {} --rounds {} --held {}",
        args.seconds, args.rounds, args.held
    );
    probe_cost_phase(Duration::from_secs(args.seconds))?;
    if args.held > 0 {
        memory_phase(args.held)?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the load once under `mode`.
fn run_once(mode: Mode, duration: Duration) -> Result<Sample> {
    let mut tracer = match mode {
        Mode::Baseline => None,
        Mode::Watch => Some(TracerProcess::start(&["watch", "--json"], None)?),
        Mode::Run => {
            let addr = free_port()?;
            Some(TracerProcess::start(
                &["run", "--listen", &addr.to_string()],
                Some(addr),
            )?)
        }
        Mode::BpftraceCount => Some(TracerProcess::bpftrace(BPFTRACE_COUNT)?),
        Mode::BpftracePrint => Some(TracerProcess::bpftrace(BPFTRACE_PRINT)?),
    };
    let (conns, addr_errors) = churn(duration)?;
    if addr_errors > 0 {
        println!("  ({addr_errors} connects failed with EADDRNOTAVAIL and were retried)");
    }
    let mut sample = Sample {
        conns_per_sec: conns as f64 / duration.as_secs_f64(),
        ..Default::default()
    };
    if let Some(t) = tracer.as_mut() {
        std::thread::sleep(Duration::from_millis(200));
        let (events, lost, cpu_us) = t.stop()?;
        sample.events = events;
        sample.lost = lost;
        sample.cpu_us_per_event = if events > 0 {
            cpu_us / events as f64
        } else {
            0.0
        };
    }
    Ok(sample)
}

/// `cargo xtask churn SECONDS`: the load alone, with its rate.
pub fn churn_only(seconds: u64) -> Result<()> {
    let (conns, _) = churn(Duration::from_secs(seconds))?;
    println!("{:.0} conn/s", conns as f64 / seconds as f64);
    Ok(())
}

/// Connect/close churn for `duration`; returns (connections completed, EADDRNOTAVAIL count).
fn churn(duration: Duration) -> Result<(u64, u64)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the churn listener")?;
    let addr = listener.local_addr()?;
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let addr_errors = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..ACCEPTORS {
        let (listener, stop, done) = (listener.clone(), stop.clone(), done.clone());
        threads.push(std::thread::spawn(move || {
            // The server closes first, so TIME-WAIT sockets pile up on the server side, not on
            // the client's ephemeral ports (whose search grows slow as they fill).
            while let Ok((s, _)) = listener.accept() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                drop(s);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let deadline = Instant::now() + duration;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let addr_errors = addr_errors.clone();
        clients.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while Instant::now() < deadline {
                match TcpStream::connect(addr) {
                    Ok(mut s) => {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                        addr_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        }));
    }
    for t in clients {
        let _ = t.join();
    }
    std::thread::sleep(Duration::from_millis(100));
    let completed = done.load(Ordering::Relaxed);
    // Wake each acceptor with one last connection so that it sees the stop flag.
    stop.store(true, Ordering::Relaxed);
    let wakers: Vec<_> = (0..ACCEPTORS)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    for t in threads {
        let _ = t.join();
    }
    drop(wakers);
    Ok((completed, addr_errors.load(Ordering::Relaxed)))
}

fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A tracer (ours or bpftrace) started for one run; killed by PID if the bench fails midway.
struct TracerProcess {
    child: Child,
    /// CPU used by start-up (BTF parsing, loading), subtracted from the per-event figure.
    start_cpu_us: f64,
    kind: Kind,
    stderr: Receiver<String>,
}

/// Where a tracer's figures come from.
enum Kind {
    /// `tracer watch`: its exit summary on stderr.
    Watch,
    /// `tracer run`: its metrics, scraped before it stops.
    Run(SocketAddr),
    /// bpftrace: its standard output, read by this thread; it yields (lines printed, sum of the
    /// map printed at exit, events it said it lost).
    Bpftrace(std::thread::JoinHandle<(u64, u64, u64)>),
}

impl TracerProcess {
    fn start(args: &[&str], metrics: Option<SocketAddr>) -> Result<TracerProcess> {
        let mut child = Command::new(TRACER)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {TRACER}"))?;
        let stderr = lines_of(child.stderr.take().context("tracer stderr")?);
        let kind = metrics.map_or(Kind::Watch, Kind::Run);
        let mut t = TracerProcess {
            child,
            start_cpu_us: 0.0,
            kind,
            stderr,
        };
        loop {
            match t.stderr.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.starts_with("tracer: attached") => {
                    t.start_cpu_us = cpu_micros(t.child.id())?;
                    return Ok(t);
                }
                Ok(_) => {}
                Err(_) => bail!("tracer did not attach"),
            }
        }
    }

    /// Starts bpftrace with `program`; returns once it has attached.
    fn bpftrace(program: &str) -> Result<TracerProcess> {
        let mut child = Command::new("bpftrace")
            .args(["-e", program])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting bpftrace")?;
        let stderr = lines_of(child.stderr.take().context("bpftrace stderr")?);
        let stdout = child.stdout.take().context("bpftrace stdout")?;
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let (mut printed, mut counted, mut lost) = (0u64, 0u64, 0u64);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("Attaching") {
                    let _ = ready_tx.send(());
                } else if let Some(n) = line.strip_prefix('@').and_then(|l| l.rsplit(": ").next()) {
                    counted += n.trim().parse::<u64>().unwrap_or(0);
                } else if let Some(n) = line.strip_prefix("Lost ") {
                    lost += n
                        .split(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                } else if !line.is_empty() {
                    printed += 1;
                }
            }
            (printed, counted, lost)
        });
        let mut t = TracerProcess {
            child,
            start_cpu_us: 0.0,
            kind: Kind::Bpftrace(reader),
            stderr,
        };
        ready
            .recv_timeout(Duration::from_secs(60))
            .context("bpftrace did not attach")?;
        t.start_cpu_us = cpu_micros(t.child.id())?;
        Ok(t)
    }

    /// Stops the tracer; returns (events handled, events lost, CPU microseconds used).
    fn stop(&mut self) -> Result<(u64, u64, f64)> {
        let pid = self.child.id();
        let cpu_us = cpu_micros(pid)? - self.start_cpu_us;
        let from_metrics = match self.kind {
            Kind::Run(addr) => {
                let text = scrape(addr)?;
                Some((
                    metric(&text, "tracer_events_total"),
                    metric(&text, "tracer_events_lost_total"),
                ))
            }
            _ => None,
        };
        // bpftrace sometimes misses a SIGINT that arrives while it is busy printing: ask again
        // every 2 s, for at most 20 s.
        let mut status = None;
        for _ in 0..10 {
            // SAFETY: kill on our own child's PID, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
            let asked = Instant::now();
            while status.is_none() && asked.elapsed() < Duration::from_secs(2) {
                status = self.child.try_wait()?;
                std::thread::sleep(Duration::from_millis(20));
            }
            if status.is_some() {
                break;
            }
        }
        let status = status.context("the tracer did not stop within 20 s of SIGINT")?;
        if !status.success() {
            bail!("tracer exited with {status}");
        }
        // Show where any losses came from (ring buffer full, or missed by the kernel).
        let mut summary = None;
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(2)) {
            if line.contains("events received") {
                summary = Some(line);
            } else if line.contains("lost")
                || (line.contains("missed") && !line.contains(" 0 missed"))
            {
                println!("  {line}");
            }
        }
        if let Some((events, lost)) = from_metrics {
            return Ok((events, lost, cpu_us));
        }
        if let Kind::Bpftrace(reader) = std::mem::replace(&mut self.kind, Kind::Watch) {
            let (printed, counted, lost) = reader
                .join()
                .map_err(|_| anyhow::anyhow!("bpftrace reader"))?;
            return Ok((printed.max(counted), lost, cpu_us));
        }
        // watch: "tracer: N events received, M printed, L lost"
        let line = summary.context("no summary line from tracer watch")?;
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect();
        match nums[..] {
            [received, _, lost] => Ok((received, lost, cpu_us)),
            _ => bail!("unexpected summary {line:?}"),
        }
    }
}

/// The lines of a child's output, read by a thread.
fn lines_of(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// One run of `tracer run` with the kernel timing every BPF program run
/// (`kernel.bpf_stats_enabled=1`, restored afterwards): what the probe costs per transition.
/// Separate from the rounds because the timing adds its own cost (two clock reads a run).
fn probe_cost_phase(duration: Duration) -> Result<()> {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(SYSCTL).context("reading kernel.bpf_stats_enabled")?;
    std::fs::write(SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
    let result = (|| {
        let addr = free_port()?;
        let mut tracer = TracerProcess::start(&["run", "--listen", &addr.to_string()], Some(addr))?;
        let (conns, _) = churn(duration)?;
        std::thread::sleep(Duration::from_millis(1_200)); // one sync of the probe's figures
        let text = scrape(addr)?;
        tracer.stop()?;
        Ok::<_, anyhow::Error>((conns, text))
    })();
    std::fs::write(SYSCTL, before.trim()).context("restoring kernel.bpf_stats_enabled")?;
    let (conns, text) = result?;
    println!(
        "probe cost (kernel.bpf_stats_enabled=1, one run, {:.0} conn/s):",
        conns as f64 / duration.as_secs_f64()
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("tracer_probe_runs_total{"))
    {
        let (labels, runs) = line.rsplit_once(' ').context("metric line")?;
        let program = labels.trim_start_matches("tracer_probe_runs_total");
        let runs: f64 = runs.parse()?;
        let seconds = sample(&text, &format!("tracer_probe_run_seconds_total{program}"));
        let per_run = if runs > 0.0 {
            seconds * 1e9 / runs
        } else {
            0.0
        };
        println!("  {program:<40} {runs:>10.0} runs  {per_run:>6.0} ns per run");
    }
    Ok(())
}

impl Drop for TracerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// User + system CPU time of a process, in microseconds (`/proc/PID/stat` fields 14 and 15).
fn cpu_micros(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("parsing /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz * 1e6)
}

fn scrape(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// The value of an unlabelled sample, 0 when absent.
fn metric(text: &str, name: &str) -> u64 {
    sample(text, name) as u64
}

/// The value of the sample `name` (with its labels, if any) in a metrics text; 0 if absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// Connections one `hold` process keeps open (two fds each, under a 20,000-fd limit).
const HOLD_PER_PROCESS: usize = 9_000;

/// Holds `held` connections open under `tracer run` and reports its resident memory.
/// The connections live in `cargo xtask hold` child processes, so that no one process needs
/// more open files than its limit allows.
fn memory_phase(held: usize) -> Result<()> {
    let addr = free_port()?;
    let mut tracer = TracerProcess::start(
        &[
            "run",
            "--listen",
            &addr.to_string(),
            "--max-sockets",
            &(4 * held).to_string(),
        ],
        Some(addr),
    )?;
    let before = metric(&scrape(addr)?, "process_resident_memory_bytes");
    let exe = std::env::current_exe()?;
    let mut holders = Vec::new();
    let mut left = held;
    while left > 0 {
        let n = left.min(HOLD_PER_PROCESS);
        left -= n;
        let mut child = Command::new(&exe)
            .args(["hold", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a hold process")?;
        let mut ready = String::new();
        BufReader::new(child.stdout.take().context("hold stdout")?).read_line(&mut ready)?;
        if ready.trim() != "ready" {
            let _ = child.kill();
            bail!("a hold process failed to open its connections");
        }
        holders.push(child);
    }
    std::thread::sleep(Duration::from_secs(2));
    let text = scrape(addr)?;
    let tracked = metric(&text, "tracer_tracked_sockets");
    let rss = metric(&text, "process_resident_memory_bytes");
    println!(
        "memory: tracer run follows {tracked} sockets with {:.1} MiB resident ({:.1} MiB before \
         the {held} connections opened: {:.0} bytes per tracked socket)",
        rss as f64 / 1048576.0,
        before as f64 / 1048576.0,
        (rss.saturating_sub(before)) as f64 / tracked.max(1) as f64
    );
    for mut h in holders {
        drop(h.stdin.take()); // EOF: the holder closes its connections and exits
        let _ = h.wait();
    }
    let _ = tracer.stop()?;
    Ok(())
}

/// `cargo xtask hold N` (used by the bench): opens N loopback connections, says "ready", and
/// keeps them until its stdin closes.
pub fn hold(n: usize) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut conns = Vec::with_capacity(2 * n);
    for _ in 0..n {
        conns.push(TcpStream::connect(addr).context("opening a held connection")?);
        conns.push(listener.accept()?.0);
    }
    println!("ready");
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}
