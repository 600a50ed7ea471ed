//! Every PromQL expression of the dashboards and the alert rules, evaluated by a real
//! Prometheus scraping a real agent under real traffic (handshakes, failures, a CLOSE_WAIT
//! leak, a lost handshake ACK, a full accept queue): each must parse, and each panel query
//! must return data. A panel that can only ever be empty is a defect.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use common::*;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// (where, expression) of every panel target and template variable of every dashboard.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join("dashboards"))
        .unwrap()
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for panel in dash["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let title = panel["title"].as_str().unwrap_or("?");
                out.push((
                    format!("{file}: {title}"),
                    target["expr"].as_str().unwrap().to_owned(),
                ));
            }
        }
        for var in dash["templating"]["list"].as_array().unwrap() {
            if let Some(q) = var["query"]["query"].as_str() {
                // label_values(SELECTOR, LABEL) is Grafana's: the selector must have data.
                let inner = q
                    .strip_prefix("label_values(")
                    .and_then(|r| r.rsplit_once(','))
                    .map(|(s, _)| s)
                    .unwrap();
                out.push((
                    format!("{file}: variable {}", var["name"]),
                    inner.to_owned(),
                ));
            }
        }
    }
    out
}

/// Every `expr:` of the rule files (one line each, as the rule files are written).
fn rule_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/tracer-alerts.yml"))
        .unwrap();
    let mut out = Vec::new();
    let mut alert = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(a) = line.strip_prefix("- alert: ") {
            alert = a.to_owned();
        } else if let Some(e) = line.strip_prefix("expr: ") {
            out.push((format!("rule {alert}"), e.to_owned()));
        }
    }
    out
}

/// Grafana's variables, as a person viewing every node and port would have them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$instance", ".*")
        .replace("$port", ".*")
        .replace("$namespace", ".*")
}

#[test]
fn every_panel_query_returns_data_and_every_rule_parses() {
    if !require_root("every_panel_query_returns_data_and_every_rule_parses")
        || host_only(
            "every_panel_query_returns_data_and_every_rule_parses",
            "the dashboards' and rules' PromQL over Prometheus, not the kernel's",
        )
    {
        return;
    }
    // A Kubernetes pod (containerd, systemd cgroup driver) for the by-pod panels.
    let mut tree = Cgroups::new();
    let uid = "5e1f0c2a-3b4d-4e6f-8a9b-0c1d2e3f4a5b";
    let pod = tree.make(&format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
         cri-containerd-{}.scope",
        uid.replace('-', "_"),
        "ab".repeat(32)
    ));
    let logs = PodLogs::new(&[("shop", "cart-0", uid)]);
    let root = tree.root.to_str().unwrap().to_owned();
    let mut args = vec![
        "--stuck-after",
        "close_wait=1s",
        "--pod-logs-dir",
        logs.dir(),
    ];
    if tree.mounted {
        args.extend(["--cgroup-root", root.as_str()]);
    }
    let kubepods = tree.kubepods_args();
    args.extend(kubepods.iter().map(String::as_str));
    let agent = Agent::start(&args);
    let prom = Prometheus::start(agent.addr);

    // Handshakes, teardowns, lifetimes; refused connects (failures, resets), from the pod.
    let server = Server::start(V4, 50, Closer::Client);
    connect_many(server.addr, 50, Closer::Client);
    server.join();
    tree.enter(&pod);
    connect_refused(closed_port(V4), 5);
    // A CLOSE_WAIT leak in the pod, stuck after 1 s.
    let leak = TcpListener::bind(closed_port(V4)).unwrap();
    tree.leave();
    let kept: Vec<_> = (0..3)
        .map(|_| {
            let c = TcpStream::connect(leak.local_addr().unwrap()).unwrap();
            let s = leak.accept().unwrap().0;
            drop(c);
            s
        })
        .collect();
    // A lost handshake ACK (one SYN-ACK retransmit) in a namespace of the test's own.
    let ns = Netns::new("dash");
    ns.nft("table inet t {\n chain out {\n type filter hook output priority 0;\n tcp dport 18083 tcp flags == ack ct original packets 2 drop\n }\n}\n");
    let ack_lost = ns.spawn(|| {
        let l = TcpListener::bind("127.0.0.1:18083").unwrap();
        let c = TcpStream::connect("127.0.0.1:18083").unwrap();
        let s = l.accept().unwrap().0;
        (l, c, s)
    });
    // A full accept queue: listen overflows.
    let full = TcpListener::bind((V4, 0)).unwrap();
    // SAFETY: listen on a valid socket.
    unsafe { libc::listen(full.as_raw_fd(), 0) };
    let full_addr = full.local_addr().unwrap();
    let overflow: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                TcpStream::connect_timeout(&full_addr, Duration::from_millis(1200))
            })
        })
        .collect();
    let _held = ack_lost.join().unwrap();
    for o in overflow {
        let _ = o.join();
    }
    // Enough scrapes for every rate() window to hold two samples after the traffic.
    prom.wait_for(
        "the stuck CLOSE_WAIT sockets",
        "sum(tracer_tcp_stuck_sockets)",
        3.0,
    );
    std::thread::sleep(Duration::from_secs(4));

    let mut empty = Vec::new();
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{} dashboard queries", queries.len());
    // Reset reasons exist from Linux 6.10 on; before, that panel is rightly empty.
    let reasons = sample(
        &agent.metrics(),
        "tracer_feature_enabled",
        &[("feature", "reset_reason")],
    ) == Some(1.0);
    for (place, expr) in &queries {
        if !reasons && expr.contains("tracer_tcp_reset_reasons_total") {
            unsupported("reset_reason", &format!("{place} is empty on this kernel"));
            continue;
        }
        if prom.query(&substitute(expr)).is_none() {
            empty.push(format!("{place}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "panel queries without data:\n{}",
        empty.join("\n")
    );
    for (place, expr) in rule_queries() {
        // Parses and evaluates (an alert that is not firing returns nothing, rightly).
        prom.query_status(&expr)
            .unwrap_or_else(|e| panic!("{place}: {e}"));
    }
    drop((kept, leak, full));
    drop(tree);
}
