//! Loading and attaching the eBPF probe, and reading its maps: the only module that knows aya.
//!
//! The probe is embedded in the binary at build time (`build.rs`), loaded with the field
//! offsets of the running kernel, and attached as a BTF tracepoint on `inet_sock_set_state`.
//! It writes into one ring buffer per CPU, created here and read by [`crate::stream::ring`].
//! Dropping [`Probe`] detaches it (aya closes the link and program fds).

use anyhow::{bail, Context, Result};

use crate::cli::Toggle;
use aya::{
    maps::{Array, ArrayOfMaps, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf, SkStorage},
    programs::{BtfTracePoint, FExit},
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use aya_obj::generated::{bpf_cmd, bpf_map_type, bpf_prog_info};

use crate::stream::ring::EventRings;
use tracer_common::{counter, socket, DropKey, SocketState, PORT_FILTER_LEN};
pub use tracer_common::{RESET_RECEIVED, RESET_SENT, RESET_STATES};

/// The probe object built by `build.rs` from `tracer-ebpf`.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// The program that handles every transition.
const MAIN_PROGRAM: &str = "inet_sock_set_state";

/// Every program of the probe and the tracepoint it attaches to, in attach order. Where the
/// kernel's `tcp_send_reset` has a reason argument (Linux 6.10+), the program loaded under the
/// name `tcp_send_reset` is [`RESET_REASON_PROGRAM`]; where `tcp_retransmit_skb` has an error
/// argument (Linux 6.14+), the one loaded as `tcp_retransmit_skb` is [`RETRANSMIT_ERR_PROGRAM`].
pub const PROGRAMS: [(&str, &str); 6] = [
    (MAIN_PROGRAM, "inet_sock_set_state"),
    ("inet_sock_set_state_rescue", "inet_sock_set_state"),
    ("tcp_retransmit_synack", "tcp_retransmit_synack"),
    ("tcp_retransmit_skb", "tcp_retransmit_skb"),
    ("tcp_send_reset", "tcp_send_reset"),
    ("tcp_receive_reset", "tcp_receive_reset"),
];

/// The `tcp_send_reset` program that also reads the reset's reason.
const RESET_REASON_PROGRAM: &str = "tcp_send_reset_reason";
/// The `tcp_retransmit_skb` program that counts only the retransmissions sent.
const RETRANSMIT_ERR_PROGRAM: &str = "tcp_retransmit_skb_err";

/// The tracepoint of dropped packets, and its program that also reads the packet's socket
/// (Linux 6.11+: a fourth argument, `rx_sk`).
const DROP_TRACEPOINT: &str = "kfree_skb";
const DROP_SOCKET_PROGRAM: &str = "kfree_skb_sk";
/// The kernel function whose return the accept-queue program follows, and that program under
/// each of the function's two prototypes (four arguments before Linux 6.10, two since).
const ACCEPT_FUNCTION: &str = "inet_csk_accept";
const ACCEPT_PROGRAMS: [(usize, &str); 2] = [(4, "inet_csk_accept_4"), (2, "inet_csk_accept_2")];

/// Which of two programs this kernel's tracepoints take (see [`PROGRAMS`]).
#[derive(Clone, Copy, Debug, Default)]
struct Variants {
    reset_reasons: bool,
    retransmit_err: bool,
    /// The dropped-packet program, once attached.
    drops: Option<&'static str>,
    /// The accept-queue program for this kernel's `inet_csk_accept`, once attached.
    accept: Option<&'static str>,
}

/// How often the reader drains the ring buffer when the probe has not woken it.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// What the probe reports; fixed at load time.
#[derive(Clone, Debug, Default)]
pub struct ProbeConfig {
    /// Size of each CPU's ring buffer in bytes: a power of two, at least one page.
    pub ring_buffer_bytes: u32,
    /// Report only sockets with one of these ports on either side; empty = every port.
    pub ports: Vec<u16>,
    /// Report each reset a connection sends as an event (see `tracer_common::SENT_RESET`),
    /// where the kernel gives reasons.
    pub reset_events: bool,
    /// Report each accepted connection's wait as an event (`tracer_common::ACCEPTED`), for
    /// the agent's histogram; the wait is kept on the socket (for its close record) either way.
    pub accept_events: bool,
    /// Whether to measure the accept-queue wait at all (`--accept-wait`).
    pub accept_wait: Toggle,
}

/// The loaded, attached probe.
pub struct Probe {
    /// What this kernel can report (see `features`).
    pub features: Vec<crate::stream::features::Feature>,
    /// The names of the kernel's reset reasons (`enum sk_rst_reason`), indexed by value;
    /// empty where resets carry no reason (before Linux 6.10).
    pub reset_reasons: Vec<String>,
    /// The names of the kernel's packet drop reasons (`enum skb_drop_reason`), indexed by
    /// value; empty where drops are not counted.
    pub drop_reasons: Vec<String>,
    variants: Variants,
    ebpf: Ebpf,
    /// The probe's log records (aya-log), passed to the `log` crate by [`Probe::flush_log`].
    /// Kept for the probe's whole life: it holds the map the programs write into.
    logger: EbpfLogger<&'static dyn log::Log>,
    /// One per possible CPU, until [`Probe::event_rings`] takes them.
    rings: Vec<RingBuf<MapData>>,
}

/// What the probe could not do, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeCounters {
    /// Events dropped because the ring buffer was full.
    pub lost: u64,
    /// Transitions the kernel did not run the probe for because it was already running on that
    /// CPU (`bpf_prog_info.recursion_misses`, Linux 5.12+), less those the rescue program
    /// delivered. Includes transitions the port filter would have dropped.
    pub missed: u64,
    /// Transitions the rescue program delivered (see `inet_sock_set_state_rescue`).
    pub rescued: u64,
    /// SYN-ACK retransmissions not counted because the per-port table was full.
    pub synack_ports_full: u64,
    /// Retransmitted segments not counted because the per-port table was full.
    pub retransmit_ports_full: u64,
    /// Kernel field reads that failed (the field was reported as 0).
    pub read_failed: u64,
    /// Transitions of TCP sockets of an address family other than IPv4 and IPv6.
    pub unknown_family: u64,
    /// Transitions whose old state was not the one the probe saw the socket enter.
    pub skipped: u64,
    /// Transitions of sockets the kernel gave no storage.
    pub no_storage: u64,
    /// Dropped TCP packets not counted because the probe's `DROPS` map was full.
    pub drop_ports_full: u64,
}

