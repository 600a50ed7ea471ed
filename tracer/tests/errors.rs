//! Bad input gets one line on stderr that says what is wrong and what to do, a non-zero exit,
//! and never a panic or a backtrace (RUST_BACKTRACE=1 is set on purpose).

mod common;

use std::process::Command;

/// Runs `tracer ARGS` (optionally through a wrapper) and returns (exit code, stderr lines).
fn run(wrapper: &[&str], args: &[&str]) -> (i32, Vec<String>) {
    let tracer = env!("CARGO_BIN_EXE_tracer");
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(tracer);
            c
        }
        None => Command::new(tracer),
    };
    let out = cmd
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("running tracer");
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_one_line(stderr: &[String], needle: &str) {
    assert_eq!(stderr.len(), 1, "expected one line, got {stderr:?}");
    let line = &stderr[0];
    assert!(line.starts_with("tracer: "), "{line}");
    assert!(line.contains(needle), "{line:?} should mention {needle:?}");
    assert!(
        !line.contains("panicked") && !line.contains("backtrace"),
        "{line}"
    );
}

#[test]
fn out_of_range_port_is_one_line_and_exit_2() {
    let (code, stderr) = run(&[], &["watch", "--port", "70000"]);
    assert_eq!(code, 2);
    assert_one_line(&stderr, "70000");
}

#[test]
fn unknown_state_lists_the_valid_ones() {
    let (code, stderr) = run(&[], &["watch", "--state", "estab"]);
    assert_eq!(code, 2);
    assert_one_line(&stderr, "close_wait");
}

#[test]
fn a_cgroup_root_that_is_not_cgroup2_is_one_line_naming_the_flag() {
    for cmd in ["run", "watch"] {
        let (code, stderr) = run(&[], &[cmd, "--cgroup-root", "/proc"]);
        assert_eq!(code, 1, "{cmd}: {stderr:?}");
        assert_one_line(&stderr, "--cgroup-root /proc");
    }
}

#[test]
fn unknown_subcommand_is_one_line() {
    let (code, stderr) = run(&[], &["frobnicate"]);
    assert_eq!(code, 2);
    assert_one_line(&stderr, "frobnicate");
}

#[test]
fn bad_duration_says_how_to_write_one() {
    let (code, stderr) = run(&[], &["watch", "--duration", "soon"]);
    assert_eq!(code, 2);
    assert_one_line(&stderr, "10s");
}

#[test]
fn a_record_interval_under_a_second_and_a_bad_otlp_setting_are_one_line_each() {
    let (code, stderr) = run(&[], &["run", "--record-interval", "100ms"]);
    assert_eq!(code, 2);
    assert_one_line(&stderr, "shorter than 1s");
    let (code, stderr) = run(
        &["env", "OTEL_EXPORTER_OTLP_ENDPOINT=collector:4318"],
        &["run"],
    );
    assert_eq!(code, 1);
    assert_one_line(
        &stderr,
        "OTEL_EXPORTER_OTLP_ENDPOINT \"collector:4318\" is not an http://",
    );
    let bad_compression = [
        "env",
        "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318",
        "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION=zstd",
    ];
    let (code, stderr) = run(&bad_compression, &["run"]);
    assert_eq!(code, 1);
    assert_one_line(
        &stderr,
        "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION=\"zstd\" is not a compression",
    );
}

#[test]
fn ring_buffer_size_must_be_a_power_of_two() {
    let (code, stderr) = run(&[], &["watch", "--ring-buffer-size", "5000"]);
    assert_eq!(code, 1);
    assert_one_line(&stderr, "power of two");
}

#[test]
fn a_ring_buffer_past_256m_per_cpu_is_refused_with_its_cost() {
    let (code, stderr) = run(&[], &["run", "--ring-buffer-size", "2G"]);
    assert_eq!(code, 1);
    assert_one_line(
        &stderr,
        "--ring-buffer-size 2048M is too large: at most 256M per CPU",
    );
    assert!(stderr[0].contains("of kernel memory"), "{stderr:?}");
}

#[test]
fn without_privileges_it_says_to_use_sudo() {
    if !common::require_root("without_privileges_it_says_to_use_sudo") {
        return;
    }
    // Drop to nobody with no capabilities, as an unprivileged user would run it.
    let drop = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    let (code, stderr) = run(&drop, &["watch"]);
    assert_eq!(code, 1);
    assert_one_line(&stderr, "sudo");
}

#[test]
fn without_kernel_btf_it_says_what_is_missing() {
    if !common::require_root("without_kernel_btf_it_says_what_is_missing") {
        return;
    }
    // A kernel built without BTF, as far as tracer can tell: in a private mount namespace,
    // an empty file system over /sys/kernel/btf.
    let no_btf = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs none /sys/kernel/btf && exec \"$0\" \"$@\"",
    ];
    for command in ["run", "watch"] {
        let (code, stderr) = run(&no_btf, &[command]);
        assert_eq!(code, 1, "{command}: {stderr:?}");
        assert_one_line(&stderr, "kernel BTF not found at /sys/kernel/btf/vmlinux");
        assert!(stderr[0].contains("CONFIG_DEBUG_INFO_BTF"), "{stderr:?}");
    }
}

