//! Kernel struct layouts, read from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The probe reads `struct sock` fields at byte offsets; Rust eBPF has no CO-RE relocations, so
//! this module finds the offsets at start and the probe receives them as a load-time constant.
//! Owns: BTF lookups. Does not own: loading the program (`probe`).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};

use anyhow::{anyhow, bail, Context, Result};
use btf_rs::{Backend, Btf, Type};
use tracer_common::SockOffsets;

/// Where the kernel exposes its own BTF (Linux 5.5+ built with CONFIG_DEBUG_INFO_BTF=y).
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Reads the kernel BTF, with an error that says how to get it when it is missing.
pub fn kernel_btf() -> Result<Btf> {
    if !std::path::Path::new(VMLINUX_BTF).exists() {
        bail!(
            "kernel BTF not found at {VMLINUX_BTF}: tracer needs Linux 5.12 or newer built with \
             CONFIG_DEBUG_INFO_BTF=y"
        );
    }
    let bytes = std::fs::read(VMLINUX_BTF).with_context(|| format!("reading {VMLINUX_BTF}"))?;
    let parsed = match in_memory_file(&bytes) {
        // btf-rs's mapped backend finds each type's place and parses only the few types
        // looked up; its default parses all of the kernel's (over 100,000) into maps, for a
        // dozen lookups: the agent's start went from 7.3 to 5.5 s in the emulated 6.12 guest
        // (0.9 to 0.6 s on a host). It maps a file, and the kernel's BTF file can be mapped
        // only since Linux 6.16: a copy in memory can be mapped everywhere.
        Ok(file) => {
            let path = format!("/proc/self/fd/{}", file.as_raw_fd());
            Btf::from_file_with_backend(path, Backend::Mmap)
        }
        Err(_) => Btf::from_bytes(&bytes),
    };
    parsed.map_err(|e| anyhow!("cannot parse {VMLINUX_BTF}: {e}"))
}