/// One program's run count and total run time, as the kernel measures them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: &'static str,
    pub runs: u64,
    pub run_ns: u64,
    /// Runs the kernel skipped because the program was already running on that CPU (a
    /// softirq's tracepoint hit while the same program ran in process context):
    /// `bpf_prog_info.recursion_misses`, counted whatever `kernel.bpf_stats_enabled` says.
    pub missed: u64,
}

/// Everything the agent reads from the probe once a second.
#[derive(Clone, Debug, Default)]
pub struct ProbeReadings {
    pub counters: ProbeCounters,
    /// SYN-ACK retransmissions per listening port.
    pub synack: Vec<(u16, u64)>,
    /// Retransmitted segments per service port and kind (`tracer_common::retransmit`).
    pub retransmits: Vec<(u16, u16, u64)>,
    /// Dropped TCP packets by (reason, service port) (empty without `drop_reason`).
    pub drops: Vec<(DropKey, u64)>,
    /// Resets by direction and socket state (see [`Probe::resets`]).
    pub resets: [[u64; RESET_STATES as usize]; 2],
    /// Resets sent, by reason (indexed as [`Probe::reset_reasons`]; empty without reasons).
    pub reset_reasons: Vec<u64>,
    pub programs: Vec<ProgramStats>,
}

impl Probe {
    /// True when the probe reports each socket's cgroup on this kernel (feature `cgroup`).
    pub fn reads_cgroups(&self) -> bool {
        self.features
            .iter()
            .any(|f| f.name == "cgroup" && f.enabled)
    }
}

impl ProbeCounters {
    /// Every transition that did not reach userspace.
    pub fn lost_total(&self) -> u64 {
        self.lost + self.missed
    }
}

impl Probe {
    /// Loads the probe for this kernel and attaches it.
    pub fn attach(config: &ProbeConfig) -> Result<Probe> {
        check_ring_buffer_size(config.ring_buffer_bytes)?;
        check_privileges()?;
        raise_memlock_limit();
        let kernel = Kernel::read()?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| anyhow::anyhow!("reading {what}: {e}"))? as u32;
        let mut ebpf = load(config, &kernel, cpus)?;
        let logger = EbpfLogger::init(&mut ebpf).context("opening the probe's log (aya-log)")?;
        let rings = create_rings(&mut ebpf, cpus, config.ring_buffer_bytes)?;
        set_port_filter(&mut ebpf, &config.ports)?;

