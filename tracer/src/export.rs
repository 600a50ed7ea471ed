//! OTLP export of connection records: every close and update record (`stream::record`) as an
//! OpenTelemetry log record, sent over OTLP/HTTP with protobuf (`POST /v1/logs`) to a
//! collector, from a thread of its own.
//!
//! The event and scrape paths never wait for it: a record is put in a bounded queue
//! ([`Exporter::send`], a lock and a push) or, when the queue is full, dropped and counted
//! (`tracer_records_dropped_total{reason="queue_full"}`). The queue's bound counts every record
//! not yet delivered, the batch being sent included, so what a collector that is away for a
//! while loses is exactly what came past the bound. A batch is retried with backoff while the
//! collector cannot take it (no answer, 429, 502, 503, 504) and dropped (`rejected`) when it
//! refuses it for good (another 4xx or 5xx).
//!
//! Settings follow the OpenTelemetry exporter conventions: `--otlp-endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL, `/v1/logs` appended) or
//! `OTEL_EXPORTER_OTLP_LOGS_ENDPOINT` (the whole URL); `..._HEADERS`, `..._COMPRESSION`
//! (`gzip` or `none`), `..._CERTIFICATE`, `..._CLIENT_CERTIFICATE`, `..._CLIENT_KEY`,
//! `..._TIMEOUT` (milliseconds), each also in its `_LOGS_` form, which wins.
//!
//! Attributes: the semantic conventions' names where they exist (`network.*`, `process.pid`,
//! `k8s.*`, `container.id`; `host.name` on the resource), the rest under `tracer.`, numbers
//! as integers.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use parking_lot::{Condvar, Mutex};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use prost::Message;
use tracer_common::retransmit;

use crate::stream::event;
use crate::stream::record::{Kind, Record};
use crate::workload::{Resolver, Workload};

/// Records sent in one request at most.
const BATCH: usize = 512;
/// How long a record waits for others to fill its batch.
const LINGER: Duration = Duration::from_millis(500);
/// Backoff between tries of one batch: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// Where and how to send; see the module's notes for where each setting comes from.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The whole URL records are posted to.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub gzip: bool,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Each request's limit.
    pub timeout: Duration,
    /// Records not yet delivered, at most (`--otlp-queue-size`).
    pub queue: usize,
}

impl OtlpConfig {
    /// The settings from `--otlp-endpoint` (None: not given) and the environment (`env`
    /// looks a variable up); None when neither names an endpoint (no export).
    pub fn from(
        flag: Option<&str>,
        queue: usize,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<OtlpConfig>> {
        // The logs-specific variable first, as the specification has it.
        let var = |name: &str| {
            let specific = format!("OTEL_EXPORTER_OTLP_LOGS_{name}");
            env(&specific)
                .map(|v| (specific, v))
                .or_else(|| {
                    let general = format!("OTEL_EXPORTER_OTLP_{name}");
                    env(&general).map(|v| (general, v))
                })
                .filter(|(_, v)| !v.trim().is_empty())
        };
        let url = match (flag, env("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")) {
            (Some(base), _) => logs_url("--otlp-endpoint", base)?,
            (None, Some(url)) if !url.trim().is_empty() => {
                check_url("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", url.trim())?;
                url.trim().to_owned()
            }
            _ => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(base) if !base.trim().is_empty() => {
                    logs_url("OTEL_EXPORTER_OTLP_ENDPOINT", &base)?
                }
                _ => return Ok(None),
            },
        };
        let headers = match var("HEADERS") {
            Some((name, v)) => parse_headers(&name, &v)?,
            None => Vec::new(),
        };
        let gzip = match var("COMPRESSION") {
            None => false,
            Some((_, v)) if v.trim() == "gzip" => true,
            Some((_, v)) if v.trim() == "none" => false,
            Some((name, v)) => bail!("{name}={v:?} is not a compression: use gzip or none"),
        };
        let timeout = match var("TIMEOUT") {
            None => Duration::from_secs(10),
            Some((name, v)) => match v.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => bail!("{name}={v:?} is not a timeout: give milliseconds, e.g. 10000"),
            },
        };
        let path = |name: &str| var(name).map(|(_, v)| PathBuf::from(v.trim()));
        let (cert_file, key_file) = (path("CLIENT_CERTIFICATE"), path("CLIENT_KEY"));
        if cert_file.is_some() != key_file.is_some() {
            bail!(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go \
                 together: set both or neither"
            );
        }
        Ok(Some(OtlpConfig {
            url,
            headers,
            gzip,
            ca_file: path("CERTIFICATE"),
            cert_file,
            key_file,
            timeout,
            queue,
        }))
    }
}

