//! `tracer run`: the agent. Three threads, each with one job, sharing nothing on the way:
//! - the **event thread** (this one): drains the rings, feeds each event (complete in itself)
//!   to the event metrics, reads the probe's counters once a second; it never waits for a
//!   scrape;
//! - the **census thread** (`scrape`): censuses of every namespace, with each socket's storage
//!   in the probe, joined and published;
//! - the **HTTP thread** (`http`): answers from the registry and the last published census.
//!
//! Owns: start-up, the event loop, and shutdown.

use std::sync::{mpsc, Arc};

use parking_lot::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus::{IntGaugeVec, Opts, Registry};
use tokio::signal::unix::{signal, SignalKind};

use crate::census::scrape::{CensusConfig, PortNews, Published};
use crate::cli::RunArgs;
use crate::export::{Exporter, OtlpConfig};
use crate::http::web_config::WebConfig;
use crate::http::Health;
use crate::metrics::census::CensusCollector;
use crate::metrics::event::EventMetrics;
use crate::metrics::kernel::KernelMetrics;
use crate::metrics::live::LiveMetrics;
use crate::metrics::pods::{PodAttribution, PodLabels};
use crate::metrics::ports::{LabelledPorts, PortLabelCollector, PortLabels, DEFAULT_EPHEMERAL};
use crate::stream::features::Feature;
use crate::stream::live::Tracker;
use crate::stream::probe::{Probe, ProbeConfig, DRAIN_INTERVAL};
use crate::stream::record::Record;
use crate::stream::ring::{monotonic_ns, EventRings};
use crate::stream::Observation;

/// How long the agent, stopping, goes on sending the records it has queued for the collector.
const EXPORT_GRACE: Duration = Duration::from_secs(2);

/// Runs the agent until a signal.
pub async fn run(args: &RunArgs) -> Result<()> {
    let (web, otlp) = check_inputs(args)?;
    raise_open_files_limit();
    let (mut probe, started_ns) = attach(args)?;
    let mut rings = probe.event_rings()?;
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    // Attached and listening: from here on only the census needs privileges. Before any other
    // thread starts, so that none inherits more.
    crate::privileges::keep_only(crate::privileges::CENSUS)?;

    let registry = Registry::new();
    let mut agent = Agent::new(args, &probe, &registry, otlp)?;
    let (news, stop_census) = start_census(args, &probe, started_ns, &agent)?;
    let health = Arc::new(Health::default());
    health.beat();
    agent.events.count_scrapes(health.scrapes.clone());
    let (failed_tx, mut http_failed) = tokio::sync::oneshot::channel();
    crate::http::spawn(
        listener,
        web,
        registry,
        health.clone(),
        agent.published.clone(),
        agent.top.clone(),
        failed_tx,
    )
    .context("starting the HTTP thread")?;
    eprintln!(
        "tracer: attached to inet_sock_set_state; serving http://{}/metrics (Ctrl-C to stop)",
        args.listen
    );

    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut each_second = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            woken = rings.woken() => {
                if let Err(e) = woken {
                    break Err(e);
                }
                agent.follow(&mut rings);
            }
            _ = drain.tick() => {
                agent.follow(&mut rings);
                health.beat();
            }
            _ = each_second.tick() => {
                for n in news.try_iter() {
                    agent.census(n);
                }
                if let Err(e) = agent.each_second(&mut probe) {
                    break Err(e);
                }
            }
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
            Ok(e) = &mut http_failed => break Err(anyhow::Error::from(e).context("HTTP server stopped")),
        }
    };
    // A census under way is not waited for: it only reads, and ends with the process.
    drop(stop_census);
    agent.follow(&mut rings);
    let c = probe.counters()?;
    probe.flush_log();
    drop(rings);
    drop(probe);
    if let Some(e) = agent.exporter.take() {
        e.stop(EXPORT_GRACE);
    }
    outcome?;
    eprintln!(
        "tracer: stopped; {} ring buffer full, {} missed by the kernel, {} rescued",
        c.lost, c.missed, c.rescued,
    );
    Ok(())
}

/// Checks what can be checked before anything is loaded (the web config, the attribution
/// flags, the OTLP settings): a bad one is one line, not a half-started agent.
fn check_inputs(args: &RunArgs) -> Result<(WebConfig, Option<OtlpConfig>)> {
    let web = match &args.web_config {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::default(),
    };
    crate::metrics::pods::check_flags(&args.attribution)?;
    let otlp = OtlpConfig::from(
        args.otlp_endpoint.as_deref(),
        args.otlp_queue_size as usize,
        |name| std::env::var(name).ok(),
    )?;
    if args.max_sockets.is_some() {
        eprintln!(
            "tracer: --max-sockets has no effect any more (each socket's state is kept on the \
             socket, in the kernel): drop it from the command line"
        );
    }
    Ok((web, otlp))
}