        let btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
        let Kernel {
            mut features,
            mut variants,
            reset_reasons,
            drop_reasons,
            drop_args,
            accept_args,
            offsets: _,
        } = kernel;
        // The main program first, then the one that rescues its nested runs.
        for (name, tracepoint) in PROGRAMS {
            attach_tracepoint(&mut ebpf, object_program(name, variants), tracepoint, &btf)?;
        }
        variants.drops = attach_drops(
            &mut ebpf,
            (drop_args, !drop_reasons.is_empty()),
            &btf,
            &mut features,
        );
        variants.accept = attach_accept_wait(
            &mut ebpf,
            config.accept_wait,
            accept_args,
            &btf,
            &mut features,
        )?;
        Ok(Probe {
            features,
            reset_reasons,
            drop_reasons,
            variants,
            ebpf,
            logger,
            rings,
        })
    }

    /// Hands what the probe logged since the last call to the `log` crate (which prints what
    /// `RUST_LOG` asks for). The probe logs at most once a second per problem and CPU.
    pub fn flush_log(&mut self) {
        self.logger.flush();
    }

    /// Reads every counter the probe keeps.
    pub fn readings(&self) -> Result<ProbeReadings> {
        Ok(ProbeReadings {
            counters: self.counters()?,
            synack: self.per_port("SYNACK_RETRANSMITS")?,
            retransmits: self.retransmits()?,
            drops: self.drops()?,
            resets: self.resets()?,
            reset_reasons: self.reset_reason_counts()?,
            programs: self.program_stats()?,
        })
    }

    /// A per-port count of the probe (`SYNACK_RETRANSMITS`), summed over CPUs.
    pub fn per_port(&self, name: &str) -> Result<Vec<(u16, u64)>> {
        let map: PerCpuHashMap<_, u16, u64> =
            PerCpuHashMap::try_from(self.ebpf.map(name).with_context(|| format!("map {name}"))?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (port, per_cpu) = entry.with_context(|| format!("reading {name}"))?;
            out.push((port, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Dropped TCP packets by (reason, port, socket's cgroup) (`DROPS`), summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(DropKey, u64)>> {
        if self.variants.drops.is_none() {
            return Ok(Vec::new());
        }
        let map: PerCpuHashMap<_, DropKey, u64> =
            PerCpuHashMap::try_from(self.ebpf.map("DROPS").context("map DROPS")?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (key, per_cpu) = entry.context("reading DROPS")?;
            out.push((key, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Retransmitted segments by (port, kind) (`RETRANSMITS`), summed over CPUs.
    pub fn retransmits(&self) -> Result<Vec<(u16, u16, u64)>> {
        let map: PerCpuHashMap<_, u32, u64> =
            PerCpuHashMap::try_from(self.ebpf.map("RETRANSMITS").context("map RETRANSMITS")?)?;
        let mut out = Vec::new();
        for entry in map.iter() {
            let (key, per_cpu) = entry.context("reading RETRANSMITS")?;
            out.push((key as u16, (key >> 16) as u16, per_cpu.iter().sum()));
        }
        Ok(out)
    }

    /// Resets by direction ([`RESET_SENT`], [`RESET_RECEIVED`]) and socket state (0 = none).
    pub fn resets(&self) -> Result<[[u64; RESET_STATES as usize]; 2]> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("RESETS").context("map RESETS")?)?;
        let mut out = [[0; RESET_STATES as usize]; 2];
        for direction in [RESET_SENT, RESET_RECEIVED] {
            for state in 0..RESET_STATES {
                let values = map.get(&(direction * RESET_STATES + state), 0)?;
                out[direction as usize][state as usize] = values.iter().sum();
            }
        }
        Ok(out)
    }

    /// Resets sent by reason, summed over CPUs, one per name of [`Probe::reset_reasons`].
    pub fn reset_reason_counts(&self) -> Result<Vec<u64>> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("RESET_REASONS")
                .context("map RESET_REASONS")?,
        )?;
        let slots = (self.reset_reasons.len() as u32).min(tracer_common::RESET_REASONS);
        (0..slots)
            .map(|i| Ok(map.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// Takes the per-CPU event rings, registered with the current tokio runtime; call once.
    pub fn event_rings(&mut self) -> Result<EventRings> {
        anyhow::ensure!(!self.rings.is_empty(), "event rings already taken");
        EventRings::new(std::mem::take(&mut self.rings))
    }

    /// What each program has cost the kernel so far. The kernel counts only while the sysctl
    /// `kernel.bpf_stats_enabled` is 1 (off by default: the timing itself costs about 20 ns
    /// a run); otherwise every figure is 0.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        // Each tracepoint's name, and the program loaded for it.
        let loaded = PROGRAMS
            .iter()
            .map(|&(name, _)| (name, object_program(name, self.variants)))
            .chain(self.variants.drops.map(|p| (DROP_TRACEPOINT, p)));
        let stats = |name, fd: BorrowedFd<'_>| {
            let info = program_info(fd)?;
            Ok::<_, anyhow::Error>(ProgramStats {
                name,
                runs: info.run_cnt,
                run_ns: info.run_time_ns,
                missed: info.recursion_misses,
            })
        };
        let mut out = Vec::with_capacity(PROGRAMS.len() + 2);
        for (name, loaded) in loaded {
            let program: &BtfTracePoint = self
                .ebpf
                .program(loaded)
                .with_context(|| format!("program {loaded}"))?
                .try_into()?;
            out.push(stats(name, program.fd()?.as_fd())?);
        }
        if let Some(loaded) = self.variants.accept {
            let program: &FExit = self
                .ebpf
                .program(loaded)
                .with_context(|| format!("program {loaded}"))?
                .try_into()?;
            out.push(stats(ACCEPT_FUNCTION, program.fd()?.as_fd())?);
        }
        Ok(out)
    }

    /// Reads the probe's counters, summed over CPUs.
    pub fn counters(&self) -> Result<ProbeCounters> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("map COUNTERS")?)?;
        let sum = |i: u32| -> Result<u64> { Ok(map.get(&i, 0)?.iter().sum()) };
        let program: &BtfTracePoint = self
            .ebpf
            .program(MAIN_PROGRAM)
            .context("program inet_sock_set_state")?
            .try_into()?;
        // Skips first: the rescue program counts a rescue after the kernel counted the skip,
        // so this order can only under-count `missed` for a moment, never over-count it.
        let skipped = program_info(program.fd()?.as_fd())?.recursion_misses;
        let rescued = sum(counter::RESCUED)?;
        Ok(ProbeCounters {
            lost: sum(counter::LOST_RINGBUF_FULL)?,
            missed: skipped.saturating_sub(rescued),
            rescued,
            synack_ports_full: sum(counter::SYNACK_PORTS_FULL)?,
            retransmit_ports_full: sum(counter::RETRANSMIT_PORTS_FULL)?,
            read_failed: sum(counter::READ_FAILED)?,
            unknown_family: sum(counter::UNKNOWN_FAMILY)?,
            skipped: sum(counter::SKIPPED)?,
            no_storage: sum(counter::NO_STORAGE)?,
            drop_ports_full: sum(counter::DROP_PORTS_FULL)?,
        })
    }
}

impl Probe {
    /// A descriptor of the probe's socket storage map (`SOCKETS`), for the census to ask
    /// sock_diag for each socket's storage with.
    pub fn socket_storage(&self) -> Result<OwnedFd> {
        let map = self.ebpf.map("SOCKETS").context("map SOCKETS")?;
        let Map::SkStorage(data) = map else {
            bail!("map SOCKETS is not a socket storage map");
        };
        data.fd()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the SOCKETS map descriptor")
    }
}

/// What [`Probe::seed_owners`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seeded {
    /// TCP sockets given their owner.
    pub sockets: u64,
    /// TCP sockets whose owner the probe already knew (it named them at their opening).
    pub known: u64,
    /// Socket descriptors that could not be reached (the process exited, or refused the
    /// agent) or written.
    pub failed: u64,
}

impl Probe {
    /// Gives every TCP socket a process holds now and whose owner the probe does not know
    /// (one opened before the probe was attached) that process as its owner, on the socket's
    /// own storage, as `ss -p` would name it: the lowest pid holding it. From then on each of
    /// its events carries the owner (marked [`socket::SEEDED`]), and so do the connections a
    /// seeded listener accepts, which inherit its storage.
    ///
    /// Each descriptor is borrowed with `pidfd_getfd` (Linux 5.6+, `CAP_SYS_PTRACE`) to name
    /// the socket to the map. A value the probe writes between this read and this write can
    /// be lost (microseconds, once per socket at start): its next event then counts as a
    /// skipped transition rather than a wrong duration.
    pub fn seed_owners(&mut self, proc: &std::path::Path) -> Result<Seeded> {
        let mut storage: SkStorage<_, SocketState> =
            SkStorage::try_from(self.ebpf.map_mut("SOCKETS").context("map SOCKETS")?)?;
        let mut seeded = Seeded::default();
        let mut seen = std::collections::HashSet::new();
        let mut pidfd: Option<(u32, OwnedFd)> = None;
        crate::census::owners::each_socket(proc, |pid, comm, fd, inode| {
            if !seen.insert(inode) {
                return;
            }
            if pidfd.as_ref().is_none_or(|(p, _)| *p != pid) {
                pidfd = pidfd_open(pid).map(|fd| (pid, fd));
            }
            let Some(socket) = pidfd.as_ref().and_then(|(_, p)| pidfd_getfd(p, fd)) else {
                seeded.failed += 1;
                return;
            };
            if !is_tcp(&socket) {
                return;
            }
            let mut value = match storage.get(&socket, 0) {
                Ok(v) if v.pid != 0 => {
                    seeded.known += 1;
                    return;
                }
                Ok(v) => v,
                Err(_) => SocketState::default(),
            };
            value.pid = pid;
            value.comm = *comm;
            value.flags |= socket::SEEDED;
            match storage.insert(&socket, value, 0) {
                Ok(()) => seeded.sockets += 1,
                Err(_) => seeded.failed += 1,
            }
        });
        Ok(seeded)
    }
}

/// A pidfd for `pid` (`pidfd_open`, Linux 5.3+); None when it exited.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// This process's copy of descriptor `fd` of the process of `pidfd` (`pidfd_getfd`, Linux
/// 5.6+; needs `CAP_SYS_PTRACE` over it); None when it is gone or refused.
fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags (0); it returns a new
    // descriptor or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    // SAFETY: a new descriptor that nothing else owns.
    (got >= 0).then(|| unsafe { OwnedFd::from_raw_fd(got as i32) })
}

