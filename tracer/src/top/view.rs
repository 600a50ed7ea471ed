//! What `top` shows of two snapshots: rows grouped one way, with rates between the
//! snapshots, filtered and sorted; and the same as plain text (`--once`, a pipe).
//!
//! Rates of what the events count (connections opened and failed, handshakes) are between
//! the last two snapshots; rates of traffic (bytes, retransmissions) are between the last
//! two censuses the snapshots hold (see the module above for why), so they move at the
//! census's pace: each `--interval` on top's own probe, each `--census-interval` of an agent.
//!
//! Pure code: snapshots in, rows and text out.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::stream::event::Printable;
use crate::top::{Entry, Histogram, Snapshot, Traffic};

/// How rows are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Group {
    Process,
    Pod,
    Port,
    Remote,
}

impl Group {
    pub const ALL: [Group; 4] = [Group::Process, Group::Pod, Group::Port, Group::Remote];

    pub fn title(self) -> &'static str {
        match self {
            Group::Process => "PROCESS",
            Group::Pod => "POD",
            Group::Port => "PORT",
            Group::Remote => "REMOTE",
        }
    }

    pub fn next(self) -> Group {
        let i = Group::ALL.iter().position(|&g| g == self).unwrap_or(0);
        Group::ALL[(i + 1) % Group::ALL.len()]
    }
}

/// A column, and what rows can be sorted by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Column {
    Name,
    Opened,
    Failed,
    Open,
    Stuck,
    Retransmits,
    Sent,
    Received,
    HandshakeP50,
    HandshakeP99,
    Rtt,
}

impl Column {
    /// Every column, left to right.
    pub const ALL: [Column; 11] = [
        Column::Name,
        Column::Opened,
        Column::Failed,
        Column::Open,
        Column::Stuck,
        Column::Retransmits,
        Column::Sent,
        Column::Received,
        Column::HandshakeP50,
        Column::HandshakeP99,
        Column::Rtt,
    ];

    /// The heading (the name column's is the grouping's).
    pub fn title(self, group: Group) -> &'static str {
        match self {
            Column::Name => group.title(),
            Column::Opened => "CONN/s",
            Column::Failed => "FAIL/s",
            Column::Open => "OPEN",
            Column::Stuck => "STUCK",
            Column::Retransmits => "RETR/s",
            Column::Sent => "TX/s",
            Column::Received => "RX/s",
            Column::HandshakeP50 => "HS p50",
            Column::HandshakeP99 => "HS p99",
            Column::Rtt => "RTT",
        }
    }

    /// Width of a figure column (the name column takes what is left).
    pub const WIDTH: usize = 7;

    /// Columns dropped first when the screen is narrow, least telling first.
    const DROP_ORDER: [Column; 6] = [
        Column::HandshakeP50,
        Column::Rtt,
        Column::Received,
        Column::Sent,
        Column::Failed,
        Column::Retransmits,
    ];

    /// The column `step` places left or right of this one (wrapping).
    pub fn moved(self, step: isize) -> Column {
        let i = Column::ALL.iter().position(|&c| c == self).unwrap_or(0) as isize;
        let n = Column::ALL.len() as isize;
        Column::ALL[(i + step).rem_euclid(n) as usize]
    }
}

/// Which entries to show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub port: Option<u16>,
    pub pid: Option<u32>,
    /// A pod's name, or `namespace/name`.
    pub pod: Option<String>,
}

impl Filter {
    fn keeps(&self, e: &Entry) -> bool {
        self.port.is_none_or(|p| e.port == p)
            && self.pid.is_none_or(|p| e.pid == p)
            && self.pod.as_deref().is_none_or(|want| {
                !e.pod.is_empty()
                    && (e.pod == want || e.pod.rsplit_once('/').is_some_and(|(_, n)| n == want))
            })
    }

