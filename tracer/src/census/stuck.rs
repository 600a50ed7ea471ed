//! What "stuck" means: how long a socket may stay in each state, why staying longer matters,
//! and the age of request sockets, which never pass through the tracepoint.
//!
//! Pure code. The join that applies it to every socket of a census is in `join`.

use std::time::Duration;

use tracer_common::state;

/// Default thresholds: how long a socket may stay in a state before it counts as stuck.
pub const DEFAULT_THRESHOLDS: [(u8, Duration); 7] = [
    // The application has not closed a connection its peer closed: a descriptor leak.
    (state::CLOSE_WAIT, Duration::from_secs(60)),
    // Our FIN is not acknowledged: the peer is gone or its receive window is closed.
    (state::FIN_WAIT1, Duration::from_secs(60)),
    // We closed, the peer has not (Linux drops orphans after tcp_fin_timeout, 60 s).
    (state::FIN_WAIT2, Duration::from_secs(60)),
    (state::LAST_ACK, Duration::from_secs(30)),
    (state::CLOSING, Duration::from_secs(30)),
    // Several SYN retransmissions without answer (1, 2, 3, 4 s ...).
    (state::SYN_SENT, Duration::from_secs(10)),
    (state::SYN_RECV, Duration::from_secs(10)),
];

/// Why a socket in `state` past its threshold is a problem, and where to look.
pub fn reason(state: u8) -> &'static str {
    match state {
        state::CLOSE_WAIT => {
            "the peer closed; the owning process has not called close() (descriptor leak?)"
        }
        state::FIN_WAIT1 => {
            "our FIN is not acknowledged: the peer is unresponsive or its window is closed"
        }
        state::FIN_WAIT2 => "we closed; the peer has not closed its side",
        state::LAST_ACK => "we closed after the peer; our FIN is not acknowledged",
        state::CLOSING => "both sides closed at once; the last ACK has not arrived",
        state::SYN_SENT => "no answer to our SYN: the peer is down, filtered or black-holed",
        state::SYN_RECV => {
            "the client has not completed the handshake: lost ACKs, a SYN flood or spoofed SYNs"
        }
        _ => "older than its threshold",
    }
}

/// Thresholds by state (index = kernel state number).
#[derive(Clone, Debug)]
pub struct Thresholds(pub [Option<Duration>; 13]);

impl Thresholds {
    /// True when a socket `age` old in `state` is past that state's threshold.
    pub fn is_stuck(&self, state: u8, age: Duration) -> bool {
        self.0
            .get(state as usize)
            .copied()
            .flatten()
            .is_some_and(|limit| age >= limit)
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        let mut t = [None; 13];
        for (s, d) in DEFAULT_THRESHOLDS {
            t[s as usize] = Some(d);
        }
        Thresholds(t)
    }
}

/// The age of a request socket from its SYN-ACK timer as sock_diag shows it: `retransmits`
/// SYN-ACKs resent so far and `expires` until the next. The kernel arms the timer for 1 s
/// (`TCP_TIMEOUT_INIT`) when the SYN arrives and doubles it at each retransmission, up to
/// 120 s (`TCP_RTO_MAX`), so the time since the SYN is the sum of the periods so far minus
/// what is left of the current one. A lower bound: the timer wheel fires each period up to an
/// eighth late, and the next period starts from there (and a BPF `sock_ops` program can
/// change the initial timeout).
pub fn request_age(expires: Duration, retransmits: u8) -> Duration {
    let periods: Duration = (0..=u32::from(retransmits))
        .map(|i| Duration::from_secs(1u64.checked_shl(i).unwrap_or(u64::MAX).min(120)))
        .sum();
    periods.saturating_sub(expires)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_sockets_are_aged_by_their_synack_timer() {
        // SYN at 0; SYN-ACKs resent at 1 s and 3 s; next at 7 s, 2.5 s away: 4.5 s old.
        assert_eq!(
            request_age(Duration::from_millis(2_500), 2),
            Duration::from_millis(4_500)
        );
        assert_eq!(request_age(Duration::from_millis(1_000), 0), Duration::ZERO);
        // The doubling stops at 120 s: 1+2+...+64 = 127, then 120 per period.
        assert_eq!(
            request_age(Duration::ZERO, 8),
            Duration::from_secs(127 + 120 + 120)
        );
    }

    #[test]
    fn a_socket_is_stuck_from_its_states_threshold_on() {
        let t = Thresholds::default();
        assert!(!t.is_stuck(state::CLOSE_WAIT, Duration::from_secs(59)));
        assert!(t.is_stuck(state::CLOSE_WAIT, Duration::from_secs(60)));
        assert!(!t.is_stuck(state::ESTABLISHED, Duration::from_secs(86_400)));
    }
}