/// True for an IPv4 or IPv6 TCP socket.
fn is_tcp(socket: &OwnedFd) -> bool {
    let option = |name: libc::c_int| {
        let (mut value, mut len) = (0 as libc::c_int, std::mem::size_of::<libc::c_int>() as u32);
        // SAFETY: getsockopt writes at most `len` bytes into `value`, which we own.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                std::ptr::addr_of_mut!(value).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    matches!(
        option(libc::SO_DOMAIN),
        Some(libc::AF_INET | libc::AF_INET6)
    ) && option(libc::SO_PROTOCOL) == Some(libc::IPPROTO_TCP)
}

/// Loads program `name` of the probe object and attaches it to BTF tracepoint `tracepoint`.
fn attach_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &str,
    btf: &aya::Btf,
) -> Result<()> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the probe object"))?
        .try_into()?;
    let (load, attach) = (
        Step::Load {
            program: name,
            tracepoint,
        },
        Step::Attach {
            program: name,
            tracepoint,
        },
    );
    program
        .load(tracepoint, btf)
        .map_err(|e| load_error(load, &e))?;
    program.attach().map_err(|e| load_error(attach, &e))?;
    Ok(())
}

/// What this kernel's BTF says about the probe's programs, read once before loading.
struct Kernel {
    /// The field offsets the probe reads with (its global `OFFSETS`).
    offsets: tracer_common::SockOffsets,
    /// The features known before attaching; the attach steps add theirs.
    features: Vec<crate::stream::features::Feature>,
    /// Which programs fit this kernel's tracepoints (`drops` and `accept` not attached yet).
    variants: Variants,
    /// See [`Probe::reset_reasons`] and [`Probe::drop_reasons`].
    reset_reasons: Vec<String>,
    drop_reasons: Vec<String>,
    /// Arguments of the dropped-packet tracepoint and of `inet_csk_accept` (None: not found).
    drop_args: Option<usize>,
    accept_args: Option<usize>,
}

