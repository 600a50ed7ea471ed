//! Command-line flags (clap) and the parsing of their values.
//!
//! Owns: what each flag means and its default. Does not own: doing it (`watch`).

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::stream::event::parse_state;

#[derive(Debug, Parser)]
#[command(
    name = "tracer",
    version,
    about = "Follows every TCP connection through its states with eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream every TCP state change as it happens.
    Watch(WatchArgs),
    /// Run the agent: follow every socket and serve Prometheus metrics.
    Run(RunArgs),
    /// List sockets from a running agent, oldest first: what is stuck, since when, whose.
    Sockets(SocketsArgs),
    /// A live view, refreshed every second: connections, failures, stuck sockets, traffic and
    /// handshake times by process, pod, port or remote endpoint.
    Top(TopArgs),
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell.
    Completions(CompletionsArgs),
    /// Print the manual page (roff), or write one per command into a directory.
    Man(ManArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write tracer.1 and a page per command (tracer-watch.1, ...) into this directory
    /// instead of printing tracer.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct SocketsArgs {
    /// Only sockets in this state, e.g. close_wait (repeatable).
    #[arg(long = "state", value_name = "NAME", value_parser = parse_state_arg)]
    pub states: Vec<u8>,
    /// Only sockets with this local or remote port.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only sockets at least this long in their state, e.g. 30s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Only sockets of this Kubernetes pod (its name or UID).
    #[arg(long, value_name = "NAME")]
    pub pod: Option<String>,
    /// Only sockets of pods in this Kubernetes namespace.
    #[arg(long, value_name = "NAME")]
    pub namespace: Option<String>,
    /// Only sockets of this container (its id, or the start of it).
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,
    /// At most this many sockets.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Print the agent's JSON as it is.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub agent: AgentArgs,
}

/// How to reach a running agent (`tracer sockets`, `tracer top --agent`).
#[derive(Debug, Args, Clone)]
pub struct AgentArgs {
    /// The agent to ask, https://... for an agent serving TLS (default: http://127.0.0.1:9479
    /// for `sockets`; `top` without it runs its own probe).
    #[arg(long = "agent", value_name = "URL")]
    pub url: Option<String>,
    /// CA certificate (PEM) that signed the agent's TLS certificate.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for an agent that asks for one; with --key-file.
    #[arg(long, value_name = "FILE", requires = "key_file")]
    pub cert_file: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    pub key_file: Option<std::path::PathBuf>,
    /// User of the agent's basic_auth_users; the password is read from the environment
    /// variable TRACER_PASSWORD (never from the command line, which other users can read).
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
}

impl AgentArgs {
    /// The agent's base URL, without a trailing slash.
    pub fn base(&self) -> &str {
        self.url
            .as_deref()
            .unwrap_or(DEFAULT_AGENT)
            .trim_end_matches('/')
    }
}

/// The agent `tracer sockets` asks by default.
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:9479";

/// Default `--listen`: loopback only (exposing it wider is the user's choice), on a fixed port
/// so that Prometheus's `instance` label survives restarts.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9479";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Address to serve /metrics, /healthz and / on.
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN)]
    pub listen: std::net::SocketAddr,
    /// TLS and basic authentication for the endpoints: a web configuration file in the format
    /// of the Prometheus exporter-toolkit (tls_server_config, basic_auth_users); see docs/security.md.
    #[arg(long, value_name = "FILE")]
    pub web_config: Option<std::path::PathBuf>,
    /// Service ports that get their own `port` label value (repeatable); others are "other".
    /// Without it, listening and connected-to service ports get one (see docs/metrics.md).
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,
    /// Distinct `port` label values at most (without --port).
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_ports: u16,
    /// Ignored: the agent keeps no table of sockets any more (each socket's state is on the
    /// socket, in the kernel); accepted so that older command lines still start.
    #[arg(long, value_name = "N")]
    pub max_sockets: Option<u32>,
    /// Size of each CPU's kernel-to-userspace ring buffer: a power of two, e.g. 256K, 4M
    /// (the memory it takes is this times the number of CPUs).
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = parse_size)]
    pub ring_buffer_size: u32,
    /// How long an open connection goes between two update records (`watch --connections`'s,
    /// or the agent's OTLP export's), e.g. 30s (at least 1s): each says what it did since the
    /// last (the close record then covers the rest). The agent's metrics count open
    /// connections at every census, whatever this says.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_record_interval)]
    pub record_interval: Duration,
    /// Time each accepted connection waits in its listener's accept queue, with a BPF
    /// trampoline on the return of the kernel's inet_csk_accept (fexit): `auto` where the
    /// kernel allows it (it says so in one line where it does not), `on` (fail to start
    /// without it), `off` (no trampoline).
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = Toggle::Auto)]
    pub accept_wait: Toggle,
    /// Send every connection record (update and close) as an OTLP log record to this
    /// OpenTelemetry collector over OTLP/HTTP, e.g. http://collector:4318 (`/v1/logs` is
    /// appended). Also from OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_LOGS_ENDPOINT;
    /// headers, compression, CA and client certificate from the other OTEL_EXPORTER_OTLP_*
    /// variables (see docs/records.md).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Records waiting for the collector at most (the batch being sent included); past it,
    /// records are dropped and counted in tracer_records_dropped_total{reason="queue_full"}.
    #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub otlp_queue_size: u32,
    /// How long a socket may stay in a state before it counts as stuck, e.g. close_wait=60s
    /// (repeatable). Defaults: close_wait, fin_wait1, fin_wait2 60s; last_ack, closing 30s;
    /// syn_sent, syn_recv 10s.
    #[arg(long = "stuck-after", value_name = "STATE=DURATION", value_parser = parse_threshold)]
    pub stuck_after: Vec<(u8, Duration)>,
    /// How often to take the socket census of every namespace that the census metrics and
    /// /sockets show, e.g. 5s; never more than 5% of the time (see docs/design.md).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub census_interval: Duration,
    /// Most pods given their own `namespace` and `pod` label values in metrics (stuck sockets,
    /// handshake failures); later pods are counted under `other`.
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub max_pods: u16,
    /// Also label the handshake, teardown and lifetime histograms by `namespace` and `pod`
    /// (`--label-by pod`). Off by default: each pod multiplies their series.
    #[arg(long = "label-by", value_name = "LABEL", value_enum)]
    pub label_by: Vec<LabelBy>,
    #[command(flatten)]
    pub attribution: AttributionArgs,
}