/// Loads and attaches the probe, and names the owners of the sockets older than it. Returns
/// the probe and when it was attached (CLOCK_MONOTONIC): sockets already there get "at least
/// since then" as their age, never an invented one.
fn attach(args: &RunArgs) -> Result<(Probe, u64)> {
    let mut probe = Probe::attach(&ProbeConfig {
        ring_buffer_bytes: args.ring_buffer_size,
        ports: Vec::new(),
        reset_events: false,
        accept_events: true,
        accept_wait: args.accept_wait,
    })?;
    let started_ns = monotonic_ns();
    // Their owners, from the processes that hold them, onto each socket's storage.
    let seeded = probe.seed_owners(std::path::Path::new("/proc"))?;
    eprintln!(
        "tracer: named the owner of {} TCP sockets older than the probe ({} could not be reached)",
        seeded.sockets, seeded.failed
    );
    Ok((probe, started_ns))
}

/// Starts the census thread. Returns what it tells the event thread, and the sender whose
/// drop stops it.
fn start_census(
    args: &RunArgs,
    probe: &Probe,
    started_ns: u64,
    agent: &Agent,
) -> Result<(mpsc::Receiver<PortNews>, mpsc::Sender<()>)> {
    let (news_tx, news) = mpsc::channel::<PortNews>();
    let (stop_census, stop) = mpsc::channel::<()>();
    let config = CensusConfig {
        interval: args.census_interval,
        thresholds: args.thresholds(),
        started_ns,
        resolver: crate::metrics::pods::resolver(&args.attribution, probe.reads_cgroups()),
        storage: Arc::new(probe.socket_storage()?),
        top: agent.top.clone(),
    };
    let published = agent.published.clone();
    std::thread::Builder::new()
        .name("census".into())
        .spawn(move || crate::census::scrape::run(config, published, news_tx, stop))
        .context("starting the census thread")?;
    Ok((news, stop_census))
}

/// What the event thread keeps: the metrics it feeds, the open connections it follows, the
/// export, and `/top`'s tally.
struct Agent {
    events: EventMetrics,
    kernel: KernelMetrics,
    live: LiveMetrics,
    tracker: Tracker,
    exporter: Option<Exporter>,
    /// The census thread's last report (read by the HTTP thread and for the table figures).
    published: Arc<Published>,
    labelled: Arc<LabelledPorts>,
    /// `tracer top --agent`'s figures, summed from the same events and censuses (`/top`),
    /// while a client asks for them (`tally` is None otherwise: nothing counted, nothing
    /// kept).
    tally: Option<crate::top::Tally>,
    top: Arc<crate::top::Latest>,
}

impl Agent {
    /// Registers every metric in `registry` and starts the export, if any.
    fn new(
        args: &RunArgs,
        probe: &Probe,
        registry: &Registry,
        otlp: Option<OtlpConfig>,
    ) -> Result<Agent> {
        let ports = PortLabels::new(&args.ports, usize::from(args.max_ports), own_port_range());
        let labelled = ports.shared();
        // Pods get label values from one budget, shared by the event and census metrics; each
        // thread resolves cgroups with its own resolver (a miss walks the cgroup tree, at most
        // once a second, on that thread only).
        let pod_labels = Arc::new(Mutex::new(PodLabels::new(usize::from(args.max_pods))));
        let resolver = || crate::metrics::pods::resolver(&args.attribution, probe.reads_cgroups());
        let pods = PodAttribution::new(resolver(), pod_labels.clone());
        let label_by_pod = args.label_by.contains(&crate::cli::LabelBy::Pod);
        let events = EventMetrics::new(registry, ports, pods, label_by_pod)?;
        let kernel = KernelMetrics::new(
            registry,
            &probe.reset_reasons,
            &probe.drop_reasons,
            PodAttribution::new(resolver(), pod_labels.clone()),
        )?;
        let published = Arc::new(Published::default());
        registry.register(Box::new(CensusCollector::new(
            published.clone(),
            labelled.clone(),
            pod_labels,
        )?))?;
        registry.register(Box::new(PortLabelCollector::new(labelled.clone())?))?;
        register_build_info(registry)?;
        register_features(registry, &probe.features)?;
        Ok(Agent {
            events,
            kernel,
            live: LiveMetrics::new(registry)?,
            tracker: Tracker::new(args.record_interval),
            exporter: otlp
                .map(|c| Exporter::start(c, registry, resolver()))
                .transpose()?,
            published,
            labelled,
            tally: None,
            top: Arc::new(crate::top::Latest::default()),
        })
    }

    /// Feeds what the rings hold into the metrics (see [`follow`]).
    fn follow(&mut self, rings: &mut EventRings) {
        follow(
            rings,
            &mut self.events,
            &mut self.tracker,
            self.tally.as_mut(),
            self.exporter.as_ref(),
        );
    }