    /// The filter as people typed it, for the header ("" when none).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.port {
            parts.push(format!("port {p}"));
        }
        if let Some(p) = self.pid {
            parts.push(format!("pid {p}"));
        }
        if let Some(p) = &self.pod {
            parts.push(format!("pod {}", Printable(p.as_bytes())));
        }
        parts.join(", ")
    }
}

/// How the rows are shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub group: Group,
    pub sort: Column,
    /// Smallest first (names: Z to A).
    pub reverse: bool,
    pub filter: Filter,
}

impl Default for View {
    fn default() -> Self {
        View {
            group: Group::Process,
            sort: Column::Opened,
            reverse: false,
            filter: Filter::default(),
        }
    }
}

/// The snapshots a screen needs: the newest, the one before it (for event rates), and the
/// newest with an earlier census than the newest's (for traffic rates).
#[derive(Clone, Debug, Default)]
pub struct Frames {
    pub newest: Option<Snapshot>,
    pub previous: Option<Snapshot>,
    pub census_base: Option<Snapshot>,
}

impl Frames {
    pub fn push(&mut self, s: Snapshot) {
        if let Some(old) = self.newest.take() {
            if old.census_ns != s.census_ns && old.census_ns != 0 {
                self.census_base = Some(old.clone());
            }
            self.previous = Some(old);
        }
        self.newest = Some(s);
    }
}

/// One row: a group's figures. Rates per second; None where nothing tells them yet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    /// The group's name, escaped for a terminal.
    pub name: String,
    pub opened: Option<f64>,
    pub failed: Option<f64>,
    pub open: u64,
    pub stuck: u64,
    pub retransmits: Option<f64>,
    pub sent: Option<f64>,
    pub received: Option<f64>,
    /// Of the handshakes between the last two snapshots, microseconds.
    pub handshake_p50_us: Option<f64>,
    pub handshake_p99_us: Option<f64>,
    /// Median smoothed RTT of its open connections, microseconds.
    pub rtt_us: Option<f64>,
}

impl Row {
    /// Nothing to show: no connection open or stuck, nothing happened since the last frames.
    fn is_idle(&self) -> bool {
        let zero = |x: Option<f64>| x.is_none_or(|x| x == 0.0);
        self.open == 0
            && self.stuck == 0
            && [
                self.opened,
                self.failed,
                self.retransmits,
                self.sent,
                self.received,
            ]
            .into_iter()
            .all(zero)
    }

    fn number(&self, c: Column) -> Option<f64> {
        match c {
            Column::Name => None,
            Column::Opened => self.opened,
            Column::Failed => self.failed,
            Column::Open => Some(self.open as f64),
            Column::Stuck => Some(self.stuck as f64),
            Column::Retransmits => self.retransmits,
            Column::Sent => self.sent,
            Column::Received => self.received,
            Column::HandshakeP50 => self.handshake_p50_us,
            Column::HandshakeP99 => self.handshake_p99_us,
            Column::Rtt => self.rtt_us,
        }
    }

    /// The cell of column `c` as text.
    pub fn cell(&self, c: Column) -> String {
        match c {
            Column::Name => self.name.clone(),
            Column::Opened | Column::Failed | Column::Retransmits => rate(self.number(c)),
            Column::Open | Column::Stuck => {
                self.number(c).map_or(String::new(), |n| format!("{n:.0}"))
            }
            Column::Sent | Column::Received => bytes_rate(self.number(c)),
            Column::HandshakeP50 | Column::HandshakeP99 | Column::Rtt => micros(self.number(c)),
        }
    }
}

/// The screen's figures: the host's (every entry, unfiltered) and the rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    pub host: Row,
    /// Events read per second, and lost and missed since the last snapshot and in all.
    pub events: Option<f64>,
    pub lost: (u64, u64),
    pub missed: (u64, u64),
    /// The probe's own cost between the last two snapshots: ns per program run, and the
    /// share of one CPU (None unless `kernel.bpf_stats_enabled` is 1).
    pub probe_ns_per_run: Option<f64>,
    pub probe_cpu: Option<f64>,
    /// Seconds between the census behind the traffic figures and the newest snapshot.
    pub census_age_s: Option<f64>,
    pub keys_overflowed: u64,
    pub rows: Vec<Row>,
}

