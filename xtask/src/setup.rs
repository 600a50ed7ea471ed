//! `cargo xtask setup`: installs what building and testing `tracer` need on a Debian host,
//! skipping (without network) whatever is already there.
//!
//! Why these pieces (see docs/toolchain.md): rustup's compilers here have no `rust-src`, so
//! the probe is built with Debian's `rustc-web`, which ships a prebuilt `core` for the BPF
//! target; `bpf-linker` must be built against the same LLVM major (22).

use std::path::{Path, PathBuf};
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
    // The shells whose completion scripts `tests/docs.rs` loads (bash is always there).
    "zsh",
    "fish",
    "man-db",
    // The real terminal `tests/top.rs` runs `tracer top` in.
    "tmux",
];

/// The rustup name under which Debian's toolchain is registered (tracer/build.rs uses it).
pub const BPF_TOOLCHAIN: &str = "tracer-bpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// The OpenTelemetry collector the export tests send records to (`rotel-agent`, shipped in
/// the `rotel` package on PyPI): a receiver no one here wrote.
const ROTEL_VERSION: &str = "0.0.1a15";

/// Installs whatever is missing.
pub fn run() -> Result<()> {
    install_packages(PACKAGES)?;
    link_toolchain()?;
    install_bpf_linker()?;
    install_rotel()?;
    Ok(())
}

/// Where the tests and the bench find `rotel-agent`: a copy out of the pip package, at a
/// path every environment sees (the kernel matrix's guests and tests run with another PATH
/// and Python than the one pip used).
pub const ROTEL_AGENT: &str = "/usr/local/bin/rotel-agent";

/// Installs `rotel` (pinned) with pip unless python3 has that version already, and puts its
/// `rotel-agent` at [`ROTEL_AGENT`] unless the same file is there.
fn install_rotel() -> Result<()> {
    let package = || -> Option<PathBuf> {
        let out = Command::new("python3")
            .args([
                "-c",
                "import importlib.metadata as m, os, rotel; \
                 print(m.version('rotel'), os.path.dirname(rotel.__file__))",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (version, dir) = text.trim().split_once(' ')?;
        (version == ROTEL_VERSION).then(|| Path::new(dir).join("rotel-agent"))
    };
    let agent = match package() {
        Some(agent) => agent,
        None => {
            require_root("installing rotel")?;
            eprintln!("xtask: installing rotel {ROTEL_VERSION} (pip), the tests' OTLP collector");
            pip_install(&format!("rotel=={ROTEL_VERSION}"))?;
            package().context("rotel was installed but python3 does not find it")?
        }
    };
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    if size(&agent) != size(Path::new(ROTEL_AGENT)) {
        require_root("installing rotel-agent")?;
        std::fs::copy(&agent, ROTEL_AGENT)
            .with_context(|| format!("copying {} to {ROTEL_AGENT}", agent.display()))?;
    }
    Ok(())
}

/// `pip install SPEC` with python3, quietly, as root.
fn pip_install(spec: &str) -> Result<()> {
    run_cmd(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--root-user-action=ignore",
            ])
            .arg(spec),
    )
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

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root: run this again with sudo");
    }
    Ok(())
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

// ---- The kernel matrix (`cargo xtask kernels`): QEMU, virtme-ng, virtiofsd, Debian kernels ----

/// Debian packages for booting other kernels: QEMU, `depmod` for the kernels' modules, the
/// static busybox that vng puts in the guest's initramfs, and what virtiofsd links against
/// (virtiofsd is not packaged in Debian 12 and is built from crates.io).
pub const KERNEL_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    "libcap-ng-dev",
    "libseccomp-dev",
];
/// Versions seen working with the kernel matrix (docs/kernels.md).
const VIRTME_NG_VERSION: &str = "1.42";
const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Installs QEMU and friends, virtme-ng and virtiofsd (into `cache/virtiofsd`) where missing.
/// Returns the `vng` command and the directory holding `virtiofsd`, for `PATH`.
pub fn install_vm_tools(cache: &Path) -> Result<(PathBuf, PathBuf)> {
    install_packages(KERNEL_PACKAGES)?;
    let vng = install_vng()?;
    let virtiofsd = install_virtiofsd(&cache.join("virtiofsd"))?;
    Ok((vng, virtiofsd))
}

/// `vng` from PATH or from python3's scripts directory (where pip puts it), if it is the
/// pinned version.
fn find_vng() -> Option<PathBuf> {
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("vng"));
    [Some(PathBuf::from("vng")), scripts]
        .into_iter()
        .flatten()
        .find(|vng| {
            Command::new(vng)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .is_ok_and(|o| {
                    o.status.success()
                        && String::from_utf8_lossy(&o.stdout).contains(VIRTME_NG_VERSION)
                })
        })
}