#[test]
fn the_example_web_config_is_refused_until_its_password_hash_is_set() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/web-config.yml");
    let dir = std::env::temp_dir().join(format!("tracer-webcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("web.yml");
    std::fs::copy(example, &config).unwrap();
    let (code, stderr) = run(&[], &["run", "--web-config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_one_line(&stderr, "tls_server_config.cert_file tls.crt");
    // With a certificate beside it, what stops it is the placeholder password hash.
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes", "-keyout", "tls.key", "-out", "tls.crt", "-days", "1", "-subj", "/CN=t",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let (code, stderr) = run(&[], &["run", "--web-config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_one_line(&stderr, "basic_auth_users.prometheus: not a bcrypt hash");
    assert!(
        stderr[0].contains("htpasswd -nBC 10 prometheus"),
        "{stderr:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let (code, stderr) = run(&[], &["run", "--web-config", "/nonexistent/web.yml"]);
    assert_eq!(code, 1);
    assert_one_line(&stderr, "cannot read --web-config /nonexistent/web.yml");
}

/// A fake agent on a port of its own: answers each request with `status` and `body`, then
/// closes, for `answers` requests.
fn fake_agent(status: &'static str, body: Vec<u8>, answers: usize) -> std::net::SocketAddr {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind(common::closed_port(common::V4)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for _ in 0..answers {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = std::io::BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let mut w = &stream;
            let _ = w
                .write_all(head.as_bytes())
                .and_then(|_| w.write_all(&body));
        }
    });
    addr
}

/// Runs `tracer sockets --agent` against `addr` with `extra` flags: (exit code, stdout, stderr).
fn sockets_from(addr: std::net::SocketAddr, extra: &[&str]) -> (i32, String, Vec<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_tracer"))
        .args(["sockets", "--agent", &format!("http://{addr}")])
        .args(extra)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("running tracer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr.lines().map(str::to_owned).collect(),
    )
}

/// True when `text` holds nothing a terminal acts on but newlines: no C0 or C1 control, no
/// bidirectional control.
fn inert(text: &str) -> bool {
    text.chars()
        .all(|c| c == '\n' || !(c.is_control() || tracer::stream::event::is_bidi_control(c)))
}

#[test]
fn tracer_sockets_against_a_hostile_agent_prints_escaped_rows_or_one_line_never_a_panic() {
    // Escape sequences in every string field, a container id whose 12th byte falls inside a
    // character, numbers at their extremes.
    let evil = "\u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31m\u{202e}gpj.exe";
    let id = "aaaaaaaaaaa\u{e9}\u{e9}\u{e9}";
    let socket = serde_json::json!({
        "state": evil, "age_seconds": 1e308, "age_is_lower_bound": true, "age_source": evil,
        "local_addr": evil, "local_port": 65535, "remote_addr": evil, "remote_port": 0,
        "service_port": 1, "pid": u32::MAX, "comm": evil, "netns": u64::MAX,
        "cgroup_id": u64::MAX, "cgroup": evil, "container_id": id, "container_runtime": evil,
        "pod_uid": evil, "pod_namespace": evil, "pod_name": evil, "pod_qos": evil, "unit": evil,
        "stuck": true, "reason": evil,
    });
    let mut unpodded = socket.clone();
    unpodded["pod_name"] = serde_json::Value::Null;
    unpodded["pod_uid"] = serde_json::Value::Null;
    let listing = serde_json::json!({
        "census_age_seconds": -1.0, "census_timestamp_seconds": 0, "total": u64::MAX,
        "sockets": [socket, unpodded],
        "busiest_destinations": [{"netns": 1, "local_addr": evil, "remote_addr": evil,
            "remote_port": 1, "ephemeral_ports_used": 1, "ephemeral_port_range": 0,
            "utilization": 1e300}],
    });
    let body = serde_json::to_vec(&listing).unwrap();
    for flags in [&[][..], &["--json"][..]] {
        let (code, stdout, stderr) = sockets_from(fake_agent("200 OK", body.clone(), 1), flags);
        assert_eq!(code, 0, "{flags:?}: {stderr:?}");
        assert!(inert(&stdout), "{flags:?}: {stdout:?}");
        assert!(
            stdout.contains("\\x1b]0;owned") || stdout.contains("\\u001b]0;owned"),
            "{stdout}"
        );
    }

    // Answers that are no listing: one line each, exit 1.
    let huge = {
        let mut b = b"{\"sockets\":[".to_vec();
        b.resize(10 << 20, b' ');
        b
    };
    let cases: Vec<(&'static str, Vec<u8>, &str)> = vec![
        (
            "200 OK",
            b"{\"sockets\": \"\x1b[2J\"}".to_vec(),
            "not a socket listing",
        ),
        (
            "200 OK",
            b"\xff\xfe\x1b[2J".to_vec(),
            "reading the agent's answer",
        ),
        ("200 OK", huge, "more than an agent sends"),
        ("500 Oops", b"\x1b[2J".to_vec(), "answered HTTP 500"),
        ("500 \x1b[2J", b"\x1b[2J".to_vec(), "does not speak HTTP"),
    ];
    for (status, body, needle) in cases {
        let (code, stdout, stderr) = sockets_from(fake_agent(status, body, 1), &[]);
        assert_eq!(code, 1, "{needle}: {stderr:?}");
        assert_one_line(&stderr, needle);
        assert!(inert(&stderr[0]) && stdout.is_empty(), "{stderr:?}");
    }
}
