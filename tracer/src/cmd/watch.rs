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
use crate::stream::event::{self, Transition};
use crate::stream::live::{census_period, LiveCensus, Tracker};
use crate::stream::probe::{Probe, ProbeConfig, ProbeCounters};
use crate::stream::record::Record;
use crate::stream::ring::EventRings;
use crate::stream::{self, Closed, Ending, Observation};
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
    let mut printer = Printer::new(args, resolver, probe.reset_reasons.clone());
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

/// Filters transitions and writes them out.
struct Printer {
    out: io::BufWriter<io::Stdout>,
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

impl Printer {
    fn new(args: &WatchArgs, resolver: Option<Resolver>, reset_reasons: Vec<String>) -> Printer {
        let mut states = [false; 256];
        for &s in &args.states {
            states[s as usize] = true;
        }
        Printer {
            out: io::BufWriter::with_capacity(1 << 16, io::stdout()),
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
        if self.received % 256 == 0 {
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
        let out = &mut self.out;
        let wall = |ns: u64| (ns as i128 + self.realtime_offset_ns).max(0);
        let mode = r.mode.map(crate::metrics::event::mode_name);
        let reason = r
            .reset_reason
            .map(|r| match self.reset_reasons.get(usize::from(r)) {
                Some(name) if !name.is_empty() => name.clone(),
                _ => format!("reason_{r}"),
            });
        let opt = |v: Option<u64>| v.map_or("null".to_owned(), |v| v.to_string());
        if self.json {
            write!(
                out,
                "{{\"time_ns\":{},\"record\":\"{}\",\"cookie\":{},\"pid\":{},\"comm\":",
                wall(r.time_ns),
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
            serde_json::to_writer(&mut *out, &mode)?;
            write!(
                out,
                ",\"opened_ns\":{},\"handshake_ns\":{},\"accept_wait_ns\":{},\"lifetime_ns\":{},\
                 \"bytes_sent\":{},\
                 \"bytes_received\":{},\"segments_retransmitted\":{},\"srtt_us\":{},\
                 \"rtt_min_us\":{},\"interval_start_ns\":{},\"interval_bytes_sent\":{},\
                 \"interval_bytes_received\":{},\"interval_segments_retransmitted\":{}",
                opt(r.opened_ns.map(|o| wall(o) as u64)),
                opt(r.handshake_ns),
                opt(r.accept_wait_ns),
                opt(r.lifetime_ns),
                opt(r.bytes_sent),
                r.bytes_received,
                r.retransmits,
                r.srtt_us,
                r.rtt_min_us,
                opt(r.interval.start_ns.map(|o| wall(o) as u64)),
                opt(r.interval.bytes_sent),
                r.interval.bytes_received,
                r.interval.retransmits,
            )?;
            let (f, i) = (&r.flow, &r.interval.flow);
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
                opt(r.snd_wnd.map(u64::from)),
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
            out.write_all(b",\"ending\":")?;
            serde_json::to_writer(&mut *out, &r.ending.map(Ending::name))?;
            let sk_err = r.ending.map(|_| r.sk_err);
            write!(out, ",\"sk_err\":{}", opt(sk_err.map(u64::from)))?;
            out.write_all(b",\"reset_reason\":")?;
            serde_json::to_writer(&mut *out, &reason)?;
            out.write_all(w.json.as_bytes())?;
            return writeln!(out, "}}");
        }
        write_clock(out, wall(r.time_ns) as u128)?;
        if r.pid == 0 {
            write!(out, "{:>7} {:<15} ", "-", "-")?;
        } else {
            let comm = event::Printable(event::comm_bytes(&r.comm));
            write!(out, "{:>7} {:<15} ", r.pid, comm)?;
        }
        write_endpoint(out, r.local, r.local_port)?;
        write_endpoint(out, r.remote, r.remote_port)?;
        let duration = |ns: Option<u64>| match ns {
            None => "-".to_owned(),
            Some(ns) if ns < 10_000_000 => format!("{}us", ns / 1_000),
            Some(ns) if ns < 10_000_000_000 => format!("{}ms", ns / 1_000_000),
            Some(ns) => format!("{}s", ns / 1_000_000_000),
        };
        let rtt = |us: u32| match us {
            0 => "-".to_owned(),
            us => duration(Some(u64::from(us) * 1_000)),
        };
        // An update says it is one where a close says how it ended.
        let ending = match (r.ending, &reason) {
            (None, _) => "(open)".to_owned(),
            (Some(e), Some(reason)) => format!("{}({reason})", e.name()),
            (Some(e), None) => e.name().to_owned(),
        };
        writeln!(
            out,
            "{:<7} {:>9} {:>9} {:>10} {:>10} {:>7} {:>9} {:>9} {:<11} {:<32} {}",
            mode.unwrap_or("-"),
            duration(r.handshake_ns),
            duration(r.lifetime_ns),
            r.bytes_sent.map_or("-".to_owned(), |b| b.to_string()),
            r.bytes_received,
            r.retransmits,
            rtt(r.srtt_us),
            rtt(r.rtt_min_us),
            limited(&r.flow),
            ending,
            w.column
        )
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

/// What held a connection's sending back most, as a share of its time busy sending: `rwnd`
/// (the receiver's window) or `sndbuf` (the send buffer), from 1%; `-` otherwise.
fn limited(f: &crate::stream::Flow) -> String {
    let share = |us: u64| (us * 100).checked_div(f.busy_us).unwrap_or(0);
    let (rwnd, sndbuf) = (share(f.rwnd_limited_us), share(f.sndbuf_limited_us));
    match (rwnd, sndbuf) {
        (0, 0) => "-".to_owned(),
        (r, b) if r >= b => format!("rwnd {r}%"),
        (_, b) => format!("sndbuf {b}%"),
    }
}
