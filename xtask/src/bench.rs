//! `cargo xtask bench`: loopback connection churn with and without a tracer, side by side.
//!
//! Each round runs the same load once per mode (no tracer, `tracer watch --json > /dev/null`,
//! `tracer run`, and for reference bpftrace counting transitions in the kernel and bpftrace
//! printing each one), interleaved so that a noisy neighbour hits every mode alike; the report
//! gives medians over rounds, the ratio to the no-tracer median, events handled and lost, and
//! the tracer's CPU per event. Two last phases measure what the probe costs the kernel per run
//! (with `kernel.bpf_stats_enabled=1` for that run only) and play a busy host: over 100,000
//! sockets held open under `tracer run` while the load runs and the agent is scraped, for the
//! events lost, the scrape latency and the memory per followed socket. `--only PHASE` runs one
//! phase. It reports figures; it does not pass or fail.
//!
//! The load: a listener on 127.0.0.1, acceptor threads that accept and close at once, and
//! client threads that connect, read to EOF and close, for a fixed time (server closes first).
//! Only loopback (127.0.0.0/8) is used; every loop ends by itself, every request has a timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
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
    /// Busy phase: connections opened while `tracer run` runs and held through the phase (two
    /// followed sockets each); 0 skips the phase.
    #[arg(long, default_value_t = 100_000)]
    held: usize,
    /// Busy phase: connections opened before the agent starts (in its census; it follows them
    /// from their next transition).
    #[arg(long, default_value_t = 10_000)]
    held_before: usize,
    /// Busy phase: seconds of churn while `/metrics` and `/sockets` are scraped.
    #[arg(long, default_value_t = 30)]
    busy_seconds: u64,
    /// Table phase: connections opened under the agent (two followed sockets each); 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    table_held: usize,
    /// Run only this phase (repeatable); every phase by default.
    #[arg(long, value_enum)]
    only: Vec<Phase>,
    /// Leave out the bpftrace reference modes (otherwise Debian's bpftrace is installed).
    #[arg(long)]
    no_bpftrace: bool,
    /// Another build of tracer (e.g. the previous commit's `target/release/tracer`, copied
    /// aside) to measure side by side with this one: as `run-before` in every round, next to
    /// `run`, and attached at the same time as this one in the probe-cost phase, so that both
    /// probes are timed on the same transitions.
    #[arg(long, value_name = "PATH")]
    before: Option<std::path::PathBuf>,
}

/// The bench's phases, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// Every mode side by side, interleaved over rounds.
    Rounds,
    /// One `tracer run` with the kernel timing the probe's programs.
    ProbeCost,
    /// Many sockets held open while churn runs and the agent is scraped.
    Busy,
    /// Memory per socket: the kernel's for the probe's storage, and the agent's.
    Table,
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
    /// `tracer watch --connections --json`: one close record per connection.
    Records,
    Run,
    /// `tracer run` of the `--before` build.
    RunBefore,
    /// `tracer run --otlp-endpoint`: every record sent to a collector on loopback
    /// (`rotel-agent`, records discarded).
    Export,
    BpftraceCount,
    BpftracePrint,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Watch => "watch",
            Mode::Records => "records",
            Mode::Run => "run",
            Mode::RunBefore => "run-before",
            Mode::Export => "run+otlp",
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
    /// Of it, the agent's census thread (sock_diag dumps of every socket of the host, every 5
    /// s, whose cost follows the sockets on the host, not the transitions).
    census_us_per_event: f64,
    /// With the export: records the collector accepted, and records dropped.
    exported: u64,
    dropped: u64,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let tw_reuse = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_tw_reuse").unwrap_or_default();
    println!(
        "bench: {cpus} CPUs, {CLIENTS} client + {ACCEPTORS} acceptor threads, tcp_tw_reuse={}",
        tw_reuse.trim()
    );
    if tw_reuse.trim() == "0" {
        println!(
            "bench: tcp_tw_reuse is 0: clients may run out of ephemeral ports (counted below)"
        );
    }
    let runs = |phase| args.only.is_empty() || args.only.contains(&phase);
    if runs(Phase::Rounds) {
        rounds(args)?;
    }
    if runs(Phase::ProbeCost) {
        // With a --before build, twice: each build attached first once (the program that
        // runs first on a transition pays for bringing the socket's lines into the cache).
        for before_first in [true, false]
            .iter()
            .take(1 + usize::from(args.before.is_some()))
        {
            probe_cost_phase(
                Duration::from_secs(args.seconds),
                !args.no_bpftrace,
                args.before.as_deref().map(|b| (b, *before_first)),
            )?;
        }
        if !args.no_bpftrace {
            hook_cost_phase(Duration::from_secs(args.seconds.max(4)))?;
        }
    }
    if runs(Phase::Busy) && args.held > 0 {
        busy_phase(
            args.held,
            args.held_before,
            Duration::from_secs(args.busy_seconds),
        )?;
    }
    if runs(Phase::Table) && args.table_held > 0 {
        table_phase(args.table_held)?;
    }
    Ok(())
}

