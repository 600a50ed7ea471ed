//! `tracer watch`: print every TCP state change as it happens, for people (aligned columns) or
//! programs (`--json`, one object per line).
//!
//! Owns: the watch loop (ring buffer → each event on its own → filters → output), signals and stop
//! conditions, and the loss reports on stderr. Formatting writes into a buffered stdout and
//! allocates nothing per event.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::census::StorageMap;
use crate::cli::WatchArgs;
use crate::stream::btf::EnumName;
use crate::stream::event::{self, Transition};
use crate::stream::live::{census_period, LiveCensus, Tracker};
use crate::stream::probe::{Probe, ProbeConfig, ProbeCounters};
use crate::stream::record::Record;
use crate::stream::ring::EventRings;
use crate::stream::{self, Closed, Ending, Mode, Observation};
use crate::workload::{Resolver, Workload};
use std::sync::Arc;
use tracer_common::{retransmit, ACCEPTED, SENT_RESET};

/// How long a close record waits for the reset its socket may send: the kernel sends it just
/// after the transition to CLOSE (tens of microseconds later on an idle host), in the same
/// call. The record is printed once every event stamped up to this long after the close has
/// been read.
const RESET_GRACE_NS: u64 = 10_000_000;

/// What a watch session saw, reported on stderr when it ends.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    /// Events read from the ring buffer.
    pub received: u64,
    /// Events printed (after the userspace filters).
    pub printed: u64,
    /// Events the probe dropped because the ring buffer was full.
    pub lost: u64,
}

