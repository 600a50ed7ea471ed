//! The metrics, one file per source: what each event tells (`event`), the probe's own
//! counters (`kernel`), what a census shows (`census`), and the two label policies they share:
//! which ports get a value (`ports`) and which pods (`pods`).

pub mod census;
pub mod event;
pub mod kernel;
pub mod pods;
pub mod ports;