/// Memory per socket: `held` connections opened under the agent, with what the kernel charges
/// for the probe's storage on each (the sockets' option memory, as the census reads it) and
/// what the agent's resident memory grows by (its census listing of them: the agent keeps
/// nothing else per socket).
fn table_phase(held: usize) -> Result<()> {
    let (per_process, _) = hold_capacity()?;
    let addr = TcpListener::bind((AGENT_ADDR, 0))
        .with_context(|| format!("finding a free port on {AGENT_ADDR}"))?
        .local_addr()?;
    let (mut tracer, pid) = start_agent(addr, &["--census-interval", "2s"])?;
    std::thread::sleep(Duration::from_millis(3_200)); // a census and a sync of its figures
    let s0 = Snapshot::take(addr, pid)?;
    let mut next_addr = 2;
    let opening = Instant::now();
    let holders = Holders::open(held, per_process, &mut next_addr)?;
    let opening = opening.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    let s1 = loop {
        std::thread::sleep(Duration::from_millis(1_200));
        let s = Snapshot::take(addr, pid)?;
        if s.tracked >= s0.tracked + 2 * held as u64 || Instant::now() > deadline {
            break s;
        }
    };
    // What reading every connection's tcp_info costs the kernel and a reader, side by side:
    // the same dump with and without INET_DIAG_INFO, as `ss` asks for it (medians of 3).
    let ss_time = |args: &[&str]| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let out = Command::new("ss")
                .args(args)
                .stdout(Stdio::null())
                .status()?;
            if !out.success() {
                bail!("ss {args:?} failed");
            }
            times.push(start.elapsed().as_secs_f64());
        }
        Ok(median(times))
    };
    let (plain, info) = (ss_time(&["-Htn"])?, ss_time(&["-Htni"])?);
    println!(
        "census: the agent's last census of {} host sockets took {:.3} s (it reads tcp_info); \
         `ss -tn` {:.3} s, `ss -tni` (with tcp_info) {:.3} s: {:+.0} ns per socket for tcp_info",
        s1.host_sockets,
        s1.census_seconds,
        plain,
        info,
        (info - plain) * 1e9 / s1.host_sockets.max(1) as f64,
    );
    tracer.stop()?;
    drop(holders);
    let stored = s1.tracked.saturating_sub(s0.tracked);
    let kernel = s1.table_bytes.saturating_sub(s0.table_bytes);
    println!(
        "socket state: {held} connections opened in {:.1} s under the agent; {} sockets with \
         the probe's storage before and {} after ({} events lost); the kernel \
         charges {:.1} MiB for them: {:.0} bytes per socket; the agent's resident memory \
         {:.1} MiB before, {:.1} MiB after: {:.0} bytes per socket (its census listing)",
        opening.as_secs_f64(),
        s0.tracked,
        s1.tracked,
        s1.lost.saturating_sub(s0.lost),
        kernel as f64 / 1048576.0,
        kernel as f64 / stored.max(1) as f64,
        s0.rss as f64 / 1048576.0,
        s1.rss as f64 / 1048576.0,
        s1.rss.saturating_sub(s0.rss) as f64 / stored.max(1) as f64,
    );
    println!("reproduce: cargo xtask bench --only table --table-held {held}");
    Ok(())
}