impl Kernel {
    /// Reads the running kernel's BTF (`/sys/kernel/btf/vmlinux`); fails with what is missing.
    fn read() -> Result<Kernel> {
        use crate::stream::{btf, features};
        let kernel_btf = btf::kernel_btf()?;
        let offsets = btf::sock_offsets(&kernel_btf)?;
        let args = |tracepoint| features::tracepoint_args(&kernel_btf, tracepoint);
        let with_reasons = args("tcp_send_reset").is_some_and(|n| n >= 3);
        let reset_reasons = if with_reasons {
            btf::enum_names(&kernel_btf, "sk_rst_reason", "SK_RST_REASON_")
        } else {
            Vec::new()
        };
        let drop_args = args(DROP_TRACEPOINT);
        let drop_reasons = if drop_args.is_some_and(|n| n >= 3) {
            btf::enum_names(&kernel_btf, "skb_drop_reason", "SKB_DROP_REASON_")
        } else {
            Vec::new()
        };
        Ok(Kernel {
            features: features::detect(&kernel_btf, &offsets),
            offsets,
            variants: Variants {
                reset_reasons: with_reasons,
                retransmit_err: args("tcp_retransmit_skb").is_some_and(|n| n >= 3),
                drops: None,
                accept: None,
            },
            reset_reasons,
            drop_reasons,
            drop_args,
            accept_args: features::function_args(&kernel_btf, ACCEPT_FUNCTION),
        })
    }
}

/// Loads the probe object with this kernel's offsets and `config`'s settings as its globals,
/// its `EVENTS` array sized for `cpus` rings.
fn load(config: &ProbeConfig, kernel: &Kernel, cpus: u32) -> Result<Ebpf> {
    let reset_events = u8::from(config.reset_events && kernel.variants.reset_reasons);
    let filter_ports: u8 = u8::from(!config.ports.is_empty());
    let accept_events = u8::from(config.accept_events);
    // Wake the reader early only when a quarter of the ring is waiting; otherwise it
    // drains every DRAIN_INTERVAL (see WAKEUP_BYTES in the probe for why).
    let wakeup_bytes: u64 = u64::from(config.ring_buffer_bytes / 4);
    // The probe logs only at the levels the `log` crate lets through (`RUST_LOG`): the
    // numbers of `log::LevelFilter` and aya-log's levels are the same (off 0 .. trace 5).
    let log_level = log::max_level() as u8;
    EbpfLoader::new()
        .override_global("OFFSETS", &kernel.offsets, true)
        .override_global("FILTER_PORTS", &filter_ports, true)
        .override_global("RESET_EVENTS", &reset_events, true)
        .override_global("EPHEMERAL_PORTS", &ephemeral_ports(), true)
        .override_global("ACCEPT_EVENTS", &accept_events, true)
        .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
        .override_global(aya_log::LEVEL, &log_level, true)
        .map_max_entries("EVENTS", cpus)
        .load(PROBE_OBJECT)
        .map_err(|e| load_error(Step::Maps, &e))
}

/// Creates one ring of `bytes` per possible CPU, each referenced from the probe's `EVENTS`
/// array.
fn create_rings(ebpf: &mut Ebpf, cpus: u32, bytes: u32) -> Result<Vec<RingBuf<MapData>>> {
    let mut events: ArrayOfMaps<_, RingBuf<MapData>> =
        ArrayOfMaps::try_from(ebpf.map_mut("EVENTS").context("map EVENTS")?)?;
    let mut rings = Vec::with_capacity(cpus as usize);
    for cpu in 0..cpus {
        let params = aya_obj::Map::new_from_params(
            bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
            0,
            0,
            bytes,
            0,
        );
        let map = MapData::create(params, &format!("events_cpu{cpu}"), None)
            .map_err(|e| load_error(Step::Maps, &e))?;
        let ring = RingBuf::try_from(Map::RingBuf(map))?;
        events
            .set(cpu, &ring, 0)
            .context("adding a ring buffer to EVENTS")?;
        rings.push(ring);
    }
    Ok(rings)
}

/// Fills the probe's `PORT_FILTER` with `ports` (nothing to do without `--port`).
fn set_port_filter(ebpf: &mut Ebpf, ports: &[u16]) -> Result<()> {
    if ports.is_empty() {
        return Ok(());
    }
    let mut filter: Array<_, u8> =
        Array::try_from(ebpf.map_mut("PORT_FILTER").context("map PORT_FILTER")?)?;
    for &port in ports {
        filter
            .set(u32::from(port), 1u8, 0)
            .context("setting the port filter")?;
    }
    debug_assert!(filter.len() == PORT_FILTER_LEN);
    Ok(())
}