/// Extra labels of the histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelBy {
    /// The Kubernetes namespace and pod of the socket.
    Pod,
}

/// Where sockets' cgroups are resolved to containers and pods.
#[derive(Clone, Debug, Args)]
pub struct AttributionArgs {
    /// The cgroup v2 file system of the host, to resolve socket cgroups in (default: the
    /// cgroup2 mount in /proc/self/mountinfo; a hybrid host's /sys/fs/cgroup works too). In a
    /// container, mount the host's /sys/fs/cgroup and give it here.
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// The kubelet's pod log directory, whose <namespace>_<name>_<uid> entries name pods.
    #[arg(long, value_name = "DIR", default_value = "/var/log/pods")]
    pub pod_logs_dir: std::path::PathBuf,
    /// A cgroup the kubelet puts pods in, from the cgroup2 root (repeatable; default
    /// /kubepods.slice and /kubepods, its systemd and cgroupfs drivers). Pods are only found
    /// right under these: a kubelet run with --cgroup-root=/kubelet and the systemd driver
    /// needs /kubelet.slice/kubelet-kubepods.slice.
    #[arg(long = "kubepods-cgroup", value_name = "PATH", value_parser = parse_kubepods)]
    pub kubepods_cgroups: Vec<String>,
}

impl AttributionArgs {
    /// The cgroups pods are found under.
    pub fn kubepods(&self) -> Vec<String> {
        if self.kubepods_cgroups.is_empty() {
            return crate::workload::DEFAULT_KUBEPODS.map(String::from).to_vec();
        }
        self.kubepods_cgroups.clone()
    }
}

/// `--kubepods-cgroup`: an absolute cgroup path below the root.
fn parse_kubepods(s: &str) -> Result<String, String> {
    let path = s.trim_end_matches('/');
    if !path.starts_with('/') || path.len() < 2 || path.split('/').any(|p| p == "..") {
        return Err(format!(
            "{s:?} is not a cgroup path from the cgroup2 root, like /kubepods.slice"
        ));
    }
    Ok(path.to_owned())
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Print one JSON object per line instead of aligned columns.
    #[arg(long)]
    pub json: bool,
    /// Print one record per connection when it closes (how it opened, how long it lived,
    /// bytes, retransmissions, RTT, how it ended and, on Linux 6.10+, why the kernel reset
    /// it) instead of every state change.
    #[arg(long, conflicts_with = "states")]
    pub connections: bool,
    /// Only sockets with this local or remote port (repeatable); filtered in the kernel.
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,
    /// Only transitions into or out of this state, e.g. close_wait (repeatable).
    #[arg(long = "state", value_name = "NAME", value_parser = parse_state_arg)]
    pub states: Vec<u8>,
    /// Only sockets owned by this process id.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Stop after this long, e.g. 10s, 500ms, 2m.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after printing this many transitions.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Size of each CPU's kernel-to-userspace ring buffer: a power of two, e.g. 256K, 4M
    /// (the memory it takes is this times the number of CPUs).
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = parse_size)]
    pub ring_buffer_size: u32,
    /// How long an open connection goes between two update records (`watch --connections`'s,
    /// or the agent's OTLP export's), e.g. 30s (at least 1s): each says what it did since the
    /// last (the close record then covers the rest). The agent's metrics count open
    /// connections at every census, whatever this says.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_record_interval)]
    pub record_interval: Duration,
    /// Time each accepted connection waits in its listener's accept queue, with a BPF
    /// trampoline on the return of the kernel's inet_csk_accept (fexit): `auto` where the
    /// kernel allows it (it says so in one line where it does not), `on` (fail to start
    /// without it), `off` (no trampoline).
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = Toggle::Auto)]
    pub accept_wait: Toggle,
    #[command(flatten)]
    pub attribution: AttributionArgs,
}