/// A file in memory (memfd) holding `bytes`, closed on drop.
fn in_memory_file(bytes: &[u8]) -> std::io::Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name and flags; it returns a new descriptor
    // or -1.
    let fd = unsafe { libc::memfd_create(c"vmlinux-btf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes)?;
    Ok(file)
}

/// Byte offsets of every field the probe reads, from `btf`.
pub fn sock_offsets(btf: &Btf) -> Result<SockOffsets> {
    // `struct sock` starts with `struct sock_common __sk_common` and `struct inet_sock` with
    // `struct sock sk`; both offsets are checked rather than assumed.
    let common = field_offset(btf, "sock", &["__sk_common"])?;
    let in_common =
        |field: &str| -> Result<u32> { Ok(common + field_offset(btf, "sock_common", &[field])?) };
    let inet_sk = field_offset(btf, "inet_sock", &["sk"])?;
    if inet_sk != 0 {
        bail!("unexpected kernel layout: inet_sock.sk at byte {inet_sk}, not 0");
    }
    // `struct tcp_sock` starts with `struct inet_connection_sock inet_conn`.
    let icsk = field_offset(btf, "tcp_sock", &["inet_conn"])?;
    let ca_state = bitfield(btf, "inet_connection_sock", "icsk_ca_state")?;
    // `u8 chrono_type:2` before Linux 6.8's regrouping of `tcp_sock`, a plain `u8` since.
    let chrono_type = bitfield(btf, "tcp_sock", "chrono_type").or_else(|_| {
        field_offset(btf, "tcp_sock", &["chrono_type"]).map(|byte| Bitfield {
            byte,
            shift: 0,
            mask: 0xff,
        })
    })?;
    Ok(SockOffsets {
        skc_daddr: in_common("skc_daddr")?,
        skc_rcv_saddr: in_common("skc_rcv_saddr")?,
        skc_dport: in_common("skc_dport")?,
        skc_family: in_common("skc_family")?,
        skc_v6_daddr: in_common("skc_v6_daddr")?,
        skc_v6_rcv_saddr: in_common("skc_v6_rcv_saddr")?,
        skc_net: in_common("skc_net")?,
        sk_protocol: field_offset(btf, "sock", &["sk_protocol"])
            .context("sk_protocol must be a plain u16 field (Linux 5.6 or newer)")?,
        inet_sport: field_offset(btf, "inet_sock", &["inet_sport"])?,
        skc_state: in_common("skc_state")?,
        sk_err: field_offset(btf, "sock", &["sk_err"])?,
        srtt_us: field_offset(btf, "tcp_sock", &["srtt_us"])?,
        total_retrans: field_offset(btf, "tcp_sock", &["total_retrans"])?,
        net_inum: field_offset(btf, "net", &["ns", "inum"])?,
        sk_cgroup: field_offset(btf, "sock", &["sk_cgrp_data", "cgroup"]).unwrap_or(0),
        cgroup_kn: field_offset(btf, "cgroup", &["kn"]).unwrap_or(0),
        kn_id: field_offset(btf, "kernfs_node", &["id"]).unwrap_or(0),
        bytes_acked: field_offset(btf, "tcp_sock", &["bytes_acked"])?,
        bytes_received: field_offset(btf, "tcp_sock", &["bytes_received"])?,
        // `struct minmax rtt_min` holds `struct minmax_sample s[3]`; s[0] is the minimum.
        rtt_min: field_offset(btf, "tcp_sock", &["rtt_min"])?
            + field_offset(btf, "minmax_sample", &["v"])?,
        snd_una: field_offset(btf, "tcp_sock", &["snd_una"])?,
        write_seq: field_offset(btf, "tcp_sock", &["write_seq"])?,
        // `sock.sk_flags`, or `sock_common.skc_flags` in newer kernels (`#define sk_flags
        // __sk_common.skc_flags`).
        sk_flags: field_offset(btf, "sock", &["sk_flags"]).or_else(|_| in_common("skc_flags"))?,
        // TCP keeps its per-skb state in `skb->cb` (`TCP_SKB_CB`).
        skb_gso_segs: field_offset(btf, "sk_buff", &["cb"])?
            + field_offset(btf, "tcp_skb_cb", &["tcp_gso_segs"])?,
        icsk_ca_state: icsk + ca_state.byte,
        icsk_ca_state_shift: ca_state.shift,
        icsk_ca_state_mask: ca_state.mask,
        skb_head: field_offset(btf, "sk_buff", &["head"])?,
        skb_network_header: field_offset(btf, "sk_buff", &["network_header"])?,
        skb_transport_header: field_offset(btf, "sk_buff", &["transport_header"])?,
        skb_protocol: field_offset(btf, "sk_buff", &["protocol"])?,
        chrono_start: field_offset(btf, "tcp_sock", &["chrono_start"])?,
        chrono_stat: field_offset(btf, "tcp_sock", &["chrono_stat"])?,
        chrono_type: chrono_type.byte,
        chrono_type_shift: chrono_type.shift,
        chrono_type_mask: chrono_type.mask,
        dsack_dups: field_offset(btf, "tcp_sock", &["dsack_dups"])?,
    })
}

/// Where a bitfield lies: the byte that holds it, its shift in that byte and its mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bitfield {
    pub byte: u32,
    pub shift: u32,
    pub mask: u32,
}

/// The bitfield `field` of `struct name` (a direct member), which must fit in one byte.
pub fn bitfield(btf: &Btf, name: &str, field: &str) -> Result<Bitfield> {
    let Type::Struct(s) = find_struct(btf, name)? else {
        unreachable!("found as a struct")
    };
    for member in &s.members {
        if btf.resolve_name(member).unwrap_or_default() != field {
            continue;
        }
        let bits = member.bitfield_size().unwrap_or(0);
        let offset = member.bit_offset();
        let (byte, shift) = (offset / 8, offset % 8);
        if bits == 0 || shift + bits > 8 {
            bail!("field {name}.{field} is not a bitfield within one byte on this kernel");
        }
        return Ok(Bitfield {
            byte,
            shift,
            mask: (1 << bits) - 1,
        });
    }
    bail!("field {name}.{field} not in kernel BTF")
}

