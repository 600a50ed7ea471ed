//! The metrics, one file per source: what each event tells (`event`), the probe's own
//! counters (`kernel`), what a census shows (`census`), the live passes (`live`), and the two label policies they share:
//! which ports get a value (`ports`) and which pods (`pods`).

pub mod census;
pub mod event;
pub mod kernel;
pub mod live;
pub mod pods;
pub mod ports;
