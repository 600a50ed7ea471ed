//! `tracer sockets`: asks a running agent for its socket listing (`GET /sockets`) and prints it
//! as a table, oldest first, or as the agent's JSON.

use std::fmt::Write as _;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::cli::SocketsArgs;
use crate::event::state_name;

/// Fetches and prints the listing.
pub fn run(args: &SocketsArgs) -> Result<()> {
    let url = query_url(args);
    let body = fetch(&url, &args.agent)?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let listing: Value = serde_json::from_str(&body).context("the agent's answer is not JSON")?;
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
    url
}

fn fetch(url: &str, agent: &str) -> Result<String> {
    match ureq::get(url).call() {
        Ok(mut response) => {
            response.body_mut().read_to_string().map_err(|e| anyhow!("reading the agent's answer: {e}"))
        }
        Err(ureq::Error::StatusCode(code)) => Err(anyhow!("the agent at {agent} answered HTTP {code}")),
        Err(e) => Err(anyhow!(
            "no agent answers at {agent} ({e}): start one with `sudo tracer run`, or name it with --agent"
        )),
    }
}

/// The table people read.
pub fn render(listing: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>10} {:<12} {:>7} {:<15} {:>11} {:<28} {:<28} FLAG",
        "AGE", "STATE", "PID", "COMM", "NETNS", "LOCAL", "REMOTE"
    );
    let empty = Vec::new();
    for s in listing["sockets"].as_array().unwrap_or(&empty) {
        let age = match s["age_seconds"].as_f64() {
            Some(a) if s["age_source"].as_str() == Some("synack_timer") => format!("~{}", human(a)),
            Some(a) if s["age_is_lower_bound"].as_bool() == Some(true) => format!(">={}", human(a)),
            Some(a) => human(a),
            None => "?".to_owned(),
        };
        let pid = match s["pid"].as_u64() {
            Some(0) | None => "-".to_owned(),
            Some(p) => p.to_string(),
        };
        let comm = s["comm"].as_str().filter(|c| !c.is_empty()).unwrap_or("-");
        let endpoint = |addr: &Value, port: &Value| {
            let a = addr.as_str().unwrap_or("?");
            if a.contains(':') {
                format!("[{a}]:{port}")
            } else {
                format!("{a}:{port}")
            }
        };
        let flag = match s["reason"].as_str() {
            Some(r) => format!("stuck: {r}"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{:>10} {:<12} {:>7} {:<15} {:>11} {:<28} {:<28} {}",
            age,
            s["state"].as_str().unwrap_or("?"),
            pid,
            comm,
            s["netns"],
            endpoint(&s["local_addr"], &s["local_port"]),
            endpoint(&s["remote_addr"], &s["remote_port"]),
            flag
        );
    }
    let total = listing["total"].as_u64().unwrap_or(0);
    let shown = listing["sockets"].as_array().map_or(0, Vec::len) as u64;
    if total > shown {
        let _ = writeln!(
            out,
            "({shown} of {total} shown; raise --limit or narrow with --state/--port)"
        );
    }
    if let Some(d) = listing["busiest_destinations"]
        .as_array()
        .and_then(|d| d.first())
    {
        let _ = writeln!(
            out,
            "busiest destination: {}:{} from {} uses {} of {} ephemeral ports ({:.1}%) in netns {}",
            d["remote_addr"].as_str().unwrap_or("?"),
            d["remote_port"],
            d["local_addr"].as_str().unwrap_or("?"),
            d["ephemeral_ports_used"],
            d["ephemeral_port_range"],
            d["utilization"].as_f64().unwrap_or(0.0) * 100.0,
            d["netns"]
        );
    }
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
        let listing = serde_json::json!({
            "total": 4,
            "sockets": [
                {"state": "close_wait", "age_seconds": 65.0, "age_is_lower_bound": true, "pid": 0,
                 "comm": "", "netns": 4026531840u64, "local_addr": "127.0.0.1", "local_port": 80,
                 "remote_addr": "::1", "remote_port": 5, "reason": "the peer closed"},
                {"state": "syn_recv", "age_seconds": null, "age_is_lower_bound": false, "pid": 7,
                 "comm": "srv", "netns": 1, "local_addr": "127.0.0.1", "local_port": 80,
                 "remote_addr": "127.0.0.1", "remote_port": 6, "reason": null},
                {"state": "syn_recv", "age_seconds": 2.5, "age_is_lower_bound": true,
                 "age_source": "synack_timer", "pid": 0, "comm": "", "netns": 1,
                 "local_addr": "127.0.0.1", "local_port": 80, "remote_addr": "127.0.0.1",
                 "remote_port": 7, "reason": null}
            ],
            "busiest_destinations": []
        });
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
    }
}
