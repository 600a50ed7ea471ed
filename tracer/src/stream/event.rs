//! Decoding what the probe sends: ring-buffer bytes into a [`Transition`], and the kernel's
//! numbers (states, families, addresses) into names people read.
//!
//! Pure code, no I/O: everything here is unit-tested on hand-made values.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use tracer_common::Transition;
use tracer_common::{state, AF_INET, AF_INET6, HEAD_BYTES};

/// Reads one ring-buffer record: a whole [`Transition`] (a transition to CLOSE, padded), or
/// its head alone (every other event), whose rest is then 0. `None` when it is shorter.
pub fn decode(bytes: &[u8]) -> Option<Transition> {
    let whole = std::mem::size_of::<Transition>();
    if bytes.len() >= whole {
        // SAFETY: the length was checked, Transition is plain old data (every bit pattern
        // valid), and read_unaligned does not require the ring buffer's alignment.
        return Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Transition>()) });
    }
    if bytes.len() < HEAD_BYTES {
        return None;
    }
    let mut t = std::mem::MaybeUninit::<Transition>::zeroed();
    // SAFETY: HEAD_BYTES fit in both (checked above, and HEAD_BYTES < size_of::<Transition>),
    // and a zeroed Transition with any head bytes over it is a valid one (plain old data).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), t.as_mut_ptr().cast::<u8>(), HEAD_BYTES);
        Some(t.assume_init())
    }
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

/// An address as the probe writes it: IPv4 in the first 4 bytes, or all 16 of IPv6.
pub fn address(family: u16, bytes: &[u8; 16]) -> IpAddr {
    addr(family, bytes)
}

fn addr(family: u16, bytes: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

/// A command name as the kernel keeps it (`task_struct.comm`): the bytes before the first NUL.
/// Any process can set its own to any bytes (`prctl(PR_SET_NAME)`), escape sequences included.
pub fn comm_bytes(comm: &[u8; 16]) -> &[u8] {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    &comm[..end]
}

/// The command name as text, invalid UTF-8 replaced (U+FFFD); `""` when unknown. For JSON,
/// which escapes control characters itself; a terminal gets [`Printable`].
pub fn comm_text(comm: &[u8; 16]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(comm_bytes(comm))
}

/// Text from a user or the kernel, made safe for a terminal: control characters (ESC among
/// them), backslashes and bytes that are not UTF-8 are written as `\xNN` / `\u{NNNN}`, so that
/// a process name cannot move the cursor, erase lines or hide text. Honours width and
/// alignment (`{:<15}`) without allocating.
pub struct Printable<'a>(pub &'a [u8]);

impl Printable<'_> {
    /// Calls `piece` with each piece of the escaped text, in order.
    fn for_each_piece(&self, mut piece: impl FnMut(&str) -> std::fmt::Result) -> std::fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() || c == '\\' || is_bidi_control(c) {
                    let mut buf = [0u8; 12];
                    let escaped = if (c as u32) < 0x80 {
                        write_escape(&mut buf, format_args!("\\x{:02x}", c as u32))
                    } else {
                        write_escape(&mut buf, format_args!("\\u{{{:x}}}", c as u32))
                    };
                    piece(escaped)?;
                } else {
                    piece(c.encode_utf8(&mut [0u8; 4]))?;
                }
            }
            for &b in chunk.invalid() {
                let mut buf = [0u8; 12];
                piece(write_escape(&mut buf, format_args!("\\x{b:02x}")))?;
            }
        }
        Ok(())
    }
}

/// The Unicode bidirectional formatting characters (UAX #9): not controls to Rust, but a
/// terminal that honours them shows text reordered (U+202E makes `exe.txt` look like `txt.exe`).
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Formats `args` into `buf` (an escape is at most 10 bytes) and returns the text.
fn write_escape<'b>(buf: &'b mut [u8; 12], args: std::fmt::Arguments<'_>) -> &'b str {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = cursor.write_fmt(args);
    let len = cursor.position() as usize;
    std::str::from_utf8(&buf[..len]).unwrap_or("?")
}

