//! `cargo xtask kernels`: the kernel tests of `tracer` on other kernels than this machine's.
//!
//! The matrix: the newest Debian 6.1 and 6.12 cloud kernels (Debian 12 and its backports),
//! each booted under QEMU with virtme-ng, and this machine's own kernel (docs/kernels.md).
//!
//! - Everything is built on the host first (`cargo build --release`, then the test binaries
//!   with `cargo test --no-run`): a guest sees the host's root file system read-only, so it
//!   runs the very same binaries by their paths, and builds nothing.
//! - Each test runs in a process of its own (`BINARY --exact NAME`), as root with `CI=1` (a
//!   missing privilege fails rather than skips), one at a time, with a time limit. Its exit
//!   status is the verdict, its whole output is kept in the output directory.
//! - The guest's script writes the results into the output directory (shared read-write):
//!   `vng` itself exits 255 whatever the script returns, so its status says nothing.
//! - This machine's own kernel is not booted (its image is not on the machine): the same
//!   script runs here directly.
//! - A test that a kernel cannot support says so on its stderr, in a line starting with
//!   `UNSUPPORTED` or `SKIPPED` and giving the reason, and passes: the report shows it as
//!   UNSUPPORTED with that reason, never as passed.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::setup;

/// Where the VM tools (virtiofsd) and the Debian kernels are kept: `$TRACER_KERNEL_CACHE`,
/// else `~/.cache/tracer/kernels` (root's, as the tests run as root).
fn machine_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRACER_KERNEL_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/tracer/kernels")
}

/// The default matrix, in the order it runs.
const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12", "host"];

#[derive(clap::Args)]
pub struct KernelsArgs {
    /// A kernel to test: a Debian cloud kernel series (`6.1`, `6.12`: the newest build of that
    /// series in the package lists, booted under QEMU) or `host` (this machine's kernel, tests
    /// run directly). Repeatable; default: 6.1, 6.12 and host.
    #[arg(long = "kernel", value_name = "SERIES|host")]
    kernels: Vec<String>,
    /// Only this test binary: `lib` (the unit tests of tracer) or an integration test (`run`,
    /// `stuck`, `watch`, ...). Repeatable; default: all.
    #[arg(long = "test", value_name = "BINARY")]
    binaries: Vec<String>,
    /// Only tests whose full name (`BINARY::TEST`) contains one of these.
    filters: Vec<String>,
    /// Time limit of one test, in seconds (a hung test is reported as TIMEOUT).
    #[arg(long, default_value_t = 240)]
    test_timeout: u64,
    /// Of the unit tests (`lib`), run only those that read the running kernel (its BTF); the
    /// others are pure code, the same on every kernel (`cargo xtask test` runs them on the host).
    #[arg(long)]
    kernel_unit_tests_only: bool,
}

/// The unit tests that read the running kernel: the rest of `lib` is pure code.
const KERNEL_UNIT_TESTS: [&str; 2] = ["btf::", "features::"];

/// One test binary built by `cargo test --no-run`.
struct Binary {
    /// `lib`, or the integration test's name.
    name: String,
    exe: PathBuf,
    /// Tests to run, in libtest's order.
    tests: Vec<String>,
    /// Tests marked `#[ignore]`: reported, not run.
    ignored: Vec<String>,
}

/// Where a kernel's tests run.
enum Kernel {
    Guest { release: String, vmlinuz: PathBuf },
    Host { release: String },
}

