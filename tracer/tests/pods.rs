//! Which container, which pod: cgroup v2 hierarchies laid out as a kubelet with containerd,
//! CRI-O and Docker (systemd and cgroupfs drivers) and as systemd lays out a service, with a
//! `/var/log/pods`-style directory in a temporary root. The test moves itself into each cgroup
//! to open real sockets there (a socket keeps the cgroup it was created in), then checks
//! every listed socket against `ss -tan --cgroup` (the kernel's own record), every watched
//! transition against the cgroup the socket was made in, and the pod labels of the stuck-socket
//! and handshake-failure metrics.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

/// One "pod" of the test, with the container the test runs in.
struct Pod {
    namespace: &'static str,
    name: &'static str,
    uid: &'static str,
    container: String,
    runtime: Option<&'static str>,
    qos: &'static str,
    /// The container's cgroup.
    dir: PathBuf,
}

fn container_id(seed: u8) -> String {
    (0..32)
        .map(|i| format!("{:02x}", seed.wrapping_mul(37).wrapping_add(i * 11)))
        .collect()
}

/// `ss -tan --cgroup` for `port`: (local, remote) -> (state, cgroup path).
fn ss_cgroups(port: u16) -> BTreeMap<(String, String), (String, String)> {
    ss_lines(&format!("--cgroup ( sport = :{port} or dport = :{port} )"))
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let cgroup = f.iter().find_map(|w| w.strip_prefix("cgroup:"))?;
            Some((
                (f[3].to_owned(), f[4].to_owned()),
                (f[0].to_owned(), cgroup.to_owned()),
            ))
        })
        .collect()
}

