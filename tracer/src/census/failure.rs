//! Why a census failed, said once a minute rather than at every census.
//!
//! Owns: what sock_diag's refusals mean and what to do about them ([`SockDiagRefused`]),
//! their classes as `tracer_census_failing{reason}` names them ([`Failure`]), and how often a
//! failing census is said ([`FailureLog`]). Does not own: the census (`census`), or where
//! the reason is shown (`metrics::census`, `http`).

use std::fmt;
use std::time::{Duration, Instant};

/// sock_diag answered a dump request with an error: its errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockDiagRefused(pub i32);

impl fmt::Display for SockDiagRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            // `sock_diag_lock_handler` found no handler for TCP and could not load one.
            libc::ENOENT => write!(
                f,
                "this kernel has no TCP socket diagnostics (sock_diag answered ENOENT: the \
                 tcp_diag module is not loaded and could not be): run `modprobe tcp_diag` on \
                 the host (CONFIG_INET_TCP_DIAG)"
            ),
            // Reading the probe's socket storage in a dump needs CAP_BPF or CAP_SYS_ADMIN
            // (`bpf_sk_storage_diag_alloc`).
            libc::EPERM | libc::EACCES => write!(
                f,
                "sock_diag refused the dump (permission denied): reading the probe's socket \
                 storage needs CAP_BPF or CAP_SYS_ADMIN; run the agent as root"
            ),
            errno => write!(
                f,
                "sock_diag refused the dump: {}",
                std::io::Error::from_raw_os_error(errno)
            ),
        }
    }
}

impl std::error::Error for SockDiagRefused {}

/// Why the last census failed, as `tracer_census_failing{reason}` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No TCP sock_diag in the kernel (`modprobe tcp_diag`).
    SockDiagMissing,
    /// sock_diag or a namespace refused for want of privileges.
    PermissionDenied,
    Other,
}

impl Failure {
    pub const ALL: [Failure; 3] = [
        Failure::SockDiagMissing,
        Failure::PermissionDenied,
        Failure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::SockDiagMissing => "sock_diag_missing",
            Failure::PermissionDenied => "permission_denied",
            Failure::Other => "other",
        }
    }

    /// The class of a census error.
    pub fn of(e: &anyhow::Error) -> Failure {
        let errno = e.chain().find_map(|c| {
            c.downcast_ref::<SockDiagRefused>()
                .map(|r| r.0)
                .or_else(|| c.downcast_ref::<std::io::Error>()?.raw_os_error())
        });
        match errno {
            Some(libc::ENOENT) if e.downcast_ref::<SockDiagRefused>().is_some() => {
                Failure::SockDiagMissing
            }
            Some(libc::EPERM | libc::EACCES) => Failure::PermissionDenied,
            _ => Failure::Other,
        }
    }

    /// The line that says it: the reason alone where it is sock_diag's (the context of
    /// which dump adds nothing a person can act on), else the whole chain.
    pub fn text(e: &anyhow::Error) -> String {
        match e.downcast_ref::<SockDiagRefused>() {
            Some(r) => r.to_string(),
            None => format!("{e:#}"),
        }
    }
}

/// How often a census that keeps failing is said.
pub const SAY_EVERY: Duration = Duration::from_secs(60);

/// Says a failing census at most once per [`SAY_EVERY`], with how many failed since it
/// was last said, and once when it works again.
#[derive(Debug, Default)]
pub struct FailureLog {
    said: Option<Instant>,
    unsaid: u64,
    failing: bool,
}

impl FailureLog {
    /// A census failed with `text` at `now`: the line to print, if it is time for one.
    pub fn failed(&mut self, text: &str, now: Instant) -> Option<String> {
        self.failing = true;
        if self.said.is_some_and(|s| now.duration_since(s) < SAY_EVERY) {
            self.unsaid += 1;
            return None;
        }
        let more = match self.unsaid {
            0 => String::new(),
            n => format!(" ({n} more failed since this was last said)"),
        };
        self.said = Some(now);
        self.unsaid = 0;
        Some(format!(
            "tracer: socket census failed: {text}{more}; said again at most once a minute"
        ))
    }

    /// A census worked: the line to print if the last one had failed.
    pub fn worked(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.failing) {
            return None;
        }
        self.said = None;
        self.unsaid = 0;
        Some("tracer: socket census works again".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_missing_tcp_diag_is_one_line_that_says_modprobe() {
        let e = Err::<(), _>(SockDiagRefused(libc::ENOENT))
            .context("sock_diag dump of family 2")
            .unwrap_err();
        assert_eq!(Failure::of(&e), Failure::SockDiagMissing);
        let text = Failure::text(&e);
        assert!(text.contains("modprobe tcp_diag"), "{text}");
        assert!(!text.contains('\n') && !text.contains("header"), "{text}");
        let denied = anyhow::Error::new(SockDiagRefused(libc::EPERM));
        assert_eq!(Failure::of(&denied), Failure::PermissionDenied);
        let io = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::ENOENT))
            .context("reading /proc/net/netstat");
        assert_eq!(Failure::of(&io), Failure::Other);
    }

    #[test]
    fn a_failing_census_is_said_once_a_minute_with_the_count_between() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let first = log.failed("no tcp_diag", t0).unwrap();
        assert_eq!(
            first,
            "tracer: socket census failed: no tcp_diag; said again at most once a minute"
        );
        // Every 5 s for a minute: 11 more, unsaid.
        for i in 1..12 {
            assert_eq!(
                log.failed("no tcp_diag", t0 + Duration::from_secs(5 * i)),
                None
            );
        }
        let again = log.failed("no tcp_diag", t0 + SAY_EVERY).unwrap();
        assert!(again.contains("(11 more failed since"), "{again}");
        assert_eq!(
            log.worked().as_deref(),
            Some("tracer: socket census works again")
        );
        assert_eq!(log.worked(), None);
        // Failing again after it worked is said at once.
        assert!(log.failed("no tcp_diag", t0 + SAY_EVERY).is_some());
    }
}
