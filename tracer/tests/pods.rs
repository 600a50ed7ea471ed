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
    let kubepods = tree.kubepods_args();
    args.extend(kubepods.iter().map(String::as_str));
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
    let what = format!(
        "5 CLOSE_WAIT on port {} in shop/cart-7d9f past 1 s, 7 connects refused on port \
         {pr_port} from web/api-0",
        ports[0]
    );
    let text = agent.metrics_exactly(
        &what,
        &[
            (
                Figure::sample(
                    "tracer_tcp_stuck_sockets",
                    &[
                        ("state", "close_wait"),
                        ("port", &ports[0]),
                        ("namespace", "shop"),
                        ("pod", "cart-7d9f"),
                    ],
                ),
                5.0,
            ),
            (
                Figure::sample(
                    "tracer_tcp_handshake_failures_total",
                    &[
                        ("mode", "active"),
                        ("reason", "refused"),
                        ("port", &pr_port),
                        ("namespace", "web"),
                        ("pod", "api-0"),
                    ],
                ),
                7.0,
            ),
        ],
    );

    // Attribution's own figures: every cgroup of the census resolved, the four pods that
    // appear in labels given values of their own.
    assert_figures(
        &text,
        "the cgroups of four pods and a service",
        &[
            (Figure::sample("tracer_cgroups_unresolved", &[]), 0.0),
            (
                Figure::sample("tracer_pod_labels", &[("result", "own")]),
                4.0,
            ),
        ],
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
        Figure::sample("tracer_tcp_handshake_duration_seconds_count", &labels)
    };
    assert_figures(
        &text,
        &format!(
            "db/pg-0 connected 5 times and batch/job-x 3 times to shop/cart-7d9f on port {}; \
             a service twice to itself on port {}",
            ports[0], ports[2]
        ),
        &[
            (handshakes("passive", &ports[0], "shop", "cart-7d9f"), 8.0),
            (handshakes("active", &ports[0], "db", "pg-0"), 5.0),
            (handshakes("active", &ports[0], "batch", "job-x"), 3.0),
            (handshakes("passive", &ports[2], "", ""), 2.0),
            (handshakes("active", &ports[2], "", ""), 2.0),
        ],
    );

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