/// Runs `tracer watch` until a signal, `--duration`, `--count`, or a closed stdout.
pub async fn run(args: &WatchArgs) -> Result<Summary> {
    crate::metrics::pods::check_flags(&args.attribution)?;
    let mut probe = Probe::attach(&ProbeConfig {
        ring_buffer_bytes: args.ring_buffer_size,
        ports: args.ports.clone(),
        reset_events: args.connections,
        accept_events: false,
        accept_wait: args.accept_wait,
    })?;
    let mut rings = probe.event_rings()?;
    // Sockets older than the probe: their owners, onto each socket's storage.
    probe.seed_owners(std::path::Path::new("/proc"))?;
    // Open connections' update records (`--connections`): from censuses of every namespace,
    // taken by a thread of their own, which is what keeps privileges (to enter namespaces).
    let (census_tx, mut censuses) = tokio::sync::mpsc::channel::<LiveCensus>(2);
    let storage = if args.connections {
        Some(Arc::new(probe.socket_storage()?))
    } else {
        None
    };
    // Attached: reading what the probe writes needs no privilege; the census needs its two.
    crate::privileges::keep_only(if storage.is_some() {
        crate::privileges::CENSUS
    } else {
        &[]
    })?;
    if let Some(storage) = storage {
        let period = census_period(args.record_interval);
        std::thread::Builder::new()
            .name("census".into())
            .spawn(move || take_censuses(&storage, period, &census_tx))
            .context("starting the census thread")?;
    }
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let stop_at =
        tokio::time::Instant::now() + args.duration.unwrap_or(Duration::from_secs(u64::MAX / 4));
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let mut drain = tokio::time::interval(crate::stream::probe::DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let resolver = crate::metrics::pods::resolver(&args.attribution, probe.reads_cgroups());
    let stdout = io::BufWriter::with_capacity(1 << 16, io::stdout());
    let mut printer = Printer::new(args, resolver, probe.reset_reasons.clone(), stdout);
    eprintln!(
        "tracer: attached to inet_sock_set_state; watching TCP state changes (Ctrl-C to stop)"
    );
    if !args.json {
        printer.header()?;
    }
    let mut reported = ProbeCounters::default();
    loop {
        tokio::select! {
            woken = rings.woken() => {
                woken?;
                if printer.drain(&mut rings, false)? { break; }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tokio::time::sleep_until(stop_at) => break,
            _ = drain.tick() => {
                if printer.drain(&mut rings, false)? { break; }
            }
            _ = report.tick() => {
                probe.flush_log();
                report_losses(&probe, &mut reported)?;
            }
            Some(census) = censuses.recv() => {
                if printer.print_updates(&census)? { break; }
            }
        }
    }
    // Print what the probe delivered before the stop, then detach (drop) and report.
    printer.drain(&mut rings, true)?;
    probe.flush_log();
    report_losses(&probe, &mut reported)?;
    drop(rings);
    drop(probe);
    Ok(Summary {
        received: printer.received,
        printed: printer.printed,
        lost: reported.lost_total(),
    })
}

/// The census thread of `watch --connections`: a census of every namespace each `period`,
/// its open connections sent to the printer, until the printer is gone.
fn take_censuses(
    storage: &StorageMap,
    period: Duration,
    to: &tokio::sync::mpsc::Sender<LiveCensus>,
) {
    let mut log = crate::census::failure::FailureLog::default();
    loop {
        std::thread::sleep(period);
        match crate::census::all_namespaces(Some(storage.clone())) {
            Ok(census) => {
                if let Some(line) = log.worked() {
                    eprintln!("{line}");
                }
                if to
                    .blocking_send(crate::stream::live::samples(&census))
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let text = crate::census::failure::Failure::text(&e);
                let text = format!("{text} (no update records meanwhile)");
                if let Some(line) = log.failed(&text, std::time::Instant::now()) {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Says on stderr how many transitions were lost since the last report, if any.
fn report_losses(probe: &Probe, reported: &mut ProbeCounters) -> Result<()> {
    let now = probe.counters()?;
    if now.lost > reported.lost {
        eprintln!(
            "tracer: {} events lost (ring buffer full), {} in all: raise --ring-buffer-size \
             or narrow with --port",
            now.lost - reported.lost,
            now.lost
        );
    }
    if now.missed > reported.missed {
        eprintln!(
            "tracer: {} events missed (the kernel skipped the probe while it was running on \
             the same CPU), {} in all",
            now.missed - reported.missed,
            now.missed
        );
    }
    *reported = now;
    Ok(())
}

/// A close record waiting to be printed.
struct Held {
    /// The transition to CLOSE, with the owner filled in.
    t: Transition,
    closed: Closed,
    workload: Rc<Rendered>,
}

/// Filters transitions and writes them out (to a buffered stdout; to a `Vec` in tests).
struct Printer<W: Write> {
    out: W,
    json: bool,
    /// One record per closed connection (`--connections`) rather than every transition.
    connections: bool,
    states: [bool; 256],
    any_state: bool,
    pid: Option<u32>,
    ports: Vec<u16>,
    /// What was last reported of each open connection (`--connections`).
    tracker: Tracker,
    remaining: Option<u64>,
    /// Close records not printed yet, oldest first: each waits [`RESET_GRACE_NS`] for the
    /// reset its socket may send as it closes.
    held: VecDeque<Held>,
    /// The kernel's names of reset reasons, indexed by value (empty: none on this kernel).
    reset_reasons: Vec<String>,
    /// Cgroup ids to containers and pods (None: not available on this host).
    resolver: Option<Resolver>,
    rendered: foldhash::HashMap<u64, Rc<Rendered>>,
    /// Wall clock minus CLOCK_MONOTONIC, to turn kernel timestamps into wall time.
    realtime_offset_ns: i128,
    received: u64,
    printed: u64,
    stdout_closed: bool,
}

impl<W: Write> Printer<W> {
    fn new(
        args: &WatchArgs,
        resolver: Option<Resolver>,
        reset_reasons: Vec<String>,
        out: W,
    ) -> Printer<W> {
        let mut states = [false; 256];
        for &s in &args.states {
            states[s as usize] = true;
        }
        Printer {
            out,
            json: args.json,
            connections: args.connections,
            states,
            any_state: args.states.is_empty(),
            pid: args.pid,
            ports: args.ports.clone(),
            tracker: Tracker::new(args.record_interval),
            remaining: args.count,
            held: VecDeque::new(),
            reset_reasons,
            resolver,
            rendered: Default::default(),
            realtime_offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
            received: 0,
            printed: 0,
            stdout_closed: false,
        }
    }

    /// Prints what the rings hold (all of it when `flush`; see [`EventRings::drain`]).
    /// Returns true when watching should stop.
    fn drain(&mut self, rings: &mut EventRings, flush: bool) -> Result<bool> {
        if self.remaining == Some(0) || self.stdout_closed {
            return Ok(true);
        }
        let mut failed = None;
        let cutoff = rings.drain(flush, |t| match self.handle(t) {
            Ok(more) => more,
            Err(e) => {
                failed = Some(e);
                false
            }
        });
        if failed.is_none() {
            failed = self.release(cutoff).err();
        }
        if let Some(e) = failed.or_else(|| self.out.flush().err()) {
            return self.write_failed(e);
        }
        Ok(self.stdout_closed || self.remaining == Some(0))
    }

    /// Follows one event and prints it if it is wanted. Returns false when no more is wanted.
    fn handle(&mut self, t: &Transition) -> io::Result<bool> {
        let t = *t;
        self.received += 1;
        // For the signal thread: still reading, so not stuck (every 256 events: an atomic
        // add per event would be a cost for nothing).
        if self.received.is_multiple_of(256) {
            crate::cmd::progressed(256);
        }
        // Each event carries its socket's owner and times (what the probe keeps on it).
        let (mut closed, mut reset_after_close) = (None, None);
        stream::observe(&t, |o| match o {
            Observation::Closed(mut c) => {
                // What it did since its last update record.
                self.tracker.close(t.cookie, t.time_ns, &mut c);
                closed = Some(c);
            }
            Observation::ResetSent {
                reason,
                followed: false,
            } => reset_after_close = Some(reason),
            _ => {}
        });
        if t.newstate == ACCEPTED {
            // Not a transition: its wait is on the socket, for the close record.
            return Ok(true);
        }
        if t.newstate == SENT_RESET {
            // Not a transition: it only completes a record (before its close, the probe
            // keeps the reason on the socket; after, the record is still held here).
            if let Some(reason) = reset_after_close {
                let cookie = t.cookie;
                if let Some(h) = self.held.iter_mut().rev().find(|h| h.t.cookie == cookie) {
                    h.closed.reset_as_it_closed(reason);
                }
            }
            return Ok(true);
        }
        if !self.wanted(&t) {
            return Ok(true);
        }
        let workload = self.workload(t.cgroup);
        match (self.connections, closed) {
            (false, _) => self.print(&t, stream::dwell(&t), &workload)?,
            (true, Some(closed)) => {
                self.held.push_back(Held {
                    t,
                    closed,
                    workload,
                });
                return Ok(true);
            }
            (true, None) => return Ok(true),
        }
        Ok(self.count_printed())
    }

    /// Prints the held close records whose socket closed at least [`RESET_GRACE_NS`] before
    /// `cutoff` (every event stamped up to `cutoff` has been read; `u64::MAX` prints all).
    fn release(&mut self, cutoff: u64) -> io::Result<()> {
        while let Some(h) = self.held.front() {
            if h.t.time_ns.saturating_add(RESET_GRACE_NS) > cutoff || self.remaining == Some(0) {
                break;
            }
            let h = self.held.pop_front().expect("a held record");
            self.print_record(&Record::close(&h.t, &h.closed), &h.workload)?;
            self.count_printed();
        }
        Ok(())
    }

    /// Prints the update records a census gives (`--connections`). Returns true when
    /// watching should stop.
    fn print_updates(&mut self, census: &LiveCensus) -> Result<bool> {
        let mut updates = Vec::new();
        self.tracker.census(census, |u| {
            if u.due {
                updates.push(Record::update(&u))
            }
        });
        for r in updates {
            if self.remaining == Some(0) || self.stdout_closed {
                break;
            }
            if self.pid.is_some_and(|p| p != r.pid) || !self.ports_wanted(&r) {
                continue;
            }
            let workload = self.workload(r.cgroup);
            if let Err(e) = self.print_record(&r, &workload) {
                return self.write_failed(e);
            }
            self.count_printed();
        }
        if let Err(e) = self.out.flush() {
            return self.write_failed(e);
        }
        Ok(self.stdout_closed || self.remaining == Some(0))
    }

    /// `--port`: the kernel filters transitions; a census lists every socket.
    fn ports_wanted(&self, r: &Record) -> bool {
        self.ports.is_empty()
            || self.ports.contains(&r.local_port)
            || self.ports.contains(&r.remote_port)
    }

    /// Counts one line printed; returns false when `--count` lines have been.
    fn count_printed(&mut self) -> bool {
        self.printed += 1;
        if let Some(n) = self.remaining.as_mut() {
            *n -= 1;
            return *n > 0;
        }
        true
    }

    /// A reader that went away (`tracer watch | head`) ends the watch quietly.
    fn write_failed(&mut self, e: io::Error) -> Result<bool> {
        if e.kind() == io::ErrorKind::BrokenPipe {
            self.stdout_closed = true;
            return Ok(true);
        }
        Err(e).context("writing to stdout")
    }

    /// What to print of cgroup `id`: rendered once per cgroup and kept, once what it names is
    /// settled (resolved, and a pod's name known); until then resolved again for each line
    /// (the resolver limits its own walks).
    fn workload(&mut self, id: u64) -> Rc<Rendered> {
        if let Some(r) = self.rendered.get(&id) {
            return r.clone();
        }
        let w = self.resolver.as_mut().and_then(|r| r.resolve(id));
        let rendered = Rc::new(Rendered::new(id, w.as_deref()));
        let settled = id == 0
            || self.resolver.is_none()
            || w.is_some_and(|w| w.pod.as_ref().is_none_or(|p| p.name.is_some()));
        if settled {
            if self.rendered.len() >= MAX_RENDERED {
                self.rendered.clear();
            }
            self.rendered.insert(id, rendered.clone());
        }
        rendered
    }

    fn wanted(&self, t: &Transition) -> bool {
        (self.any_state || self.states[t.oldstate as usize] || self.states[t.newstate as usize])
            && self.pid.is_none_or(|p| p == t.pid)
    }

    fn header(&mut self) -> Result<()> {
        if self.connections {
            writeln!(
                self.out,
                "{:<15} {:>7} {:<15} {:<30} {:<30} {:<7} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9} {:>9} {:<11} {:<32} WORKLOAD",
                "TIME(UTC)", "PID", "COMM", "LOCAL", "REMOTE", "MODE", "HANDSHAKE", "LIFETIME",
                "SENT", "RECEIVED", "RETRANS", "SRTT", "MINRTT", "LIMITED", "ENDING"
            )?;
            return Ok(());
        }
        writeln!(
            self.out,
            "{:<15} {:>7} {:<15} {:<30} {:<30} {:<27} {:>9} WORKLOAD",
            "TIME(UTC)", "PID", "COMM", "LOCAL", "REMOTE", "OLD -> NEW", "DWELL"
        )?;
        Ok(())
    }

    fn print(&mut self, t: &Transition, dwell: Option<u64>, w: &Rendered) -> io::Result<()> {
        if self.json {
            self.print_json(t, dwell, w)
        } else {
            self.print_human(t, dwell, w)
        }
    }

    fn print_json(&mut self, t: &Transition, dwell: Option<u64>, w: &Rendered) -> io::Result<()> {
        let out = &mut self.out;
        let time_ns = (t.time_ns as i128 + self.realtime_offset_ns).max(0);
        write!(
            out,
            "{{\"time_ns\":{time_ns},\"skaddr\":\"{:#x}\",\"pid\":{},\"comm\":",
            t.skaddr, t.pid
        )?;
        serde_json::to_writer(&mut *out, &*event::comm_text(&t.comm))?;
        write_endpoints_json(out, t)?;
        write!(
            out,
            ",\"old\":\"{}\",\"new\":\"{}\",\"dwell_ns\":",
            event::state_name(t.oldstate),
            event::state_name(t.newstate),
        )?;
        match dwell {
            Some(ns) => write!(out, "{ns}")?,
            None => write!(out, "null")?,
        }
        out.write_all(w.json.as_bytes())?;
        writeln!(out, "}}")
    }

    /// One connection record: a line of columns, or a JSON object.
    fn print_record(&mut self, r: &Record, w: &Rendered) -> io::Result<()> {
        let reason = r
            .reset_reason
            .map(|n| EnumName::new(&self.reset_reasons, usize::from(n)));
        let line = RecordLine {
            r,
            reason,
            w,
            realtime_offset_ns: self.realtime_offset_ns,
        };
        if self.json {
            line.write_json(&mut self.out)
        } else {
            line.write_columns(&mut self.out)
        }
    }

    fn print_human(&mut self, t: &Transition, dwell: Option<u64>, w: &Rendered) -> io::Result<()> {
        let wall_ns = (t.time_ns as i128 + self.realtime_offset_ns).max(0) as u128;
        write_clock(&mut self.out, wall_ns)?;
        if t.pid == 0 {
            write!(self.out, "{:>7} {:<15} ", "-", "-")?;
        } else {
            let comm = event::Printable(event::comm_bytes(&t.comm));
            write!(self.out, "{:>7} {:<15} ", t.pid, comm)?;
        }
        write_endpoint(&mut self.out, event::local_addr(t), t.sport)?;
        write_endpoint(&mut self.out, event::remote_addr(t), t.dport)?;
        let old = event::state_name(t.oldstate);
        let new = event::state_name(t.newstate);
        // Pad "old -> new" to 27 columns without building a string.
        let used = old.len() + 4 + new.len();
        write!(
            self.out,
            "{old} -> {new}{:pad$} ",
            "",
            pad = 27usize.saturating_sub(used)
        )?;
        match dwell {
            None => write!(self.out, "{:>9}", "-")?,
            Some(ns) if ns < 10_000_000 => write!(self.out, "{:>7}us", ns / 1_000)?,
            Some(ns) if ns < 10_000_000_000 => write!(self.out, "{:>7}ms", ns / 1_000_000)?,
            Some(ns) => write!(self.out, "{:>8}s", ns / 1_000_000_000)?,
        }
        writeln!(self.out, " {}", w.column)
    }
}

/// Most cgroups whose rendering `watch` keeps.
const MAX_RENDERED: usize = 65_536;

/// What `watch` prints of one cgroup: its JSON keys and its WORKLOAD column.
struct Rendered {
    json: String,
    column: String,
}

impl Rendered {
    fn new(id: u64, w: Option<&Workload>) -> Rendered {
        let mut json = Vec::new();
        let _ = write!(json, ",\"cgroup_id\":{id}");
        let _ = write_workload_json(&mut json, w);
        let column = match w {
            Some(w) => event::Printable(w.short().as_bytes()).to_string(),
            None if id == 0 => "-".to_owned(),
            None => format!("cgroup:{id}"),
        };
        Rendered {
            json: String::from_utf8_lossy(&json).into_owned(),
            column,
        }
    }
}

/// Writes the JSON keys that say which cgroup, container and pod a socket belongs to (null
/// where not known), after a preceding key.
pub fn write_workload_json(out: &mut impl Write, w: Option<&Workload>) -> io::Result<()> {
    let container = w.and_then(|w| w.container.as_ref());
    let pod = w.and_then(|w| w.pod.as_ref());
    let cgroup = w.map(|w| crate::workload::cut_tail(&w.path, crate::workload::MAX_PATH_CHARS));
    let fields: [(&str, Option<&str>); 8] = [
        ("cgroup", cgroup.as_deref()),
        ("container_id", container.map(|c| c.id.as_str())),
        (
            "container_runtime",
            container.map(|c| c.runtime).filter(|r| !r.is_empty()),
        ),
        ("pod_uid", pod.map(|p| p.uid.as_str())),
        ("pod_namespace", pod.and_then(|p| p.namespace.as_deref())),
        ("pod_name", pod.and_then(|p| p.name.as_deref())),
        ("pod_qos", pod.map(|p| p.qos)),
        ("unit", w.and_then(|w| w.unit.as_deref())),
    ];
    for (key, value) in fields {
        write!(out, ",\"{key}\":")?;
        serde_json::to_writer(&mut *out, &value)?;
    }
    Ok(())
}

/// Writes the time of day (UTC) of `wall_ns`, to the microsecond, and a space.
/// The `family`, `saddr`, `sport`, `daddr` and `dport` keys of a JSON line, each after a comma.
fn write_endpoints_json(out: &mut impl Write, t: &Transition) -> io::Result<()> {
    write!(
        out,
        ",\"family\":\"{}\",\"saddr\":\"{}\",\"sport\":{},\"daddr\":\"{}\",\"dport\":{}",
        event::family_name(t.family),
        event::local_addr(t),
        t.sport,
        event::remote_addr(t),
        t.dport,
    )
}

fn write_clock(out: &mut impl Write, wall_ns: u128) -> io::Result<()> {
    let day_us = (wall_ns / 1_000) % 86_400_000_000;
    let (h, m, s, us) = (
        day_us / 3_600_000_000,
        day_us / 60_000_000 % 60,
        day_us / 1_000_000 % 60,
        day_us % 1_000_000,
    );
    write!(out, "{h:02}:{m:02}:{s:02}.{us:06} ")
}

/// Writes `addr:port` (`[v6]:port`) padded to 30 columns, without allocating.
fn write_endpoint(out: &mut impl Write, addr: std::net::IpAddr, port: u16) -> io::Result<()> {
    struct Counter<'a, W: Write>(&'a mut W, usize);
    impl<W: Write> Write for Counter<'_, W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.0.write(buf)?;
            self.1 += n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }
    let mut c = Counter(out, 0);
    match addr {
        std::net::IpAddr::V4(a) => write!(c, "{a}:{port}")?,
        std::net::IpAddr::V6(a) => write!(c, "[{a}]:{port}")?,
    }
    let pad = 30usize.saturating_sub(c.1);
    write!(c.0, "{:pad$} ", "")
}

/// Reads a clock in nanoseconds.
fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec pointer and a clock id the kernel always has.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// A connection record as `watch --connections` prints it, with what the printer knows.
struct RecordLine<'a> {
    r: &'a Record,
    /// The name of the reset the kernel sent as it closed, if it sent one.
    reason: Option<EnumName<'a>>,
    w: &'a Rendered,
    /// Wall clock minus CLOCK_MONOTONIC (see [`Printer`]).
    realtime_offset_ns: i128,
}

impl RecordLine<'_> {
    /// Wall time of kernel time `ns`.
    fn wall(&self, ns: u64) -> i128 {
        (ns as i128 + self.realtime_offset_ns).max(0)
    }

    /// Writes the record as one JSON object and a newline.
    fn write_json(&self, out: &mut impl Write) -> io::Result<()> {
        let r = self.r;
        write!(
            out,
            "{{\"time_ns\":{},\"record\":\"{}\",\"cookie\":{},\"pid\":{},\"comm\":",
            self.wall(r.time_ns),
            r.kind.name(),
            r.cookie,
            r.pid
        )?;
        serde_json::to_writer(&mut *out, &*event::comm_text(&r.comm))?;
        write!(
            out,
            ",\"family\":\"{}\",\"saddr\":\"{}\",\"sport\":{},\"daddr\":\"{}\",\"dport\":{}",
            event::family_name(r.family),
            r.local,
            r.local_port,
            r.remote,
            r.remote_port,
        )?;
        write!(out, ",\"netns\":{},\"mode\":", r.netns)?;
        serde_json::to_writer(&mut *out, &r.mode.map(Mode::label))?;
        self.write_json_counts(out)?;
        write_json_flow(out, &r.flow, &r.interval.flow, r.snd_wnd)?;
        out.write_all(b",\"ending\":")?;
        serde_json::to_writer(&mut *out, &r.ending.map(Ending::name))?;
        let sk_err = r.ending.map(|_| u64::from(r.sk_err));
        write!(out, ",\"sk_err\":{}", Null(sk_err))?;
        out.write_all(b",\"reset_reason\":")?;
        match self.reason {
            // Escaped as any string, written without building one.
            Some(reason) => serde_json::to_writer(&mut *out, &format_args!("{reason}"))?,
            None => out.write_all(b"null")?,
        }
        out.write_all(self.w.json.as_bytes())?;
        writeln!(out, "}}")
    }

    /// The JSON keys of the record's times and its totals and interval counts.
    fn write_json_counts(&self, out: &mut impl Write) -> io::Result<()> {
        let r = self.r;
        let wall = |ns: Option<u64>| Null(ns.map(|ns| self.wall(ns) as u64));
        write!(
            out,
            ",\"opened_ns\":{},\"handshake_ns\":{},\"accept_wait_ns\":{},\"lifetime_ns\":{},\
             \"bytes_sent\":{},\
             \"bytes_received\":{},\"segments_retransmitted\":{},\"srtt_us\":{},\
             \"rtt_min_us\":{},\"interval_start_ns\":{},\"interval_bytes_sent\":{},\
             \"interval_bytes_received\":{},\"interval_segments_retransmitted\":{}",
            wall(r.opened_ns),
            Null(r.handshake_ns),
            Null(r.accept_wait_ns),
            Null(r.lifetime_ns),
            Null(r.bytes_sent),
            r.bytes_received,
            r.retransmits,
            r.srtt_us,
            r.rtt_min_us,
            wall(r.interval.start_ns),
            Null(r.interval.bytes_sent),
            r.interval.bytes_received,
            r.interval.retransmits,
        )
    }

    /// Writes the record as one line of the columns of [`Printer::header`].
    fn write_columns(&self, out: &mut impl Write) -> io::Result<()> {
        let r = self.r;
        write_clock(out, self.wall(r.time_ns) as u128)?;
        if r.pid == 0 {
            write!(out, "{:>7} {:<15} ", "-", "-")?;
        } else {
            let comm = event::Printable(event::comm_bytes(&r.comm));
            write!(out, "{:>7} {:<15} ", r.pid, comm)?;
        }
        write_endpoint(out, r.local, r.local_port)?;
        write_endpoint(out, r.remote, r.remote_port)?;
        let rtt = |us: u32| Took((us > 0).then(|| u64::from(us) * 1_000));
        writeln!(
            out,
            "{:<7} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9} {:>9} {:<11} {:<32} {}",
            r.mode.map_or("-", Mode::label),
            Took(r.handshake_ns),
            Took(r.lifetime_ns),
            OrDash(r.bytes_sent),
            r.bytes_received,
            r.retransmits,
            rtt(r.srtt_us),
            rtt(r.rtt_min_us),
            Limited(&r.flow),
            EndingCell(r.ending, self.reason),
            self.w.column
        )
    }
}

/// The JSON keys of a record's sending (its whole life's `flow`, the interval's `interval`),
/// the peer's window, and retransmissions by kind.
fn write_json_flow(
    out: &mut impl Write,
    f: &crate::stream::Flow,
    i: &crate::stream::Flow,
    snd_wnd: Option<u32>,
) -> io::Result<()> {
    write!(
        out,
        ",\"busy_us\":{},\"rwnd_limited_us\":{},\"sndbuf_limited_us\":{},\
         \"spurious_retransmits\":{},\"interval_busy_us\":{},\
         \"interval_rwnd_limited_us\":{},\"interval_sndbuf_limited_us\":{},\
         \"interval_spurious_retransmits\":{},\"snd_wnd\":{}",
        f.busy_us,
        f.rwnd_limited_us,
        f.sndbuf_limited_us,
        f.spurious_retransmits,
        i.busy_us,
        i.rwnd_limited_us,
        i.sndbuf_limited_us,
        i.spurious_retransmits,
        Null(snd_wnd.map(u64::from)),
    )?;
    for (key, kinds) in [
        ("retransmits_by_kind", &f.retransmits),
        ("interval_retransmits_by_kind", &i.retransmits),
    ] {
        write!(out, ",\"{key}\":{{")?;
        for (k, name) in retransmit::NAMES.iter().enumerate() {
            let comma = if k > 0 { "," } else { "" };
            write!(out, "{comma}\"{name}\":{}", kinds[k])?;
        }
        out.write_all(b"}")?;
    }
    Ok(())
}

/// A JSON number, or `null`.
struct Null(Option<u64>);

impl std::fmt::Display for Null {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("null"),
        }
    }
}

/// A number in a column, or `-`.
struct OrDash(Option<u64>);

impl std::fmt::Display for OrDash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => std::fmt::Display::fmt(&v, f),
            None => f.pad("-"),
        }
    }
}

