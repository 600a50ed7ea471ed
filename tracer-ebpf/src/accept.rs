//! The accept queue: how long each connection waited in it, from the end of its handshake
//! (SYN_RECV -> ESTABLISHED, kept on the child's storage) to the server's `accept()` that
//! took it (`inet_csk_accept` returning it). The wait is kept on the socket, for its close
//! record, and reported as an [`ACCEPTED`] event, for the agent's histogram.

use super::*;

/// `struct sock *inet_csk_accept(struct sock *sk, int flags, int *err, bool kern)`, before
/// Linux 6.10: the return value follows the four arguments.
#[fexit(function = "inet_csk_accept")]
pub fn inet_csk_accept_4(ctx: FExitContext) -> i32 {
    accepted(&ctx, ctx.arg(4));
    0
}

/// `struct sock *inet_csk_accept(struct sock *sk, struct proto_accept_arg *arg)`, Linux 6.10+.
/// Userspace loads this one or [`inet_csk_accept_4`], whichever the kernel's function fits.
#[fexit(function = "inet_csk_accept")]
pub fn inet_csk_accept_2(ctx: FExitContext) -> i32 {
    accepted(&ctx, ctx.arg(2));
    0
}

/// Stamps the accepted socket `sk` (null when the accept failed) with its wait and reports it.
#[inline(always)]
fn accepted(ctx: &FExitContext, sk: *const u8) {
    if sk.is_null() {
        return;
    }
    let s = socket_state(sk, false);
    // SAFETY: null or this socket's storage; the socket is not yet the application's, and
    // its state changes under the lock `inet_csk_accept` held.
    let Some(s) = (unsafe { s.as_mut() }) else {
        return;
    };
    // A passive child the probe saw established (a Fast Open child is accepted before).
    if s.flags & socket::PASSIVE == 0 || s.established_ns == 0 {
        return;
    }
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // At least 1: 0 says "not accepted".
    let wait_us = (now.saturating_sub(s.established_ns) / 1_000).clamp(1, u64::from(u32::MAX));
    s.accept_wait_us = wait_us as u32;
    // SAFETY: read-only global, volatile for the same reason as OFFSETS.
    if unsafe { core::ptr::read_volatile(&ACCEPT_EVENTS) } == 0 {
        return;
    }
    // SAFETY: direct loads through the BTF-typed socket `inet_csk_accept` returned.
    let (family, dport) = unsafe {
        (
            field::<u16>(sk, offset!(skc_family)),
            u16::from_be(field::<u16>(sk, offset!(skc_dport))),
        )
    };
    // SAFETY: `sk` is the full socket `inet_csk_accept` returned and `s` its storage.
    unsafe {
        let state = field::<u8>(sk, offset!(skc_state));
        report_event(
            ctx,
            sk,
            s,
            (family, s.port, dport),
            now,
            state,
            ACCEPTED,
            |_| {},
        );
    }
}
