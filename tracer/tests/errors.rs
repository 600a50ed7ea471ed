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
