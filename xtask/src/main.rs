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
    if host_only {
        let kernel_tests = host_kernel_tests();
        let deploy = checks::run();
        eprintln!("xtask: --host-only: the Debian 6.1 and 6.12 kernels were NOT tested");
        return kernel_tests.and(deploy);
    }
    // The guests boot while the host's kernel tests run: they are other kernels, and their
    // emulation, at a lower priority (see kernels::run_kernel), takes the CPU time the host's
    // tests leave (most of it: they wait on timers and censuses). One after the other, the
    // two took 14 minutes of a 30-minute run.
    let args = kernels::KernelsArgs::other_kernels();
    let matrix = kernels::prepare(&args)?;
    std::thread::scope(|s| {
        let guests = s.spawn(|| matrix.run());
        let kernel_tests = host_kernel_tests();
        let deploy = checks::run();
        let finished = guests
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the kernel matrix's runner panicked")));
        let matrix = finished.and_then(|f| f.report());
        kernel_tests.and(deploy).and(matrix)
    })
}

/// The kernel tests (tracer/tests), on this machine's kernel, one at a time.
fn host_kernel_tests() -> Result<()> {
    cargo(&[
        "test",
        "--release",
        "--no-fail-fast",
        "--test",
        "*",
        "--",
        "--test-threads=1",
    ])
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
