//! `tracer sockets`: asks a running agent for its socket listing (`GET /sockets`) and prints it
//! as a table, oldest first, or as the agent's JSON.
//!
//! Trusts nothing it reads: whoever binds the agent's port while the agent is down answers
//! instead (an unprivileged port), and an operator runs this as root. An answer is read up
//! to [`MAX_ANSWER_BYTES`] (more than the agent ever sends), parsed into the typed schema,
//! and every string printed through [`Printable`], so no field can drive the terminal; no
//! answer can make it panic (`tests::any_answer_...` throws arbitrary ones at it).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use base64::Engine as _;

use crate::census::listing::{Listing, WorkloadFields, MAX_BODY_BYTES};
use crate::cli::{AgentArgs, SocketsArgs};
use crate::stream::event::{state_name, Printable};
use crate::workload::{cut_tail, MAX_COLUMN_CHARS};

/// The largest answer read: the agent's bound, and room for its last socket and the rest.
pub const MAX_ANSWER_BYTES: u64 = MAX_BODY_BYTES as u64 + (1 << 20);

/// How long to wait for the agent: it answers from its last census, at once.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches and prints the listing.
pub fn run(args: &SocketsArgs) -> Result<()> {
    let url = query_url(args);
    let body = fetch(&url, &args.agent, "/sockets")?;
    let listing = parse(&body)?;
    if args.json {
        println!("{}", json(&listing));
        return Ok(());
    }
    print!("{}", render(&listing));
    Ok(())
}

/// The agent's answer as a listing, or a one-line error.
pub fn parse(body: &str) -> Result<Listing> {
    serde_json::from_str(body).context("the agent's answer is not a socket listing")
}

/// The listing as JSON for `--json`, written anew from the typed schema (so it is exactly
/// that schema), with the characters JSON allows raw in strings but a terminal acts on (C1
/// controls, bidirectional controls) escaped as `\uNNNN`: still the same JSON value.
pub fn json(listing: &Listing) -> String {
    let text = serde_json::to_string(listing).unwrap_or_default();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() || crate::stream::event::is_bidi_control(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// The `/sockets` URL for these flags.
pub fn query_url(args: &SocketsArgs) -> String {
    let mut url = format!("{}/sockets?limit={}", args.agent.base(), args.limit);
    if !args.states.is_empty() {
        let names: Vec<&str> = args.states.iter().map(|&s| state_name(s)).collect();
        let _ = write!(url, "&state={}", names.join(","));
    }
    if let Some(p) = args.port {
        let _ = write!(url, "&port={p}");
    }
    if let Some(d) = args.older_than {
        let _ = write!(url, "&older_than={}ms", d.as_millis());
    }
    for (key, value) in [
        ("pod", &args.pod),
        ("namespace", &args.namespace),
        ("container", &args.container),
    ] {
        if let Some(v) = value {
            let _ = write!(url, "&{key}={}", percent_encode(v));
        }
    }
    url
}

/// `value` for a query string: unreserved characters as they are, every other byte `%XX`.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// One column's worth of who owns a socket: `namespace/pod` (and the container's first 12
/// characters), the container alone, the systemd unit, the cgroup path, or `-`.
fn workload_column(w: &WorkloadFields) -> String {
    cut_tail(&workload_text(w), MAX_COLUMN_CHARS).into_owned()
}

fn workload_text(w: &WorkloadFields) -> String {
    // Characters, not bytes: the agent's answer is not trusted to hold ASCII ids.
    let container = w
        .container_id
        .as_deref()
        .map(|id| id.chars().take(12).collect::<String>());
    let pod = match (&w.pod_namespace, &w.pod_name, &w.pod_uid) {
        (Some(ns), Some(name), _) => Some(format!("{ns}/{name}")),
        (_, _, Some(uid)) => Some(format!("pod:{uid}")),
        _ => None,
    };
    match (pod, container, &w.unit, &w.cgroup) {
        (Some(p), Some(c), _, _) => format!("{p}/{c}"),
        (Some(p), None, _, _) => p,
        (None, Some(c), _, _) => {
            format!(
                "{}:{c}",
                w.container_runtime.as_deref().unwrap_or("container")
            )
        }
        (None, None, Some(unit), _) => unit.clone(),
        (None, None, None, Some(path)) => path.clone(),
        (None, None, None, None) if w.cgroup_id != 0 => format!("cgroup:{}", w.cgroup_id),
        _ => "-".to_owned(),
    }
}

/// GETs `url` from the agent `args` names (`path`, for errors), and reads its answer.
pub fn fetch(url: &str, args: &AgentArgs, path: &str) -> Result<String> {
    let agent = args.base();
    // The agent is usually on loopback: never through a proxy from the environment.
    let client: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(TIMEOUT))
        .tls_config(tls_config(args)?)
        .build()
        .into();
    let mut request = client.get(url);
    if let Some(user) = &args.user {
        let password = std::env::var("TRACER_PASSWORD").map_err(|_| {
            anyhow!("--user {user}: set the password in the environment variable TRACER_PASSWORD")
        })?;
        let credential =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request = request.header("Authorization", format!("Basic {credential}"));
    }
    match request.call() {
        Ok(mut response) => response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => anyhow!(
                    "the answer of {agent} is over {} MiB, more than an agent sends: is it tracer?",
                    MAX_ANSWER_BYTES >> 20
                ),
                e => anyhow!("reading the agent's answer: {e}"),
            }),
        Err(ureq::Error::StatusCode(401)) => Err(anyhow!(
            "the agent at {agent} wants a user and password: give --user and TRACER_PASSWORD"
        )),
        Err(ureq::Error::StatusCode(403)) => Err(anyhow!(
            "the agent at {agent} shows {path} only on loopback or to an authenticated client: \
             give --user (and TRACER_PASSWORD) or --cert-file/--key-file"
        )),
        Err(ureq::Error::StatusCode(code)) => {
            Err(anyhow!("the agent at {agent} answered HTTP {code}"))
        }
        Err(e @ (ureq::Error::Protocol(_) | ureq::Error::LargeResponseHeader(..))) => Err(
            anyhow!("what answers at {agent} does not speak HTTP as tracer does ({e}): is it tracer?"),
        ),
        Err(e) => Err(anyhow!(
            "no agent answers at {agent} ({e}): start one with `sudo tracer run`, or name it with --agent"
        )),
    }
}

