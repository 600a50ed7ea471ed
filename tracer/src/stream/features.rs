//! What this kernel can report, decided once at start from its BTF: a figure the kernel
//! cannot give is said once, in one line, and exported as `tracer_feature_enabled{feature}`
//! 0, rather than silently staying 0.
//!
//! Owns: the list of optional features and how each is detected. Does not own: what the probe
//! does with them (it attaches the same programs everywhere).

use btf_rs::{Btf, Type};
use tracer_common::SockOffsets;

/// One optional feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// The `feature` label value.
    pub name: &'static str,
    pub enabled: bool,
    /// What is missing when it is off, for the one line the agent prints.
    pub missing: &'static str,
}

/// Every optional feature, detected on this kernel.
///
/// - `resets_sent_without_socket`: seen in the kernel matrix, 6.1 calls `tcp_send_reset` only
///   for resets sent by a socket; 6.12 and 6.18 also for those that answer no socket. The
///   kernels that do have a third tracepoint argument (`enum sk_rst_reason`), which is what
///   is detected.
///
/// - `reset_reason`: why the kernel sent a reset (`enum sk_rst_reason`), the same third
///   argument.
///
/// - `cgroup`: the socket's cgroup (and so its container and pod) needs `struct
///   sock_cgroup_data` with a plain `cgroup` pointer (Linux 5.15+).
pub fn detect(btf: &Btf, offsets: &SockOffsets) -> Vec<Feature> {
    vec![
        Feature {
            name: "cgroup",
            enabled: crate::stream::btf::reads_cgroup(offsets),
            missing: "this kernel's struct sock_cgroup_data has no plain cgroup pointer (Linux \
                      5.15+ has one): sockets are not attributed to cgroups, containers or pods",
        },
        Feature {
            name: "reset_reason",
            enabled: tracepoint_args(btf, "tcp_send_reset").is_some_and(|n| n >= 3),
            missing: "this kernel's tcp/tcp_send_reset tracepoint has no reset-reason argument \
                      (Linux 6.10+): close records carry no reset_reason and \
                      tracer_tcp_reset_reasons_total stays empty",
        },
        Feature {
            name: "resets_sent_without_socket",
            enabled: tracepoint_args(btf, "tcp_send_reset").is_some_and(|n| n >= 3),
            missing: "this kernel's tcp/tcp_send_reset tracepoint does not fire for a reset that \
                  answers no socket (a SYN to a closed port), so \
                  tracer_tcp_resets_total{direction=\"sent\",state=\"none\"} stays 0 (kernels \
                  whose tracepoint has a reset-reason argument do: 6.12 and 6.18 in the \
                  kernel matrix, not 6.1)",
        },
    ]
}

/// Number of arguments of a tracepoint (the `__data` context pointer not counted), from the
/// `btf_trace_<name>` typedef the kernel's BTF holds for every tracepoint.
pub fn tracepoint_args(btf: &Btf, name: &str) -> Option<usize> {
    let typedef = btf
        .resolve_types_by_name(&format!("btf_trace_{name}"))
        .ok()?
        .into_iter()
        .find(|t| matches!(t, Type::Typedef(_)))?;
    let Type::Typedef(t) = typedef else {
        return None;
    };
    let Type::Ptr(p) = btf.resolve_chained_type(&t).ok()? else {
        return None;
    };
    let Type::FuncProto(proto) = btf.resolve_chained_type(&p).ok()? else {
        return None;
    };
    Some(proto.parameters.len().saturating_sub(1))
}

/// Number of arguments of kernel function `name`, from its BTF `FUNC`.
pub fn function_args(btf: &Btf, name: &str) -> Option<usize> {
    let func = btf
        .resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find(|t| matches!(t, Type::Func(_)))?;
    let Type::Func(f) = func else {
        return None;
    };
    let Type::FuncProto(proto) = btf.resolve_chained_type(&f).ok()? else {
        return None;
    };
    Some(proto.parameters.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracepoint_arguments_are_read_from_the_kernels_btf() {
        let btf = match crate::stream::btf::kernel_btf() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("SKIPPED: {e:#}");
                return;
            }
        };
        // inet_sock_set_state(const struct sock *sk, int oldstate, int newstate).
        assert_eq!(tracepoint_args(&btf, "inet_sock_set_state"), Some(3));
        assert_eq!(tracepoint_args(&btf, "no_such_tracepoint"), None);
        // inet_csk_accept: (sk, flags, err, kern) before Linux 6.10, (sk, arg) since.
        let accept = function_args(&btf, "inet_csk_accept");
        assert!(matches!(accept, Some(2 | 4)), "{accept:?}");
    }
}