/// What one group did between two snapshots, and holds in the newest.
#[derive(Clone, Debug, Default)]
struct Growth {
    opened: u64,
    failed: u64,
    handshakes: Histogram,
    /// Closed and open connections' traffic together (see the module above), between the
    /// two censuses.
    traffic: Traffic,
    open: u64,
    stuck: u64,
    rtt_us: Histogram,
}

/// Who and what an entry is about: entries of two snapshots are matched by it.
type EntryKey<'a> = (u32, &'a str, u64, u16, &'a str);

fn key(e: &Entry) -> EntryKey<'_> {
    (e.pid, &e.comm, e.cgroup, e.port, &e.remote)
}

/// A snapshot's entries by key.
type Index<'a> = HashMap<EntryKey<'a>, &'a Entry>;

fn index(s: Option<&Snapshot>) -> Option<Index<'_>> {
    s.map(|s| s.entries.iter().map(|e| (key(e), e)).collect())
}

fn traffic(e: &Entry) -> Traffic {
    let mut t = e.closed;
    t.add(&e.census.traffic);
    t
}

/// The name of an entry's group, escaped for a terminal.
pub fn group_name(group: Group, e: &Entry) -> String {
    match group {
        Group::Process if e.pid == 0 && e.comm.is_empty() => "-".to_owned(),
        Group::Process if e.pid == 0 => Printable(e.comm.as_bytes()).to_string(),
        Group::Process => format!("{} {}", e.pid, Printable(e.comm.as_bytes())),
        Group::Pod if e.pod.is_empty() => "-".to_owned(),
        Group::Pod => Printable(e.pod.as_bytes()).to_string(),
        Group::Port if e.port == 0 => "-".to_owned(),
        Group::Port => e.port.to_string(),
        Group::Remote => Printable(e.remote.as_bytes()).to_string(),
    }
}

/// Each group's growth, entry by entry: what an entry of the newest snapshot gained since the
/// same entry in `previous` (events) and in `base` (traffic), all of it where the entry is new.
/// An entry the source no longer sends (it forgets idle ones) is one that gained nothing.
fn growths(
    newest: &Snapshot,
    before: Option<&Index<'_>>,
    at_base: Option<&Index<'_>>,
    name: impl Fn(&Entry) -> Option<String>,
) -> HashMap<String, Growth> {
    let mut out: HashMap<String, Growth> = HashMap::new();
    for e in &newest.entries {
        let Some(group) = name(e) else { continue };
        let g = out.entry(group).or_default();
        g.open += e.census.open;
        g.stuck += e.census.stuck;
        g.rtt_us.merge(&e.census.rtt_us);
        if let Some(before) = before {
            match before.get(&key(e)) {
                Some(p) => {
                    g.opened += e.events.opened.saturating_sub(p.events.opened);
                    g.failed += e.events.failed.saturating_sub(p.events.failed);
                    g.handshakes
                        .merge(&e.events.handshake_us.since(&p.events.handshake_us));
                }
                None => {
                    g.opened += e.events.opened;
                    g.failed += e.events.failed;
                    g.handshakes.merge(&e.events.handshake_us);
                }
            }
        }
        if let Some(at_base) = at_base {
            let (now, then) = (traffic(e), at_base.get(&key(e)).map(|b| traffic(b)));
            let then = then.unwrap_or_default();
            g.traffic.add(&Traffic {
                sent: now.sent.saturating_sub(then.sent),
                received: now.received.saturating_sub(then.received),
                retransmits: now.retransmits.saturating_sub(then.retransmits),
            });
        }
    }
    out
}

