//! The commands: `tracer run` (the agent), `tracer watch`, `tracer sockets`, `tracer top`, and the
//! generated documentation (`tracer completions`, `tracer man`).

pub mod docs;
pub mod run;
pub mod sockets;
pub mod top;
pub mod watch;