impl Kernel {
    fn release(&self) -> &str {
        match self {
            Kernel::Guest { release, .. } | Kernel::Host { release } => release,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Passed,
    Failed,
    /// Passed, saying the kernel cannot support what it tests; with the reason.
    Unsupported(String),
    Ignored,
    TimedOut,
    /// Ended by a signal or with an unexpected status.
    Crashed(i32),
    /// `--exact NAME` ran no test.
    NotFound,
    /// No result: the guest stopped (or was stopped) before the test ran.
    NotRun,
}

impl Verdict {
    fn word(&self) -> String {
        match self {
            Verdict::Passed => "ok".into(),
            Verdict::Failed => "FAILED".into(),
            Verdict::Unsupported(reason) => format!("UNSUPPORTED ({reason})"),
            Verdict::Ignored => "ignored".into(),
            Verdict::TimedOut => "TIMEOUT".into(),
            Verdict::Crashed(rc) => format!("CRASHED (exit status {rc})"),
            Verdict::NotFound => "NOT FOUND (ran no test)".into(),
            Verdict::NotRun => "NOT RUN".into(),
        }
    }

    fn is_failure(&self) -> bool {
        !matches!(
            self,
            Verdict::Passed | Verdict::Unsupported(_) | Verdict::Ignored
        )
    }
}

struct TestResult {
    name: String,
    verdict: Verdict,
    seconds: Option<f64>,
    log: PathBuf,
}

struct KernelRun {
    release: String,
    /// The kernel the script saw (`uname -r`), when it ran.
    booted: Option<String>,
    results: Vec<TestResult>,
    elapsed: Duration,
    /// Why the run itself went wrong, if it did.
    trouble: Option<String>,
    console: PathBuf,
    /// The oops of a first boot that panicked, when this run is the second.
    panicked_before: Option<String>,
}

impl KernelsArgs {
    /// The Debian kernels of the matrix, every test: what `cargo xtask test` runs after the
    /// host's own tests (which it has just run on this kernel).
    pub fn other_kernels() -> KernelsArgs {
        KernelsArgs {
            kernels: DEFAULT_KERNELS
                .iter()
                .filter(|k| **k != "host")
                .map(|k| k.to_string())
                .collect(),
            binaries: Vec::new(),
            filters: Vec::new(),
            test_timeout: 240,
            kernel_unit_tests_only: true,
        }
    }
}

pub fn run(args: &KernelsArgs) -> Result<()> {
    prepare(args)?.run()?.report()
}

/// A matrix ready to run: tools installed, kernels fetched, test binaries built.
pub struct Matrix<'a> {
    args: &'a KernelsArgs,
    started: Instant,
    prepared: Duration,
    root: PathBuf,
    results: PathBuf,
    tools: Option<(PathBuf, PathBuf)>,
    kernels: Vec<Kernel>,
    binaries: Vec<Binary>,
}

/// What a matrix did on each kernel.
pub struct Finished {
    runs: Vec<KernelRun>,
    prepared: Duration,
    total: Duration,
}

impl Finished {
    /// Prints every result and the failures' logs; an error when any failed.
    pub fn report(&self) -> Result<()> {
        report(&self.runs, self.prepared, self.total)
    }
}

/// Installs what the matrix needs and builds the test binaries: everything before the first
/// kernel, so that a guest only runs binaries and no cargo runs beside it.
pub fn prepare(args: &KernelsArgs) -> Result<Matrix<'_>> {
    let started = Instant::now();
    let root = workspace_root();
    // The tools and kernels are the machine's, kept across clones (a fresh clone built
    // virtiofsd and fetched both kernels again: two minutes of every run); the results are
    // the clone's.
    let cache = machine_cache();
    let results = root.join("target/kernels");
    let mut wanted: Vec<String> = if args.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect()
    } else {
        args.kernels.clone()
    };
    let mut seen = std::collections::HashSet::new();
    wanted.retain(|k| seen.insert(k.clone()));
    for k in &wanted {
        let series_ok = k.split('.').count() == 2 && k.split('.').all(|n| n.parse::<u32>().is_ok());
        if k != "host" && !series_ok {
            bail!("--kernel {k}: expected a series such as 6.1 or 6.12, or `host`");
        }
    }

    // The tests load eBPF programs and mount tracefs, in a guest as here.
    setup::require_root("running the kernel tests")?;
    // Install, then build: all before the first kernel, so that a guest only runs binaries.
    setup::run()?;
    let guests = wanted.iter().any(|k| k != "host");
    let tools = if guests {
        Some(setup::install_vm_tools(&cache)?)
    } else {
        None
    };
    let mut kernels = Vec::new();
    for k in &wanted {
        if k == "host" {
            kernels.push(Kernel::Host {
                release: host_release()?,
            });
        } else {
            let deb = setup::install_debian_kernel(k, &cache)?;
            kernels.push(Kernel::Guest {
                release: deb.release,
                vmlinuz: deb.vmlinuz,
            });
        }
    }
    let binaries = build(&root, args)?;
    let total: usize = binaries.iter().map(|b| b.tests.len()).sum();
    if total == 0 {
        bail!("no test matches the --test and filter arguments");
    }
    let prepared = started.elapsed();
    eprintln!(
        "xtask: installed and built in {:.0} s; {total} tests in {} binaries on {} kernels",
        prepared.as_secs_f64(),
        binaries.len(),
        kernels.len()
    );
    Ok(Matrix {
        args,
        started,
        prepared,
        root,
        results,
        tools,
        kernels,
        binaries,
    })
}