/// A group's row: its growth over `dt` seconds (events) and `census_dt` (traffic).
fn row(name: String, g: &Growth, dt: Option<f64>, census_dt: Option<f64>) -> Row {
    let per_s = |n: u64, dt: Option<f64>| dt.map(|dt| n as f64 / dt);
    Row {
        name,
        opened: per_s(g.opened, dt),
        failed: per_s(g.failed, dt),
        open: g.open,
        stuck: g.stuck,
        retransmits: per_s(g.traffic.retransmits, census_dt),
        sent: per_s(g.traffic.sent, census_dt),
        received: per_s(g.traffic.received, census_dt),
        handshake_p50_us: dt.and_then(|_| g.handshakes.quantile(0.5)),
        handshake_p99_us: dt.and_then(|_| g.handshakes.quantile(0.99)),
        rtt_us: g.rtt_us.quantile(0.5),
    }
}

fn seconds(later: u64, earlier: u64) -> Option<f64> {
    (later > earlier).then(|| (later - earlier) as f64 / 1e9)
}

/// The rows and host figures of `frames` as `view` shows them.
pub fn table(frames: &Frames, view: &View) -> Table {
    let Some(newest) = frames.newest.as_ref() else {
        return Table::default();
    };
    let previous = frames.previous.as_ref();
    let base = frames.census_base.as_ref();
    let dt = previous.and_then(|p| seconds(newest.time_ns, p.time_ns));
    let census_dt = base.and_then(|b| seconds(newest.census_ns, b.census_ns));

    // Each snapshot indexed once, for the rows and for the host's totals.
    let (before, at_base) = (index(previous), index(base));
    let groups = growths(newest, before.as_ref(), at_base.as_ref(), |e| {
        view.filter.keeps(e).then(|| group_name(view.group, e))
    });
    let mut rows: Vec<Row> = groups
        .iter()
        .map(|(name, g)| row(name.clone(), g, dt, census_dt))
        .filter(|r| !r.is_idle())
        .collect();
    sort(&mut rows, view.sort, view.reverse);
    let host = growths(newest, before.as_ref(), at_base.as_ref(), |_| {
        Some(String::new())
    })
    .remove("")
    .unwrap_or_default();
    let host = row("host".to_owned(), &host, dt, census_dt);
    let (t, p) = (
        newest.totals,
        previous.map(|p| p.totals).unwrap_or_default(),
    );
    let runs = t.probe_runs.saturating_sub(p.probe_runs);
    let run_ns = t.probe_ns.saturating_sub(p.probe_ns);
    Table {
        host,
        events: dt.map(|dt| t.events.saturating_sub(p.events) as f64 / dt),
        lost: (t.lost.saturating_sub(p.lost), t.lost),
        missed: (t.missed.saturating_sub(p.missed), t.missed),
        probe_ns_per_run: (runs > 0 && run_ns > 0).then(|| run_ns as f64 / runs as f64),
        probe_cpu: dt.filter(|_| run_ns > 0).map(|dt| run_ns as f64 / 1e9 / dt),
        census_age_s: (newest.census_ns != 0)
            .then(|| newest.time_ns.saturating_sub(newest.census_ns) as f64 / 1e9),
        keys_overflowed: t.keys_overflowed,
        rows,
    }
}

/// Largest first (rows without the figure last), names A to Z among equals; `reverse`
/// turns the order round.
fn sort(rows: &mut [Row], by: Column, reverse: bool) {
    rows.sort_by(|a, b| {
        let order = match by {
            Column::Name => a.name.cmp(&b.name),
            c => {
                let (x, y) = (a.number(c), b.number(c));
                y.partial_cmp(&x)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then_with(|| a.name.cmp(&b.name))
            }
        };
        if reverse {
            order.reverse()
        } else {
            order
        }
    });
}

