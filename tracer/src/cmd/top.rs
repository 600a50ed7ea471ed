//! `tracer top`: a live view of what the probe sees, refreshed every `--interval`.
//!
//! Two sources, one screen: its own probe (loaded as `watch` loads it, with a census of
//! every namespace each interval), or a running agent's `/top` (`--agent URL`), which
//! loads nothing. On a terminal it draws a full screen (`top::screen`) until `q`; piped, or
//! with `--once`, it prints one plain table once it has rates to show, and exits.
//!
//! Owns: the loop and the screen thread. The terminal is drawn on a thread of its own,
//! handed snapshots through a queue of two that drops what it cannot take: a slow terminal
//! (a laggy ssh session, a stopped `less`) never holds up the reading of the rings, so it
//! never costs events.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::census::scrape::{CensusConfig, PortNews, Published};
use crate::cli::{Toggle, TopArgs};
use crate::stream::probe::{Probe, ProbeConfig, DRAIN_INTERVAL};
use crate::stream::ring::monotonic_ns;
use crate::top::screen::{self, Action, Scroll};
use crate::top::view::{self, Filter, Frames, View};
use crate::top::{Snapshot, Tally};

/// How long `--once` waits at most, from its first snapshot, for a census to follow the first
/// (an agent's census interval may be longer than `--interval`): then it prints what it has.
/// From the first snapshot, not from the start: loading the probe took 13 s of it in an
/// emulated guest on a busy host, and the table came out empty.
const ONCE_WAIT: Duration = Duration::from_secs(15);

/// Runs `tracer top` until `q`, a signal, or (plain) one table printed.
pub async fn run(args: &TopArgs) -> Result<()> {
    let view = View {
        group: args.group,
        sort: args.sort,
        reverse: args.reverse,
        filter: Filter {
            port: args.port,
            pid: args.pid,
            pod: args.pod.clone(),
        },
    };
    let interactive = !args.once && std::io::stdout().is_terminal();
    let source = match &args.agent.url {
        Some(_) => format!("agent {}", args.agent.base()),
        None => "own probe".to_owned(),
    };
    let mut out = Output::new(interactive, view, source, args.rows as usize);
    if args.agent.url.is_some() {
        crate::privileges::keep_only(&[])?;
        from_agent(args, &mut out)?;
    } else {
        from_probe(args, &mut out).await?;
    }
    out.finish()
}

/// Where snapshots go: the screen thread, or the plain table.
struct Output {
    view: View,
    source: String,
    rows: usize,
    /// Plain: the snapshots so far.
    frames: Frames,
    /// When the first snapshot came.
    started: Option<Instant>,
    screen: Option<ScreenThread>,
    interactive: bool,
    /// Said on stderr once the terminal is given back.
    summary: Option<String>,
}

struct ScreenThread {
    to: SyncSender<Snapshot>,
    quit: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<()>>,
}

impl Output {
    fn new(interactive: bool, view: View, source: String, rows: usize) -> Output {
        Output {
            view,
            source,
            rows,
            frames: Frames::default(),
            started: None,
            screen: None,
            interactive,
            summary: None,
        }
    }

    /// Starts the screen thread (interactive only), once privileges are dropped.
    fn start(&mut self) -> Result<()> {
        if !self.interactive {
            return Ok(());
        }
        let (to, from) = sync_channel::<Snapshot>(2);
        let quit = Arc::new(AtomicBool::new(false));
        let (view, source, q) = (self.view.clone(), self.source.clone(), quit.clone());
        let handle = std::thread::Builder::new()
            .name("screen".into())
            .spawn(move || screen_loop(from, view, source, q))
            .context("starting the screen thread")?;
        self.screen = Some(ScreenThread { to, quit, handle });
        Ok(())
    }