/// True when the probe can read a socket's cgroup on this kernel: `struct sock_cgroup_data`
/// holds a plain `struct cgroup *` (Linux 5.15+; before, a tagged union with the v1 classid)
/// and `kernfs_node.id` is the 64-bit id (Linux 5.5+).
pub fn reads_cgroup(offsets: &SockOffsets) -> bool {
    offsets.sk_cgroup != 0 && offsets.kn_id != 0
}

/// The names of `enum name`'s values, indexed by value, lowercase and without `prefix`
/// (`enum sk_rst_reason`, prefix `SK_RST_REASON_`: `TCP_ABORT_ON_CLOSE` is
/// `tcp_abort_on_close`). Empty when the kernel has no such enum; values past 255 and gaps
/// are left out (a gap is an empty name).
pub fn enum_names(btf: &Btf, name: &str, prefix: &str) -> Vec<String> {
    let Some(Type::Enum(e)) = btf
        .resolve_types_by_name(name)
        .unwrap_or_default()
        .into_iter()
        .find(|t| matches!(t, Type::Enum(_)))
    else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for member in &e.members {
        let Ok(value) = usize::try_from(member.val()) else {
            continue;
        };
        if value > 255 {
            continue;
        }
        let full = btf.resolve_name(member).unwrap_or_default();
        let short = full
            .strip_prefix(prefix)
            .unwrap_or(&full)
            .to_ascii_lowercase();
        if names.len() <= value {
            names.resize(value + 1, String::new());
        }
        names[value] = short;
    }
    names
}

/// Value `value` of a kernel enum whose names [`enum_names`] read, as label values and records
/// show it: its name, or `reason_{value}` where this kernel's BTF names none. Written (by
/// `Display`) without allocating.
#[derive(Clone, Copy, Debug)]
pub struct EnumName<'a> {
    names: &'a [String],
    value: usize,
}

impl<'a> EnumName<'a> {
    pub fn new(names: &'a [String], value: usize) -> EnumName<'a> {
        EnumName { names, value }
    }
}

impl std::fmt::Display for EnumName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.names.get(self.value) {
            Some(name) if !name.is_empty() => f.write_str(name),
            _ => write!(f, "reason_{}", self.value),
        }
    }
}

/// Byte offset of `path` (a field, or a field of a field) inside `struct name`.
///
/// Fields inside anonymous structs and unions (as most of `sock_common` is) are found by
/// searching through them, adding their offsets.
pub fn field_offset(btf: &Btf, name: &str, path: &[&str]) -> Result<u32> {
    let ty = find_struct(btf, name)?;
    let mut offset = 0;
    let mut current = ty;
    for field in path {
        let (bits, next) = find_member(btf, &current, field)?
            .ok_or_else(|| anyhow!("field {name}.{} not in kernel BTF", path.join(".")))?;
        if bits % 8 != 0 {
            bail!("field {name}.{field} is a bitfield; this kernel is too old for tracer");
        }
        offset += bits / 8;
        current = next;
    }
    Ok(offset)
}

/// `struct name` of the kernel's BTF.
fn find_struct(btf: &Btf, name: &str) -> Result<Type> {
    btf.resolve_types_by_name(name)
        .map_err(|e| anyhow!("struct {name} not in kernel BTF: {e}"))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(|| anyhow!("struct {name} not in kernel BTF"))
}

/// Finds `field` in a struct or union, descending into anonymous members.
/// Returns its bit offset and its type.
fn find_member(btf: &Btf, ty: &Type, field: &str) -> Result<Option<(u32, Type)>> {
    let (Type::Struct(s) | Type::Union(s)) = ty else {
        return Ok(None);
    };
    for member in &s.members {
        if member.bitfield_size().is_some_and(|n| n > 0) {
            // Bitfields cannot be read at a byte offset; skip, so that a field turning into
            // one is reported as missing rather than read wrongly.
            if btf.resolve_name(member).unwrap_or_default() == field {
                bail!("field {field} is a bitfield; this kernel is too old for tracer");
            }
            continue;
        }
        let name = btf.resolve_name(member).unwrap_or_default();
        let member_ty = skip_modifiers(btf, btf.resolve_chained_type(member).map_err(to_anyhow)?)?;
        if name == field {
            return Ok(Some((member.bit_offset(), member_ty)));
        }
        if name.is_empty() {
            if let Some((bits, t)) = find_member(btf, &member_ty, field)? {
                return Ok(Some((member.bit_offset() + bits, t)));
            }
        }
    }
    Ok(None)
}

