//! Developer tasks that cargo cannot do by itself: install the eBPF toolchain, run the root-only
//! tests, benchmark. `cargo xtask --help` lists them.

mod bench;
mod checks;
mod kernels;
mod setup;

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, the BPF toolchain, bpf-linker).
    /// Does nothing, without network, when all is there.
    Setup,
    /// Set up, build in release mode, and run `tracer` with the given arguments (default: the
    /// agent, `tracer run`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run every test (the kernel tests need root): unit tests, kernel
    /// tests on this machine's kernel, deploy checks, then the kernel tests on Debian's 6.1 and
    /// 6.12 kernels under QEMU (`cargo xtask kernels`).
    Test {
        /// Leave out the Debian kernels (for a quicker run while developing; CI runs them).
        #[arg(long)]
        host_only: bool,
    },
    /// Set up, build, and measure connection churn with and without the tracer.
    Bench(bench::BenchArgs),
    /// Run the kernel tests on other kernels too: the newest Debian 6.1 and 6.12 cloud kernels
    /// (booted under QEMU with virtme-ng) and this machine's own; one line per kernel and test.
    /// Installs what it needs (QEMU, virtme-ng, virtiofsd, the kernels) where missing.
    Kernels(kernels::KernelsArgs),
    /// (Used by bench) hold N loopback connections to a listener on ADDR open until stdin closes.
    #[command(hide = true)]
    Hold {
        connections: usize,
        /// The loopback address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        addr: std::net::Ipv4Addr,
    },
    /// Only the bench's loopback churn, for SECONDS, to profile a tracer under load (e.g. with
    /// `perf record -a`).
    Churn { seconds: u64 },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Run { args } => run_tracer(args),
        Task::Test { host_only } => test(host_only),
        Task::Kernels(args) => kernels::run(&args),
        Task::Hold { connections, addr } => bench::hold(connections, addr),
        Task::Churn { seconds } => bench::churn_only(seconds),
        Task::Bench(args) => setup::run()
            .and_then(|()| build_release())
            .and_then(|()| bench::run(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_tracer(mut args: Vec<String>) -> Result<()> {
    setup::run()?;
    build_release()?;
    if args.is_empty() {
        args.push("run".into());
    }
    let status = Command::new("target/release/tracer")
        .args(&args)
        .status()
        .context("starting target/release/tracer")?;
    if !status.success() {
        bail!("tracer exited with {status}");
    }
    Ok(())
}

/// Runs the unit tests, then the kernel tests one at a time (they attach probes and read the
/// kernel's trace buffers, which are shared by the whole machine), then the deploy checks,
/// then (unless `host_only`) the same kernel tests on the Debian kernels of the matrix.
fn test(host_only: bool) -> Result<()> {
    setup::run()?;
    setup::mount_tracefs()?;
    // Every test binary in one build, the `tracer` binary the kernel tests run included, so
    // that cargo compiles them side by side on both cores rather than one after the other
    // (a `cargo build` of the binary first cost a fresh clone a minute more).
    cargo(&[
        "test",
        "--release",
        "--no-run",
        "--lib",
        "--bins",
        "--test",
        "*",
    ])?;
    cargo(&["test", "--release", "--lib", "--bins"])?;
    let kernel_tests = cargo(&[
        "test",
        "--release",
        "--no-fail-fast",
        "--test",
        "*",
        "--",
        "--test-threads=1",
    ]);
    // The deploy checks and the other kernels run even when a test failed, so that one run
    // shows everything.
    let deploy = checks::run();
    let matrix = if host_only {
        eprintln!("xtask: --host-only: the Debian 6.1 and 6.12 kernels were NOT tested");
        Ok(())
    } else {
        kernels::run(&kernels::KernelsArgs::other_kernels())
    };
    kernel_tests.and(deploy).and(matrix)
}

fn build_release() -> Result<()> {
    cargo(&["build", "--release", "--package", "tracer"])
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