/// Every mode once per round, interleaved; prints each run, then medians per mode.
fn rounds(args: &BenchArgs) -> Result<()> {
    println!("rounds: {} s per run, {} rounds", args.seconds, args.rounds);
    let mut modes = vec![Mode::Baseline, Mode::Watch, Mode::Records, Mode::Run];
    if args.before.is_some() {
        modes.push(Mode::RunBefore);
    }
    modes.push(Mode::Export);
    if !args.no_bpftrace {
        crate::setup::install_packages(&["bpftrace"])?;
        crate::setup::mount_tracefs()?;
        modes.extend([Mode::BpftraceCount, Mode::BpftracePrint]);
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for round in 1..=args.rounds {
        for (i, &mode) in modes.iter().enumerate() {
            let s = run_once(
                mode,
                Duration::from_secs(args.seconds),
                args.before.as_deref(),
            )
            .with_context(|| format!("round {round}, mode {}", mode.name()))?;
            println!(
                "round {round} {:<8} {:>9.0} conn/s  events {:>9}  lost {:>4}  cpu {:.2} us/event \
                 ({:.2} census)",
                mode.name(),
                s.conns_per_sec,
                s.events,
                s.lost,
                s.cpu_us_per_event,
                s.census_us_per_event,
            );
            if mode == Mode::Export {
                println!(
                    "        export: {} records accepted by the collector ({:.0}/s), {} dropped",
                    s.exported,
                    s.exported as f64 / args.seconds as f64,
                    s.dropped
                );
            }
            samples[i].push(s);
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let base = median(samples[0].iter().map(|s| s.conns_per_sec).collect());
    println!();
    println!(
        "mode       runs  median conn/s   ratio   events/run (median)   lost (total)   \
         tracer CPU us/event (median)   without the census"
    );
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
        let events_only = median(
            samples[i]
                .iter()
                .map(|s| s.cpu_us_per_event - s.census_us_per_event)
                .collect(),
        );
        println!(
            "{:<10} {:>4}  {:>13.0}   {:>5.3}   {:>19.0}   {:>12}   {:>27.2}   {:>18.2}",
            mode.name(),
            samples[i].len(),
            rate,
            rate / base,
            events,
            lost,
            cpu,
            events_only,
        );
    }
    if let Some(i) = modes.iter().position(|&m| m == Mode::Export) {
        let exported = median(samples[i].iter().map(|s| s.exported as f64).collect());
        let dropped: u64 = samples[i].iter().map(|s| s.dropped).sum();
        let per_conn = |m: Mode| {
            let j = modes.iter().position(|&x| x == m).unwrap_or(0);
            median(
                samples[j]
                    .iter()
                    .map(|s| {
                        s.cpu_us_per_event * s.events as f64
                            / (s.conns_per_sec * args.seconds as f64)
                    })
                    .collect(),
            )
        };
        println!(
            "export: median {:.0} records/s accepted by a collector on loopback, {dropped} dropped in all; \
             agent CPU {:.2} us per connection with the export, {:.2} without (run)",
            exported / args.seconds as f64,
            per_conn(Mode::Export),
            per_conn(Mode::Run),
        );
    }
    if let (Some(now), Some(then)) = (
        modes.iter().position(|&m| m == Mode::Run),
        modes.iter().position(|&m| m == Mode::RunBefore),
    ) {
        // Per round, so that both come from the same moment of a noisy machine.
        let ratio = median(
            samples[now]
                .iter()
                .zip(&samples[then])
                .map(|(a, b)| a.conns_per_sec / b.conns_per_sec)
                .collect(),
        );
        let ahead = samples[now]
            .iter()
            .zip(&samples[then])
            .filter(|(a, b)| a.conns_per_sec > b.conns_per_sec)
            .count();
        println!(
            "run against run-before: {ratio:.3}x the connection rate (per-round median), ahead \
             in {ahead} of {} rounds",
            samples[now].len()
        );
    }
    println!(
        "reproduce: cargo xtask bench --only rounds --seconds {} --rounds {}{}{}",
        args.seconds,
        args.rounds,
        if args.no_bpftrace {
            " --no-bpftrace"
        } else {
            ""
        },
        args.before
            .as_ref()
            .map(|p| format!(" --before {}", p.display()))
            .unwrap_or_default(),
    );
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
fn run_once(mode: Mode, duration: Duration, before: Option<&Path>) -> Result<Sample> {
    let mut collector_process = None;
    let mut tracer = match mode {
        Mode::Baseline => None,
        Mode::Watch => Some(TracerProcess::start(&["watch", "--json"], None)?),
        Mode::Records => Some(TracerProcess::start(
            &["watch", "--connections", "--json"],
            None,
        )?),
        Mode::Run => Some(TracerProcess::start_run(Path::new(TRACER))?),
        Mode::RunBefore => Some(TracerProcess::start_run(
            before.context("run-before without --before")?,
        )?),
        Mode::Export => {
            let (addr, collector) = (free_port()?, free_port()?);
            collector_process = Some(Collector::start(collector)?);
            let endpoint = format!("http://{collector}");
            Some(TracerProcess::start(
                &[
                    "run",
                    "--listen",
                    &addr.to_string(),
                    "--otlp-endpoint",
                    &endpoint,
                ],
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
        if let (Kind::Run(addr), Some(_)) = (&t.kind, &collector_process) {
            // What the export delivered of the churn, once its queue has had a moment.
            std::thread::sleep(Duration::from_secs(1));
            let text = scrape(*addr)?;
            sample.exported = metric(&text, "tracer_records_exported_total");
            sample.dropped = ["queue_full", "rejected"]
                .iter()
                .map(|r| {
                    metric(
                        &text,
                        &format!("tracer_records_dropped_total{{reason=\"{r}\"}}"),
                    )
                })
                .sum();
        }
        let (events, lost, cpu_us, census_us) = t.stop()?;
        sample.events = events;
        sample.lost = lost;
        let per_event = |us: f64| if events > 0 { us / events as f64 } else { 0.0 };
        sample.cpu_us_per_event = per_event(cpu_us);
        sample.census_us_per_event = per_event(census_us);
    }
    Ok(sample)
}

/// An OpenTelemetry collector on loopback for the export mode: `rotel-agent` (installed by
/// `cargo xtask setup`) taking OTLP/HTTP and discarding what it takes; killed on drop.
struct Collector(std::process::Child);

impl Collector {
    fn start(addr: SocketAddr) -> Result<Collector> {
        let agent = crate::setup::ROTEL_AGENT;
        let grpc = free_port()?;
        let child = Command::new(agent)
            .args(["start", "--otlp-http-endpoint", &addr.to_string()])
            .args([
                "--otlp-grpc-endpoint",
                &grpc.to_string(),
                "--exporter",
                "blackhole",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {agent}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("rotel-agent did not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Collector(child))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's PID, not yet reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
        let _ = self.0.wait();
    }
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
    churn_on(listener, duration)
}

/// [`churn`] toward a listener bound by the caller on 127.0.0.1.
fn churn_on(listener: TcpListener, duration: Duration) -> Result<(u64, u64)> {
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

/// Connects refused in the probe-cost phase, so that the drop program's cost per run is
/// measured on drops (each refused SYN is one, reason `no_socket`).
const REFUSED_CONNECTS: usize = 20_000;

/// Connects `n` times to a loopback port nobody listens on (the discard port, 9), each
/// refused by a reset; returns how many were refused.
fn refused_connects(n: usize) -> Result<usize> {
    let mut refused = 0;
    for _ in 0..n {
        match std::net::TcpStream::connect(("127.0.0.1", 9)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(e) => return Err(e).context("connecting to 127.0.0.1:9"),
            Ok(_) => bail!("something listens on 127.0.0.1:9: the bench needs it closed"),
        }
    }
    Ok(refused)
}

fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A tracer (ours or bpftrace) started for one run; killed by PID if the bench fails midway.
struct TracerProcess {
    child: Child,
    /// CPU used by start-up (BTF parsing, loading), subtracted from the per-event figure, and
    /// by the census thread until then.
    start_cpu_us: f64,
    start_census_us: f64,
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
        TracerProcess::start_bin(Path::new(TRACER), args, metrics)
    }

    /// `tracer run` of build `bin`, serving its metrics on a free port.
    fn start_run(bin: &Path) -> Result<TracerProcess> {
        let addr = free_port()?;
        let listen = addr.to_string();
        TracerProcess::start_bin(bin, &["run", "--listen", &listen], Some(addr))
    }

    fn start_bin(bin: &Path, args: &[&str], metrics: Option<SocketAddr>) -> Result<TracerProcess> {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = lines_of(child.stderr.take().context("tracer stderr")?);
        let kind = metrics.map_or(Kind::Watch, Kind::Run);
        let mut t = TracerProcess {
            child,
            start_cpu_us: 0.0,
            start_census_us: 0.0,
            kind,
            stderr,
        };
        loop {
            match t.stderr.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.starts_with("tracer: attached") => {
                    t.start_cpu_us = cpu_micros(t.child.id())?;
                    t.start_census_us = census_micros(t.child.id());
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
            start_census_us: 0.0,
            kind: Kind::Bpftrace(reader),
            stderr,
        };
        ready
            .recv_timeout(Duration::from_secs(60))
            .context("bpftrace did not attach")?;
        t.start_cpu_us = cpu_micros(t.child.id())?;
        Ok(t)
    }

    /// Where a `tracer run` serves its metrics.
    fn metrics_addr(&self) -> Result<SocketAddr> {
        match self.kind {
            Kind::Run(addr) => Ok(addr),
            _ => bail!("not a tracer run"),
        }
    }

    /// Stops the tracer; returns (events handled, events lost, CPU microseconds used, of
    /// which by the census thread).
    fn stop(&mut self) -> Result<(u64, u64, f64, f64)> {
        let pid = self.child.id();
        let cpu_us = cpu_micros(pid)? - self.start_cpu_us;
        let census_us = match self.kind {
            Kind::Bpftrace(_) => 0.0,
            _ => census_micros(pid) - self.start_census_us,
        };
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
            return Ok((events, lost, cpu_us, census_us));
        }
        if let Kind::Bpftrace(reader) = std::mem::replace(&mut self.kind, Kind::Watch) {
            let (printed, counted, lost) = reader
                .join()
                .map_err(|_| anyhow::anyhow!("bpftrace reader"))?;
            return Ok((printed.max(counted), lost, cpu_us, 0.0));
        }
        // watch: "tracer: N events received, M printed, L lost"
        let line = summary.context("no summary line from tracer watch")?;
        let nums: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect();
        match nums[..] {
            [received, _, lost] => Ok((received, lost, cpu_us, census_us)),
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

/// One run of `tracer run` and bpftrace counting transitions, both attached at once, with the
/// kernel timing every BPF program run (`kernel.bpf_stats_enabled=1`, restored afterwards):
/// what each costs per transition, on the same events.
/// `before`: another build to time on the same transitions, and whether it attaches first.
fn probe_cost_phase(
    duration: Duration,
    with_bpftrace: bool,
    before: Option<(&Path, bool)>,
) -> Result<()> {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let stats_were = std::fs::read_to_string(SYSCTL).context("reading kernel.bpf_stats_enabled")?;
    std::fs::write(SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
    if with_bpftrace {
        crate::setup::install_packages(&["bpftrace"])?;
        crate::setup::mount_tracefs()?;
    }
    let result = (|| {
        let already = program_ids();
        let mut bpftrace = if with_bpftrace {
            Some(TracerProcess::bpftrace(BPFTRACE_COUNT)?)
        } else {
            None
        };
        let first = before.filter(|&(_, first)| first);
        let mut earlier = first
            .map(|(b, _)| TracerProcess::start_run(b))
            .transpose()?;
        let mut tracer = TracerProcess::start_run(Path::new(TRACER))?;
        if let Some((b, false)) = before {
            earlier = Some(TracerProcess::start_run(b)?);
        }
        let (conns, _) = churn(duration)?;
        let refused = refused_connects(REFUSED_CONNECTS)?;
        std::thread::sleep(Duration::from_millis(1_200)); // one sync of the probe's figures
        let text = scrape(tracer.metrics_addr()?)?;
        let before_text = match &earlier {
            Some(t) => Some(scrape(t.metrics_addr()?)?),
            None => None,
        };
        // Read while both are attached: the kernel forgets a program's figures when it goes.
        // bpftrace's is the classic tracepoint program loaded since the start (the tracer's
        // are BTF tracepoints).
        let bpftrace_cost = program_costs(|p| {
            !already.contains(&p.id())
                && p.program_type() == aya_obj::generated::bpf_prog_type::BPF_PROG_TYPE_TRACEPOINT
        });
        tracer.stop()?;
        if let Some(t) = earlier.as_mut() {
            t.stop()?;
        }
        if let Some(b) = bpftrace.as_mut() {
            b.stop()?;
        }
        Ok::<_, anyhow::Error>((conns, refused, text, before_text, bpftrace_cost))
    })();
    std::fs::write(SYSCTL, stats_were.trim()).context("restoring kernel.bpf_stats_enabled")?;
    let (conns, refused, text, before_text, bpftrace_cost) = result?;
    println!(
        "probe cost (kernel.bpf_stats_enabled=1, one run, {:.0} conn/s, tracer run{} and \
         bpftrace counting attached at once):",
        conns as f64 / duration.as_secs_f64(),
        match before {
            Some((_, true)) => ", the --before build's (attached first)",
            Some((_, false)) => ", the --before build's (attached second)",
            None => "",
        },
    );
    if let Some(t) = &before_text {
        println!("  the --before build:");
        print_probe_costs(t)?;
        println!("  this build:");
    }
    print_probe_costs(&text)?;
    let drops: f64 = text
        .lines()
        .filter(|l| l.starts_with("tracer_tcp_drops_total{") && l.contains("reason=\"no_socket\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    println!(
        "  then {refused} connects refused by a closed port: the kernel drops each SYN \
         (no_socket), {drops:.0} such drops counted; kfree_skb runs for every packet freed \
         as dropped, TCP or not (its line above)"
    );
    for (name, runs, ns) in bpftrace_cost {
        let per_run = if runs > 0 {
            ns as f64 / runs as f64
        } else {
            0.0
        };
        println!("  bpftrace {name:<31} {runs:>10} runs  {per_run:>6.0} ns per run");
    }
    Ok(())
}

/// Prints what each of a tracer's programs cost per run, from its `/metrics` `text`, and its
/// cost per transition (the main program and its rescue, both run for every transition).
fn print_probe_costs(text: &str) -> Result<()> {
    let transitions = sample(
        text,
        "tracer_probe_runs_total{program=\"inet_sock_set_state\"}",
    );
    let mut per_transition = 0.0;
    for line in text
        .lines()
        .filter(|l| l.starts_with("tracer_probe_runs_total{"))
    {
        let (labels, runs) = line.rsplit_once(' ').context("metric line")?;
        let program = labels.trim_start_matches("tracer_probe_runs_total");
        let runs: f64 = runs.parse()?;
        let seconds = sample(text, &format!("tracer_probe_run_seconds_total{program}"));
        let per_run = if runs > 0.0 {
            seconds * 1e9 / runs
        } else {
            0.0
        };
        if program.contains("inet_sock_set_state") && transitions > 0.0 {
            per_transition += seconds * 1e9 / transitions;
        }
        println!("  {program:<40} {runs:>10.0} runs  {per_run:>6.0} ns per run");
    }
    println!(
        "  tracer: {per_transition:.0} ns per transition (inet_sock_set_state and its rescue \
         program, both run for every transition)"
    );
    Ok(())
}

/// Three runs of `tracer run` and bpftrace counting transitions, both attached at once as in
/// [`probe_cost_phase`] but with `kernel.bpf_stats_enabled` off, every CPU sampled by `perf`
/// (one sample per 200 us of CPU time, light enough to leave the rate it samples about as it
/// was): the whole cost of each on the tracepoint, its program and what the kernel runs
/// around it for that kind of attachment, on the same events. Medians of the three are
/// reported (one run alone moves by a fifth from one to the next on a shared machine).
///
/// Why as well as the kernel's timing: `bpf_stats` times a program's own instructions only.
/// bpftrace's classic tracepoint reads the socket's fields and fills its record in the
/// kernel's `perf_trace_inet_sock_set_state` before its program starts, outside that timing,
/// while the tracer's BTF tracepoint programs read the socket themselves, inside it; and the
/// timing's own clock reads, about as dear as a small program, are charged once to bpftrace
/// and twice to the tracer (its main and rescue programs). Samples of the call stacks count
/// both kinds alike. Also reported: what the kernel spends on the probe's socket storage
/// outside the tracepoint (copying a listener's to each child it accepts, freeing it with
/// the socket), which no program timing sees.
fn hook_cost_phase(duration: Duration) -> Result<()> {
    const ROUNDS: usize = 3;
    crate::setup::install_packages(&["linux-perf"])?;
    println!(
        "hook cost (perf, every CPU, one sample per {} us of CPU, kernel.bpf_stats_enabled=0; \
         tracer run and bpftrace counting attached at once; ns per transition):",
        HOOK_PERIOD_NS / 1_000
    );
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let (events, hooks) = hook_cost_round(duration)?;
        let ns = |n: u64| n as f64 * HOOK_PERIOD_NS as f64 / events.max(1.0);
        let r = [
            ns(hooks.tracer_programs),
            ns(hooks.tracer_dispatch),
            ns(hooks.bpftrace_program),
            ns(hooks.bpftrace_dispatch),
            ns(hooks.storage_upkeep),
        ];
        println!(
            "  round {round}: {events:.0} transitions; tracer {:.0} ({:.0} programs + {:.0} \
             dispatch), bpftrace {:.0} ({:.0} program + {:.0} dispatch), storage upkeep {:.0}",
            r[0] + r[1],
            r[0],
            r[1],
            r[2] + r[3],
            r[2],
            r[3],
            r[4]
        );
        rounds.push(r);
    }
    let med = |f: &dyn Fn(&[f64; 5]) -> f64| median(rounds.iter().map(f).collect());
    println!(
        "  median tracer:   {:>5.0} ns per transition ({:.0} in its programs, {:.0} in the \
         kernel's tp_btf dispatch)",
        med(&|r| r[0] + r[1]),
        med(&|r| r[0]),
        med(&|r| r[1])
    );
    println!(
        "  median bpftrace: {:>5.0} ns per transition ({:.0} in its program, {:.0} in the \
         kernel's perf_trace record and dispatch)",
        med(&|r| r[2] + r[3]),
        med(&|r| r[2]),
        med(&|r| r[3])
    );
    println!(
        "  median ratio tracer / bpftrace (per round): {:.2}; the probe's socket storage \
         outside the tracepoint (copied at accept, freed with the socket): {:.0} ns per \
         transition more",
        med(&|r| (r[0] + r[1]) / (r[2] + r[3]).max(1.0)),
        med(&|r| r[4])
    );
    Ok(())
}

/// perf's sampling period in [`hook_cost_phase`]: one sample per this much CPU time.
const HOOK_PERIOD_NS: u64 = 200_000;

/// One sampled run of [`hook_cost_phase`]: the transitions in the sampled window and the
/// samples sorted by whose they are.
fn hook_cost_round(duration: Duration) -> Result<(f64, HookSamples)> {
    let data = std::env::temp_dir().join(format!("tracer-bench-{}.perf", std::process::id()));
    let result = (|| {
        let mut bpftrace = TracerProcess::bpftrace(BPFTRACE_COUNT)?;
        let addr = free_port()?;
        let mut tracer = TracerProcess::start(&["run", "--listen", &addr.to_string()], Some(addr))?;
        let before = sample(&scrape(addr)?, "tracer_events_total");
        let window = duration.saturating_sub(Duration::from_secs(1));
        let mut perf = Command::new("perf")
            .args([
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-c",
                &HOOK_PERIOD_NS.to_string(),
                "-a",
                "-g",
            ])
            .arg("-o")
            .arg(&data)
            .args(["--", "sleep", &format!("{:.1}", window.as_secs_f64())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        let started = Instant::now();
        let churned = churn(duration);
        let status = perf.wait().context("waiting for perf record")?;
        let sampled = started.elapsed().min(window);
        let text = scrape(addr)?;
        tracer.stop()?;
        bpftrace.stop()?;
        churned?;
        if !status.success() {
            bail!("perf record failed: {status}");
        }
        // Events over the churn, scaled to the sampled window (the agent drains every 10 ms).
        let events = (sample(&text, "tracer_events_total") - before) * sampled.as_secs_f64()
            / duration.as_secs_f64();
        let script = Command::new("perf")
            .args(["script", "-F", "ip,sym", "-i"])
            .arg(&data)
            .stderr(Stdio::null())
            .output()
            .context("running perf script")?;
        Ok::<_, anyhow::Error>((
            events,
            HookSamples::count(&String::from_utf8_lossy(&script.stdout)),
        ))
    })();
    let _ = std::fs::remove_file(&data);
    result
}

/// Samples of [`hook_cost_phase`]'s profile, by whose cost they are.
#[derive(Default, Debug, PartialEq)]
struct HookSamples {
    /// In the tracer's programs (and the helpers they call).
    tracer_programs: u64,
    /// Under the tracepoint's BTF dispatch (`__bpf_trace_*`, `bpf_trace_run3`), outside them.
    tracer_dispatch: u64,
    /// In bpftrace's program.
    bpftrace_program: u64,
    /// Under `perf_trace_inet_sock_set_state`, outside its program.
    bpftrace_dispatch: u64,
    /// Outside the tracepoint, in the kernel's socket storage code.
    storage_upkeep: u64,
}

impl HookSamples {
    /// Sorts the samples of `perf script -F ip,sym` (a stack per sample, leaf first, samples
    /// separated by blank lines).
    fn count(script: &str) -> HookSamples {
        let mut h = HookSamples::default();
        for stack in script.split("\n\n") {
            let frames: Vec<&str> = stack
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .collect();
            let has = |prefix: &str| frames.iter().any(|f| f.starts_with(prefix));
            let in_program = has("bpf_prog_");
            if has("perf_trace_inet_sock_set_state") {
                *if in_program {
                    &mut h.bpftrace_program
                } else {
                    &mut h.bpftrace_dispatch
                } += 1;
            } else if has("__bpf_trace_inet_sock_set_state") || has("bpf_trace_run3") {
                *if in_program {
                    &mut h.tracer_programs
                } else {
                    &mut h.tracer_dispatch
                } += 1;
            } else if has("bpf_sk_storage_") || has("bpf_local_storage_") || has("bpf_selem_") {
                h.storage_upkeep += 1;
            }
        }
        h
    }
}

/// The ids of every BPF program loaded now.
fn program_ids() -> std::collections::HashSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| p.id())
        .collect()
}

/// (name, runs, run nanoseconds) of each loaded program that `pick` takes.
fn program_costs(pick: impl Fn(&aya::programs::ProgramInfo) -> bool) -> Vec<(String, u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| pick(p))
        .map(|p| {
            let name = p.name_as_str().unwrap_or("?").to_owned();
            (name, p.run_count(), p.run_time().as_nanos() as u64)
        })
        .collect()
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
/// CPU microseconds used by process `pid`'s threads named `census` (0 where it has none).
fn census_micros(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "census")
        })
        .filter_map(|t| stat_micros(&t.path().join("stat")).ok())
        .sum()
}

fn cpu_micros(pid: u32) -> Result<f64> {
    stat_micros(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

/// User and system CPU microseconds in a `/proc` stat file (a process's or a thread's).
fn stat_micros(path: &std::path::Path) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
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

/// The agent's `/metrics` text.
fn scrape(addr: SocketAddr) -> Result<String> {
    get(&format!("http://{addr}/metrics"))
}

/// The body of a 200 answer to `GET url`; any other status is an error.
fn get(url: &str) -> Result<String> {
    let mut response = http()
        .get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer to GET {url}"))
}

/// The HTTP client of every request the bench makes, all to the agent on loopback: no proxy
/// (ureq's default configuration takes one from `HTTP_PROXY`/`ALL_PROXY`), and 10 s at most
/// per request, body included, so that no scrape can hang the bench.
fn http() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into()
    })
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

/// The busy host: `held_before` connections opened before `tracer run` starts and `held` more
/// opened under it (two sockets each, kept by `cargo xtask hold` child processes), then churn
/// for `duration` while `/metrics` is scraped every second and `/sockets?limit=100` every two,
/// as Prometheus and someone running `tracer sockets` would. Reports the events read and lost,
/// the latency of each scrape, and the agent's resident memory per followed socket.
fn busy_phase(held: usize, held_before: usize, duration: Duration) -> Result<()> {
    let (per_process, ports) = hold_capacity()?;
    // The held client sockets take ports of 127.0.0.1 all over the ephemeral range; a later
    // bind there could find none free. So the churn listener is bound now, and the agent and
    // each hold process listen on addresses of their own (127.0.0.0/8 is all loopback), where
    // those ports do not conflict.
    let churn_listener = TcpListener::bind("127.0.0.1:0").context("binding the churn listener")?;
    let addr = TcpListener::bind((AGENT_ADDR, 0))
        .with_context(|| format!("finding a free port on {AGENT_ADDR}"))?
        .local_addr()?;
    let mut next_addr = 2; // hold listeners on 127.0.0.2, .3, ...
    let before = Holders::open(held_before, per_process, &mut next_addr)?;
    let (mut tracer, pid) = start_agent(addr, &[])?;
    let s0 = Snapshot::take(addr, pid)?;

    let opening = Instant::now();
    let holders = Holders::open(held, per_process, &mut next_addr)?;
    let opening = opening.elapsed();
    std::thread::sleep(Duration::from_secs(2)); // the agent drains the opening's events
    let s1 = Snapshot::take(addr, pid)?;

    let stop = Arc::new(AtomicBool::new(false));
    let metrics = scraper(
        format!("http://{addr}/metrics"),
        Duration::from_secs(1),
        stop.clone(),
    );
    let sockets = scraper(
        format!("http://{addr}/sockets?limit=100"),
        Duration::from_secs(2),
        stop.clone(),
    );
    let churned = churn_on(churn_listener, duration);
    stop.store(true, Ordering::Relaxed);
    let metrics = metrics
        .join()
        .map_err(|_| anyhow::anyhow!("the /metrics scraper panicked"))?;
    let sockets = sockets
        .join()
        .map_err(|_| anyhow::anyhow!("the /sockets scraper panicked"))?;
    let (conns, addr_errors) = churned?;
    std::thread::sleep(Duration::from_millis(1_200)); // one sync of the probe's figures
    let s2 = Snapshot::take(addr, pid)?;
    let peak = proc_status_bytes(pid, "VmHWM:")?;
    tracer.stop()?;
    drop(holders);
    drop(before);

    let mib = |b: u64| b as f64 / 1048576.0;
    let followed = s1.tracked.saturating_sub(s0.tracked);
    println!(
        "busy host: {} connections held open before `tracer run` started and {held} opened \
         under it ({} sockets; {} hold processes, ephemeral range {}-{}), then {} s of churn \
         while /metrics is scraped every 1 s and /sockets?limit=100 every 2 s",
        held_before,
        2 * (held + held_before),
        held.div_ceil(per_process) + held_before.div_ceil(per_process),
        ports.0,
        ports.1,
        duration.as_secs(),
    );
    println!(
        "  opening    {held} connections in {:.1} s",
        opening.as_secs_f64()
    );
    println!(
        "  churn      {:.0} conn/s{}",
        conns as f64 / duration.as_secs_f64(),
        if addr_errors > 0 {
            format!(" ({addr_errors} connects failed with EADDRNOTAVAIL and were retried)")
        } else {
            String::new()
        }
    );
    println!(
        "  events     {} read, {} lost ({} while opening, {} during the churn); {} census \
         errors",
        s2.events.saturating_sub(s0.events),
        s2.lost.saturating_sub(s0.lost),
        s1.lost.saturating_sub(s0.lost),
        s2.lost.saturating_sub(s1.lost),
        s2.census_errors.saturating_sub(s0.census_errors),
    );
    for (path, log) in [("/metrics", &metrics), ("/sockets", &sockets)] {
        let ms: Vec<f64> = log.ok.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        println!(
            "  {path:<10} {} requests, {} failed; latency median {:.1} ms, max {:.1} ms{}",
            ms.len() as u64 + log.failed,
            log.failed,
            median(ms.clone()),
            ms.iter().copied().fold(0.0, f64::max),
            log.first_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (first failure: {e})")),
        );
    }
    println!(
        "  sockets    the agent followed {} before the opening, {} after, {} after the churn; \
         the census saw {}, {} and {} on the host",
        s0.tracked, s1.tracked, s2.tracked, s0.host_sockets, s1.host_sockets, s2.host_sockets
    );
    // Each figure is read after a scrape, so it includes the census's high-water mark for the
    // host's sockets at that moment (TIME-WAIT sockets left by earlier phases included).
    println!(
        "  memory     {:.1} MiB resident before the opening, {:.1} MiB after: {:.0} bytes per \
         followed socket; {:.1} MiB after the churn, {:.1} MiB at the peak (VmHWM)",
        mib(s0.rss),
        mib(s1.rss),
        s1.rss.saturating_sub(s0.rss) as f64 / followed.max(1) as f64,
        mib(s2.rss),
        mib(peak),
    );
    println!(
        "reproduce: cargo xtask bench --only busy --held {held} --held-before {held_before} \
         --busy-seconds {}",
        duration.as_secs()
    );
    Ok(())
}

/// Where the busy phase's agent listens: a loopback address of its own (see [`busy_phase`]).
const AGENT_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 254);

/// The agent's figures at one moment of the busy phase.
struct Snapshot {
    events: u64,
    lost: u64,
    tracked: u64,
    /// The kernel memory of the probe's socket storage (`tracer_tracked_sockets_bytes`).
    table_bytes: u64,
    census_errors: u64,
    /// How long the last census took (`tracer_census_duration_seconds`).
    census_seconds: f64,
    /// Sockets of every state in the census (`tracer_tcp_sockets`, summed).
    host_sockets: u64,
    /// The agent's resident memory (VmRSS) just after the scrape, its census included.
    rss: u64,
}

impl Snapshot {
    fn take(addr: SocketAddr, pid: u32) -> Result<Snapshot> {
        let text = scrape(addr)?;
        Ok(Snapshot {
            events: metric(&text, "tracer_events_total"),
            lost: metric(&text, "tracer_events_lost_total"),
            tracked: metric(&text, "tracer_tracked_sockets"),
            table_bytes: metric(&text, "tracer_tracked_sockets_bytes"),
            census_errors: metric(&text, "tracer_census_errors_total"),
            census_seconds: sample(&text, "tracer_census_duration_seconds"),
            host_sockets: text
                .lines()
                .filter(|l| l.starts_with("tracer_tcp_sockets{"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum::<f64>() as u64,
            rss: proc_status_bytes(pid, "VmRSS:")?,
        })
    }
}

/// Starts `tracer run` on `addr` and waits until it is healthy; returns it and its pid.
fn start_agent(addr: SocketAddr, extra: &[&str]) -> Result<(TracerProcess, u32)> {
    let listen = addr.to_string();
    let mut args = vec!["run", "--listen", &listen];
    args.extend_from_slice(extra);
    let tracer = TracerProcess::start(&args, Some(addr))?;
    let pid = tracer.child.id();
    wait_healthy(addr)?;
    Ok((tracer, pid))
}

/// Waits (at most 30 s) for the agent's `/healthz` to answer 200.
fn wait_healthy(addr: SocketAddr) -> Result<()> {
    let url = format!("http://{addr}/healthz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match get(&url) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("the agent did not become healthy within 30 s"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A `/proc/PID/status` figure given in kB (`VmRSS:`, `VmHWM:`), in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// What one scraper saw: the latency of each answered request, and the failures.
#[derive(Default)]
struct ScrapeLog {
    ok: Vec<Duration>,
    failed: u64,
    first_error: Option<String>,
}

/// GETs `url` every `period` (a request that overruns skips the ticks it covered, as
/// Prometheus does) until `stop` is set.
fn scraper(
    url: String,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<ScrapeLog> {
    std::thread::spawn(move || {
        let mut log = ScrapeLog::default();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
                continue;
            }
            match get(&url) {
                Ok(_) => log.ok.push(now.elapsed()),
                Err(e) => {
                    log.failed += 1;
                    log.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
            while next <= Instant::now() {
                next += period;
            }
        }
        log
    })
}

/// Connections one hold process can keep, and the ephemeral port range: two descriptors each
/// under the hard open-file limit (`hold` raises its soft limit to it), and at most 3/4 of the
/// range, since all of a process's connections go to one listener and each needs its own
/// port toward it.
fn hold_capacity() -> Result<(usize, (u32, u32))> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("reading net.ipv4.ip_local_port_range")?;
    let ports: Vec<u32> = range
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let &[low, high] = &ports[..] else {
        bail!("unexpected ip_local_port_range {range:?}");
    };
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    let by_fds = (limit.rlim_max.min(1 << 20) as usize).saturating_sub(100) / 2;
    let by_ports = (high.saturating_sub(low) as usize + 1) * 3 / 4;
    let per_process = by_fds.min(by_ports);
    if per_process < 100 {
        bail!(
            "a hold process could keep only {per_process} connections (open-file hard limit \
             {}, ephemeral range {low}-{high}): raise them",
            limit.rlim_max
        );
    }
    Ok((per_process, (low, high)))
}

/// `cargo xtask hold` processes, each holding connections to a listener on its own loopback
/// address. Dropping it closes their stdin (they close their connections and exit) and waits
/// for them, killing any still there after 10 s.
struct Holders(Vec<Child>);

impl Holders {
    /// Starts enough processes for `connections` (`per_process` at most each, on 127.0.0.N
    /// from `*next_addr` on); returns once all of them hold theirs.
    fn open(connections: usize, per_process: usize, next_addr: &mut u8) -> Result<Holders> {
        let exe = std::env::current_exe()?;
        let mut holders = Holders(Vec::new());
        let mut left = connections;
        while left > 0 {
            let n = left.min(per_process);
            left -= n;
            if *next_addr >= AGENT_ADDR.octets()[3] {
                bail!("too many hold processes: raise the open-file limit");
            }
            let ip = Ipv4Addr::new(127, 0, 0, *next_addr);
            *next_addr += 1;
            let child = Command::new(&exe)
                .args(["hold", &n.to_string(), "--addr", &ip.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a hold process")?;
            holders.0.push(child);
        }
        // They open their connections side by side; each says "ready" when done, or exits.
        for child in &mut holders.0 {
            let mut ready = String::new();
            BufReader::new(child.stdout.take().context("hold stdout")?).read_line(&mut ready)?;
            if ready.trim() != "ready" {
                bail!("a hold process failed to open its connections");
            }
        }
        Ok(holders)
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.0 {
            drop(child.stdin.take()); // EOF: the holder closes its connections and exits
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.0 {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// `cargo xtask hold N --addr IP` (used by the bench): opens N loopback connections to a
/// listener on IP, says "ready", and keeps them until its stdin closes.
pub fn hold(n: usize, addr: Ipv4Addr) -> Result<()> {
    raise_open_file_limit()?;
    let listener = TcpListener::bind((addr, 0)).with_context(|| format!("listening on {addr}"))?;
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

/// Raises this process's soft open-file limit to its hard limit.
fn raise_open_file_limit() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own; setrlimit reads it.
    let failed = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0
        }
    };
    if failed {
        bail!(
            "raising the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_samples_are_sorted_by_the_frames_under_them() {
        // Shaped as `perf script -F ip,sym` prints them: leaf first.
        let script = "\
\tffffffffc0012345 bpf_prog_30dec0afb023080b_inet_sock_set_s
\tffffffff81234567 trace_call_bpf
\tffffffff81234568 perf_trace_inet_sock_set_state
\tffffffff81234569 tcp_set_state

\tffffffff81234570 perf_swevent_event
\tffffffff81234568 perf_trace_inet_sock_set_state

\tffffffff81234571 bpf_sk_storage_get_tracing
\tffffffffc0012399 bpf_prog_78d5c2f7c68850e2_inet_sock_set_state
\tffffffff81234572 bpf_trace_run3
\tffffffff81234573 __bpf_trace_inet_sock_set_state

\tffffffff81234572 bpf_trace_run3
\tffffffff81234573 __bpf_trace_inet_sock_set_state

\tffffffff81234574 bpf_selem_alloc
\tffffffff81234575 bpf_sk_storage_clone
\tffffffff81234576 sk_clone_lock

\tffffffff81234577 tcp_v4_rcv
";
        assert_eq!(
            HookSamples::count(script),
            HookSamples {
                tracer_programs: 1,
                tracer_dispatch: 1,
                bpftrace_program: 1,
                bpftrace_dispatch: 1,
                storage_upkeep: 1,
            }
        );
    }
}
