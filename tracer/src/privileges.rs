//! Least privilege once the probe is attached: the capabilities loading it took (CAP_BPF,
//! CAP_PERFMON, and all of root's others) are dropped; what reads it later (its maps, rings and
//! program statistics) goes through the descriptors already held, which need none.
//!
//! Owns: the capabilities each command keeps, and dropping the rest. Capabilities belong to a
//! thread and are inherited by the threads it starts: the commands drop them before starting
//! their other threads; the signal thread, started earlier, drops its own.

use anyhow::{anyhow, Result};
use caps::{CapSet, Capability, CapsHashSet};

/// What `tracer run` keeps: its census enters every network namespace (`setns` needs
/// CAP_SYS_ADMIN), found through `/proc/PID/ns/net` of other users' processes (CAP_SYS_PTRACE).
pub const CENSUS: &[Capability] = &[Capability::CAP_SYS_ADMIN, Capability::CAP_SYS_PTRACE];

/// Keeps only those of `keep` that this thread has, in its effective and permitted sets;
/// empties its inheritable and ambient sets, removes the rest from its bounding set where it
/// may, and forbids gaining any back (`PR_SET_NO_NEW_PRIVS`).
pub fn keep_only(keep: &[Capability]) -> Result<()> {
    let fail =
        |what: &str, e: caps::errors::CapsError| anyhow!("dropping capabilities ({what}): {e}");
    let keep: CapsHashSet = keep.iter().copied().collect();
    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| fail("reading", e))?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    // The bounding set first: shrinking it needs CAP_SETPCAP, which goes next. (A service
    // started with a bounding set of its own, as the systemd unit is, has no CAP_SETPCAP.)
    if permitted.contains(&Capability::CAP_SETPCAP) {
        let bounding = caps::read(None, CapSet::Bounding).map_err(|e| fail("bounding", e))?;
        for cap in bounding.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(|e| fail("bounding", e))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| fail("ambient", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| fail("inheritable", e))?;
    caps::set(None, CapSet::Effective, &kept).map_err(|e| fail("effective", e))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| fail("permitted", e))?;
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(anyhow!(
            "setting no_new_privs: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