impl Matrix<'_> {
    /// Runs every test on every kernel: the host's own kernel first, alone (its tests share
    /// this machine's trace buffers); then the guests, all at once: each is its own kernel,
    /// and a guest's tests spend much of their time waiting (timers, censuses), which the
    /// other guest's emulation fills.
    pub fn run(self) -> Result<Finished> {
        let run_one = |kernel: &Kernel| {
            run_with_retry(
                kernel,
                &self.binaries,
                &self.results,
                &self.root,
                self.tools.as_ref(),
                self.args,
            )
        };
        let mut runs = Vec::new();
        for kernel in self
            .kernels
            .iter()
            .filter(|k| matches!(k, Kernel::Host { .. }))
        {
            runs.push(run_one(kernel)?);
        }
        let guests: Vec<&Kernel> = self
            .kernels
            .iter()
            .filter(|k| matches!(k, Kernel::Guest { .. }))
            .collect();
        let guest_runs: Vec<Result<KernelRun>> = std::thread::scope(|s| {
            let handles: Vec<_> = guests
                .iter()
                .map(|kernel| s.spawn(move || run_one(kernel)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a guest's runner panicked")))
                })
                .collect()
        });
        for run in guest_runs {
            runs.push(run?);
        }
        Ok(Finished {
            runs,
            prepared: self.prepared,
            total: self.started.elapsed(),
        })
    }
}

/// Runs every test on `kernel`. A guest kernel that panics under full emulation (seen once,
/// in 6.12's scheduler, an int3 trap during a timer softirq) takes every test after it down:
/// it is booted once more for the whole run, saying so. A panic that comes back fails as
/// before.
fn run_with_retry(
    kernel: &Kernel,
    binaries: &[Binary],
    results: &Path,
    root: &Path,
    tools: Option<&(PathBuf, PathBuf)>,
    args: &KernelsArgs,
) -> Result<KernelRun> {
    let out = results.join("out").join(kernel.release());
    let mut run = run_kernel(kernel, binaries, &out, root, tools, args)?;
    if let Some(oops) = guest_panic(kernel, &run) {
        let kept = results
            .join("out")
            .join(format!("{}-panicked-console.log", kernel.release()));
        let _ = std::fs::rename(&run.console, &kept);
        eprintln!(
            "xtask: {}: PANIC: the guest kernel panicked during the run ({oops}); its \
             console is kept in {}; booting it again for every test",
            kernel.release(),
            kept.display()
        );
        run = run_kernel(kernel, binaries, &out, root, tools, args)?;
        run.panicked_before = Some(format!("{oops}; console: {}", kept.display()));
    }
    Ok(run)
}

/// The first line of a guest kernel's oops when its run stopped early because the kernel
/// panicked (its console says `Kernel panic`); None otherwise.
fn guest_panic(kernel: &Kernel, run: &KernelRun) -> Option<String> {
    if !matches!(kernel, Kernel::Guest { .. }) || run.trouble.is_none() {
        return None;
    }
    panic_line(&std::fs::read_to_string(&run.console).unwrap_or_default())
}

/// In a kernel console, the oops line of a `Kernel panic` (or the panic line itself).
fn panic_line(console: &str) -> Option<String> {
    let panic = console.lines().find(|l| l.contains("Kernel panic"))?;
    let oops = console
        .lines()
        .find(|l| l.contains("Oops:") || l.contains("BUG:"));
    let line = oops.unwrap_or(panic);
    // Without the `[  300.499361] ` timestamp.
    Some(
        line.split_once("] ")
            .map_or(line, |(_, rest)| rest)
            .trim()
            .to_owned(),
    )
}

/// The workspace's root directory (xtask's parent).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