/// TLS settings for an `https://` agent: its CA and our client certificate, when given.
fn tls_config(args: &AgentArgs) -> Result<ureq::tls::TlsConfig> {
    let pair = args.cert_file.as_deref().zip(args.key_file.as_deref());
    client_tls(
        args.ca_file.as_deref().map(|p| ("--ca-file", p)),
        pair.map(|(c, k)| (("--cert-file", c), ("--key-file", k))),
    )
}

/// A PEM file, and the flag or variable that named it (for errors).
pub type NamedFile<'a> = (&'a str, &'a std::path::Path);

/// TLS settings of a client: a CA to trust, and a certificate and key to show.
pub fn client_tls(
    ca: Option<NamedFile<'_>>,
    identity: Option<(NamedFile<'_>, NamedFile<'_>)>,
) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let read = |(flag, path): (&str, &std::path::Path)| {
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    let mut tls = TlsConfig::builder();
    if let Some(ca @ (flag, path)) = ca {
        let pem = read(ca)?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<Certificate<'static>>, _>>()
            .map_err(|e| anyhow!("{flag} {}: {e}", path.display()))?;
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    if let Some((cert, key)) = identity {
        let chain = Certificate::from_pem(&read(cert)?)
            .map_err(|e| anyhow!("{} {}: {e}", cert.0, cert.1.display()))?;
        let private = PrivateKey::from_pem(&read(key)?)
            .map_err(|e| anyhow!("{} {}: {e}", key.0, key.1.display()))?;
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&[chain], private)));
    }
    Ok(tls.build())
}