/// Attaches the dropped-packet program that fits this kernel's tracepoint, given its
/// `(arguments, whether the kernel names drop reasons)`, and adds the `drop_reason` and
/// `drop_socket` features; returns the program attached. A kernel without it still gets
/// everything else.
fn attach_drops(
    ebpf: &mut Ebpf,
    (args, with_reasons): (Option<usize>, bool),
    btf: &aya::Btf,
    features: &mut Vec<crate::stream::features::Feature>,
) -> Option<&'static str> {
    // The socket a dropped packet was for is an argument since Linux 6.11.
    let program = if args.is_some_and(|n| n >= 4) {
        DROP_SOCKET_PROGRAM
    } else {
        DROP_TRACEPOINT
    };
    let dropped = if with_reasons {
        attach_tracepoint(ebpf, program, DROP_TRACEPOINT, btf)
    } else {
        Err(anyhow::anyhow!("no reason argument"))
    };
    features.push(crate::stream::features::Feature {
        name: "drop_reason",
        enabled: dropped.is_ok(),
        missing: "this kernel's skb/kfree_skb tracepoint has no drop-reason argument \
                  (Linux 5.17+), or the probe could not attach to it: \
                  tracer_tcp_drops_total stays empty",
    });
    if let Err(e) = dropped {
        log::debug!("dropped packets: {e:#}");
        return None;
    }
    features.push(crate::stream::features::Feature {
        name: "drop_socket",
        enabled: program == DROP_SOCKET_PROGRAM,
        missing: "this kernel's skb/kfree_skb tracepoint does not name the socket a \
                  dropped packet was for (Linux 6.11+): tracer_tcp_drops_total has no \
                  namespace and pod",
    });
    Some(program)
}

/// Attaches the accept-queue program as `--accept-wait` asks (`wanted`), for
/// `inet_csk_accept`'s `args` arguments, and adds the `accept_wait` feature; returns the
/// program attached. Fails only with `--accept-wait on`: the accept queue is a feature, and a
/// kernel that cannot trace the function (no BPF trampolines, a prototype of another shape)
/// still gets everything else.
fn attach_accept_wait(
    ebpf: &mut Ebpf,
    wanted: Toggle,
    args: Option<usize>,
    btf: &aya::Btf,
    features: &mut Vec<crate::stream::features::Feature>,
) -> Result<Option<&'static str>> {
    let attached = match wanted {
        Toggle::Off => Err(anyhow::anyhow!("--accept-wait off")),
        Toggle::Auto | Toggle::On => attach_accept(ebpf, args, btf),
    };
    match (&attached, wanted) {
        (Ok(_), _) => {}
        (Err(e), Toggle::On) => bail!(
            "--accept-wait on: this kernel does not let the probe trace the return of \
             inet_csk_accept ({e:#}); use --accept-wait auto or off"
        ),
        (Err(e), _) => log::debug!("accept queue: {e:#}"),
    }
    features.push(crate::stream::features::Feature {
        name: "accept_wait",
        enabled: attached.is_ok(),
        missing: if wanted == Toggle::Off {
            "left out (--accept-wait off): tracer_tcp_accept_wait_seconds stays empty and \
             records carry no accept_wait_ns"
        } else {
            "this kernel does not let the probe trace the return of inet_csk_accept \
             (fexit: BPF trampolines, CONFIG_FUNCTION_TRACER): \
             tracer_tcp_accept_wait_seconds stays empty and records carry no \
             accept_wait_ns"
        },
    });
    Ok(attached.ok())
}

/// This namespace's ephemeral port range, for the probe's choice of a dropped packet's
/// service port; the Linux default where it cannot be read.
fn ephemeral_ports() -> [u16; 2] {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| crate::census::parse_port_range(&t))
        .map_or([32_768, 60_999], |(lo, hi)| [lo, hi])
}

/// Loads and attaches the accept-queue program that fits `inet_csk_accept`'s `args`
/// arguments; returns its name.
fn attach_accept(ebpf: &mut Ebpf, args: Option<usize>, btf: &aya::Btf) -> Result<&'static str> {
    let Some(&(_, name)) = ACCEPT_PROGRAMS.iter().find(|(n, _)| Some(*n) == args) else {
        bail!("{ACCEPT_FUNCTION} has {args:?} arguments on this kernel; the probe knows 4 and 2");
    };
    let program: &mut FExit = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the probe object"))?
        .try_into()?;
    // Not `load_error`: the probe itself loaded, so privileges are not what is missing.
    let refused = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "the kernel refused an fexit program on {ACCEPT_FUNCTION} ({e}): it has no BPF \
             trampolines (a kernel built without ftrace does not)"
        )
    };
    program.load(ACCEPT_FUNCTION, btf).map_err(|e| match e {
        aya::programs::ProgramError::LoadError { io_error, .. } => refused(&io_error),
        e => refused(&e),
    })?;
    program.attach().map_err(|e| refused(&e))?;
    Ok(name)
}