fn host_release() -> Result<String> {
    let out = Command::new("uname")
        .arg("-r")
        .output()
        .context("running uname -r")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Builds tracer and its test binaries in release mode; returns the binaries with the tests
/// each will run.
fn build(root: &Path, args: &KernelsArgs) -> Result<Vec<Binary>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The workspace's default members, as `cargo xtask test` builds them: the same feature
    // set, so that nothing is built twice (a `cargo build --package tracer` here resolved
    // the dependencies' features for tracer alone and rebuilt them: a minute of each run);
    // the `tracer` binary comes with the integration tests, which run it. Only tracer's test
    // binaries are kept below.
    let out = Command::new(&cargo)
        .args(["test", "--release", "--no-run"])
        .args(["--lib", "--bins", "--test", "*", "--message-format=json"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed ({})", out.status);
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = json::parse(line) else { continue };
        if msg.get("reason").and_then(json::Value::as_str) != Some("compiler-artifact")
            || msg.get("profile").and_then(|p| p.get("test")) != Some(&json::Value::Bool(true))
        {
            continue;
        }
        let Some(exe) = msg.get("executable").and_then(json::Value::as_str) else {
            continue;
        };
        // `path+file:///.../tracer#0.1.0`: tracer's own, not tracer-common's or xtask's.
        let package = msg
            .get("package_id")
            .and_then(json::Value::as_str)
            .unwrap_or("");
        if !package.contains("/tracer#") {
            continue;
        }
        let target = msg
            .get("target")
            .context("cargo message without a target")?;
        let kind = target
            .get("kind")
            .and_then(|k| k.index(0))
            .and_then(json::Value::as_str)
            .unwrap_or("");
        // The binary's own unit tests (`--bins`, built only to share the feature set) are
        // pure code.
        if kind == "bin" {
            continue;
        }
        let name = if kind == "lib" {
            "lib".to_owned()
        } else {
            target
                .get("name")
                .and_then(json::Value::as_str)
                .unwrap_or("?")
                .to_owned()
        };
        if !args.binaries.is_empty() && !args.binaries.contains(&name) {
            continue;
        }
        if binaries.iter().any(|b: &Binary| b.name == name) {
            continue;
        }
        let exe = PathBuf::from(exe);
        let package_dir = root.join("tracer");
        let all = list_tests(&exe, &package_dir, false)?;
        let ignored = list_tests(&exe, &package_dir, true)?;
        let keep = |t: &String| {
            if name == "lib"
                && args.kernel_unit_tests_only
                && !KERNEL_UNIT_TESTS.iter().any(|m| t.starts_with(m))
            {
                return false;
            }
            args.filters.is_empty()
                || args
                    .filters
                    .iter()
                    .any(|f| format!("{name}::{t}").contains(f.as_str()))
        };
        let tests = all
            .iter()
            .filter(|t| !ignored.contains(t))
            .filter(|t| keep(t))
            .cloned()
            .collect();
        let ignored = ignored.into_iter().filter(|t| keep(t)).collect();
        binaries.push(Binary {
            name,
            exe,
            tests,
            ignored,
        });
    }
    for b in &args.binaries {
        if !binaries.iter().any(|x| &x.name == b) {
            bail!("--test {b}: no such test binary (there are `lib` and tracer/tests/*.rs)");
        }
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    binaries.retain(|b| !b.tests.is_empty() || !b.ignored.is_empty());
    Ok(binaries)
}

/// The tests a libtest binary holds (with `ignored`, only those marked `#[ignore]`).
fn list_tests(exe: &Path, cwd: &Path, ignored: bool) -> Result<Vec<String>> {
    let mut cmd = Command::new(exe);
    cmd.args(["--list", "--format=terse"]).current_dir(cwd);
    if ignored {
        cmd.arg("--ignored");
    }
    let out = cmd
        .output()
        .with_context(|| format!("listing the tests of {}", exe.display()))?;
    if !out.status.success() {
        bail!("{} --list failed ({})", exe.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

/// Quotes `s` for the shell.
fn sh(s: impl AsRef<str>) -> String {
    format!("'{}'", s.as_ref().replace('\'', r"'\''"))
}

/// The script that runs every test on the kernel it finds itself on, writing into `out`:
/// `uname` (the kernel), `results.tsv` (binary, test, exit status, microseconds: one line per test
/// as it ends), `logs/BINARY/TEST.log`, and `finished` last.
fn script(binaries: &[Binary], out: &Path, package_dir: &Path, timeout: u64) -> String {
    let o = out.display().to_string();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "#!/bin/bash\n\
         # Generated by `cargo xtask kernels`: runs tracer's kernel tests on this kernel.\n\
         set -u\n\
         OUT={o}\n\
         uname -r > \"$OUT/uname\"\n\
         # The tests' ftrace oracle needs tracefs (a fresh guest or host may not mount it).\n\
         [ -e /sys/kernel/tracing/instances ] || mount -t tracefs nodev /sys/kernel/tracing\n\
         [ -e /sys/kernel/debug/tracing ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null\n\
         # Root-only tests fail rather than skip; temporary files (Prometheus's storage) go\n\
         # where the guest can write.\n\
         export CI=1 TRACER_KERNEL_MATRIX=1 TMPDIR=\"$OUT/tmp\" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         unset RUST_BACKTRACE\n\
         mkdir -p \"$TMPDIR\"\n\
         cd {}\n\
         t() {{\n\
         \x20   mkdir -p \"$OUT/logs/$1\"\n\
         \x20   local log=\"$OUT/logs/$1/$2.log\" start=${{EPOCHREALTIME//[!0-9]/}}\n\
         \x20   timeout -k 10 {timeout} \"$3\" --exact \"$2\" --test-threads=1 --nocapture </dev/null >\"$log\" 2>&1\n\
         \x20   local rc=$? end=${{EPOCHREALTIME//[!0-9]/}}\n\
         \x20   printf '%s\\t%s\\t%s\\t%s\\n' \"$1\" \"$2\" \"$rc\" \"$((end - start))\" >> \"$OUT/results.tsv\"\n\
         }}",
        sh(package_dir.display().to_string()),
        o = sh(&o),
    );
    for b in binaries {
        for t in &b.tests {
            let _ = writeln!(
                s,
                "t {} {} {}",
                sh(&b.name),
                sh(t),
                sh(b.exe.display().to_string())
            );
        }
    }
    let _ = writeln!(s, "echo finished > \"$OUT/finished\"");
    s
}

fn run_kernel(
    kernel: &Kernel,
    binaries: &[Binary],
    out: &Path,
    root: &Path,
    tools: Option<&(PathBuf, PathBuf)>,
    args: &KernelsArgs,
) -> Result<KernelRun> {
    let release = kernel.release().to_owned();
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out)?;
    let script_path = out.join("run.sh");
    std::fs::write(
        &script_path,
        script(binaries, out, &root.join("tracer"), args.test_timeout),
    )?;
    let console = out.join("console.log");
    let log = std::fs::File::create(&console)?;
    let mut cmd = match kernel {
        Kernel::Guest { vmlinuz, .. } => {
            let (vng, virtiofsd) = tools.context("the VM tools are not installed")?;
            // At a lower priority than the host's own tests, which `cargo xtask test` runs
            // beside the guests: their timings are the host kernel's, which the emulation
            // must not disturb; the guests' tests allow for a slow and stalling CPU.
            let mut cmd = Command::new("nice");
            cmd.args(["-n", "10"])
                .arg(vng)
                .arg("--run")
                .arg(vmlinuz)
                .args([
                    "--disable-kvm",
                    "--cpus",
                    "2",
                    "--memory",
                    "4G",
                    "--verbose",
                ])
                .arg(format!("--rwdir={}", out.display()))
                .arg(format!("--cwd={}", root.display()))
                .arg("--exec")
                .arg(format!("bash {}", sh(script_path.display().to_string())))
                .env(
                    "PATH",
                    format!(
                        "{}:{}",
                        virtiofsd.display(),
                        std::env::var("PATH").unwrap_or_default()
                    ),
                );
            eprintln!("xtask: {release}: booting under QEMU (no KVM) and running the tests");
            cmd
        }
        Kernel::Host { .. } => {
            eprintln!("xtask: {release}: running the tests on this machine's kernel");
            let mut cmd = Command::new("bash");
            cmd.arg(&script_path);
            cmd
        }
    };
    let start = Instant::now();
    let mut child = cmd
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    // A backstop only: every test has its own limit inside.
    let count: usize = binaries.iter().map(|b| b.tests.len()).sum();
    let limit = Duration::from_secs(180 + (count as u64) * (args.test_timeout + 15));
    let results_path = out.join("results.tsv");
    let mut shown = 0;
    let mut trouble = None;
    // A guest whose kernel hangs ends no test, and the per-test limit inside it cannot fire:
    // once no test has ended for a test's limit and a minute (the boot besides, for the
    // first), the guest is stopped rather than waited for until the backstop.
    let (mut last_progress, mut stall) = (
        Instant::now(),
        Duration::from_secs(180 + args.test_timeout + 60),
    );
    loop {
        let done = child.try_wait()?.is_some();
        let text = std::fs::read_to_string(&results_path).unwrap_or_default();
        for line in text.lines().skip(shown) {
            if let Some(r) = parse_result(line, out) {
                eprintln!(
                    "xtask: {release}: {}/{count} {} {} ({})",
                    shown + 1,
                    r.name,
                    r.verdict.word(),
                    seconds(r.seconds)
                );
            }
            shown += 1;
            last_progress = Instant::now();
            stall = Duration::from_secs(args.test_timeout + 60);
        }
        if done {
            break;
        }
        if last_progress.elapsed() > stall {
            trouble = Some(format!(
                "no test ended for {} s after test {shown} of {count}: the guest hung (its \
                 console log says how far it got)",
                stall.as_secs()
            ));
            // SAFETY: kill on the process group of a child we started and have not reaped.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break;
        }
        if start.elapsed() > limit {
            trouble = Some(format!("stopped after {} s", limit.as_secs()));
            // SAFETY: kill on the process group of a child we started and have not reaped.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = start.elapsed();
    let booted = std::fs::read_to_string(out.join("uname"))
        .ok()
        .map(|s| s.trim().to_owned());
    if trouble.is_none() {
        trouble = match &booted {
            None => Some("the script never ran (the kernel did not boot?)".into()),
            Some(b) if *b != release => Some(format!("booted {b}, not {release}")),
            Some(_) if !out.join("finished").exists() => {
                Some("the script stopped before the end".into())
            }
            Some(_) => None,
        };
    }
    let text = std::fs::read_to_string(&results_path).unwrap_or_default();
    let mut ran: Vec<TestResult> = text.lines().filter_map(|l| parse_result(l, out)).collect();
    let mut results = Vec::new();
    for b in binaries {
        for t in &b.tests {
            let name = format!("{}::{t}", b.name);
            let r = match ran.iter().position(|r| r.name == name) {
                Some(i) => ran.swap_remove(i),
                None => TestResult {
                    name,
                    verdict: Verdict::NotRun,
                    seconds: None,
                    log: PathBuf::new(),
                },
            };
            results.push(r);
        }
        for t in &b.ignored {
            results.push(TestResult {
                name: format!("{}::{t}", b.name),
                verdict: Verdict::Ignored,
                seconds: None,
                log: PathBuf::new(),
            });
        }
    }
    Ok(KernelRun {
        release,
        booted,
        results,
        elapsed,
        trouble,
        console,
        panicked_before: None,
    })
}

/// One line of results.tsv, judged with its log.
fn parse_result(line: &str, out: &Path) -> Option<TestResult> {
    let mut f = line.split('\t');
    let (binary, test, rc, secs) = (f.next()?, f.next()?, f.next()?, f.next()?);
    let log = out.join("logs").join(binary).join(format!("{test}.log"));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let rc: i32 = rc.trim().parse().ok()?;
    let verdict = match rc {
        0 if !text
            .lines()
            .any(|l| l.starts_with("test result: ok. 1 passed")) =>
        {
            Verdict::NotFound
        }
        0 => match unsupported_reason(&text, test) {
            Some(reason) => Verdict::Unsupported(reason),
            None => Verdict::Passed,
        },
        101 => Verdict::Failed,
        124 | 137 => Verdict::TimedOut,
        rc => Verdict::Crashed(rc),
    };
    Some(TestResult {
        name: format!("{binary}::{test}"),
        verdict,
        seconds: secs.trim().parse::<f64>().ok().map(|us| us / 1e6),
        log,
    })
}

/// The reasons a passing test gave for not testing (all or part of) what it tests: its lines
/// `UNSUPPORTED [TEST:] REASON` or `SKIPPED [TEST:] REASON`. Such a line may follow libtest's
/// own `test NAME ... ` on the same line (with --nocapture the test's output comes right
/// after it).
fn unsupported_reason(log: &str, test: &str) -> Option<String> {
    let started = format!("test {test} ... ");
    let reasons: Vec<String> = log
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix(started.as_str()).unwrap_or(l);
            let rest = l
                .strip_prefix("UNSUPPORTED")
                .or_else(|| l.strip_prefix("SKIPPED"))?;
            let rest = rest.trim_start_matches([':', ' ']);
            let rest = rest
                .strip_prefix(test)
                .and_then(|r| r.strip_prefix(':'))
                .unwrap_or(rest)
                .trim();
            Some(if rest.is_empty() {
                "no reason given".to_owned()
            } else {
                rest.to_owned()
            })
        })
        .collect();
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

fn seconds(s: Option<f64>) -> String {
    s.map_or_else(|| "-".into(), |s| format!("{s:.1}s"))
}

/// Prints one line per kernel and test, a summary per kernel, then the failures' output.
fn report(runs: &[KernelRun], prepared: Duration, total: Duration) -> Result<()> {
    let kw = runs.iter().map(|r| r.release.len()).max().unwrap_or(0);
    let tw = runs
        .iter()
        .flat_map(|r| &r.results)
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0);
    println!();
    for run in runs {
        for t in &run.results {
            println!(
                "{:kw$}  {:tw$}  {:7}  {}",
                run.release,
                t.name,
                seconds(t.seconds),
                t.verdict.word()
            );
        }
    }
    println!();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for run in runs {
        let count = |f: fn(&Verdict) -> bool| run.results.iter().filter(|t| f(&t.verdict)).count();
        let ok = count(|v| *v == Verdict::Passed);
        let unsupported = count(|v| matches!(v, Verdict::Unsupported(_)));
        let ignored = count(|v| *v == Verdict::Ignored);
        let bad = count(Verdict::is_failure);
        let notrun = count(|v| *v == Verdict::NotRun);
        passed += ok;
        failed += bad;
        skipped += unsupported + ignored;
        let mut line = format!(
            "{:kw$}  {ok} passed, {bad} failed, {unsupported} unsupported, {ignored} ignored  in {:.0} s",
            run.release,
            run.elapsed.as_secs_f64()
        );
        if notrun > 0 {
            let _ = write!(line, " ({notrun} not run)");
        }
        if let Some(t) = &run.trouble {
            let _ = write!(line, "  !! {t}; console: {}", run.console.display());
        } else if run.booted.is_none() {
            let _ = write!(line, "  !! no result");
        }
        if let Some(oops) = &run.panicked_before {
            let _ = write!(line, "  (PANIC on a first boot, run again: {oops})");
        }
        println!("{line}");
    }
    println!(
        "total {:.0} s (install and build {:.0} s)",
        total.as_secs_f64(),
        prepared.as_secs_f64()
    );

    for run in runs {
        if let Some(t) = &run.trouble {
            println!("\n==== {}: {t}; the end of its console:", run.release);
            print_trimmed(
                &std::fs::read_to_string(&run.console).unwrap_or_default(),
                30,
            );
        }
        for t in run.results.iter().filter(|t| t.verdict.is_failure()) {
            if t.verdict == Verdict::NotRun {
                continue;
            }
            println!(
                "\n==== {}  {}  {}  (whole output: {})",
                run.release,
                t.name,
                t.verdict.word(),
                t.log.display()
            );
            let text = std::fs::read_to_string(&t.log).unwrap_or_default();
            print_failure(&text);
        }
    }
    // Unsupported and ignored tests count as skipped in the closing line.
    println!("\nkernels: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 || runs.iter().any(|r| r.trouble.is_some()) {
        bail!("{failed} test results on the kernel matrix are failures");
    }
    Ok(())
}

/// Prints at most `max` lines of `text`, each cut at 300 characters: its end.
fn print_trimmed(text: &str, max: usize) {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(max);
    if start > 0 {
        println!("    [... {start} lines]");
    }
    for l in &lines[start..] {
        println!("    {}", cut(l));
    }
}

/// The panic messages in a failed test's output (the assertion and what it printed with it),
/// each shortened to its first 10 and last 4 lines; without a panic, the output's end.
fn print_failure(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    let mut shown = false;
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].contains("panicked at") {
            i += 1;
            continue;
        }
        let end = (i + 1..lines.len())
            .find(|&k| {
                let l = lines[k];
                l.starts_with("note: run with `RUST_BACKTRACE")
                    || l.starts_with("stack backtrace:")
                    || l.contains("panicked at")
                    || l == "FAILED"
                    || l == "failures:"
            })
            .unwrap_or(lines.len());
        // Prometheus expositions that a test prints with its assertion: the comments are noise.
        let block: Vec<&str> = lines[i..end]
            .iter()
            .copied()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !l.starts_with("# HELP ") && !l.starts_with("# TYPE "))
            .collect();
        if block.len() > 16 {
            for l in &block[..10] {
                println!("    {}", cut(l));
            }
            println!("    [... {} lines]", block.len() - 14);
            for l in &block[block.len() - 4..] {
                println!("    {}", cut(l));
            }
        } else {
            for l in &block {
                println!("    {}", cut(l));
            }
        }
        shown = true;
        i = end;
    }
    if !shown {
        print_trimmed(text, 20);
    }
}