/// The table people read.
pub fn render(listing: &Listing) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>10} {:<12} {:>7} {:<15} {:>11} {:<28} {:<28} {:<40} FLAG",
        "AGE", "STATE", "PID", "COMM", "NETNS", "LOCAL", "REMOTE", "WORKLOAD"
    );
    for s in &listing.sockets {
        let age = match s.age_seconds {
            Some(a) if s.age_source == "synack_timer" => format!("~{}", human(a)),
            Some(a) if s.age_is_lower_bound => format!(">={}", human(a)),
            Some(a) => human(a),
            None => "?".to_owned(),
        };
        let pid = match s.pid {
            0 => "-".to_owned(),
            p => p.to_string(),
        };
        // Every string is whatever the agent (or whoever answers in its place) sent, and
        // the command name whatever the process set: escaped, so it cannot drive the terminal.
        let comm = if s.comm.is_empty() { "-" } else { &s.comm };
        let flag = match &s.reason {
            Some(r) => format!("stuck: {}", Printable(r.as_bytes())),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{:>10} {:<12} {:>7} {:<15} {:>11} {:<28} {:<28} {:<40} {}",
            age,
            Printable(s.state.as_bytes()),
            pid,
            Printable(comm.as_bytes()),
            s.netns,
            endpoint(&s.local_addr, s.local_port),
            endpoint(&s.remote_addr, s.remote_port),
            Printable(workload_column(&s.workload).as_bytes()),
            flag
        );
    }
    let shown = listing.sockets.len();
    if listing.total > shown {
        let why = if listing.cut_at_bytes {
            format!("the answer reached its {} MiB bound", MAX_BODY_BYTES >> 20)
        } else {
            "raise --limit".to_owned()
        };
        let _ = writeln!(
            out,
            "({shown} of {} shown; {why}, or narrow with --state/--port)",
            listing.total
        );
    }
    if let Some(d) = listing.busiest_destinations.first() {
        let _ = writeln!(
            out,
            "busiest destination: {} from {} uses {} of {} ephemeral ports ({:.1}%) in netns {}",
            endpoint(&d.remote_addr, d.remote_port),
            Printable(d.local_addr.as_bytes()),
            d.ephemeral_ports_used,
            d.ephemeral_port_range,
            d.utilization * 100.0,
            d.netns
        );
    }
    let _ = writeln!(out, "(census taken {:.1}s ago)", listing.census_age_seconds);
    out
}

/// `addr:port`, `[v6]:port`, the address escaped.
fn endpoint(addr: &str, port: u16) -> String {
    let a = Printable(addr.as_bytes());
    if addr.contains(':') {
        format!("[{a}]:{port}")
    } else {
        format!("{a}:{port}")
    }
}