/// The program of the probe object loaded as `name` of [`PROGRAMS`].
fn object_program(name: &'static str, variants: Variants) -> &'static str {
    match name {
        "tcp_send_reset" if variants.reset_reasons => RESET_REASON_PROGRAM,
        "tcp_retransmit_skb" if variants.retransmit_err => RETRANSMIT_ERR_PROGRAM,
        _ => name,
    }
}

/// Reads the kernel's `bpf_prog_info` of a loaded program: aya 0.14's `ProgramInfo` does not
/// expose `recursion_misses`.
fn program_info(fd: BorrowedFd<'_>) -> Result<bpf_prog_info> {
    /// The `info` member of `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD
    /// (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_prog_info is a plain C struct of integers; all zeroes is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<bpf_prog_info>() as u32,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    // SAFETY: `attr` is a valid prefix of bpf_attr for this command and `info` points at a
    // writable buffer of `info_len` bytes that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            std::ptr::addr_of!(attr),
            std::mem::size_of::<InfoByFd>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("reading the probe's program info");
    }
    Ok(info)
}

/// Fails with a message that says how to fix it when this process cannot load eBPF programs.
pub fn check_privileges() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    // CAP_BPF (39) and CAP_PERFMON (38), or CAP_SYS_ADMIN (21) on kernels before 5.8.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| cap_eff & (1 << bit) != 0;
    if (has(39) && has(38)) || has(21) {
        return Ok(());
    }
    bail!("tracer needs root or CAP_BPF+CAP_PERFMON to load its eBPF probe: run it with sudo")
}

/// Largest `--ring-buffer-size`. Each CPU gets a ring of that size in kernel memory that is
/// never swapped, so 2G would take 4 GiB on two CPUs (and seconds to start); 1M already holds
/// [`TRANSITIONS_PER_MIB`] transitions, 7 ms of drain at 1M events/s.
pub const MAX_RING_BUFFER_BYTES: u32 = 256 << 20;

/// Bytes an event takes in a ring, with the ring's 8-byte record header
/// (`BPF_RINGBUF_HDR_SZ`): a transition's head alone ([`HEAD_RECORD_BYTES`], every transition
/// but one to CLOSE), or the whole of it ([`WHOLE_RECORD_BYTES`], a transition to CLOSE).
pub const HEAD_RECORD_BYTES: usize = tracer_common::HEAD_BYTES + 8;
pub const WHOLE_RECORD_BYTES: usize = tracer_common::WHOLE_RECORD_BYTES + 8;

/// Transitions a 1 MiB ring holds when a connection's sockets make 10 of them, 2 of them to
/// CLOSE (a short connection: the client's CLOSE -> SYN_SENT -> ESTABLISHED -> FIN_WAIT1 ->
/// FIN_WAIT2 -> CLOSE, the server's LISTEN -> SYN_RECV -> ESTABLISHED -> CLOSE_WAIT ->
/// LAST_ACK -> CLOSE).
pub const TRANSITIONS_PER_MIB: usize =
    (1 << 20) * 10 / (8 * HEAD_RECORD_BYTES + 2 * WHOLE_RECORD_BYTES);

/// Validates `--ring-buffer-size`: the kernel wants a power of two, a whole number of pages;
/// this tool wants a size whose kernel memory stays sane.
pub fn check_ring_buffer_size(bytes: u32) -> Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    if bytes < page || !bytes.is_power_of_two() {
        bail!(
            "--ring-buffer-size {bytes} is not valid: use a power of two of at least {page} \
             bytes, e.g. 8M"
        );
    }
    if bytes > MAX_RING_BUFFER_BYTES {
        let cpus = aya::util::nr_cpus().map_or(1, |n| n) as u64;
        bail!(
            "--ring-buffer-size {}M is too large: at most {}M per CPU (this host's {cpus} CPUs \
             would pin {}M of kernel memory); 1M holds {TRANSITIONS_PER_MIB} transitions",
            bytes >> 20,
            MAX_RING_BUFFER_BYTES >> 20,
            cpus * u64::from(bytes >> 20)
        );
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large rings load there.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit pointer; failure only means the old limit stays.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// What the kernel was asked to take when it refused, for [`load_error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step<'a> {
    /// The probe object's maps and globals, or a CPU's ring buffer.
    Maps,
    /// Loading `program` of the probe object for BTF tracepoint `tracepoint` (the verifier runs).
    Load {
        program: &'a str,
        tracepoint: &'a str,
    },
    /// Attaching the loaded `program` to BTF tracepoint `tracepoint`.
    Attach {
        program: &'a str,
        tracepoint: &'a str,
    },
}

impl Step<'_> {
    /// The verb of the line: what the kernel refused to do.
    fn verb(self) -> &'static str {
        match self {
            Step::Maps | Step::Load { .. } => "load",
            Step::Attach { .. } => "attach",
        }
    }
}

/// Turns a load or attach failure of `step` into one line that says what to do.
fn load_error(step: Step<'_>, err: &dyn std::error::Error) -> anyhow::Error {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    anyhow::anyhow!("{}", load_error_line(step, &text))
}