    /// Hands a snapshot on. Returns true when top should stop (the user quit, or the plain
    /// table is printed).
    fn push(&mut self, s: Snapshot) -> bool {
        if let Some(screen) = &self.screen {
            // Full: the screen is behind; it gets the next one (snapshots are running
            // totals, so skipping one loses nothing but a refresh).
            let _ = screen.to.try_send(s);
            return screen.quit.load(Ordering::Relaxed) || screen.handle.is_finished();
        }
        self.frames.push(s);
        let ready = self.frames.previous.is_some() && self.frames.census_base.is_some();
        let started = *self.started.get_or_insert_with(Instant::now);
        if ready || started.elapsed() >= ONCE_WAIT {
            let mut table = view::table(&self.frames, &self.view);
            table.rows.truncate(self.rows);
            print!(
                "{}",
                view::plain(&table, &self.view, &self.source, plain_width())
            );
            return true;
        }
        false
    }

    fn quit_requested(&self) -> bool {
        self.screen
            .as_ref()
            .is_some_and(|s| s.quit.load(Ordering::Relaxed) || s.handle.is_finished())
    }

    /// Stops the screen thread (which gives the terminal back) and reports its error.
    fn finish(mut self) -> Result<()> {
        let mut outcome = Ok(());
        if let Some(screen) = self.screen.take() {
            screen.quit.store(true, Ordering::Relaxed);
            drop(screen.to);
            outcome = screen
                .handle
                .join()
                .map_err(|_| anyhow!("the screen thread failed"))
                .and_then(|r| r);
        }
        if let Some(summary) = &self.summary {
            eprintln!("{summary}");
        }
        outcome
    }
}

/// The plain table's width: the terminal's `COLUMNS` if set, else 120.
fn plain_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|&c: &usize| c >= 40)
        .unwrap_or(120)
}

/// The screen thread: draws each snapshot it is handed and applies keys, until `q` or until
/// told to quit; gives the terminal back as it found it, on every way out.
fn screen_loop(
    from: Receiver<Snapshot>,
    mut view: View,
    source: String,
    quit: Arc<AtomicBool>,
) -> Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyEventKind};
    let mut terminal = ratatui::try_init().context("cannot take over the terminal")?;
    let (mut frames, mut scroll) = (Frames::default(), Scroll::default());
    let mut table = view::table(&frames, &view);
    let outcome = (|| -> Result<()> {
        let mut dirty = true;
        while !quit.load(Ordering::Relaxed) {
            loop {
                match from.try_recv() {
                    Ok(s) => {
                        frames.push(s);
                        dirty = true;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Ok(()),
                }
            }
            if dirty {
                table = view::table(&frames, &view);
                terminal.draw(|f| screen::draw(f, &table, &view, &scroll, &source))?;
                dirty = false;
            }
            if event::poll(Duration::from_millis(50))? {
                match event::read()? {
                    Event::Key(k) if k.kind == KeyEventKind::Press => {
                        match screen::key(&mut view, &mut scroll, k) {
                            Action::Quit => return Ok(()),
                            Action::Redraw => dirty = true,
                            Action::Nothing => {}
                        }
                    }
                    Event::Resize(..) => dirty = true,
                    _ => {}
                }
            }
        }
        Ok(())
    })();
    quit.store(true, Ordering::Relaxed);
    ratatui::try_restore().context("cannot give the terminal back")?;
    outcome
}

