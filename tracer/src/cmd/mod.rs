//! The commands: `tracer run` (the agent), `tracer watch`, `tracer sockets`.

pub mod run;
pub mod sockets;
pub mod watch;