/// A feature that is on where the kernel allows it (`auto`), required (`on`) or left out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// How often the screen refreshes, e.g. 1s, 500ms (at least 200ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_refresh)]
    pub interval: Duration,
    /// How rows are grouped at start (the g key changes it).
    #[arg(long, value_name = "BY", value_enum, default_value_t = crate::top::view::Group::Process)]
    pub group: crate::top::view::Group,
    /// The column rows are sorted by at start, largest first (< and > change it).
    #[arg(long, value_name = "COLUMN", value_enum, default_value_t = crate::top::view::Column::Opened)]
    pub sort: crate::top::view::Column,
    /// Smallest first.
    #[arg(long)]
    pub reverse: bool,
    /// Only connections of this service port (the local port of a server, the remote port of
    /// a client).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only connections of this process.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Only connections of this Kubernetes pod (its name, or namespace/name).
    #[arg(long, value_name = "NAME")]
    pub pod: Option<String>,
    /// Print one plain table after one interval and exit (what it does without a terminal).
    #[arg(long)]
    pub once: bool,
    /// Rows of the plain table at most.
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rows: u32,
    /// Size of each CPU's ring buffer of its own probe (without --agent), a power of two.
    #[arg(long, value_name = "BYTES", default_value = "1M", value_parser = parse_size)]
    pub ring_buffer_size: u32,
    /// How long a socket may stay in a state before it counts as stuck, e.g. close_wait=60s
    /// (repeatable; the defaults are `tracer run`'s). An agent's own thresholds apply with
    /// --agent.
    #[arg(long = "stuck-after", value_name = "STATE=DURATION", value_parser = parse_threshold)]
    pub stuck_after: Vec<(u8, Duration)>,
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(flatten)]
    pub attribution: AttributionArgs,
}

impl TopArgs {
    pub fn thresholds(&self) -> crate::census::stuck::Thresholds {
        let mut t = crate::census::stuck::Thresholds::default();
        for &(state, d) in &self.stuck_after {
            t.0[state as usize] = Some(d);
        }
        t
    }
}

fn parse_refresh(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(200) {
        return Err(format!(
            "{s:?} is too short: refresh at most 5 times a second (200ms)"
        ));
    }
    Ok(d)
}

impl RunArgs {
    /// The defaults with `--stuck-after` applied.
    pub fn thresholds(&self) -> crate::census::stuck::Thresholds {
        let mut t = crate::census::stuck::Thresholds::default();
        for &(state, d) in &self.stuck_after {
            t.0[state as usize] = Some(d);
        }
        t
    }
}

/// Parses `close_wait=60s`.
fn parse_threshold(s: &str) -> Result<(u8, Duration), String> {
    let (state, duration) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not STATE=DURATION, e.g. close_wait=60s"))?;
    Ok((parse_state_arg(state)?, parse_duration(duration)?))
}

fn parse_state_arg(s: &str) -> Result<u8, String> {
    parse_state(s).ok_or_else(|| {
        format!(
            "unknown state {s:?}; use one of {}",
            crate::stream::event::STATE_NAMES[1..].join(", ")
        )
    })
}

/// Parses `10s`, `500ms`, `2m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 10s, 500ms, 2m"))?;
    if d.is_zero() {
        return Err("a duration of zero would stop at once; give e.g. 10s".into());
    }
    Ok(d)
}

/// Parses `--record-interval`: a duration of at least a second.
fn parse_record_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than 1s; give e.g. 30s"));
    }
    Ok(d)
}

/// Parses a byte size: `4096`, `64K`, `8M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("{s:?} is not a size; write e.g. 4096, 64K, 8M")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 64K, 8M"))?;
    u32::try_from(n << shift)
        .ok()
        .filter(|_| n < (1 << 32))
        .ok_or_else(|| format!("{s:?} is too large; the limit is 2G"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("8X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("4G").is_err());
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
    }

    #[test]
    fn watch_flags_parse() {
        let cli = Cli::try_parse_from([
            "tracer",
            "watch",
            "--json",
            "--port",
            "80",
            "--port",
            "443",
            "--state",
            "CLOSE_WAIT",
            "--count",
            "5",
        ])
        .unwrap();
        let Command::Watch(w) = cli.command else {
            panic!("not watch")
        };
        assert_eq!(w.ports, vec![80, 443]);
        assert_eq!(w.states, vec![tracer_common::state::CLOSE_WAIT]);
        assert_eq!(w.ring_buffer_size, 1 << 20);
        assert!(Cli::try_parse_from(["tracer", "watch", "--port", "0"]).is_err());
        assert!(Cli::try_parse_from(["tracer", "watch", "--state", "nope"]).is_err());
    }

    #[test]
    fn max_sockets_still_parses_and_its_help_says_it_is_ignored() {
        use clap::CommandFactory;
        let cli = Cli::try_parse_from(["tracer", "run", "--max-sockets", "10"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.max_sockets, Some(10));
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        let line = help
            .lines()
            .skip_while(|l| !l.contains("--max-sockets"))
            .nth(1)
            .unwrap_or_default();
        assert!(line.trim_start().starts_with("Ignored:"), "{help}");
    }
}