/// A duration in a column, in the largest unit that keeps three digits (`1250us`, `3500ms`,
/// `75s`), or `-`.
struct Took(Option<u64>);

impl std::fmt::Display for Took {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.pad("-"),
            Some(ns) if ns < 10_000_000 => pad(f, format_args!("{}us", ns / 1_000)),
            Some(ns) if ns < 10_000_000_000 => pad(f, format_args!("{}ms", ns / 1_000_000)),
            Some(ns) => pad(f, format_args!("{}s", ns / 1_000_000_000)),
        }
    }
}

/// What held a connection's sending back most, as a share of its time busy sending: `rwnd`
/// (the receiver's window) or `sndbuf` (the send buffer), from 1%; `-` otherwise.
struct Limited<'a>(&'a crate::stream::Flow);

impl std::fmt::Display for Limited<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flow = self.0;
        let share = |us: u64| (us * 100).checked_div(flow.busy_us).unwrap_or(0);
        let (rwnd, sndbuf) = (share(flow.rwnd_limited_us), share(flow.sndbuf_limited_us));
        match (rwnd, sndbuf) {
            (0, 0) => f.pad("-"),
            (r, b) if r >= b => pad(f, format_args!("rwnd {r}%")),
            (_, b) => pad(f, format_args!("sndbuf {b}%")),
        }
    }
}