/// Its own probe: events into a tally, a census each interval, a snapshot each interval.
async fn from_probe(args: &TopArgs, out: &mut Output) -> Result<()> {
    crate::metrics::pods::check_flags(&args.attribution)?;
    let mut probe = Probe::attach(&ProbeConfig {
        ring_buffer_bytes: args.ring_buffer_size,
        ports: Vec::new(),
        reset_events: false,
        accept_events: false,
        accept_wait: Toggle::Off,
    })?;
    let started_ns = monotonic_ns();
    probe.seed_owners(std::path::Path::new("/proc"))?;
    let mut rings = probe.event_rings()?;
    let storage = Arc::new(probe.socket_storage()?);
    crate::privileges::keep_only(crate::privileges::CENSUS)?;
    let (news_tx, news) = std::sync::mpsc::channel::<PortNews>();
    let (stop_census, stop) = std::sync::mpsc::channel::<()>();
    let config = CensusConfig {
        interval: args.interval,
        thresholds: args.thresholds(),
        started_ns,
        resolver: crate::metrics::pods::resolver(&args.attribution, probe.reads_cgroups()),
        storage,
        top: Arc::new(crate::top::Latest::always()),
    };
    let published = Arc::new(Published::default());
    std::thread::Builder::new()
        .name("census".into())
        .spawn(move || crate::census::scrape::run(config, published, news_tx, stop))
        .context("starting the census thread")?;
    out.start()?;

    let mut tally = Tally::default();
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let follow = |rings: &mut crate::stream::ring::EventRings, tally: &mut Tally| {
        let read = rings.drain_unordered(|ev| {
            crate::stream::observe(ev, |o| tally.observe(ev, &o));
        });
        tally.totals.events += read;
    };
    loop {
        tokio::select! {
            woken = rings.woken() => {
                woken?;
                follow(&mut rings, &mut tally);
            }
            _ = drain.tick() => {
                follow(&mut rings, &mut tally);
                // A census as soon as it is there: the closes it settles are those read by
                // then, so the fewer read after its dump, the fewer counted twice for one
                // refresh (open at the dump, and closed since).
                for part in news.try_iter().filter_map(|n| n.top) {
                    tally.census(part);
                }
                if out.quit_requested() { break; }
            }
            _ = tick.tick() => {
                follow(&mut rings, &mut tally);
                probe.flush_log();
                let counters = probe.counters().context("reading the probe's counters")?;
                tally.probe(&counters, &probe.program_stats()?);
                if out.push(tally.snapshot(monotonic_ns())) { break; }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    drop(stop_census);
    follow(&mut rings, &mut tally);
    let c = probe.counters().context("reading the probe's counters")?;
    drop(rings);
    drop(probe);
    // As `watch` ends: what was read, and what was lost, on stderr (after the screen).
    out.summary = Some(format!(
        "tracer: {} events read, {} lost (ring buffer full), {} missed",
        tally.totals.events, c.lost, c.missed
    ));
    Ok(())
}

/// A running agent: its `/top` each interval.
fn from_agent(args: &TopArgs, out: &mut Output) -> Result<()> {
    let url = format!("{}/top", args.agent.base());
    // SIGINT and SIGTERM end top cleanly (the terminal given back) within 50 ms.
    let signalled = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, signalled.clone())
            .context("installing a signal handler")?;
    }
    let fetch = || -> Result<Snapshot> {
        let body = crate::cmd::sockets::fetch(&url, &args.agent, "/top").map_err(|e| {
            if e.to_string().ends_with("answered HTTP 404") {
                anyhow!(
                    "the agent at {} has no /top: it is older than this tracer; upgrade it",
                    args.agent.base()
                )
            } else {
                e
            }
        })?;
        serde_json::from_str(&body).context("the agent's /top answer is not a top snapshot")
    };
    // 503: the agent starts counting at the first request (or is busy): ask again.
    let busy = |e: &anyhow::Error| e.to_string().ends_with("answered HTTP 503");
    // The first answer decides whether the agent is there at all: one line, before the
    // screen takes the terminal.
    let mut tries = 0;
    let first = loop {
        match fetch() {
            Err(e) if busy(&e) && tries < 5 => {
                tries += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            answer => break answer?,
        }
    };
    out.start()?;
    let mut next = Instant::now() + args.interval;
    if out.push(first) {
        return Ok(());
    }
    loop {
        // Short sleeps, so that `q` ends top at once.
        while Instant::now() < next {
            if out.quit_requested() || signalled.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50).min(next - Instant::now()));
        }
        next += args.interval;
        match fetch() {
            Ok(s) => {
                if out.push(s) {
                    return Ok(());
                }
            }
            // A restart of the agent, a slow or busy answer: the screen keeps its last
            // figures.
            Err(e) if out.screen.is_some() || busy(&e) => log::debug!("top: {e:#}"),
            Err(e) => return Err(e),
        }
    }
}