impl std::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut chars = 0;
        self.for_each_piece(|p| {
            chars += p.chars().count();
            Ok(())
        })?;
        let pad = f.width().unwrap_or(0).saturating_sub(chars);
        let (before, after) = match f.align() {
            Some(std::fmt::Alignment::Right) => (pad, 0),
            Some(std::fmt::Alignment::Center) => (pad / 2, pad - pad / 2),
            _ => (0, pad),
        };
        for _ in 0..before {
            f.write_str(" ")?;
        }
        self.for_each_piece(|p| f.write_str(p))?;
        for _ in 0..after {
            f.write_str(" ")?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_could_drive_a_terminal() {
        let name = b"\x1b[2K\x1b[1A\x1b[8m";
        assert_eq!(Printable(name).to_string(), "\\x1b[2K\\x1b[1A\\x1b[8m");
        // Not UTF-8, a backslash, a C1 control: each escaped; other text as it is, padded.
        assert_eq!(
            format!("[{:<15}]", Printable("a\\b\u{9b}é".as_bytes())),
            "[a\\x5cb\\u{9b}é  ]"
        );
        assert_eq!(format!("[{:>6}]", Printable(b"x\xff")), "[ x\\xff]");
        // Bidirectional controls reorder what a terminal shows: escaped too.
        assert_eq!(
            Printable("a\u{202e}b\u{2066}c\u{200f}".as_bytes()).to_string(),
            "a\\u{202e}b\\u{2066}c\\u{200f}"
        );
        assert_eq!(comm_text(b"curl\0\0\0\0\0\0\0\0\0\0\0\0"), "curl");
    }

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
            close_flags: 0,
            reset_reason: 0,
            netns: 0,
            cgroup: 0,
            bytes_acked: 0,
            bytes_received: 0,
            rtt_min_us: 0,
            total_retrans: 0,
            since_ns: 0,
            opened_ns: 0,
            established_ns: 0,
            teardown_ns: 0,
            port: 8080,
            socket_flags: 0,
            dsack_dups: 0,
            chrono_jiffies: [0; 3],
            retransmits: [0; 4],
            accept_wait_us: 0,
        }
    }

    #[test]
    fn decode_round_trips_the_probe_layout() {
        let mut t = transition(
            0xffff_8880_1234_5678,
            99,
            state::SYN_SENT,
            state::ESTABLISHED,
        );
        (t.since_ns, t.accept_wait_us, t.socket_flags) = (90, 7, 3);
        (t.opened_ns, t.established_ns, t.teardown_ns) = (10, 20, 30);
        (t.bytes_acked, t.bytes_received, t.total_retrans) = (1_000, 2_000, 3);
        (t.chrono_jiffies, t.retransmits) = ([4, 5, 6], [1, 0, 2, 0]);
        // SAFETY: viewing a POD value as its bytes, as the ring buffer holds it.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&t as *const Transition).cast::<u8>(),
                std::mem::size_of::<Transition>(),
            )
        };
        assert_eq!(decode(bytes), Some(t));
        // A head-only record: the same head, the rest 0; shorter than a head: nothing.
        let mut head = t;
        head.opened_ns = 0;
        head.established_ns = 0;
        head.teardown_ns = 0;
        (head.bytes_acked, head.bytes_received) = (0, 0);
        (head.rtt_min_us, head.total_retrans, head.dsack_dups) = (0, 0, 0);
        (head.chrono_jiffies, head.retransmits) = ([0; 3], [0; 4]);
        assert_eq!(decode(&bytes[..HEAD_BYTES]), Some(head));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), Some(head));
        assert_eq!(decode(&bytes[..HEAD_BYTES - 1]), None);
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
        t.comm = *b"curl\0\0\0\0\0\0\0\0\0\0\0\0";
        assert_eq!(comm_text(&t.comm), "curl");
        t.comm = [0; 16];
        assert_eq!(comm_text(&t.comm), "");
        t.comm[..4].copy_from_slice(&[b'a', b'b', 0xff, b'c']);
        // JSON gets the replacement character; a terminal gets the byte, escaped.
        assert_eq!(comm_text(&t.comm), "ab\u{fffd}c");
        assert_eq!(Printable(comm_bytes(&t.comm)).to_string(), "ab\\xffc");
    }
}