/// One line that says which part of the probe the kernel refused, why and what to do, from the
/// error text (which may hold the verifier's whole log: it is summarised, never printed).
fn load_error_line(step: Step<'_>, text: &str) -> String {
    // The verifier names a helper this kernel does not offer to BTF tracepoint programs.
    let helper = text.lines().find_map(|l| {
        let l = l.trim();
        let rest = l
            .strip_prefix("unknown func ")
            .or_else(|| l.split_once("cannot use helper ").map(|(_, r)| r))?;
        Some(rest.split('#').next().unwrap_or(rest).to_owned())
    });
    let first = text.lines().next().unwrap_or_default();
    let first = first.split(". Verifier output").next().unwrap_or(first);
    let verb = step.verb();
    let (what, tracepoint) = match step {
        Step::Maps => ("the eBPF probe's maps".to_owned(), None),
        Step::Load {
            program,
            tracepoint,
        }
        | Step::Attach {
            program,
            tracepoint,
        } => (
            format!("the eBPF program {program} (tracepoint {tracepoint})"),
            Some(tracepoint),
        ),
    };
    if let Some(helper) = helper {
        format!(
            "this kernel does not let the probe call {helper} from a BTF tracepoint program \
             (cannot {verb} {what}: {first}): tracer needs Linux 5.12 or newer (or a kernel \
             with that backported)"
        )
    } else if text.contains("Operation not permitted") || text.contains("EPERM") {
        format!(
            "the kernel refused to {verb} {what} ({first}): run as root or with \
             CAP_BPF+CAP_PERFMON, and check that lockdown or seccomp does not forbid bpf()"
        )
    } else {
        let needs = tracepoint.map_or(String::new(), |t| format!(" and the {t} tracepoint"));
        format!(
            "cannot {verb} {what} ({first}): tracer needs Linux 5.12 or newer with BTF \
             (CONFIG_DEBUG_INFO_BTF){needs}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_records_are_128_and_256_bytes_as_the_docs_say() {
        assert_eq!((HEAD_RECORD_BYTES, WHOLE_RECORD_BYTES), (128, 256));
        assert_eq!(TRANSITIONS_PER_MIB, 6826);
        let docs = include_str!("../../../docs/watch.md");
        let said = "6,826 transitions of short connections each";
        assert!(docs.contains(said), "docs/watch.md should say {said:?}");
    }

    #[test]
    fn a_verifier_log_becomes_one_line_naming_the_missing_helper() {
        let log = "the BPF_PROG_LOAD syscall failed. Verifier output: 0: R1=ctx() R10=fp0\n\
                   12: (85) call bpf_get_socket_cookie#46\n\
                   program of this type cannot use helper bpf_get_socket_cookie#46\n\
                   processed 12 insns\n";
        let step = Step::Load {
            program: "inet_sock_set_state",
            tracepoint: "inet_sock_set_state",
        };
        let line = load_error_line(step, log);
        assert_eq!(
            line,
            "this kernel does not let the probe call bpf_get_socket_cookie from a BTF tracepoint \
             program (cannot load the eBPF program inet_sock_set_state (tracepoint \
             inet_sock_set_state): the BPF_PROG_LOAD syscall failed): tracer needs Linux 5.12 \
             or newer (or a kernel with that backported)"
        );
    }

    #[test]
    fn a_refused_program_is_named_with_its_tracepoint_not_always_the_main_one() {
        let step = Step::Load {
            program: "tcp_send_reset_reason",
            tracepoint: "tcp_send_reset",
        };
        let text = "the BPF_PROG_LOAD syscall failed: Invalid argument (os error 22)";
        assert_eq!(
            load_error_line(step, text),
            "cannot load the eBPF program tcp_send_reset_reason (tracepoint tcp_send_reset) \
             (the BPF_PROG_LOAD syscall failed: Invalid argument (os error 22)): tracer needs \
             Linux 5.12 or newer with BTF (CONFIG_DEBUG_INFO_BTF) and the tcp_send_reset \
             tracepoint"
        );
        let step = Step::Attach {
            program: "tcp_retransmit_synack",
            tracepoint: "tcp_retransmit_synack",
        };
        let text = "`bpf_raw_tracepoint_open` failed: Operation not permitted (os error 1)";
        assert_eq!(
            load_error_line(step, text),
            "the kernel refused to attach the eBPF program tcp_retransmit_synack (tracepoint \
             tcp_retransmit_synack) (`bpf_raw_tracepoint_open` failed: Operation not permitted \
             (os error 1)): run as root or with CAP_BPF+CAP_PERFMON, and check that lockdown or \
             seccomp does not forbid bpf()"
        );
    }

    #[test]
    fn refused_maps_name_no_program() {
        let text = "map EVENTS: the BPF_MAP_CREATE syscall failed: Invalid argument (os error 22)";
        let line = load_error_line(Step::Maps, text);
        assert_eq!(
            line,
            "cannot load the eBPF probe's maps (map EVENTS: the BPF_MAP_CREATE syscall failed: \
             Invalid argument (os error 22)): tracer needs Linux 5.12 or newer with BTF \
             (CONFIG_DEBUG_INFO_BTF)"
        );
        assert!(!line.contains("inet_sock_set_state"), "{line}");
    }
}