    /// What a census tells the event thread: port ranges (and at the first, the ports in
    /// use), the open connections' counters since the last census (and their update records
    /// where their record interval is up), and `/top`'s census figures.
    fn census(&mut self, n: PortNews) {
        let events = &mut self.events;
        events.ports.set_ranges(n.ranges);
        if let Some(seed) = n.seed {
            events.ports.seed(seed);
        }
        let (live, exporter) = (&self.live, self.exporter.as_ref());
        self.tracker.census(&n.live, |u| {
            if u.due {
                live.reports.inc();
                if let Some(e) = exporter.filter(|_| u.sample.storage.pid != own_pid()) {
                    e.send(Record::update(&u));
                }
            }
            events.record(&Observation::Update(u));
        });
        events.flush(0);
        if let (Some(t), Some(part)) = (self.tally.as_mut(), n.top) {
            t.census(part);
        }
    }

    /// Once a second: the probe's counters and log, the followed connections, and `/top`
    /// (counting starts at its first request and stops once nobody asks).
    fn each_second(&mut self, probe: &mut Probe) -> Result<()> {
        self.live.followed.set(self.tracker.len() as i64);
        probe.flush_log();
        let readings = probe.readings().context("reading the probe's counters")?;
        self.kernel.sync(&readings, &self.labelled);
        let now = monotonic_ns();
        match (self.top.wanted(now), self.tally.as_mut()) {
            (true, Some(t)) => {
                t.probe(&readings.counters, &readings.programs);
                self.top.publish(Some(t.snapshot(now)));
            }
            (true, None) => self.tally = Some(crate::top::Tally::default()),
            (false, Some(_)) => {
                self.tally = None;
                self.top.publish(None);
            }
            (false, None) => {}
        }
        Ok(())
    }
}

/// Feeds what the rings hold into the metrics, each event on its own, as it comes: no order
/// across CPUs is needed, and none is waited for.
///
/// A close counts what its connection did since a census last counted it (`tracker`), and
/// its record goes to the OTLP export, if any. `tally` sums the same for `/top`, while it is
/// asked for.
fn follow(
    rings: &mut EventRings,
    metrics: &mut EventMetrics,
    tracker: &mut Tracker,
    mut tally: Option<&mut crate::top::Tally>,
    exporter: Option<&Exporter>,
) {
    let read = rings.drain_unordered(|ev| {
        // Each observation is handled in place, by reference: a close carries a few hundred
        // bytes, and moving it from one owner to the next was a copy per event.
        crate::stream::observe(ev, |mut o| {
            if let Observation::Closed(c) = &mut o {
                tracker.close(ev.cookie, ev.time_ns, c);
                if let Some(e) = exporter.filter(|_| ev.pid != own_pid()) {
                    e.send(Record::close(ev, c));
                }
            }
            if let Some(t) = tally.as_mut() {
                t.observe(ev, &o);
            }
            metrics.record(&o);
        })
    });
    if let Some(t) = tally {
        t.totals.events += read;
    }
    metrics.flush(read);
    crate::cmd::progressed(read);
}

/// This process: its own connections (its endpoint's, and its export's to the collector, which
/// would otherwise feed the export records of itself) are counted in the metrics but not
/// exported.
fn own_pid() -> u32 {
    std::process::id()
}

/// Raises the soft limit on open files to the hard one: each HTTP connection and each
/// namespace a census enters takes a descriptor, and the common soft limit (1,024) is low for a
/// busy node. The HTTP server bounds its own share (`http::MAX_CONNECTIONS`).
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// `ip_local_port_range` of the agent's own namespace (Linux's default when unreadable): the
/// range of namespaces no census has visited yet.
fn own_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| crate::census::parse_port_range(&t))
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// Exports which optional features this kernel allows, and says once what each missing one
/// costs.
fn register_features(registry: &Registry, features: &[Feature]) -> Result<()> {
    let enabled = IntGaugeVec::new(
        Opts::new(
            "tracer_feature_enabled",
            "1 when this kernel lets tracer report the feature, 0 when it cannot (the agent \
             says why when it starts).",
        ),
        &["feature"],
    )?;
    registry.register(Box::new(enabled.clone()))?;
    for f in features {
        enabled
            .with_label_values(&[f.name])
            .set(i64::from(f.enabled));
        if !f.enabled {
            eprintln!("tracer: {} unavailable: {}", f.name, f.missing);
        }
    }
    Ok(())
}

fn register_build_info(registry: &Registry) -> Result<()> {
    let build_info = IntGaugeVec::new(
        Opts::new(
            "tracer_build_info",
            "Always 1; the version of the running tracer.",
        ),
        &["version"],
    )?;
    registry.register(Box::new(build_info.clone()))?;
    build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(())
}
