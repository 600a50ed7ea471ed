//! `tracer run`: the agent. Follows every socket from the probe's events, keeps the metrics,
//! and serves them over HTTP until SIGINT or SIGTERM.
//!
//! Owns: the agent's loop (ring buffer → socket table → metrics; kernel counters once a
//! second) and its start-up and shutdown.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cli::RunArgs;
use crate::http::{AppState, CensusRequest, Health};
use crate::metrics::{Metrics, PortLabels};
use crate::probe::{Probe, ProbeConfig, DRAIN_INTERVAL};
use crate::ring::{monotonic_ns, EventRings};
use crate::sockets::SocketTable;
use crate::stuck;

/// Runs the agent until a signal.
pub async fn run(args: &RunArgs) -> Result<()> {
    let mut probe = Probe::attach(&ProbeConfig {
        ring_buffer_bytes: args.ring_buffer_size,
        ports: Vec::new(),
    })?;
    let mut rings = probe.event_rings()?;
    let mut table = SocketTable::new(args.max_sockets as usize);
    let mut metrics = Metrics::new(PortLabels::new(&args.ports, usize::from(args.max_ports)))?;
    let health = Arc::new(Health::default());
    health.beat();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    // Sockets already there now get "at least since start" as their age, never an invented one.
    let started_ns = monotonic_ns();
    // (TIME-WAIT sockets are left out: they are many, short-lived, and have no threshold.)
    // A failed first census only costs those "at least since start" ages: say so, go on.
    let first_census = crate::census::all_namespaces().unwrap_or_else(|e| {
        eprintln!("tracer: first socket census failed ({e:#}); sockets older than the agent will show no age");
        Default::default()
    });
    let mut at_start: HashSet<u64> = first_census
        .namespaces
        .iter()
        .flat_map(|ns| ns.sockets.iter())
        .filter(|r| r.state != tracer_common::state::TIME_WAIT)
        .map(|r| r.cookie)
        .collect();
    drop(first_census);
    let thresholds = args.thresholds();
    let (requests, mut census_requests) = mpsc::channel::<CensusRequest>(4);
    let state = AppState {
        registry: metrics.registry.clone(),
        census_errors: metrics.census_errors.clone(),
        health: health.clone(),
        requests,
    };
    let mut server = tokio::spawn(crate::http::serve(listener, state));
    eprintln!(
        "tracer: attached to inet_sock_set_state; serving http://{}/metrics (Ctrl-C to stop)",
        args.listen
    );

    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sync = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            woken = rings.woken() => {
                woken?;
                follow(&mut rings, false, &mut table, &mut metrics);
            }
            _ = drain.tick() => {
                follow(&mut rings, false, &mut table, &mut metrics);
                health.beat();
            }
            _ = sync.tick() => {
                metrics.sync(&probe.readings()?, table.len(), table.evicted());
            }
            Some(request) = census_requests.recv() => {
                // Read what is pending first, so that the join sees every transition so far
                // (but the last HOLD_BACK_NS, which may still be out of order).
                follow(&mut rings, false, &mut table, &mut metrics);
                let census = &request.census.namespaces;
                let snap = stuck::snapshot(
                    census,
                    |cookie| table.get(cookie),
                    &at_start,
                    &thresholds,
                    monotonic_ns(),
                    started_ns,
                );
                metrics.apply_census(census, request.census.unreachable, &snap);
                let present: HashSet<u64> =
                    census.iter().flat_map(|ns| ns.sockets.iter().map(|r| r.cookie)).collect();
                at_start.retain(|c| present.contains(c));
                let _ = request.reply.send(snap);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            result = &mut server => {
                // The HTTP server only returns on an error.
                let e = result.map_err(anyhow::Error::from).and_then(|r| r.map_err(Into::into));
                return e.context("HTTP server stopped");
            }
        }
    }
    server.abort();
    follow(&mut rings, true, &mut table, &mut metrics);
    let c = probe.counters()?;
    drop(rings);
    drop(probe);
    eprintln!(
        "tracer: stopped; {} ring buffer full, {} missed by the kernel, {} rescued, {} sockets evicted",
        c.lost, c.missed, c.rescued, table.evicted()
    );
    Ok(())
}

/// Feeds what the rings hold through the socket table into the metrics (all of it when
/// `flush`; see [`EventRings::drain`]).
fn follow(rings: &mut EventRings, flush: bool, table: &mut SocketTable, metrics: &mut Metrics) {
    let mut read = 0;
    rings.drain(flush, |t| {
        read += 1;
        table.follow(t, |o| metrics.record(o));
        true
    });
    metrics.flush(read);
}