/// `base` with the logs path (`/v1/logs`) appended, as the specification says for the
/// general endpoint.
fn logs_url(what: &str, base: &str) -> Result<String> {
    let base = base.trim();
    check_url(what, base)?;
    Ok(format!("{}/v1/logs", base.trim_end_matches('/')))
}

fn check_url(what: &str, url: &str) -> Result<()> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{what} {url:?} is not an http:// or https:// URL, e.g. http://collector:4318");
    }
    Ok(())
}

/// `key1=value1,key2=value2`, values percent-encoded (W3C baggage format, as the
/// specification has it).
fn parse_headers(name: &str, text: &str) -> Result<Vec<(String, String)>> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| anyhow!("{name}: {pair:?} is not key=value"))?;
            Ok((k.trim().to_owned(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|&b| (b as char).to_digit(16));
        if bytes[i] == b'%' {
            if let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The export's own metrics, every series there from the first scrape.
#[derive(Clone)]
struct ExportMetrics {
    exported: IntCounter,
    dropped: IntCounterVec,
    queued: IntGauge,
    requests: IntCounterVec,
}

/// Why records were dropped: the queue was full, the collector refused them, or the agent
/// stopped with them undelivered.
const DROP_REASONS: [&str; 3] = ["queue_full", "rejected", "shutdown"];
const REQUEST_RESULTS: [&str; 3] = ["ok", "retried", "rejected"];

impl ExportMetrics {
    fn new(registry: &Registry) -> Result<ExportMetrics> {
        let exported = IntCounter::new(
            "tracer_records_exported_total",
            "Connection records (close and update) the OTLP collector accepted.",
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "tracer_records_dropped_total",
                "Connection records not delivered to the OTLP collector, by reason: queue_full \
                 (the queue of --otlp-queue-size records was full), rejected (the collector \
                 refused them for good), shutdown (undelivered when the agent stopped).",
            ),
            &["reason"],
        )?;
        let queued = IntGauge::new(
            "tracer_records_queued",
            "Connection records waiting for the OTLP collector, the batch being sent included.",
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "tracer_otlp_requests_total",
                "Export requests to the OTLP collector, by result: ok, retried (no answer, or \
                 429, 502, 503, 504: tried again after a backoff), rejected.",
            ),
            &["result"],
        )?;
        for r in DROP_REASONS {
            dropped.with_label_values(&[r]);
        }
        for r in REQUEST_RESULTS {
            requests.with_label_values(&[r]);
        }
        registry.register(Box::new(exported.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        Ok(ExportMetrics {
            exported,
            dropped,
            queued,
            requests,
        })
    }
}

/// Records waiting, and how many are not yet delivered (these and the batch being sent).
struct Queue {
    state: Mutex<Waiting>,
    ready: Condvar,
    bound: usize,
    stop: AtomicBool,
}

#[derive(Default)]
struct Waiting {
    records: VecDeque<Record>,
    undelivered: usize,
}

/// The export: a queue and the thread that empties it.
pub struct Exporter {
    queue: Arc<Queue>,
    metrics: ExportMetrics,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    /// Registers the export's metrics and starts its thread. `resolver` names records'
    /// containers and pods (None: not on this host).
    pub fn start(
        config: OtlpConfig,
        registry: &Registry,
        resolver: Option<Resolver>,
    ) -> Result<Exporter> {
        let tls = crate::cmd::sockets::client_tls(
            config
                .ca_file
                .as_deref()
                .map(|p| ("OTEL_EXPORTER_OTLP_CERTIFICATE", p)),
            config
                .cert_file
                .as_deref()
                .zip(config.key_file.as_deref())
                .map(|(c, k)| {
                    (
                        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", c),
                        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", k),
                    )
                }),
        )?;
        let client: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .tls_config(tls)
            .build()
            .into();
        let metrics = ExportMetrics::new(registry)?;
        let queue = Arc::new(Queue {
            state: Mutex::new(Waiting::default()),
            ready: Condvar::new(),
            bound: config.queue,
            stop: AtomicBool::new(false),
        });
        let sender = Sender {
            config,
            client,
            resource: resource(),
            resolver,
            metrics: metrics.clone(),
        };
        let thread = {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("otlp".into())
                .spawn(move || sender.run(&queue))
                .context("starting the OTLP export thread")?
        };
        Ok(Exporter {
            queue,
            metrics,
            thread: Some(thread),
        })
    }

    /// Queues `record`, or drops and counts it when the queue is full. Never waits.
    pub fn send(&self, record: Record) {
        let mut w = self.queue.state.lock();
        if w.undelivered >= self.queue.bound {
            drop(w);
            self.metrics
                .dropped
                .with_label_values(&["queue_full"])
                .inc();
            return;
        }
        w.undelivered += 1;
        w.records.push_back(record);
        let wake = w.records.len() >= BATCH;
        self.metrics.queued.set(w.undelivered as i64);
        drop(w);
        if wake {
            self.queue.ready.notify_one();
        }
    }

    /// Sends what is queued, for at most `grace`, and stops; what is left is counted as
    /// dropped at shutdown.
    pub fn stop(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.queue.state.lock().undelivered > 0 {
            self.queue.ready.notify_one();
            std::thread::sleep(Duration::from_millis(20));
        }
        self.queue.stop.store(true, Ordering::Relaxed);
        self.queue.ready.notify_one();
        let left = std::mem::take(&mut self.queue.state.lock().undelivered);
        self.metrics
            .dropped
            .with_label_values(&["shutdown"])
            .inc_by(left as u64);
        if left > 0 {
            eprintln!("tracer: {left} connection records were not delivered to the OTLP collector");
        }
        // The thread may be inside a request: not waited for beyond the grace.
        drop(self.thread.take());
    }
}

/// The export thread's side.
struct Sender {
    config: OtlpConfig,
    client: ureq::Agent,
    resource: Resource,
    resolver: Option<Resolver>,
    metrics: ExportMetrics,
}

impl Sender {
    fn run(mut self, queue: &Queue) {
        let mut said = None::<String>;
        loop {
            let batch = {
                let mut w = queue.state.lock();
                if w.records.len() < BATCH && !queue.stop.load(Ordering::Relaxed) {
                    let _ = queue.ready.wait_for(&mut w, LINGER);
                }
                if queue.stop.load(Ordering::Relaxed) {
                    return;
                }
                let n = w.records.len().min(BATCH);
                w.records.drain(..n).collect::<Vec<_>>()
            };
            if batch.is_empty() {
                continue;
            }
            let body = self.encode(&batch);
            let mut backoff = BACKOFF.0;
            let delivered = loop {
                match self.post(&body) {
                    Ok(()) => {
                        self.metrics.requests.with_label_values(&["ok"]).inc();
                        break true;
                    }
                    Err(Failure::Retry(why)) => {
                        self.metrics.requests.with_label_values(&["retried"]).inc();
                        if said.as_deref() != Some(why.as_str()) {
                            eprintln!(
                                "tracer: OTLP collector at {} not taking records ({why}); retrying",
                                self.config.url
                            );
                            said = Some(why);
                        }
                    }
                    Err(Failure::Rejected(why)) => {
                        self.metrics.requests.with_label_values(&["rejected"]).inc();
                        eprintln!(
                            "tracer: OTLP collector at {} refused {} records ({why}); dropped",
                            self.config.url,
                            batch.len()
                        );
                        break false;
                    }
                }
                if queue.stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF.1);
            };
            if delivered {
                said = None;
                self.metrics.exported.inc_by(batch.len() as u64);
            } else {
                self.metrics
                    .dropped
                    .with_label_values(&["rejected"])
                    .inc_by(batch.len() as u64);
            }
            let mut w = queue.state.lock();
            w.undelivered = w.undelivered.saturating_sub(batch.len());
            self.metrics.queued.set(w.undelivered as i64);
        }
    }

    /// One export request: the records as log records of one resource and scope.
    fn encode(&mut self, batch: &[Record]) -> Vec<u8> {
        let realtime_offset_ns = realtime_offset_ns();
        let observed = (crate::stream::ring::monotonic_ns() as i128 + realtime_offset_ns) as u64;
        let resolver = &mut self.resolver;
        let records = batch.iter().map(|r| {
            let w = resolver.as_mut().and_then(|res| res.resolve(r.cgroup));
            log_record(r, w.as_deref(), realtime_offset_ns, observed)
        });
        let bytes = request(&self.resource, records);
        if !self.config.gzip {
            return bytes;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        // Writing to a Vec cannot fail.
        let _ = gz.write_all(&bytes);
        gz.finish().unwrap_or_default()
    }

    fn post(&self, body: &[u8]) -> Result<(), Failure> {
        let mut request = self
            .client
            .post(&self.config.url)
            .header("Content-Type", "application/x-protobuf");
        if self.config.gzip {
            request = request.header("Content-Encoding", "gzip");
        }
        for (k, v) in &self.config.headers {
            request = request.header(k, v);
        }
        match request.send(body) {
            Ok(response) => match response.status().as_u16() {
                200..=299 => Ok(()),
                code @ (429 | 502 | 503 | 504) => Err(Failure::Retry(format!("HTTP {code}"))),
                code => Err(Failure::Rejected(format!("HTTP {code}"))),
            },
            Err(e) => Err(Failure::Retry(e.to_string())),
        }
    }
}

enum Failure {
    Retry(String),
    Rejected(String),
}

/// One `ExportLogsServiceRequest` of `records`, from one resource and scope, as protobuf.
///
/// Framed here rather than built as one nested message for prost to encode: prost measures a
/// nested message's length again at every level it is nested in, which made the outer levels
/// walk each record three more times; this way each record is measured and written once
/// (the bytes are the same, as the tests check by decoding them).
fn request(resource: &Resource, records: impl Iterator<Item = LogRecord>) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let nested = |tag: u32, len: usize, out: &mut Vec<u8>| {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
    };
    // ScopeLogs: scope (1), log_records (2, repeated).
    let mut scope_logs = Vec::new();
    let scope = InstrumentationScope {
        name: "tracer".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    nested(1, scope.encoded_len(), &mut scope_logs);
    scope.encode_raw(&mut scope_logs);
    for r in records {
        encode_key(2, WireType::LengthDelimited, &mut scope_logs);
        // Writing to a Vec cannot fail.
        let _ = r.encode_length_delimited(&mut scope_logs);
    }
    // ResourceLogs: resource (1), scope_logs (2).
    let mut resource_logs = Vec::with_capacity(scope_logs.len() + 128);
    nested(1, resource.encoded_len(), &mut resource_logs);
    resource.encode_raw(&mut resource_logs);
    nested(2, scope_logs.len(), &mut resource_logs);
    resource_logs.extend_from_slice(&scope_logs);
    // ExportLogsServiceRequest: resource_logs (1).
    let mut out = Vec::with_capacity(resource_logs.len() + 16);
    nested(1, resource_logs.len(), &mut out);
    out.extend_from_slice(&resource_logs);
    out
}

/// The resource every record comes from: this host.
fn resource() -> Resource {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    Resource {
        attributes: vec![
            string("host.name", host),
            string("service.name", "tracer".into()),
        ],
        ..Default::default()
    }
}

/// One record as an OpenTelemetry log record.
fn log_record(
    r: &Record,
    w: Option<&Workload>,
    realtime_offset_ns: i128,
    observed: u64,
) -> LogRecord {
    let wall = |ns: u64| (ns as i128 + realtime_offset_ns).max(0) as u64;
    let mut a = vec![
        string("network.transport", "tcp".into()),
        string(
            "network.type",
            if r.family == tracer_common::AF_INET6 {
                "ipv6"
            } else {
                "ipv4"
            }
            .into(),
        ),
        string("network.local.address", r.local.to_string()),
        int("network.local.port", u64::from(r.local_port)),
        string("network.peer.address", r.remote.to_string()),
        int("network.peer.port", u64::from(r.remote_port)),
        string("tracer.record", r.kind.name().into()),
        int("tracer.cookie", r.cookie),
        int("tracer.netns", u64::from(r.netns)),
        int("tracer.service_port", u64::from(r.port)),
        int("tracer.bytes_received", r.bytes_received),
        int("tracer.segments_retransmitted", r.retransmits),
        int("tracer.interval.bytes_received", r.interval.bytes_received),
        int(
            "tracer.interval.segments_retransmitted",
            r.interval.retransmits,
        ),
        int("tracer.busy_us", r.flow.busy_us),
        int("tracer.rwnd_limited_us", r.flow.rwnd_limited_us),
        int("tracer.sndbuf_limited_us", r.flow.sndbuf_limited_us),
        int("tracer.spurious_retransmits", r.flow.spurious_retransmits),
        int("tracer.interval.busy_us", r.interval.flow.busy_us),
        int(
            "tracer.interval.rwnd_limited_us",
            r.interval.flow.rwnd_limited_us,
        ),
        int(
            "tracer.interval.sndbuf_limited_us",
            r.interval.flow.sndbuf_limited_us,
        ),
        int(
            "tracer.interval.spurious_retransmits",
            r.interval.flow.spurious_retransmits,
        ),
    ];
    if r.pid != 0 {
        a.push(int("process.pid", u64::from(r.pid)));
        a.push(string(
            "tracer.comm",
            event::comm_text(&r.comm).into_owned(),
        ));
    }
    let mut opt = |key: &str, v: Option<u64>| {
        if let Some(v) = v {
            a.push(int(key, v));
        }
    };
    // Retransmissions by kind: those that happened (a kind absent is 0).
    for (k, name) in retransmit::NAMES.iter().enumerate() {
        let (total, interval) = (r.flow.retransmits[k], r.interval.flow.retransmits[k]);
        opt(
            &format!("tracer.retransmits.{name}"),
            (total > 0).then_some(total),
        );
        opt(
            &format!("tracer.interval.retransmits.{name}"),
            (interval > 0).then_some(interval),
        );
    }
    opt("tracer.bytes_sent", r.bytes_sent);
    opt("tracer.snd_wnd", r.snd_wnd.map(u64::from));
    opt("tracer.interval.bytes_sent", r.interval.bytes_sent);
    opt(
        "tracer.interval.start_unix_nano",
        r.interval.start_ns.map(wall),
    );
    opt("tracer.opened_unix_nano", r.opened_ns.map(wall));
    opt("tracer.handshake_ns", r.handshake_ns);
    opt("tracer.accept_wait_ns", r.accept_wait_ns);
    opt("tracer.lifetime_ns", r.lifetime_ns);
    opt(
        "tracer.srtt_us",
        (r.srtt_us > 0).then_some(u64::from(r.srtt_us)),
    );
    opt(
        "tracer.rtt_min_us",
        (r.rtt_min_us > 0).then_some(u64::from(r.rtt_min_us)),
    );
    if let Some(mode) = r.mode {
        a.push(string("tracer.mode", mode.label().into()));
    }
    if let Some(ending) = r.ending {
        a.push(string("tracer.ending", ending.name().into()));
        a.push(int("tracer.sk_err", u64::from(r.sk_err)));
    }
    if let Some(reason) = r.reset_reason {
        a.push(int("tracer.reset_reason", u64::from(reason)));
    }
    if let Some(w) = w {
        if let Some(c) = &w.container {
            a.push(string("container.id", c.id.clone()));
        }
        if let Some(p) = &w.pod {
            a.push(string("k8s.pod.uid", p.uid.clone()));
            if let Some(ns) = &p.namespace {
                a.push(string("k8s.namespace.name", ns.clone()));
            }
            if let Some(name) = &p.name {
                a.push(string("k8s.pod.name", name.clone()));
            }
        }
    }
    let body = format!(
        "TCP connection {} {}:{} -> {}:{}",
        if r.kind == Kind::Close {
            "closed"
        } else {
            "open"
        },
        r.local,
        r.local_port,
        r.remote,
        r.remote_port
    );
    LogRecord {
        time_unix_nano: wall(r.time_ns),
        observed_time_unix_nano: observed,
        severity_number: SeverityNumber::Info as i32,
        severity_text: "INFO".into(),
        event_name: format!("tracer.connection.{}", r.kind.name()),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(body)),
        }),
        attributes: a,
        ..Default::default()
    }
}