fn cut(line: &str) -> String {
    let cut: String = line.chars().take(300).collect();
    if cut.len() < line.len() {
        format!("{cut} [...]")
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_panic_is_told_by_its_oops_line() {
        let console = "[    5.49] virtme-ng-init: starting script\n\
            [  300.49] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
            [  300.50] RIP: 0010:ttwu_do_activate+0x8d/0x220\n\
            [  300.51] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert_eq!(
            panic_line(console).as_deref(),
            Some("Oops: int3: 0000 [#1] PREEMPT SMP NOPTI")
        );
        assert_eq!(
            panic_line("[ 1.0] Oops: looks bad\n[ 2.0] still running\n"),
            None
        );
        assert_eq!(
            panic_line("[ 9.0] Kernel panic - not syncing: VFS\n").as_deref(),
            Some("Kernel panic - not syncing: VFS")
        );
    }

    #[test]
    fn an_unsupported_or_skipped_line_gives_the_reason() {
        let log =
            "running 1 test\nUNSUPPORTED resets: this kernel's tcp_send_reset has no reason\nok\n";
        assert_eq!(
            unsupported_reason(log, "resets").as_deref(),
            Some("this kernel's tcp_send_reset has no reason")
        );
        assert_eq!(
            unsupported_reason("SKIPPED: no BTF\n", "btf::tests::x").as_deref(),
            Some("no BTF")
        );
        assert_eq!(unsupported_reason("test x ... ok\n", "x"), None);
        let inline = "test x ... UNSUPPORTED feature: why\nSKIPPED x: other\nok\n";
        assert_eq!(
            unsupported_reason(inline, "x").as_deref(),
            Some("feature: why; other")
        );
    }

    #[test]
    fn results_are_judged_by_exit_status_and_log() {
        let out = std::env::temp_dir().join(format!("xtask-kernels-test-{}", std::process::id()));
        let logs = out.join("logs/run");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(logs.join("a.log"), "test result: ok. 1 passed; 0 failed\n").unwrap();
        std::fs::write(logs.join("b.log"), "test result: ok. 0 passed; 0 failed\n").unwrap();
        let judge = |line: &str| parse_result(line, &out).map(|r| (r.name, r.verdict, r.seconds));
        assert_eq!(
            judge("run\ta\t0\t1500000"),
            Some(("run::a".into(), Verdict::Passed, Some(1.5)))
        );
        assert_eq!(judge("run\tb\t0\t1").unwrap().1, Verdict::NotFound);
        assert_eq!(judge("run\ta\t101\t1").unwrap().1, Verdict::Failed);
        assert_eq!(judge("run\ta\t124\t1").unwrap().1, Verdict::TimedOut);
        assert_eq!(judge("run\ta\t139\t1").unwrap().1, Verdict::Crashed(139));
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Just enough JSON to read cargo's `--message-format=json` lines.
mod json {
    #[derive(Debug, PartialEq)]
    pub enum Value {
        Null,
        Bool(bool),
        Number(String),
        Str(String),
        Array(Vec<Value>),
        Object(Vec<(String, Value)>),
    }

    impl Value {
        pub fn get(&self, key: &str) -> Option<&Value> {
            match self {
                Value::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
                _ => None,
            }
        }

        pub fn index(&self, i: usize) -> Option<&Value> {
            match self {
                Value::Array(a) => a.get(i),
                _ => None,
            }
        }

        pub fn as_str(&self) -> Option<&str> {
            match self {
                Value::Str(s) => Some(s),
                _ => None,
            }
        }
    }

    pub fn parse(text: &str) -> Result<Value, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at {}", p.i));
        }
        Ok(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
                self.i += 1;
            }
        }

        fn eat(&mut self, c: u8) -> Result<(), String> {
            self.ws();
            if self.s.get(self.i) == Some(&c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected {:?} at {}", c as char, self.i))
            }
        }

        fn literal(&mut self, word: &str, v: Value) -> Result<Value, String> {
            if self.s[self.i..].starts_with(word.as_bytes()) {
                self.i += word.len();
                Ok(v)
            } else {
                Err(format!("bad literal at {}", self.i))
            }
        }

        fn value(&mut self) -> Result<Value, String> {
            self.ws();
            match self.s.get(self.i) {
                Some(b'{') => {
                    self.i += 1;
                    let mut m = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(Value::Object(m));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.eat(b':')?;
                        m.push((k, self.value()?));
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(Value::Object(m));
                            }
                            _ => return Err(format!("bad object at {}", self.i)),
                        }
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    let mut a = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(Value::Array(a));
                    }
                    loop {
                        a.push(self.value()?);
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(Value::Array(a));
                            }
                            _ => return Err(format!("bad array at {}", self.i)),
                        }
                    }
                }
                Some(b'"') => Ok(Value::Str(self.string()?)),
                Some(b't') => self.literal("true", Value::Bool(true)),
                Some(b'f') => self.literal("false", Value::Bool(false)),
                Some(b'n') => self.literal("null", Value::Null),
                Some(c) if *c == b'-' || c.is_ascii_digit() => {
                    let start = self.i;
                    while self
                        .s
                        .get(self.i)
                        .is_some_and(|c| b"+-.eE".contains(c) || c.is_ascii_digit())
                    {
                        self.i += 1;
                    }
                    Ok(Value::Number(
                        String::from_utf8_lossy(&self.s[start..self.i]).into_owned(),
                    ))
                }
                _ => Err(format!("unexpected input at {}", self.i)),
            }
        }

        fn string(&mut self) -> Result<String, String> {
            self.eat(b'"')?;
            let mut out: Vec<u8> = Vec::new();
            loop {
                let c = *self.s.get(self.i).ok_or("unterminated string")?;
                self.i += 1;
                match c {
                    b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                    b'\\' => {
                        let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                        self.i += 1;
                        let ch = match e {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'u' => {
                                let hex = self.s.get(self.i..self.i + 4).ok_or("short \\u")?;
                                self.i += 4;
                                let code = u32::from_str_radix(
                                    std::str::from_utf8(hex).map_err(|e| e.to_string())?,
                                    16,
                                )
                                .map_err(|e| e.to_string())?;
                                // Surrogate pairs do not occur in paths and names we read.
                                char::from_u32(code).unwrap_or('\u{fffd}')
                            }
                            other => other as char,
                        };
                        let mut buf = [0; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                    }
                    c => out.push(c),
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_a_cargo_artifact_line() {
            let v = parse(
                r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"run"},"profile":{"test":true,"opt_level":"3"},"executable":"/t/run-1\"x","n":-1.5e3,"z":null,"e":[]}"#,
            )
            .unwrap();
            assert_eq!(v.get("reason").unwrap().as_str(), Some("compiler-artifact"));
            let kind = v.get("target").unwrap().get("kind").unwrap();
            assert_eq!(kind.index(0).unwrap().as_str(), Some("test"));
            assert_eq!(
                v.get("profile").unwrap().get("test"),
                Some(&Value::Bool(true))
            );
            assert_eq!(v.get("executable").unwrap().as_str(), Some("/t/run-1\"x"));
            assert!(parse("{\"a\":").is_err());
        }
    }
}