/// How a connection ended, with the reason of the reset the kernel sent as it closed
/// (`reset_sent(tcp_abort_on_close)`); `(open)` for an update.
struct EndingCell<'a>(Option<Ending>, Option<EnumName<'a>>);

impl std::fmt::Display for EndingCell<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0, self.1) {
            (None, _) => f.pad("(open)"),
            (Some(e), Some(reason)) => pad(f, format_args!("{}({reason})", e.name())),
            (Some(e), None) => f.pad(e.name()),
        }
    }
}

/// Writes `args` with the width and alignment `f` asks for, as formatting them into a
/// `String` and padding that would, without allocating: through a buffer on the stack, or
/// as they are when they do not fit it (then they are wider than any column anyway).
fn pad(f: &mut std::fmt::Formatter<'_>, args: std::fmt::Arguments<'_>) -> std::fmt::Result {
    /// Wider than every column of `watch`.
    const CELL: usize = 64;
    struct Cell {
        buf: [u8; CELL],
        len: usize,
    }
    impl std::fmt::Write for Cell {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let end = self.len + s.len();
            self.buf
                .get_mut(self.len..end)
                .ok_or(std::fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }
    let mut cell = Cell {
        buf: [0; CELL],
        len: 0,
    };
    if std::fmt::Write::write_fmt(&mut cell, args).is_err() {
        return f.write_fmt(args);
    }
    // Whole `str` pieces only were copied in, so the bytes are UTF-8.
    match std::str::from_utf8(&cell.buf[..cell.len]) {
        Ok(text) => f.pad(text),
        Err(_) => f.write_fmt(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::stream::record::Kind;
    use crate::stream::{Flow, Interval, Mode};
    use clap::Parser;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use tracer_common::{state, AF_INET, AF_INET6};

    /// A printer of `tracer watch` with `flags`, writing into a `Vec`, its clock at UTC
    /// midnight of day 0 (kernel time = wall time), knowing reset reasons 0-2 only.
    fn printer(flags: &[&str]) -> Printer<Vec<u8>> {
        let cli = Cli::try_parse_from([&["tracer", "watch"], flags].concat()).unwrap();
        let Command::Watch(args) = cli.command else {
            panic!("not watch")
        };
        let reasons = ["not_specified", "no_socket", "tcp_abort_on_close"].map(String::from);
        let mut p = Printer::new(&args, None, reasons.to_vec(), Vec::new());
        p.realtime_offset_ns = 0;
        p
    }

    /// The close record of an active connection from 10.0.0.1:40000 to 10.0.0.2:5432 by pid
    /// 4242 (`psql`), in cgroup 7, that the peer reset after 3.5 s: the record at
    /// 01:02:03.000456789 (kernel time), every figure a distinct number.
    fn close_record() -> Record {
        let mut flow = Flow {
            busy_us: 900_000,
            rwnd_limited_us: 300_000,
            sndbuf_limited_us: 100_000,
            spurious_retransmits: 2,
            ..Flow::default()
        };
        flow.retransmits[usize::from(retransmit::TIMEOUT)] = 3;
        flow.retransmits[usize::from(retransmit::FAST)] = 1;
        let mut comm = [0; 16];
        comm[..4].copy_from_slice(b"psql");
        Record {
            kind: Kind::Close,
            time_ns: 3_723_000_456_789,
            cookie: 77,
            pid: 4242,
            comm,
            family: AF_INET,
            local: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            local_port: 40_000,
            remote: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            remote_port: 5432,
            netns: 4_026_531_840,
            cgroup: 7,
            port: 5432,
            mode: Some(Mode::Active),
            opened_ns: Some(3_719_000_000_000),
            handshake_ns: Some(1_250_000),
            accept_wait_ns: None,
            lifetime_ns: Some(3_500_000_000),
            bytes_sent: Some(123_456),
            bytes_received: 654_321,
            retransmits: 4,
            srtt_us: 1_800,
            rtt_min_us: 950,
            flow,
            snd_wnd: None,
            interval: Interval {
                start_ns: Some(3_720_000_000_000),
                bytes_sent: Some(23_456),
                bytes_received: 54_321,
                retransmits: 1,
                flow: Flow {
                    busy_us: 400_000,
                    ..Flow::default()
                },
            },
            ending: Some(Ending::ResetReceived),
            sk_err: 104,
            reset_reason: Some(2),
        }
    }

    /// An update record of a passive IPv6 connection to [::1]:8443 whose opening the probe
    /// did not see (sockets older than it), owner unknown, no cgroup.
    fn update_record() -> Record {
        Record {
            kind: Kind::Update,
            time_ns: 86_399_999_999_999,
            cookie: 5,
            pid: 0,
            comm: [0; 16],
            family: AF_INET6,
            local: IpAddr::V6(Ipv6Addr::LOCALHOST),
            local_port: 8443,
            remote: IpAddr::V6(Ipv6Addr::LOCALHOST),
            remote_port: 51_000,
            netns: 1,
            cgroup: 0,
            port: 8443,
            mode: None,
            opened_ns: None,
            handshake_ns: None,
            accept_wait_ns: Some(20_000),
            lifetime_ns: Some(75_000_000_000),
            bytes_sent: None,
            bytes_received: 10,
            retransmits: 0,
            srtt_us: 0,
            rtt_min_us: 0,
            flow: Flow::default(),
            snd_wnd: Some(0),
            interval: Interval::default(),
            ending: None,
            sk_err: 0,
            reset_reason: None,
        }
    }

    fn record_line(flags: &[&str], r: &Record, cgroup: u64) -> String {
        let mut p = printer(flags);
        let w = Rendered::new(cgroup, None);
        p.print_record(r, &w).unwrap();
        String::from_utf8(p.out).unwrap()
    }

    #[test]
    fn a_close_record_prints_as_this_json_line() {
        let line = record_line(&["--connections", "--json"], &close_record(), 7);
        assert_eq!(
            line,
            "{\"time_ns\":3723000456789,\"record\":\"close\",\"cookie\":77,\"pid\":4242,\
            \"comm\":\"psql\",\"family\":\"ipv4\",\"saddr\":\"10.0.0.1\",\"sport\":40000,\
            \"daddr\":\"10.0.0.2\",\"dport\":5432,\"netns\":4026531840,\"mode\":\"active\",\
            \"opened_ns\":3719000000000,\"handshake_ns\":1250000,\"accept_wait_ns\":null,\
            \"lifetime_ns\":3500000000,\"bytes_sent\":123456,\"bytes_received\":654321,\
            \"segments_retransmitted\":4,\"srtt_us\":1800,\"rtt_min_us\":950,\
            \"interval_start_ns\":3720000000000,\"interval_bytes_sent\":23456,\
            \"interval_bytes_received\":54321,\"interval_segments_retransmitted\":1,\
            \"busy_us\":900000,\"rwnd_limited_us\":300000,\"sndbuf_limited_us\":100000,\
            \"spurious_retransmits\":2,\"interval_busy_us\":400000,\
            \"interval_rwnd_limited_us\":0,\"interval_sndbuf_limited_us\":0,\
            \"interval_spurious_retransmits\":0,\"snd_wnd\":null,\
            \"retransmits_by_kind\":{\"timeout\":3,\"fast\":1,\"tail_loss_probe\":0,\
            \"syn\":0,\"synack\":0,\"other\":0},\
            \"interval_retransmits_by_kind\":{\"timeout\":0,\"fast\":0,\
            \"tail_loss_probe\":0,\"syn\":0,\"synack\":0,\"other\":0},\
            \"ending\":\"reset_received\",\"sk_err\":104,\
            \"reset_reason\":\"tcp_abort_on_close\",\"cgroup_id\":7,\"cgroup\":null,\
            \"container_id\":null,\"container_runtime\":null,\"pod_uid\":null,\
            \"pod_namespace\":null,\"pod_name\":null,\"pod_qos\":null,\"unit\":null}\n"
        );
    }

    #[test]
    fn a_close_record_prints_as_this_column_line() {
        let line = record_line(&["--connections"], &close_record(), 7);
        assert_eq!(
            line,
            concat!(
                "01:02:03.000456    ",
                "4242 ",
                "psql            ",
                "10.0.0.1:40000                 ",
                "10.0.0.2:5432                  ",
                "active     ",
                "1250us    ",
                "3500ms     ",
                "123456     ",
                "654321       ",
                "4    ",
                "1800us     ",
                "950us ",
                "rwnd ",
                "33%    ",
                "reset_received(tcp_abort_on_close) ",
                "cgroup:7\n"
            )
        );
    }

    #[test]
    fn an_update_record_without_owner_or_opening_prints_as_these_lines() {
        let json = record_line(&["--connections", "--json"], &update_record(), 0);
        assert_eq!(
            json,
            "{\"time_ns\":86399999999999,\"record\":\"update\",\"cookie\":5,\"pid\":0,\
            \"comm\":\"\",\"family\":\"ipv6\",\"saddr\":\"::1\",\"sport\":8443,\
            \"daddr\":\"::1\",\"dport\":51000,\"netns\":1,\"mode\":null,\"opened_ns\":null,\
            \"handshake_ns\":null,\"accept_wait_ns\":20000,\"lifetime_ns\":75000000000,\
            \"bytes_sent\":null,\"bytes_received\":10,\"segments_retransmitted\":0,\
            \"srtt_us\":0,\"rtt_min_us\":0,\"interval_start_ns\":null,\
            \"interval_bytes_sent\":null,\"interval_bytes_received\":0,\
            \"interval_segments_retransmitted\":0,\"busy_us\":0,\"rwnd_limited_us\":0,\
            \"sndbuf_limited_us\":0,\"spurious_retransmits\":0,\"interval_busy_us\":0,\
            \"interval_rwnd_limited_us\":0,\"interval_sndbuf_limited_us\":0,\
            \"interval_spurious_retransmits\":0,\"snd_wnd\":0,\
            \"retransmits_by_kind\":{\"timeout\":0,\"fast\":0,\"tail_loss_probe\":0,\
            \"syn\":0,\"synack\":0,\"other\":0},\
            \"interval_retransmits_by_kind\":{\"timeout\":0,\"fast\":0,\
            \"tail_loss_probe\":0,\"syn\":0,\"synack\":0,\"other\":0},\"ending\":null,\
            \"sk_err\":null,\"reset_reason\":null,\"cgroup_id\":0,\"cgroup\":null,\
            \"container_id\":null,\"container_runtime\":null,\"pod_uid\":null,\
            \"pod_namespace\":null,\"pod_name\":null,\"pod_qos\":null,\"unit\":null}\n"
        );
        let columns = record_line(&["--connections"], &update_record(), 0);
        assert_eq!(
            columns,
            concat!(
                "23:59:59.999999       ",
                "- ",
                "-               ",
                "[::1]:8443                     ",
                "[::1]:51000                    ",
                "-               ",
                "-       ",
                "75s          ",
                "-         ",
                "10       ",
                "0         ",
                "-         ",
                "- ",
                "-           ",
                "(open)                           ",
                "-\n"
            )
        );
    }

    #[test]
    fn a_reset_reason_this_kernel_does_not_name_prints_as_its_number() {
        let r = Record {
            reset_reason: Some(9),
            ..close_record()
        };
        let json = record_line(&["--connections", "--json"], &r, 7);
        assert!(json.contains(",\"reset_reason\":\"reason_9\","), "{json}");
        let columns = record_line(&["--connections"], &r, 7);
        assert!(columns.contains(" reset_received(reason_9) "), "{columns}");
    }

    #[test]
    fn cells_are_padded_without_allocating_and_whole_when_wider_than_the_buffer() {
        let long = "x".repeat(70);
        let names = [String::new(), long.clone()];
        let cell = |reason| format!("[{:<32}]", EndingCell(Some(Ending::ResetSent), reason));
        assert_eq!(
            cell(None),
            format!("[{:<32}]", "reset_sent"),
            "no reason: the ending alone"
        );
        assert_eq!(
            cell(Some(EnumName::new(&names, 1))),
            format!("[reset_sent({long})]")
        );
        let sndbuf = crate::stream::Flow {
            busy_us: 1_000,
            rwnd_limited_us: 100,
            sndbuf_limited_us: 500,
            ..Default::default()
        };
        assert_eq!(format!("[{:<11}]", Limited(&sndbuf)), "[sndbuf 50% ]");
        assert_eq!(
            format!("[{:>9}]", Took(Some(10_000_000_000))),
            "[      10s]"
        );
    }

    #[test]
    fn a_transition_prints_as_these_lines() {
        let (skaddr, time_ns) = (0xffff_8881_0000_1000, 3_723_000_456_789);
        let mut t = crate::stream::event::tests::transition(
            skaddr,
            time_ns,
            state::SYN_SENT,
            state::ESTABLISHED,
        );
        (t.pid, t.sport, t.dport, t.family) = (4242, 40_000, 5432, AF_INET);
        t.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        t.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        t.comm = [0; 16];
        t.comm[..4].copy_from_slice(b"psql");
        let w = Rendered::new(0, None);
        let line = |flags: &[&str]| {
            let mut p = printer(flags);
            p.print(&t, Some(1_250_000), &w).unwrap();
            String::from_utf8(p.out).unwrap()
        };
        assert_eq!(
            line(&["--json"]),
            "{\"time_ns\":3723000456789,\"skaddr\":\"0xffff888100001000\",\"pid\":4242,\
            \"comm\":\"psql\",\"family\":\"ipv4\",\"saddr\":\"10.0.0.1\",\"sport\":40000,\
            \"daddr\":\"10.0.0.2\",\"dport\":5432,\"old\":\"syn_sent\",\
            \"new\":\"established\",\"dwell_ns\":1250000,\"cgroup_id\":0,\"cgroup\":null,\
            \"container_id\":null,\"container_runtime\":null,\"pod_uid\":null,\
            \"pod_namespace\":null,\"pod_name\":null,\"pod_qos\":null,\"unit\":null}\n"
        );
        assert_eq!(
            line(&[]),
            concat!(
                "01:02:03.000456    ",
                "4242 ",
                "psql            ",
                "10.0.0.1:40000                 ",
                "10.0.0.2:5432                  ",
                "syn_sent ",
                "-> ",
                "established        ",
                "1250us ",
                "-\n"
            )
        );
    }
}