fn install_vng() -> Result<PathBuf> {
    if let Some(vng) = find_vng() {
        return Ok(vng);
    }
    eprintln!("xtask: installing virtme-ng {VIRTME_NG_VERSION} (pip)");
    pip_install(&format!("virtme-ng=={VIRTME_NG_VERSION}"))?;
    find_vng().context("virtme-ng was installed but no `vng` of that version is found")
}

/// Builds virtiofsd into `root` unless it is there; returns `root/bin`. Without virtiofsd,
/// vng falls back to 9p, which Debian's cloud kernels do not have.
fn install_virtiofsd(root: &Path) -> Result<PathBuf> {
    let bin = root.join("bin");
    if bin.join("virtiofsd").exists() {
        return Ok(bin);
    }
    eprintln!(
        "xtask: building virtiofsd {VIRTIOFSD_VERSION} into {} (about a minute)",
        root.display()
    );
    run_cmd(
        Command::new("cargo")
            .args(["install", "--locked", "--quiet"])
            .arg(format!("virtiofsd@{VIRTIOFSD_VERSION}"))
            .arg("--root")
            .arg(root),
    )?;
    Ok(bin)
}

/// A Debian kernel unpacked under the cache.
pub struct DebianKernel {
    /// `uname -r` of that kernel, e.g. `6.1.0-53-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
}

/// The newest `linux-image-SERIES.*-cloud-amd64-unsigned` the package lists know, unpacked into
/// `cache/RELEASE` with its modules indexed there (nothing is installed on the host). Skips
/// whatever is already done; asks the network only for what is missing.
pub fn install_debian_kernel(series: &str, cache: &Path) -> Result<DebianKernel> {
    let mut updated = false;
    let release = match newest_cloud_kernel(series)? {
        Some(r) => r,
        None => {
            // A fresh machine's package lists may be empty or old.
            require_root("updating the package lists")?;
            run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
            updated = true;
            newest_cloud_kernel(series)?.with_context(|| {
                format!("no linux-image-{series}.*-cloud-amd64-unsigned in the package lists")
            })?
        }
    };
    let dir = cache.join(&release);
    let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        let package = format!("linux-image-{release}-unsigned");
        let debs = cache.join("debs");
        std::fs::create_dir_all(&debs)?;
        eprintln!("xtask: downloading {package}");
        let download = || {
            run_cmd(
                Command::new("apt-get")
                    // Into a directory of root's: apt's sandbox user could not write there.
                    .args(["download", "-qq", "-o", "APT::Sandbox::User=root", &package])
                    .current_dir(&debs),
            )
        };
        if download().is_err() && !updated {
            run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
            download()?;
        }
        let deb = std::fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        let partial = cache.join(format!("{release}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&partial, &dir)?;
        std::fs::remove_file(&deb)?;
    }
    // The package ships its modules without their index. vng takes the modules that sit beside
    // the image (`cache/RELEASE/lib/modules/RELEASE`: 6.1 needs its virtio-fs module to mount
    // the root) and would run depmod itself; doing it here keeps it out of the boot.
    if !dir
        .join("lib/modules")
        .join(&release)
        .join("modules.dep")
        .exists()
    {
        run_cmd(
            Command::new("/sbin/depmod")
                .arg("-a")
                .arg("-b")
                .arg(&dir)
                .arg(&release),
        )?;
    }
    Ok(DebianKernel { release, vmlinuz })
}

/// The release (`uname -r`) of the newest cloud kernel of `series` ("6.1", "6.12") in the
/// package lists, compared number by number (6.1.0-9 < 6.1.0-53).
fn newest_cloud_kernel(series: &str) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only"])
        .arg(format!(
            "^linux-image-{}\\..*-cloud-amd64-unsigned$",
            series.replace('.', "\\.")
        ))
        .output()
        .context("running apt-cache search")?;
    let prefix = format!("{series}.");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| p.strip_prefix("linux-image-")?.strip_suffix("-unsigned"))
        .filter(|r| r.starts_with(&prefix))
        .max_by_key(|r| version_key(r))
        .map(str::to_owned))
}

/// The numbers in `s`, in order: a version's sort key.
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .map(|n| n.parse().unwrap_or(u64::MAX))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_number_by_number() {
        let mut releases = [
            "6.1.0-53-cloud-amd64",
            "6.1.0-9-cloud-amd64",
            "6.1.0-56-cloud-amd64",
        ];
        releases.sort_by_key(|r| version_key(r));
        assert_eq!(releases[2], "6.1.0-56-cloud-amd64");
        assert_eq!(releases[0], "6.1.0-9-cloud-amd64");
        assert!(
            version_key("6.12.117+deb12-cloud-amd64") > version_key("6.12.9+deb12-cloud-amd64")
        );
    }
}