/// The columns that fit in `width` characters, the name column given at least `min_name`.
pub fn columns_that_fit(width: usize, min_name: usize) -> Vec<Column> {
    let mut shown: Vec<Column> = Column::ALL.to_vec();
    let need = |cols: &[Column]| min_name + (cols.len() - 1) * (Column::WIDTH + 1);
    for drop in Column::DROP_ORDER {
        if need(&shown) <= width {
            break;
        }
        shown.retain(|&c| c != drop);
    }
    shown
}

/// The header's lines: what is shown, the host's figures, and the probe's.
pub fn header_lines(t: &Table, view: &View, source: &str) -> [String; 3] {
    let mut first = format!(
        "tracer top: {source}; by {}, sorted by {}{}",
        view.group.title().to_ascii_lowercase(),
        Column::title(view.sort, view.group),
        if view.reverse { " (reversed)" } else { "" },
    );
    let filter = view.filter.describe();
    if !filter.is_empty() {
        let _ = write!(first, "; only {filter}");
    }
    let h = &t.host;
    let second = format!(
        "host: {} conn/s, {} failed/s, {} open, {} stuck, {} retr/s, tx {}/s, rx {}/s",
        rate(h.opened),
        rate(h.failed),
        h.open,
        h.stuck,
        rate(h.retransmits),
        bytes_rate(h.sent),
        bytes_rate(h.received),
    );
    let mut third = format!(
        "probe: {} events/s, {} lost, {} missed ({}, {} in all)",
        rate(t.events),
        t.lost.0,
        t.missed.0,
        t.lost.1,
        t.missed.1
    );
    match (t.probe_ns_per_run, t.probe_cpu) {
        (Some(ns), Some(cpu)) => {
            let _ = write!(third, "; {ns:.0} ns a run, {:.2}% of a CPU", cpu * 100.0);
        }
        _ => third.push_str("; cost n/a (bpf_stats off)"),
    }
    match t.census_age_s {
        Some(age) => {
            let _ = write!(third, "; census {age:.1}s ago");
        }
        None => third.push_str("; no census yet"),
    }
    if t.keys_overflowed > 0 {
        let _ = write!(
            third,
            "; {} past the key limit, in (more)",
            t.keys_overflowed
        );
    }
    [first, second, third]
}

/// The table as plain text, `width` characters wide at most (for `--once` and pipes).
pub fn plain(t: &Table, view: &View, source: &str, width: usize) -> String {
    let mut out = String::new();
    for line in header_lines(t, view, source) {
        out.push_str(&line);
        out.push('\n');
    }
    out.push('\n');
    let longest = t
        .rows
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0);
    let cols = columns_that_fit(width, longest.clamp(8, 24));
    let name_width = width
        .saturating_sub((cols.len() - 1) * (Column::WIDTH + 1))
        .clamp(8, longest.max(view.group.title().len()).max(8));
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (c, text) in cols.iter().zip(cells) {
            if *c == Column::Name {
                let _ = write!(s, "{:<name_width$}", cut(&text, name_width));
            } else {
                let _ = write!(s, " {:>w$}", cut(&text, Column::WIDTH), w = Column::WIDTH);
            }
        }
        s.trim_end().to_owned()
    };
    out.push_str(&line(
        cols.iter()
            .map(|c| c.title(view.group).to_owned())
            .collect(),
    ));
    out.push('\n');
    for r in &t.rows {
        out.push_str(&line(cols.iter().map(|&c| r.cell(c)).collect()));
        out.push('\n');
    }
    out
}

/// `text` cut to `width` characters, its end marked with `~` when cut.
pub fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut s: String = text.chars().take(width.saturating_sub(1)).collect();
    s.push('~');
    s
}

/// A rate: `-` when unknown, one decimal below 100.
pub fn rate(r: Option<f64>) -> String {
    match r {
        None => "-".to_owned(),
        Some(r) if r < 100.0 => format!("{r:.1}"),
        Some(r) => format!("{r:.0}"),
    }
}

