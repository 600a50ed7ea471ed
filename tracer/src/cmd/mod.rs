//! The commands: `tracer run` (the agent), `tracer watch`, `tracer sockets`, `tracer top`, and the
//! generated documentation (`tracer completions`, `tracer man`).

pub mod docs;
pub mod run;
pub mod sockets;
pub mod top;
pub mod watch;

use std::sync::atomic::{AtomicU64, Ordering};

/// Work the running command has done: events read. The signal thread (`main`) gives a
/// command that is still reading after SIGINT or SIGTERM more time to stop cleanly.
static PROGRESS: AtomicU64 = AtomicU64::new(0);

/// Says that the command read `n` more events.
pub fn progressed(n: u64) {
    PROGRESS.fetch_add(n, Ordering::Relaxed);
}

/// Events the command has read so far.
pub fn progress() -> u64 {
    PROGRESS.load(Ordering::Relaxed)
}
