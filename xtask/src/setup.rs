//! `cargo xtask setup`: installs what building and testing `tracer` need on a Debian host,
//! skipping (without network) whatever is already there.
//!
//! Why these pieces (see README, "Toolchain"): rustup's compilers here have no `rust-src`, so
//! the probe is built with Debian's `rustc-web`, which ships a prebuilt `core` for the BPF
//! target; `bpf-linker` must be built against the same LLVM major (22).

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian packages: the BPF-capable compiler, what bpf-linker links against, and the tools the
/// tests use as real peers and oracles.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "nftables",
    "prometheus",
];

/// The rustup name under which Debian's toolchain is registered (tracer/build.rs uses it).
pub const BPF_TOOLCHAIN: &str = "tracer-bpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// Installs whatever is missing.
pub fn run() -> Result<()> {
    install_packages(PACKAGES)?;
    link_toolchain()?;
    install_bpf_linker()?;
    Ok(())
}

/// Installs the Debian packages of `packages` that are missing; no network work otherwise.
pub fn install_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    require_root(&format!("installing {}", missing.join(" ")))?;
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "install ok installed")
}

fn link_toolchain() -> Result<()> {
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup (the project expects rustup's cargo on PATH)")?;
    if String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.starts_with(BPF_TOOLCHAIN))
    {
        return Ok(());
    }
    eprintln!("xtask: registering Debian's rustc-web with rustup as {BPF_TOOLCHAIN}");
    run_cmd(Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]))
}

fn install_bpf_linker() -> Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if installed {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    run_cmd(
        Command::new("cargo")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path),
    )
}

/// Mounts tracefs where it is missing: the tests read the kernel's own record of transitions
/// from a private ftrace instance. (The tracer itself does not need tracefs.)
pub fn mount_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/instances").exists() {
        return Ok(());
    }
    require_root("mounting tracefs for the tests' ftrace oracle")?;
    run_cmd(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root: run this again with sudo");
    }
    Ok(())
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}
