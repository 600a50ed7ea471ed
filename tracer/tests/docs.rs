//! The generated documentation as people load it: each completion script sourced in its own
//! shell (bash, zsh, fish) and asked to complete, and the manual pages rendered by `man -l`.
//! No root needed.

mod common;

use std::process::Command;

use common::host_only;

const TRACER: &str = env!("CARGO_BIN_EXE_tracer");

/// Why these tests run on the host only.
const HOST_ONLY: &str = "generated from the flag definitions, nothing of the kernel's";

/// Runs `shell -c script` (with `$TRACER` set) and returns its stdout; a shell that is not
/// installed fails the test with what to install (`cargo xtask setup` installs them).
fn shell(shell: &str, args: &[&str], script: &str) -> String {
    let out = Command::new(shell)
        .args(args)
        .arg("-c")
        .arg(script)
        .env("TRACER", TRACER)
        .output()
        .unwrap_or_else(|e| panic!("{shell}: {e}: install it (cargo xtask setup does)"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{shell} failed: {stderr}\n{stdout}");
    stdout
}

#[test]
fn bash_completes_commands_and_flags_from_the_script() {
    if host_only(
        "bash_completes_commands_and_flags_from_the_script",
        HOST_ONLY,
    ) {
        return;
    }
    let out = shell(
        "bash",
        &["--norc", "--noprofile"],
        r#"source <("$TRACER" completions bash)
complete -p tracer
COMP_WORDS=(tracer w); COMP_CWORD=1; _tracer tracer w tracer; echo "commands: ${COMPREPLY[*]}"
COMP_WORDS=(tracer watch --accept-w); COMP_CWORD=2; _tracer tracer --accept-w watch
echo "flags: ${COMPREPLY[*]}"
COMP_WORDS=(tracer watch --accept-wait ''); COMP_CWORD=3; _tracer tracer '' --accept-wait
echo "values: ${COMPREPLY[*]}""#,
    );
    let line = |prefix: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {out}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(out.contains("-F _tracer tracer"), "{out}");
    assert_eq!(line("commands: "), ["watch"], "{out}");
    assert_eq!(line("flags: "), ["--accept-wait"], "{out}");
    assert_eq!(line("values: "), ["auto", "on", "off"], "{out}");
}

#[test]
fn zsh_registers_the_completion_function() {
    if host_only("zsh_registers_the_completion_function", HOST_ONLY) {
        return;
    }
    let out = shell(
        "zsh",
        &["-f"],
        r#"autoload -U compinit && compinit -u
source <("$TRACER" completions zsh)
print -r -- "tracer: $_comps[tracer]"
whence -w _tracer"#,
    );
    assert!(out.contains("tracer: _tracer"), "{out}");
    assert!(out.contains("_tracer: function"), "{out}");
}

#[test]
fn fish_completes_commands_and_flags_from_the_script() {
    if host_only(
        "fish_completes_commands_and_flags_from_the_script",
        HOST_ONLY,
    ) {
        return;
    }
    let out = shell(
        "fish",
        &["--no-config"],
        r#""$TRACER" completions fish | source
complete -C 'tracer w'
complete -C 'tracer watch --accept-w'
complete -C 'tracer run --accept-wait='"#,
    );
    let firsts: Vec<&str> = out
        .lines()
        .map(|l| l.split('\t').next().unwrap_or(""))
        .collect();
    for want in [
        "watch",
        "--accept-wait",
        "--accept-wait=auto",
        "--accept-wait=off",
    ] {
        assert!(firsts.contains(&want), "no {want:?} in {firsts:?}");
    }
}

#[test]
fn the_manual_pages_render_and_name_every_command_and_flag() {
    if host_only(
        "the_manual_pages_render_and_name_every_command_and_flag",
        HOST_ONLY,
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tracer-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(TRACER)
        .args(["man", "--dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let render = |page: &str| {
        let out = Command::new("man")
            .args(["-l", dir.join(page).to_str().unwrap()])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .expect("man (man-db)");
        assert!(out.status.success(), "man -l {page}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let top = render("tracer.1");
    assert!(top.contains("NAME"), "{top}");
    for command in ["tracer-watch(1)", "tracer-run(1)", "tracer-sockets(1)"] {
        assert!(top.contains(command), "tracer.1 names no {command}: {top}");
    }
    let watch = render("tracer-watch.1");
    for flag in ["--connections", "--accept-wait", "--ring-buffer-size"] {
        assert!(watch.contains(flag), "tracer-watch.1 has no {flag}");
    }
    let run = render("tracer-run.1");
    for flag in ["--listen", "--web-config", "--otlp-endpoint"] {
        assert!(run.contains(flag), "tracer-run.1 has no {flag}");
    }
    // Printed on stdout too (with `help` among the commands, which has no page of its own).
    let printed = Command::new(TRACER).arg("man").output().unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.starts_with(".ie"), "{printed}");
    assert!(printed.contains("tracer\\-watch(1)"), "{printed}");
    let _ = std::fs::remove_dir_all(&dir);
}
