//! Builds the eBPF program (`tracer-ebpf`) and leaves it in OUT_DIR, where `probe.rs` embeds it,
//! so that `cargo build` makes one self-contained binary.
//!
//! The BPF target needs a compiler that ships `core` for `bpfel-unknown-none`: Debian's
//! `rustc-web` does, registered with rustup as `tracer-bpf` by `cargo xtask setup`.

use anyhow::{bail, Result};

/// The rustup name under which `cargo xtask setup` links Debian's BPF-capable toolchain.
const BPF_TOOLCHAIN: &str = "tracer-bpf";

fn main() -> Result<()> {
    if which::which("bpf-linker").is_err() {
        bail!("bpf-linker is not on PATH: run `cargo xtask setup` first (see docs/toolchain.md)");
    }
    // aya-ebpf uses `asm_experimental_arch` on the BPF target. Naming the crate (rather than
    // `1`) lets only it use unstable features and keeps aya-build from asking for build-std.
    std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf");
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tracer-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tracer-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(BPF_TOOLCHAIN),
    )
}