#[test]
fn every_socket_names_its_container_and_pod_as_the_kernel_records_them() {
    let name = "every_socket_names_its_container_and_pod_as_the_kernel_records_them";
    if !require_root(name) {
        return;
    }
    let mut tree = Cgroups::new();
    let uid = |n: u8| -> &'static str {
        Box::leak(format!("{n}{n}a1b2c3-d4e5-4f60-8a7b-9c0d1e2f3a4b").into_boxed_str())
    };
    let u = [uid(1), uid(2), uid(3), uid(4)];
    let systemd = |qos: &str, uid: &str| {
        let slice = uid.replace('-', "_");
        match qos {
            "guaranteed" => format!("kubepods.slice/kubepods-pod{slice}.slice"),
            q => format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{slice}.slice"),
        }
    };
    let mut pod = |namespace, name, uid: &'static str, qos, runtime: Option<&'static str>, seed| {
        let container = container_id(seed);
        let rel = match runtime {
            Some("containerd") => format!("{}/cri-containerd-{container}.scope", systemd(qos, uid)),
            Some("crio") => format!("{}/crio-{container}.scope", systemd(qos, uid)),
            Some(r) => format!("{}/{r}-{container}.scope", systemd(qos, uid)),
            // The cgroupfs driver: no runtime in the path.
            None => format!("kubepods/{qos}/pod{uid}/{container}"),
        };
        let dir = tree.make(&rel);
        Pod {
            namespace,
            name,
            uid,
            container,
            runtime,
            qos,
            dir,
        }
    };
    let server = pod(
        "shop",
        "cart-7d9f",
        u[0],
        "burstable",
        Some("containerd"),
        1,
    );
    let client = pod("db", "pg-0", u[1], "besteffort", Some("crio"), 2);
    let refuser = pod("web", "api-0", u[2], "guaranteed", Some("docker"), 3);
    let holder = pod("batch", "job-x", u[3], "burstable", None, 4);
    let service = tree.make("system.slice/tracer-test-echo.service");
    let logs =
        PodLogs::new(&[&server, &client, &refuser, &holder].map(|p| (p.namespace, p.name, p.uid)));

    let (pa, pr, pe) = (closed_port(V4), closed_port(V4), closed_port(V4));
    let ports: Vec<String> = [pa, pr, pe].iter().map(|a| a.port().to_string()).collect();
    let logs_dir = logs.0.to_str().unwrap().to_owned();
    let root = tree.root.to_str().unwrap().to_owned();
    let mut args = vec![
        "--stuck-after",
        "close_wait=1s",
        "--pod-logs-dir",
        &logs_dir,
    ];
    for p in &ports {
        args.extend(["--port", p.as_str()]);
    }
    if tree.mounted {
        args.extend(["--cgroup-root", root.as_str()]);
    }
    let mut watch_args = vec!["watch", "--json"];
    watch_args.extend(&args[2..]); // all but --stuck-after
    args.extend(["--label-by", "pod"]);
    let agent = Agent::start(&args);
    let watch = Tracer::start(&watch_args, true);

    // The server pod listens; the client pod connects five times and half-closes (the server
    // never closes: five CLOSE_WAIT in the server pod, accepted sockets, which a kernel gives the
    // listener's cgroup); the holder pod keeps three connections open; the refuser pod is
    // refused seven times; a systemd service talks to itself twice.
    tree.enter(&server.dir);
    let listener = TcpListener::bind(pa).unwrap();
    tree.enter(&client.dir);
    let clients: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(pa).unwrap()).collect();
    tree.enter(&holder.dir);
    let held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(pa).unwrap()).collect();
    tree.enter(&refuser.dir);
    connect_refused(pr, 7);
    tree.enter(&service);
    let echo = TcpListener::bind(pe).unwrap();
    let echo_clients: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(pe).unwrap()).collect();
    tree.leave();
    let accepted: Vec<TcpStream> = (0..8).map(|_| listener.accept().unwrap().0).collect();
    let echo_accepted: Vec<TcpStream> = (0..2).map(|_| echo.accept().unwrap().0).collect();
    let client_ports: BTreeSet<u16> = clients
        .iter()
        .map(|c| c.local_addr().unwrap().port())
        .collect();
    // Half-closed rather than closed: an orphaned FIN_WAIT2 socket becomes a timewait mini
    // socket, which has no cgroup (nor does `ss` show one).
    for c in &clients {
        c.shutdown(std::net::Shutdown::Write).unwrap();
    }
    settle();

    // Every listed socket of the three ports names the cgroup `ss --cgroup` names.
    let inode = |dir: &Path| std::fs::metadata(dir).unwrap().ino();
    let pa_port = pa.port();
    let listing = sockets_json(&agent, "limit=1000");
    let listed: Vec<&serde_json::Value> = listing["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            let (l, r) = (
                s["local_port"].as_u64().unwrap(),
                s["remote_port"].as_u64().unwrap(),
            );
            [pa, pe]
                .iter()
                .any(|a| u64::from(a.port()) == l || u64::from(a.port()) == r)
        })
        .collect();
    let mut ss = ss_cgroups(pa_port);
    ss.extend(ss_cgroups(pe.port()));
    let endpoint =
        |a: &serde_json::Value, p: &serde_json::Value| format!("{}:{}", a.as_str().unwrap(), p);
    let mut compared = 0;
    for s in &listed {
        let key = (
            endpoint(&s["local_addr"], &s["local_port"]),
            endpoint(&s["remote_addr"], &s["remote_port"]),
        );
        let Some((_, cgroup)) = ss.get(&key) else {
            continue; // a listener's remote is `*` in ss; checked below
        };
        assert_eq!(s["cgroup"].as_str(), Some(cgroup.as_str()), "{s}");
        compared += 1;
    }
    // 5 client + 5 server (CLOSE_WAIT / FIN_WAIT2), 3 + 3 held, 2 + 2 echo.
    assert_eq!(
        compared, 20,
        "sockets compared with ss: {listed:?}\nss: {ss:?}"
    );

    let of = |s: &serde_json::Value| -> Option<&'static str> {
        let local = s["local_port"].as_u64().unwrap() as u16;
        let remote = s["remote_port"].as_u64().unwrap() as u16;
        if local == pa_port {
            Some("server")
        } else if remote == pa_port && client_ports.contains(&local) {
            Some("client")
        } else if remote == pa_port {
            Some("holder")
        } else {
            None
        }
    };
    let mut per_pod: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &listed {
        let Some(who) = of(s) else {
            // The echo service: a unit, no pod.
            assert_eq!(s["unit"], "tracer-test-echo.service", "{s}");
            assert_eq!(s["pod_uid"], serde_json::Value::Null, "{s}");
            assert_eq!(s["cgroup_id"], inode(&service), "{s}");
            continue;
        };
        let p = match who {
            "server" => &server,
            "client" => &client,
            _ => &holder,
        };
        assert_eq!(s["cgroup_id"], inode(&p.dir), "{who}: {s}");
        assert_eq!(s["cgroup"], tree.path(&p.dir), "{who}: {s}");
        assert_eq!(s["pod_uid"], p.uid, "{who}: {s}");
        assert_eq!(s["pod_namespace"], p.namespace, "{who}: {s}");
        assert_eq!(s["pod_name"], p.name, "{who}: {s}");
        assert_eq!(s["pod_qos"], p.qos, "{who}: {s}");
        assert_eq!(s["container_id"], p.container.as_str(), "{who}: {s}");
        assert_eq!(s["container_runtime"].as_str(), p.runtime, "{who}: {s}");
        *per_pod.entry(p.name).or_default() += 1;
    }
    // The server pod: its listener and eight accepted sockets.
    assert_eq!(
        per_pod,
        BTreeMap::from([("cart-7d9f", 9), ("pg-0", 5), ("job-x", 3)]),
        "{listed:?}"
    );

    // The filters of /sockets and `tracer sockets`.
    let count = |q: &str| sockets_json(&agent, q)["total"].as_u64().unwrap();
    assert_eq!(count(&format!("pod=cart-7d9f&port={pa_port}")), 9);
    assert_eq!(count(&format!("pod={}&port={pa_port}", client.uid)), 5);
    assert_eq!(count(&format!("namespace=batch&port={pa_port}")), 3);
    assert_eq!(count(&format!("container={}", &client.container[..12])), 5);
    assert_eq!(count("namespace=no-such-namespace"), 0);
    let url = format!("http://{}", agent.addr);
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args([
            "sockets",
            "--agent",
            &url,
            "--namespace",
            "shop",
            "--state",
            "close_wait",
        ])
        .output()
        .expect("tracer sockets");
    let text = String::from_utf8_lossy(&table.stdout);
    let rows: Vec<&str> = text.lines().filter(|l| l.contains("close_wait")).collect();
    assert_eq!(rows.len(), 5, "{text}");
    let column = format!("shop/cart-7d9f/{}", &server.container[..12]);
    assert!(rows.iter().all(|r| r.contains(&column)), "{text}");

    // Metrics: the CLOSE_WAIT leak under the server pod, the refused connects under theirs.
    let pr_port = pr.port().to_string();
    let text = agent.metrics_until("the leak to be stuck and the failures counted", |t| {
        sample(
            t,
            "tracer_tcp_stuck_sockets",
            &[
                ("state", "close_wait"),
                ("port", &ports[0]),
                ("namespace", "shop"),
                ("pod", "cart-7d9f"),
            ],
        ) == Some(5.0)
    });
    assert_eq!(
        sample(
            &text,
            "tracer_tcp_handshake_failures_total",
            &[
                ("mode", "active"),
                ("reason", "refused"),
                ("port", &pr_port),
                ("namespace", "web"),
                ("pod", "api-0"),
            ],
        ),
        Some(7.0),
        "{text}"
    );

    // Attribution's own figures: every cgroup of the census resolved, the four pods that
    // appear in labels given values of their own.
    assert_eq!(
        sample(&text, "tracer_cgroups_unresolved", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tracer_pod_labels", &[("result", "own")]),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tracer_feature_enabled", &[("feature", "cgroup")]),
        Some(1.0)
    );

    // With --label-by pod, the handshake histograms too: the accepted sockets under the
    // server's pod, each client's under its own, the service's under none.
    let handshakes = |mode: &str, port: &str, namespace: &str, pod: &str| {
        let labels = [
            ("mode", mode),
            ("port", port),
            ("namespace", namespace),
            ("pod", pod),
        ];
        sample(
            &text,
            "tracer_tcp_handshake_duration_seconds_count",
            &labels,
        )
    };
    for (mode, port, namespace, pod, n) in [
        ("passive", &ports[0], "shop", "cart-7d9f", 8.0),
        ("active", &ports[0], "db", "pg-0", 5.0),
        ("active", &ports[0], "batch", "job-x", 3.0),
        ("passive", &ports[2], "", "", 2.0),
        ("active", &ports[2], "", "", 2.0),
    ] {
        assert_eq!(
            handshakes(mode, port, namespace, pod),
            Some(n),
            "{mode} {port} {namespace}/{pod}: {text}"
        );
    }

    // Every transition `tracer watch` printed names the cgroup its socket was made in,
    // accepted sockets included.
    drop((
        clients,
        held,
        accepted,
        echo_accepted,
        echo_clients,
        listener,
        echo,
    ));
    settle();
    let out = watch.stop_with(libc::SIGINT);
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in out.json() {
        let (sport, dport) = (e["sport"].as_u64().unwrap(), e["dport"].as_u64().unwrap());
        let expected = if sport == u64::from(pa_port) {
            Some(&server)
        } else if dport == u64::from(pr.port()) {
            Some(&refuser)
        } else {
            None
        };
        if let Some(p) = expected {
            assert_eq!(e["pod_name"], p.name, "{e}");
            assert_eq!(e["cgroup_id"], inode(&p.dir), "{e}");
        }
        if dport == u64::from(pa_port) {
            // A client socket (its first event has no local port yet): one pod per socket.
            let pod = e["pod_name"].as_str().unwrap_or("-").to_owned();
            groups
                .entry(e["skaddr"].as_str().unwrap().to_owned())
                .or_default()
                .insert(pod);
        }
    }
    let mut clients_per_pod: BTreeMap<String, usize> = BTreeMap::new();
    for pods in groups.values() {
        assert_eq!(pods.len(), 1, "a socket's events name one pod: {pods:?}");
        *clients_per_pod
            .entry(pods.iter().next().unwrap().clone())
            .or_default() += 1;
    }
    assert_eq!(
        clients_per_pod,
        BTreeMap::from([("job-x".to_owned(), 3), ("pg-0".to_owned(), 5)]),
    );
    drop(agent);
    drop(tree);
}