/// Follows typedefs and qualifiers down to the type they name.
fn skip_modifiers(btf: &Btf, mut ty: Type) -> Result<Type> {
    loop {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t).map_err(to_anyhow)?,
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                btf.resolve_chained_type(t).map_err(to_anyhow)?
            }
            _ => return Ok(ty),
        };
    }
}

fn to_anyhow(e: btf_rs::Error) -> anyhow::Error {
    anyhow!("reading kernel BTF: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's kernel BTF; skipped (loudly) where there is none.
    fn btf() -> Option<Btf> {
        match kernel_btf() {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("SKIPPED: {e:#}");
                None
            }
        }
    }

    #[test]
    fn sock_common_fields_sit_where_the_kernel_abi_puts_them() {
        let Some(btf) = btf() else { return };
        let off = sock_offsets(&btf).expect("offsets");
        // skc_daddr and skc_rcv_saddr open sock_common (the `skc_addrpair` union), in that
        // order; skc_dport and skc_num follow the hash (`skc_portpair`). These have been the
        // layout since Linux 2.6.38 and are what any kernel must show.
        assert_eq!(off.skc_daddr, 0);
        assert_eq!(off.skc_rcv_saddr, 4);
        assert_eq!(off.skc_dport, 12);
        assert_eq!(off.skc_family, 16);
        assert!(off.sk_protocol > off.skc_v6_rcv_saddr, "{off:?}");
        assert!(off.inet_sport > off.sk_protocol, "{off:?}");
    }

    #[test]
    fn reset_reasons_are_named_from_the_kernels_enum() {
        let Some(btf) = btf() else { return };
        let names = enum_names(&btf, "sk_rst_reason", "SK_RST_REASON_");
        if names.is_empty() {
            eprintln!("UNSUPPORTED: reset reasons: no enum sk_rst_reason (Linux 6.10+)");
            return;
        }
        // The first two have been the same since the enum appeared (Linux 6.10).
        assert_eq!(names[0], "not_specified");
        assert_eq!(names[1], "no_socket");
        assert!(names.iter().any(|n| n == "tcp_abort_on_close"), "{names:?}");
        assert!(enum_names(&btf, "no_such_enum", "").is_empty());
    }

    #[test]
    fn a_value_the_kernel_does_not_name_is_reason_and_its_number() {
        // A gap in the enum is an empty name (see `enum_names`).
        let names = ["not_specified", "", "tcp_abort_on_close"].map(String::from);
        let name = |value| EnumName::new(&names, value).to_string();
        assert_eq!(
            [name(0), name(1), name(2), name(9)],
            [
                "not_specified",
                "reason_1",
                "tcp_abort_on_close",
                "reason_9"
            ]
        );
        assert_eq!(EnumName::new(&[], 3).to_string(), "reason_3");
    }

    #[test]
    fn the_congestion_state_is_a_five_bit_field_of_one_byte() {
        let Some(btf) = btf() else { return };
        // `__u8 icsk_ca_state:5, icsk_ca_initialized:1, ...`: the low bits of its byte on
        // little-endian kernels; a plain byte is no bitfield.
        let ca = bitfield(&btf, "inet_connection_sock", "icsk_ca_state").expect("bitfield");
        assert_eq!((ca.shift, ca.mask), (0, 0x1f), "{ca:?}");
        assert!(bitfield(&btf, "inet_connection_sock", "icsk_pending").is_err());
        // (sk, skb), and from Linux 6.14 also err: the probe loads the program that fits.
        let args = crate::stream::features::tracepoint_args(&btf, "tcp_retransmit_skb");
        assert!(matches!(args, Some(2 | 3)), "{args:?}");
    }

    #[test]
    fn missing_field_is_an_error_naming_it() {
        let Some(btf) = btf() else { return };
        let err = field_offset(&btf, "sock", &["no_such_field"]).unwrap_err();
        assert!(format!("{err:#}").contains("sock.no_such_field"), "{err:#}");
    }
}