/// Bytes per second with a binary unit.
pub fn bytes_rate(r: Option<f64>) -> String {
    let Some(mut r) = r else {
        return "-".to_owned();
    };
    for unit in ["B", "K", "M", "G"] {
        if r < 1024.0 {
            return if unit == "B" {
                format!("{r:.0}B")
            } else {
                format!("{r:.1}{unit}")
            };
        }
        r /= 1024.0;
    }
    format!("{r:.1}T")
}

/// A duration in microseconds as people read it.
pub fn micros(us: Option<f64>) -> String {
    match us {
        None => "-".to_owned(),
        Some(us) if us < 1_000.0 => format!("{us:.0}us"),
        Some(us) if us < 10_000.0 => format!("{:.1}ms", us / 1e3),
        Some(us) if us < 1_000_000.0 => format!("{:.0}ms", us / 1e3),
        Some(us) => format!("{:.1}s", us / 1e6),
    }
}

/// Synthetic snapshots for the tests of this module and of the screen.
#[cfg(test)]
pub(crate) mod fixture {
    use crate::top::{CensusFigures, Entry, EventFigures, Histogram, Snapshot, Totals, Traffic};

    const S: u64 = 1_000_000_000;

    fn histogram(points: &[(u64, u64)]) -> Histogram {
        let mut h = Histogram::default();
        for &(us, n) in points {
            h.add(us, n);
        }
        h
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        pid: u32,
        comm: &str,
        pod: &str,
        port: u16,
        remote: &str,
        opened: u64,
        failed: u64,
        handshakes: &[(u64, u64)],
        open: u64,
        stuck: u64,
        traffic: (u64, u64, u64),
        rtt: &[(u64, u64)],
    ) -> Entry {
        Entry {
            pid,
            comm: comm.to_owned(),
            cgroup: u64::from(pid),
            pod: pod.to_owned(),
            port,
            remote: remote.to_owned(),
            events: EventFigures {
                opened,
                failed,
                handshake_us: histogram(handshakes),
                closed: opened,
            },
            closed: Traffic::default(),
            census: CensusFigures {
                open,
                stuck,
                traffic: Traffic {
                    sent: traffic.0,
                    received: traffic.1,
                    retransmits: traffic.2,
                },
                rtt_us: histogram(rtt),
            },
        }
    }

    /// Three snapshots a second apart, with censuses at 0.5 s and 1.5 s: a pod's server on
    /// port 80 with two clients, a client of a remote service on 443 that fails half its
    /// connects, a process with terminal escapes in its name on port 22, and a TIME-WAIT
    /// leftover (no owner) that shows nothing.
    pub fn snapshots() -> [Snapshot; 3] {
        let evil = "ev\u{1b}[2Jil";
        let at = |n: u64| {
            let k = n as usize;
            let pick = |v: [u64; 3]| v[k];
            vec![
                entry(
                    100,
                    "nginx",
                    "web/nginx-7f9c",
                    80,
                    "10.0.0.5",
                    pick([0, 10, 30]),
                    0,
                    &[(100, pick([0, 10, 25])), (1_000, pick([0, 0, 5]))],
                    pick([0, 3, 4]),
                    0,
                    (0, pick([0, 1_000, 4_072]), 0),
                    &[(200, 3)],
                ),
                entry(
                    100,
                    "nginx",
                    "web/nginx-7f9c",
                    80,
                    "10.0.0.6",
                    pick([0, 2, 4]),
                    0,
                    &[(150, pick([0, 2, 4]))],
                    1,
                    1,
                    (0, pick([0, 0, 512]), 0),
                    &[(300, 1)],
                ),
                entry(
                    200,
                    "curl",
                    "",
                    443,
                    "93.184.216.34:443",
                    pick([0, 5, 10]),
                    pick([0, 5, 10]),
                    &[(20_000, pick([0, 5, 10]))],
                    2,
                    0,
                    (
                        pick([0, 100, 1_124]),
                        pick([0, 10_000, 1_058_576]),
                        pick([0, 1, 4]),
                    ),
                    &[(20_000, 2)],
                ),
                entry(
                    300,
                    evil,
                    "",
                    22,
                    "::1",
                    pick([0, 1, 1]),
                    0,
                    &[(50, pick([0, 1, 1]))],
                    1,
                    1,
                    (0, 0, 0),
                    &[(40, 1)],
                ),
                entry(0, "", "", 80, "10.0.0.9", 0, 0, &[], 0, 0, (0, 0, 0), &[]),
            ]
        };
        let totals = |n: u64| Totals {
            events: n * 1_000,
            lost: if n == 2 { 3 } else { 0 },
            missed: 0,
            probe_runs: n * 1_000,
            probe_ns: n * 400_000,
            keys_overflowed: 0,
        };
        [0, 1, 2].map(|n| Snapshot {
            time_ns: 10 * S + n * S,
            census_ns: if n == 0 { 0 } else { 10 * S + n * S - S / 2 },
            totals: totals(n),
            entries: at(n),
        })
    }

