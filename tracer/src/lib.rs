//! `tracer`: follows every TCP socket through its states with an eBPF probe on the kernel's
//! `inet_sock_set_state` tracepoint, which keeps each socket's state on the socket itself.
//!
//! The folders follow the data: [`stream`] (the probe, its rings, and what each event tells)
//! → [`metrics`] (Prometheus) and [`census`] (every socket of the host, with what the probe
//! keeps on it: stuck sockets, `/sockets`) → [`http`] (serving) → [`cmd`] (the commands).
//! [`workload`] and [`cgroups`] say which container and pod a cgroup is.

pub mod census;
pub mod cgroups;
pub mod cli;
pub mod cmd;
pub mod export;
pub mod http;
pub mod metrics;
pub mod privileges;
pub mod stream;
pub mod top;
pub mod workload;

/// What the unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    /// Property tests' settings: `cases` cases from a fixed seed, so that CI runs the same
    /// cases every time; `PROPTEST_RNG_SEED=N cargo test` explores others.
    pub fn proptest_config(cases: u32) -> proptest::prelude::ProptestConfig {
        let mut config = proptest::prelude::ProptestConfig::with_cases(cases);
        if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
            config.rng_seed = proptest::test_runner::RngSeed::Fixed(2026);
        }
        config
    }
}
