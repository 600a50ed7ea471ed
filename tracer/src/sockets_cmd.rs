//! `tracer sockets`: asks a running agent for its socket listing (`GET /sockets`) and prints it
//! as a table, oldest first, or as the agent's JSON.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use base64::Engine as _;

use crate::cli::SocketsArgs;
use crate::event::state_name;
use crate::listing::{Listing, WorkloadFields};

/// How long to wait for the agent: it answers from its last census, at once.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches and prints the listing.
pub fn run(args: &SocketsArgs) -> Result<()> {
    let url = query_url(args);
    let body = fetch(&url, args)?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let listing: Listing =
        serde_json::from_str(&body).context("the agent's answer is not a socket listing")?;
    print!("{}", render(&listing));
    Ok(())
}

/// The `/sockets` URL for these flags.
pub fn query_url(args: &SocketsArgs) -> String {
    let mut url = format!(
        "{}/sockets?limit={}",
        args.agent.trim_end_matches('/'),
        args.limit
    );
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
    let container = w.container_id.as_deref().map(|id| &id[..id.len().min(12)]);
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

fn fetch(url: &str, args: &SocketsArgs) -> Result<String> {
    let agent = &args.agent;
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
            .read_to_string()
            .map_err(|e| anyhow!("reading the agent's answer: {e}")),
        Err(ureq::Error::StatusCode(401)) => Err(anyhow!(
            "the agent at {agent} wants a user and password: give --user and TRACER_PASSWORD"
        )),
        Err(ureq::Error::StatusCode(403)) => Err(anyhow!(
            "the agent at {agent} shows /sockets only on loopback or to an authenticated client: \
             give --user (and TRACER_PASSWORD) or --cert-file/--key-file"
        )),
        Err(ureq::Error::StatusCode(code)) => {
            Err(anyhow!("the agent at {agent} answered HTTP {code}"))
        }
        Err(e) => Err(anyhow!(
            "no agent answers at {agent} ({e}): start one with `sudo tracer run`, or name it with --agent"
        )),
    }
}

/// TLS settings for an `https://` agent: its CA and our client certificate, when given.
fn tls_config(args: &SocketsArgs) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
    };
    let mut tls = TlsConfig::builder();
    if let Some(path) = &args.ca_file {
        let pem = read("--ca-file", path)?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<Certificate<'static>>, _>>()
            .map_err(|e| anyhow!("--ca-file {}: {e}", path.display()))?;
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
        let chain = Certificate::from_pem(&read("--cert-file", cert)?)
            .map_err(|e| anyhow!("--cert-file {}: {e}", cert.display()))?;
        let key = PrivateKey::from_pem(&read("--key-file", key)?)
            .map_err(|e| anyhow!("--key-file {}: {e}", key.display()))?;
        tls = tls.client_cert(Some(ClientCert::new_with_certs(&[chain], key)));
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
        // The name is whatever the process set: escaped, so that it cannot drive the terminal.
        let comm = crate::event::Printable(if s.comm.is_empty() {
            b"-"
        } else {
            s.comm.as_bytes()
        });
        let endpoint = |a: &str, port: u16| {
            if a.contains(':') {
                format!("[{a}]:{port}")
            } else {
                format!("{a}:{port}")
            }
        };
        let flag = match &s.reason {
            Some(r) => format!("stuck: {r}"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{:>10} {:<12} {:>7} {:<15} {:>11} {:<28} {:<28} {:<40} {}",
            age,
            s.state,
            pid,
            comm,
            s.netns,
            endpoint(&s.local_addr, s.local_port),
            endpoint(&s.remote_addr, s.remote_port),
            crate::event::Printable(workload_column(&s.workload).as_bytes()),
            flag
        );
    }
    let shown = listing.sockets.len();
    if listing.total > shown {
        let _ = writeln!(
            out,
            "({shown} of {} shown; raise --limit or narrow with --state/--port)",
            listing.total
        );
    }
    if let Some(d) = listing.busiest_destinations.first() {
        let _ = writeln!(
            out,
            "busiest destination: {}:{} from {} uses {} of {} ephemeral ports ({:.1}%) in netns {}",
            d.remote_addr,
            d.remote_port,
            d.local_addr,
            d.ephemeral_ports_used,
            d.ephemeral_port_range,
            d.utilization * 100.0,
            d.netns
        );
    }
    let _ = writeln!(out, "(census taken {:.1}s ago)", listing.census_age_seconds);
    out
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
            crate::listing::ListedSocket {
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
}