    pub fn frames() -> super::Frames {
        let mut f = super::Frames::default();
        for s in snapshots() {
            f.push(s);
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(t: &Table) -> Vec<&str> {
        t.rows.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn rates_come_from_the_last_two_snapshots_and_the_last_two_censuses() {
        let t = table(&fixture::frames(), &View::default());
        let nginx = &t.rows[0];
        assert_eq!(nginx.name, "100 nginx");
        // 22 handshakes in the last second, none failed; 5 open, 1 stuck.
        assert_eq!((nginx.opened, nginx.failed), (Some(22.0), Some(0.0)));
        assert_eq!((nginx.open, nginx.stuck), (5, 1));
        // Received: 1,000 at the first census, 4,584 at the second, a second later.
        assert_eq!(nginx.received, Some(3_584.0));
        // 17 of 22 handshakes took 100-150 us, 5 took 1 ms: p50 in the first, p99 the last.
        let (p50, p99) = (
            nginx.handshake_p50_us.unwrap(),
            nginx.handshake_p99_us.unwrap(),
        );
        assert!((90.0..=115.0).contains(&p50), "{p50}");
        assert!((900.0..=1_130.0).contains(&p99), "{p99}");
        let curl = t.rows.iter().find(|r| r.name == "200 curl").unwrap();
        assert_eq!((curl.opened, curl.failed), (Some(5.0), Some(5.0)));
        assert_eq!(curl.retransmits, Some(3.0));
        assert_eq!(curl.received, Some(1_048_576.0));
        assert_eq!(bytes_rate(curl.received), "1.0M");
        // The host: every entry; the probe: 1,000 events and 400 us of programs a second.
        assert_eq!(t.host.opened, Some(27.0));
        assert_eq!(t.events, Some(1_000.0));
        assert_eq!(t.lost, (3, 3));
        assert_eq!(t.probe_ns_per_run, Some(400.0));
        assert_eq!(t.probe_cpu, Some(0.0004));
        assert_eq!(t.census_age_s, Some(0.5));
    }

    #[test]
    fn an_owner_with_nothing_to_show_is_left_out_and_escapes_are_escaped() {
        let t = table(&fixture::frames(), &View::default());
        assert_eq!(names(&t), ["100 nginx", "200 curl", "300 ev\\x1b[2Jil"]);
    }

    #[test]
    fn each_grouping_sums_its_entries() {
        let by = |group| {
            let t = table(
                &fixture::frames(),
                &View {
                    group,
                    ..View::default()
                },
            );
            t.rows
                .iter()
                .map(|r| (r.name.clone(), r.opened.unwrap()))
                .collect::<Vec<_>>()
        };
        let own = |v: &[(&str, f64)]| {
            v.iter()
                .map(|&(n, o)| (n.to_owned(), o))
                .collect::<Vec<_>>()
        };
        assert_eq!(by(Group::Pod), own(&[("web/nginx-7f9c", 22.0), ("-", 5.0)]));
        assert_eq!(
            by(Group::Port),
            own(&[("80", 22.0), ("443", 5.0), ("22", 0.0)])
        );
        assert_eq!(
            by(Group::Remote),
            own(&[
                ("10.0.0.5", 20.0),
                ("93.184.216.34:443", 5.0),
                ("10.0.0.6", 2.0),
                ("::1", 0.0)
            ])
        );
    }

    #[test]
    fn filters_keep_their_entries_only() {
        let only = |filter: Filter| {
            names(&table(
                &fixture::frames(),
                &View {
                    filter,
                    ..View::default()
                },
            ))
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
        };
        assert_eq!(
            only(Filter {
                port: Some(443),
                ..Filter::default()
            }),
            ["200 curl"]
        );
        assert_eq!(
            only(Filter {
                pid: Some(300),
                ..Filter::default()
            }),
            ["300 ev\\x1b[2Jil"]
        );
        assert_eq!(
            only(Filter {
                pod: Some("nginx-7f9c".into()),
                ..Filter::default()
            }),
            ["100 nginx"]
        );
        assert_eq!(
            only(Filter {
                pod: Some("web/nginx-7f9c".into()),
                ..Filter::default()
            }),
            ["100 nginx"]
        );
        assert!(only(Filter {
            pod: Some("nginx".into()),
            ..Filter::default()
        })
        .is_empty());
    }

    #[test]
    fn every_column_sorts_largest_first_and_reverses() {
        let mut out = String::new();
        for c in Column::ALL {
            for reverse in [false, true] {
                let t = table(
                    &fixture::frames(),
                    &View {
                        sort: c,
                        reverse,
                        ..View::default()
                    },
                );
                let _ = writeln!(
                    out,
                    "{c:?}{}: {}",
                    if reverse { " reversed" } else { "" },
                    names(&t).join(" | ")
                );
            }
        }
        insta::assert_snapshot!(out);
    }

    #[test]
    fn the_first_frames_say_what_they_cannot_tell_yet() {
        let mut f = Frames::default();
        let [first, ..] = fixture::snapshots();
        f.push(first);
        let t = table(&f, &View::default());
        assert!(t.events.is_none() && t.census_age_s.is_none());
        // Open connections show at once; rates wait for a second snapshot.
        assert_eq!(t.host.open, 4);
        assert!(t
            .rows
            .iter()
            .all(|r| r.opened.is_none() && r.sent.is_none()));
        assert_eq!(rate(t.host.opened), "-");
    }

    #[test]
    fn plain_tables_fit_their_width() {
        let t = table(&fixture::frames(), &View::default());
        for width in [40, 80, 120, 200] {
            let text = plain(&t, &View::default(), "own probe", width);
            let table_lines: Vec<&str> = text.lines().skip(4).collect();
            if width >= 80 {
                assert!(
                    table_lines.iter().all(|l| l.chars().count() <= width),
                    "{width}:\n{text}"
                );
            }
            insta::assert_snapshot!(format!("plain_{width}"), text);
        }
    }

    #[test]
    fn figures_are_written_as_people_read_them() {
        assert_eq!(micros(Some(850.0)), "850us");
        assert_eq!(micros(Some(1_250.0)), "1.2ms");
        assert_eq!(micros(Some(250_000.0)), "250ms");
        assert_eq!(micros(Some(3_500_000.0)), "3.5s");
        assert_eq!(bytes_rate(Some(512.0)), "512B");
        assert_eq!(bytes_rate(Some(2_048.0)), "2.0K");
        assert_eq!(rate(Some(0.25)), "0.2");
        assert_eq!(rate(Some(1_234.0)), "1234");
        assert_eq!(cut("abcdefgh", 5), "abcd~");
    }
}