fn string(key: &str, v: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v)),
        }),
        ..Default::default()
    }
}

fn int(key: &str, v: u64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v.min(i64::MAX as u64) as i64)),
        }),
        ..Default::default()
    }
}

/// Wall clock minus CLOCK_MONOTONIC, nanoseconds.
fn realtime_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec pointer and a clock id the kernel always has.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn a_request_framed_by_hand_decodes_as_the_nested_message() {
        let record = |n: u64| LogRecord {
            time_unix_nano: n,
            attributes: vec![
                int("tracer.cookie", n),
                string("network.transport", "tcp".into()),
            ],
            ..Default::default()
        };
        let bytes = request(&resource(), (1..=3).map(record));
        let decoded = ExportLogsServiceRequest::decode(bytes.as_slice()).unwrap();
        let expected = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(resource()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "tracer".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    log_records: (1..=3).map(record).collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        assert_eq!(decoded, expected);
        assert_eq!(bytes, expected.encode_to_vec());
    }

    #[test]
    fn the_endpoint_comes_from_the_flag_then_the_logs_variable_then_the_general_one() {
        let none = OtlpConfig::from(None, 10, env(&[])).unwrap();
        assert!(none.is_none());
        let flag = OtlpConfig::from(Some("http://c:4318/"), 10, env(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(flag.url, "http://c:4318/v1/logs");
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4318"),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://logs:9/custom"),
        ];
        let logs = OtlpConfig::from(None, 10, env(&vars)).unwrap().unwrap();
        assert_eq!(logs.url, "http://logs:9/custom");
        let general = OtlpConfig::from(None, 10, env(&vars[..1]))
            .unwrap()
            .unwrap();
        assert_eq!(general.url, "http://general:4318/v1/logs");
    }

    #[test]
    fn headers_compression_and_timeout_are_read_logs_variables_first() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            (
                "OTEL_EXPORTER_OTLP_LOGS_HEADERS",
                "api-key=s%20cret, x = y ",
            ),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ];
        let c = OtlpConfig::from(None, 10, env(&vars)).unwrap().unwrap();
        assert_eq!(
            c.headers,
            [
                ("api-key".into(), "s cret".into()),
                ("x".into(), "y".into())
            ]
        );
        assert!(c.gzip);
        assert_eq!(c.timeout, Duration::from_millis(2_500));
    }

    #[test]
    fn bad_settings_are_one_line_errors_naming_the_variable() {
        let bad = |vars: &[(&str, &str)]| {
            OtlpConfig::from(None, 10, env(vars))
                .unwrap_err()
                .to_string()
        };
        let e = bad(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]);
        assert!(
            e.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && e.contains("http://"),
            "{e}"
        );
        let e = bad(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
        ]);
        assert!(e.contains("OTEL_EXPORTER_OTLP_COMPRESSION"), "{e}");
        let e = bad(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem"),
        ]);
        assert!(e.contains("set both"), "{e}");
        let e = bad(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
        ]);
        assert!(e.contains("key=value"), "{e}");
        assert!(!e.contains('\n'));
    }
}
