//! `tracer`: follows every TCP socket through its states with an eBPF probe on the kernel's
//! `inet_sock_set_state` tracepoint.
//!
//! The data path, one module each: [`probe`] (kernel side, aya) → [`ring`] (per-CPU rings
//! merged in time order) → [`event`] (decoding) →
//! [`sockets`] (what each socket did, and when) → [`watch`] (printing for people and programs).

pub mod btf;
pub mod census;
pub mod census_metrics;
pub mod cgroups;
pub mod cli;
pub mod event;
pub mod event_metrics;
pub mod features;
pub mod http;
pub mod http_limits;
pub mod join;
pub mod kernel_metrics;
pub mod listing;
pub mod owners;
pub mod pods;
pub mod ports;
pub mod privileges;
pub mod probe;
pub mod ring;
pub mod run;
pub mod scrape;
pub mod sockets_cmd;
pub mod stream;
pub mod stuck;
pub mod watch;
pub mod web_config;
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