#[test]
fn a_kubepods_cgroup_below_a_delegated_subtree_is_no_pod_and_spends_no_label() {
    let name = "a_kubepods_cgroup_below_a_delegated_subtree_is_no_pod_and_spends_no_label";
    if !require_root(name)
        || host_only(
            name,
            "the agent's reading of cgroup paths, not the kernel's",
        )
    {
        return;
    }
    use std::os::unix::process::CommandExt as _;
    let mut tree = Cgroups::new();
    let victim = "7e1f0c2a-3b4d-4e6f-8a9b-0c1d2e3f4a5b";
    let real = tree.make(&format!(
        "kubepods.slice/kubepods-pod{}.slice/cri-containerd-{}.scope",
        victim.replace('-', "_"),
        container_id(9)
    ));
    // A user's delegated subtree, as systemd gives `user@UID.service`: the user (nobody here)
    // makes a `kubepods` of their own in it, in both drivers' spellings, for the victim's UID
    // and for three more pods that the node does not know.
    let delegated = tree.make("user.slice/user-65534.slice/user@65534.service");
    run_ok("chown", &["-R", "65534:65534", delegated.to_str().unwrap()]);
    let uids = [
        victim,
        "8e1f0c2a-3b4d-4e6f-8a9b-0c1d2e3f4a5b",
        "9e1f0c2a-3b4d-4e6f-8a9b-0c1d2e3f4a5b",
        "ae1f0c2a-3b4d-4e6f-8a9b-0c1d2e3f4a5b",
    ];
    let fakes: Vec<PathBuf> = uids
        .iter()
        .enumerate()
        .map(|(i, uid)| {
            let rel = match i % 2 {
                0 => format!("kubepods/pod{uid}/{}", container_id(i as u8)),
                _ => format!(
                    "kubepods.slice/kubepods-pod{}.slice/cri-containerd-{}.scope",
                    uid.replace('-', "_"),
                    container_id(i as u8)
                ),
            };
            let dir = delegated.join(rel);
            let made = std::process::Command::new("mkdir")
                .arg("-p")
                .arg(&dir)
                .uid(65534)
                .gid(65534)
                .status()
                .expect("mkdir as nobody");
            assert!(made.success(), "nobody could not make {dir:?}");
            dir
        })
        .collect();
    let logs = PodLogs::new(&[("prod", "payments-api", victim)]);
    let real_port = closed_port(V4);
    let fake_ports: Vec<std::net::SocketAddr> = fakes.iter().map(|_| closed_port(V4)).collect();
    let root = tree.root.to_str().unwrap().to_owned();
    let rp = real_port.port().to_string();
    let fps: Vec<String> = fake_ports.iter().map(|a| a.port().to_string()).collect();
    let mut args = vec![
        "--stuck-after",
        "close_wait=1s",
        "--pod-logs-dir",
        logs.dir(),
        "--max-pods",
        "2",
        "--port",
        &rp,
    ];
    for fp in &fps {
        args.extend(["--port", fp.as_str()]);
    }
    if tree.mounted {
        args.extend(["--cgroup-root", root.as_str()]);
    }
    let kubepods = tree.kubepods_args();
    args.extend(kubepods.iter().map(String::as_str));
    let agent = Agent::start(&args);

    // One CLOSE_WAIT leak in each fake pod, and one in the real one.
    let leak = |dir: &Path, at: std::net::SocketAddr, n: usize| {
        tree.enter(dir);
        let listener = TcpListener::bind(at).unwrap();
        let clients: Vec<TcpStream> = (0..n).map(|_| TcpStream::connect(at).unwrap()).collect();
        tree.leave();
        let accepted: Vec<TcpStream> = (0..n).map(|_| listener.accept().unwrap().0).collect();
        for c in &clients {
            c.shutdown(std::net::Shutdown::Write).unwrap();
        }
        (listener, clients, accepted)
    };
    let kept_fake: Vec<_> = fakes
        .iter()
        .zip(&fake_ports)
        .map(|(d, &at)| leak(d, at, 1))
        .collect();
    let kept_real = leak(&real, real_port, 2);
    // Past the 1 s threshold.
    std::thread::sleep(std::time::Duration::from_millis(1_500));

    // The real pod's two leaks; the fake pods' leaks are stuck too, and belong to no pod.
    let mut figures = vec![(
        Figure::sample(
            "tracer_tcp_stuck_sockets",
            &[
                ("state", "close_wait"),
                ("port", &rp),
                ("namespace", "prod"),
                ("pod", "payments-api"),
            ],
        ),
        2.0,
    )];
    for fp in &fps {
        let stuck = [("state", "close_wait"), ("port", fp.as_str())];
        figures.push((Figure::sample("tracer_tcp_stuck_sockets", &stuck), 1.0));
    }
    let text = agent.metrics_exactly(
        &format!(
            "2 CLOSE_WAIT leaks past 1 s on port {rp} in prod/payments-api, 1 on each of \
             ports {fps:?} in fake pods"
        ),
        &figures,
    );
    let stuck_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tracer_tcp_stuck_sockets{"))
        .collect();
    let fake_port_line = |l: &str| fps.iter().any(|fp| l.contains(&format!("port=\"{fp}\"")));
    for line in &stuck_lines {
        assert!(!line.contains("pod=\"other\""), "{line}");
        assert!(
            !(fake_port_line(line) && line.contains("pod=\"p")),
            "{line}"
        );
    }
    // The real pod has the one label value spent; nothing was refused.
    assert_figures(
        &text,
        "one real pod and four fakes, with --max-pods 2",
        &[
            (
                Figure::sample("tracer_pod_labels", &[("result", "own")]),
                1.0,
            ),
            (
                Figure::sample("tracer_pod_labels", &[("result", "other")]),
                0.0,
            ),
        ],
    );

    // In the listing: the fake sockets name no pod. A container is named by its cgroup
    // wherever it is (rootless runtimes make theirs in the user's subtree): the user's own;
    // without one, the user's unit.
    let listing = sockets_json(&agent, "state=close_wait&limit=10000");
    let listed: Vec<&serde_json::Value> = listing["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| fps.contains(&s["local_port"].to_string()))
        .collect();
    assert_eq!(listed.len(), 4, "{listing}");
    for s in listed {
        assert_eq!(s["pod_uid"], serde_json::Value::Null, "{s}");
        assert_eq!(s["pod_name"], serde_json::Value::Null, "{s}");
        assert_eq!(s["pod_qos"], serde_json::Value::Null, "{s}");
        if s["container_id"].is_null() {
            assert_eq!(s["unit"], "user@65534.service", "{s}");
        } else {
            assert_eq!(s["container_runtime"], "containerd", "{s}");
        }
    }
    let real_listed = sockets_json(&agent, &format!("port={rp}&state=close_wait"));
    for s in real_listed["sockets"].as_array().unwrap() {
        assert_eq!(s["pod_name"], "payments-api", "{s}");
    }
    assert_eq!(
        sockets_json(&agent, "pod=payments-api&state=close_wait")["total"],
        2,
        "only the real pod's sockets are the pod's"
    );
    drop((kept_fake, kept_real));
    for dir in fakes.iter().rev() {
        // Made by nobody, below the test's tree: removed leaf first.
        let mut d = dir.clone();
        while d != delegated {
            let _ = std::fs::remove_dir(&d);
            d.pop();
        }
    }
}

/// The service port of the dropped-packets-by-pod test.
const DROP_PORT: u16 = 7_410;

/// The kernel's count of packets dropped for the socket on local port `port` (`ss -m`'s `d`:
/// `sk_drops`), for its one ESTABLISHED socket there.
fn ss_socket_drops(port: u16) -> u64 {
    let out = std::process::Command::new("ss")
        .args([
            "-tmnH",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let d = text
        .split(|c: char| c == ',' || c == '(' || c == ')' || c.is_whitespace())
        .find_map(|f| f.strip_prefix('d').and_then(|n| n.parse::<u64>().ok()));
    d.unwrap_or_else(|| panic!("no sk_drops in ss -tm: {text}"))
}

/// Drops every packet that reaches `s` (a classic BPF socket filter that returns 0).
fn filter_everything(s: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let mut code = [libc::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: setsockopt on a valid socket with a pointer to a sock_fprog and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_ATTACH_FILTER: {}",
        std::io::Error::last_os_error()
    );
}

/// Takes [`filter_everything`]'s filter off `s`.
fn detach_filter(s: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let zero: libc::c_int = 0;
    // SAFETY: setsockopt on a valid socket with a pointer to an int and its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_FILTER,
            &zero as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_DETACH_FILTER: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn packets_dropped_for_a_pods_socket_are_counted_under_its_pod() {
    let name = "packets_dropped_for_a_pods_socket_are_counted_under_its_pod";
    if !require_root(name) {
        return;
    }
    use std::io::Write as _;
    let mut tree = Cgroups::new();
    let uid = "5e1f0c2a-3b4d-4e6f-8a9b-0c1d2e3f4a5b";
    let dir = tree.make(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
         cri-containerd-{}.scope",
        uid.replace('-', "_"),
        container_id(7)
    ));
    let logs = PodLogs::new(&[("shop", "filter-0", uid)]);
    let port = DROP_PORT.to_string();
    let root = tree.root.to_str().unwrap().to_owned();
    let mut args = vec!["--pod-logs-dir", logs.dir(), "--port", &port];
    if tree.mounted {
        args.extend(["--cgroup-root", root.as_str()]);
    }
    let kubepods = tree.kubepods_args();
    args.extend(kubepods.iter().map(String::as_str));
    let agent = Agent::start(&args);
    let feature = |f| {
        sample(
            &agent.metrics_now(),
            "tracer_feature_enabled",
            &[("feature", f)],
        )
    };
    if feature("drop_reason") != Some(1.0) {
        unsupported(name, "this kernel gives no drop reasons");
        return;
    }
    let by_pod = feature("drop_socket") == Some(1.0);

    // The pod's server listens (its accepted socket is in its cgroup); a socket filter that
    // takes nothing makes the kernel drop every segment the client sends it, the first and
    // the retransmissions, with the reason socket_filter, each counted on the socket too.
    tree.enter(&dir);
    let listener = TcpListener::bind(("127.0.0.1", DROP_PORT)).unwrap();
    tree.leave();
    let mut client = TcpStream::connect(("127.0.0.1", DROP_PORT)).unwrap();
    let (server, _) = listener.accept().unwrap();
    filter_everything(&server);
    client.write_all(&[5u8; 1_000]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2_000));
    // The filter off, nothing more is dropped: the socket's count is final.
    detach_filter(&server);
    let kernel = ss_socket_drops(DROP_PORT);
    assert!(
        kernel >= 2,
        "the kernel dropped {kernel} packets for the socket"
    );
    let drops = |namespace: &str, pod: &str| {
        Figure::sample(
            "tracer_tcp_drops_total",
            &[
                ("reason", "socket_filter"),
                ("port", &port),
                ("namespace", namespace),
                ("pod", pod),
            ],
        )
    };
    let (namespace, pod) = if by_pod {
        ("shop", "filter-0")
    } else {
        ("", "")
    };
    let what = format!(
        "ss -m: the kernel dropped {kernel} packets for the socket on port {DROP_PORT} of \
         {namespace:?}/{pod:?}"
    );
    let text = agent.metrics_at_least(&what, &[(drops(namespace, pod), kernel as f64)]);
    eprintln!(
        "ss -m: {kernel} dropped for the socket; tracer: {} under {namespace:?}/{pod:?}",
        drops(namespace, pod).read(&text)
    );
    // Exactly the socket's count, under the pod where the kernel names the socket, and none
    // elsewhere.
    let mut figures = vec![(drops(namespace, pod), kernel as f64)];
    if by_pod {
        figures.push((drops("", ""), 0.0));
    }
    assert_figures(&text, &what, &figures);
    if !by_pod {
        unsupported(
            name,
            "this kernel's kfree_skb does not name the packet's socket (Linux 6.11+): the drops \
             were counted without a pod",
        );
    }
    drop((client, server, listener));
}