/// `3.2s`, `4m05s`, `2h03m`.
fn human(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{secs:.1}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_marks_lower_bounds_unknowns_and_stuck_sockets() {
        let socket = |state: &str,
                      age: Option<f64>,
                      source: &str,
                      pid,
                      comm: &str,
                      remote: &str,
                      port,
                      reason: Option<&str>| {
            crate::census::listing::ListedSocket {
                state: state.into(),
                age_seconds: age,
                age_is_lower_bound: matches!(source, "agent_start" | "census" | "synack_timer"),
                age_source: source.into(),
                local_addr: "127.0.0.1".into(),
                local_port: 80,
                remote_addr: remote.into(),
                remote_port: port,
                service_port: 80,
                pid,
                comm: comm.into(),
                netns: 4026531840,
                workload: Default::default(),
                stuck: reason.is_some(),
                reason: reason.map(Into::into),
            }
        };
        let listing = Listing {
            census_age_seconds: 1.25,
            census_timestamp_seconds: 1.7e9,
            total: 4,
            sockets: vec![
                socket(
                    "close_wait",
                    Some(65.0),
                    "census",
                    0,
                    "",
                    "::1",
                    5,
                    Some("the peer closed"),
                ),
                socket("syn_recv", None, "unknown", 7, "srv", "127.0.0.1", 6, None),
                socket(
                    "syn_recv",
                    Some(2.5),
                    "synack_timer",
                    0,
                    "",
                    "127.0.0.1",
                    7,
                    None,
                ),
            ],
            cut_at_bytes: false,
            busiest_destinations: vec![],
        };
        let text = render(&listing);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].contains(">=1m05s") && lines[1].contains("stuck: the peer closed"),
            "{text}"
        );
        assert!(
            lines[1].contains("[::1]:5") && lines[1].contains(" - "),
            "{text}"
        );
        assert!(
            lines[2].trim_start().starts_with('?') && lines[2].contains("srv"),
            "{text}"
        );
        assert!(lines[3].trim_start().starts_with("~2.5s"), "{text}");
        assert!(lines[4].contains("3 of 4 shown"), "{text}");
        assert!(lines[5].contains("census taken 1.2s ago"), "{text}");
    }

    /// True when `text` holds nothing a terminal acts on but newlines.
    fn inert(text: &str) -> bool {
        text.chars()
            .all(|c| c == '\n' || !(c.is_control() || crate::stream::event::is_bidi_control(c)))
    }

    /// A listing whose every string is `s` (and ids `id`), as a hostile agent could send.
    fn hostile(s: &str, id: &str, n: f64) -> Listing {
        let w = WorkloadFields {
            cgroup_id: 1,
            cgroup: Some(s.into()),
            container_id: Some(id.into()),
            container_runtime: Some(s.into()),
            pod_uid: Some(s.into()),
            pod_namespace: Some(s.into()),
            pod_name: Some(s.into()),
            pod_qos: Some(s.into()),
            unit: Some(s.into()),
        };
        let socket = crate::census::listing::ListedSocket {
            state: s.into(),
            age_seconds: Some(n),
            age_is_lower_bound: true,
            age_source: s.into(),
            local_addr: s.into(),
            local_port: 1,
            remote_addr: s.into(),
            remote_port: 2,
            service_port: 3,
            pid: 4,
            comm: s.into(),
            netns: 5,
            workload: w,
            stuck: true,
            reason: Some(s.into()),
        };
        let mut unpodded = socket.clone();
        (unpodded.workload.pod_uid, unpodded.workload.pod_name) = (None, None);
        let mut unit = unpodded.clone();
        unit.workload.container_id = None;
        let mut bare = unit.clone();
        bare.workload.unit = None;
        Listing {
            census_age_seconds: n,
            census_timestamp_seconds: n,
            total: usize::MAX,
            sockets: vec![socket, unpodded, unit, bare],
            cut_at_bytes: true,
            busiest_destinations: vec![crate::census::listing::ListedDestination {
                netns: 1,
                local_addr: s.into(),
                remote_addr: s.into(),
                remote_port: 9,
                ephemeral_ports_used: u64::MAX,
                ephemeral_port_range: 0,
                utilization: n,
            }],
        }
    }

    #[test]
    fn a_hostile_answer_prints_escaped_and_a_multibyte_id_is_cut_by_characters() {
        // The 12th byte of this id falls inside a character: once a panic.
        let id = "aaaaaaaaaaa\u{e9}\u{e9}";
        let evil = "\x1b]0;owned\x07\x1b[2J\u{9b}31m\u{202e}gpj.exe";
        let l = hostile(evil, id, f64::NAN);
        let text = render(&l);
        assert!(inert(&text), "{text:?}");
        assert!(
            text.contains("\\x1b]0;owned\\x07") && text.contains("\\u{202e}"),
            "{text}"
        );
        assert!(text.contains("aaaaaaaaaaa\u{e9}"), "{text}");
        let json = json(&hostile(evil, id, 1.5));
        assert!(inert(&json), "{json:?}");
        let back: Listing = serde_json::from_str(&json).unwrap();
        assert_eq!(back.sockets[0].comm, evil, "escaping keeps the JSON value");
        // Huge, negative and infinite numbers print as numbers.
        for n in [f64::INFINITY, -1e300, 1e300, -0.0] {
            assert!(inert(&render(&hostile("x", "y", n))));
        }
    }

    #[test]
    fn answers_that_are_not_listings_are_one_line_errors() {
        for body in [
            "",
            "null",
            "[]",
            "{\"sockets\":7}",
            "\u{1b}[2J",
            "{\"total\":-1}",
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(format!("{e:#}").lines().count(), 1, "{body:?}: {e:#}");
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::proptest_config(2_000))]

        /// Any string in every field, any number: printed without a panic, and inert.
        #[test]
        fn any_listing_renders_inert(s in "\\PC*|.*", id in ".{0,40}", n in proptest::num::f64::ANY) {
            let l = hostile(&s, &id, n);
            let text = render(&l);
            proptest::prop_assert!(inert(&text), "{:?}", text);
            proptest::prop_assert!(inert(&json(&l)));
        }

        /// Any answer, JSON-like or not: parsed or refused, never a panic.
        #[test]
        fn any_answer_parses_or_is_refused(body in "[{}\\[\\]\",:0-9a-z_ .\\\\-]{0,400}|\\PC{0,200}") {
            if let Ok(l) = parse(&body) {
                proptest::prop_assert!(inert(&render(&l)));
            }
        }

        /// A real listing's JSON with bytes changed here and there: parsed or refused.
        #[test]
        fn mutated_answers_parse_or_are_refused(at in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..8)) {
            let mut body = serde_json::to_vec(&hostile("ns/pod", "abc", 1.5)).unwrap();
            for (i, b) in at {
                let i = i % body.len();
                body[i] = b;
            }
            if let Ok(l) = parse(&String::from_utf8_lossy(&body)) {
                proptest::prop_assert!(inert(&render(&l)));
            }
        }
    }
}
