//! Decoding what the probe sends: ring-buffer bytes into a [`Transition`], and the kernel's
//! numbers (states, families, addresses) into names people read.
//!
//! Pure code, no I/O: everything here is unit-tested on hand-made values.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use tracer_common::Transition;
use tracer_common::{state, AF_INET, AF_INET6};

/// Reads one ring-buffer record. `None` when it is too short to be a [`Transition`].
pub fn decode(bytes: &[u8]) -> Option<Transition> {
    if bytes.len() < std::mem::size_of::<Transition>() {
        return None;
    }
    // SAFETY: the length was checked, Transition is plain old data (every bit pattern valid),
    // and read_unaligned does not require the ring buffer's alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Transition>()) })
}

/// Every state name, in the kernel's numbering (index = state number). Lowercase kernel names
/// without the `TCP_` prefix: the labels users filter by and dashboards show.
pub const STATE_NAMES: [&str; 13] = [
    "unknown",
    "established",
    "syn_sent",
    "syn_recv",
    "fin_wait1",
    "fin_wait2",
    "time_wait",
    "close",
    "close_wait",
    "last_ack",
    "listen",
    "closing",
    "new_syn_recv",
];

/// Name of a kernel TCP state number; `"unknown"` for numbers the kernel does not use.
pub fn state_name(s: u8) -> &'static str {
    STATE_NAMES.get(s as usize).copied().unwrap_or("unknown")
}

/// The state number of a name, accepting any case and an optional `TCP_` prefix.
pub fn parse_state(name: &str) -> Option<u8> {
    let lower = name.to_ascii_lowercase();
    let bare = lower.strip_prefix("tcp_").unwrap_or(&lower);
    (state::ESTABLISHED..=state::NEW_SYN_RECV).find(|&s| STATE_NAMES[s as usize] == bare)
}

/// `"ipv4"`, `"ipv6"`, or `"unknown"`.
pub fn family_name(family: u16) -> &'static str {
    match family {
        AF_INET => "ipv4",
        AF_INET6 => "ipv6",
        _ => "unknown",
    }
}

/// Local address of the transition's socket.
pub fn local_addr(t: &Transition) -> IpAddr {
    addr(t.family, &t.saddr)
}

/// Remote address of the transition's socket.
pub fn remote_addr(t: &Transition) -> IpAddr {
    addr(t.family, &t.daddr)
}

fn addr(family: u16, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// The owner's command name: the bytes before the first NUL, or `""` when unknown.
pub fn comm(t: &Transition) -> &str {
    let end = t.comm.iter().position(|&b| b == 0).unwrap_or(t.comm.len());
    // Task names are set by userspace and may hold any bytes: fall back to the valid prefix.
    match std::str::from_utf8(&t.comm[..end]) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&t.comm[..e.valid_up_to()]).unwrap_or(""),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A transition with the given ports and states, on 127.0.0.1, as tests elsewhere need.
    pub(crate) fn transition(skaddr: u64, time_ns: u64, old: u8, new: u8) -> Transition {
        let mut saddr = [0; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        Transition {
            time_ns,
            skaddr,
            cookie: skaddr + 1_000_000,
            saddr,
            daddr: saddr,
            pid: 42,
            sport: 40000,
            dport: 8080,
            family: AF_INET,
            oldstate: old,
            newstate: new,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            srtt_us: 0,
            sk_err: 0,
            retrans: 0,
            netns: 0,
        }
    }

    #[test]
    fn decode_round_trips_the_probe_layout() {
        let t = transition(
            0xffff_8880_1234_5678,
            99,
            state::SYN_SENT,
            state::ESTABLISHED,
        );
        // SAFETY: viewing a POD value as its bytes, as the ring buffer holds it.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&t as *const Transition).cast::<u8>(),
                std::mem::size_of::<Transition>(),
            )
        };
        assert_eq!(decode(bytes), Some(t));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn state_names_follow_the_kernel_numbering() {
        assert_eq!(state_name(state::ESTABLISHED), "established");
        assert_eq!(state_name(state::TIME_WAIT), "time_wait");
        assert_eq!(state_name(state::NEW_SYN_RECV), "new_syn_recv");
        assert_eq!(state_name(0), "unknown");
        assert_eq!(state_name(200), "unknown");
        assert_eq!(parse_state("CLOSE_WAIT"), Some(state::CLOSE_WAIT));
        assert_eq!(parse_state("tcp_syn_sent"), Some(state::SYN_SENT));
        assert_eq!(parse_state("unknown"), None);
        assert_eq!(parse_state("estab"), None);
    }

    #[test]
    fn addresses_decode_by_family() {
        let mut t = transition(1, 0, state::CLOSE, state::SYN_SENT);
        assert_eq!(local_addr(&t).to_string(), "127.0.0.1");
        t.family = AF_INET6;
        t.daddr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(remote_addr(&t).to_string(), "::1");
        assert_eq!(family_name(t.family), "ipv6");
    }

    #[test]
    fn comm_stops_at_nul_and_survives_bad_utf8() {
        let mut t = transition(1, 0, state::CLOSE, state::SYN_SENT);
        assert_eq!(comm(&t), "curl");
        t.comm = [0; 16];
        assert_eq!(comm(&t), "");
        t.comm[..4].copy_from_slice(&[b'a', b'b', 0xff, b'c']);
        assert_eq!(comm(&t), "ab");
    }
}
