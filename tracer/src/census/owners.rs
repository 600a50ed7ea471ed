//! Who holds a socket, as `ss -p` finds it: the process with a descriptor for the socket's
//! inode (`/proc/PID/fd/N -> socket:[INODE]`).
//!
//! Owns: the walk of `/proc` and reading a link. Used by the census for the sockets whose
//! owner the probe never named: those that were open before the agent started (their
//! SYN_SENT or LISTEN came before the probe), the children of listeners that old, and those
//! whose opening event was lost. Does not own: when to ask (`join`).
//!
//! Reading another user's `/proc/PID/fd` needs `CAP_SYS_PTRACE`, which the agent keeps.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tracer_common::COMM_LEN;

/// A process holding a socket: its pid and command name (NUL-padded, as the kernel's).
pub type Holder = (u32, [u8; COMM_LEN]);

/// The holder of each of `wanted`'s socket inodes that some process of `proc` (a procfs
/// mount, usually `/proc`) has a descriptor for; the lowest pid where several share one (a
/// parent and the children it forked).
pub fn find(proc: &Path, wanted: &HashSet<u64>) -> HashMap<u64, Holder> {
    let mut found = HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    each_socket(proc, |pid, comm, _, inode| {
        if wanted.contains(&inode) {
            found.entry(inode).or_insert((pid, *comm));
        }
    });
    found
}

/// Calls `each(pid, comm, fd, inode)` for every socket descriptor of every process of `proc`
/// (a procfs mount), in pid order; processes that exit meanwhile, or that this process may not
/// look into, are skipped.
pub fn each_socket(proc: &Path, mut each: impl FnMut(u32, &[u8; COMM_LEN], i32, u64)) {
    let Ok(entries) = std::fs::read_dir(proc) else {
        return;
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(proc.join(pid.to_string()).join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Some(n) = fd.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let Some(inode) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| socket_inode(l.as_os_str().as_encoded_bytes()))
            else {
                continue;
            };
            let comm = comm.get_or_insert_with(|| read_comm(proc, pid));
            each(pid, comm, n, inode);
        }
    }
}

/// The inode of a descriptor's link text `socket:[INODE]`; None for anything else.
pub fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `/proc/PID/comm` as the kernel keeps it (at most 15 bytes, NUL-padded); empty if gone.
fn read_comm(proc: &Path, pid: u32) -> [u8; COMM_LEN] {
    let mut comm = [0; COMM_LEN];
    if let Ok(text) = std::fs::read(proc.join(pid.to_string()).join("comm")) {
        let name = text.strip_suffix(b"\n").unwrap_or(&text);
        let n = name.len().min(COMM_LEN - 1);
        comm[..n].copy_from_slice(&name[..n]);
    }
    comm
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn socket_links_give_their_inode_and_nothing_else_does() {
        assert_eq!(socket_inode(b"socket:[4026531993]"), Some(4_026_531_993));
        for other in [
            &b"socket:[]"[..],
            b"socket:[12",
            b"socket:[-1]",
            b"socket:[1 ]",
            b"pipe:[123]",
            b"/dev/null",
            b"anon_inode:[eventpoll]",
            b"socket:[99999999999999999999999]",
        ] {
            assert_eq!(
                socket_inode(other),
                None,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn the_lowest_pid_holding_a_wanted_socket_is_its_holder() {
        let proc = std::env::temp_dir().join(format!("tracer-{}-owners", std::process::id()));
        let _ = std::fs::remove_dir_all(&proc);
        let process = |pid: u32, comm: &str, links: &[&str]| {
            let fd = proc.join(pid.to_string()).join("fd");
            std::fs::create_dir_all(&fd).unwrap();
            std::fs::write(proc.join(pid.to_string()).join("comm"), format!("{comm}\n")).unwrap();
            for (i, l) in links.iter().enumerate() {
                symlink(l, fd.join(i.to_string())).unwrap();
            }
        };
        process(300, "worker", &["socket:[7]", "socket:[8]"]);
        process(
            20,
            "a-name-longer-than-fifteen",
            &["pipe:[5]", "socket:[7]"],
        );
        process(4000, "other", &["socket:[9]"]);
        std::fs::create_dir_all(proc.join("self")).unwrap();
        let wanted = HashSet::from([7, 8, 10]);
        let found = find(&proc, &wanted);
        let _ = std::fs::remove_dir_all(&proc);
        let name = |c: &[u8; COMM_LEN]| {
            String::from_utf8_lossy(crate::stream::event::comm_bytes(c)).into_owned()
        };
        let got: Vec<(u64, u32, String)> = {
            let mut v: Vec<_> = found.iter().map(|(i, (p, c))| (*i, *p, name(c))).collect();
            v.sort();
            v
        };
        assert_eq!(
            got,
            vec![(7, 20, "a-name-longer-t".into()), (8, 300, "worker".into())]
        );
        assert!(find(&proc, &HashSet::new()).is_empty());
    }
}
