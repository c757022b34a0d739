//! The `tokenfab` binary's wiring, as a library so black-box tests can start the same
//! server the binary runs: configuration, `serve` assembly, and the `bench` load generator.
//! Logic belongs in the other crates; this one only connects them.

pub mod admin;
pub mod bench;
pub mod calibrate;
pub mod config;
pub mod plot;
pub mod serve;
pub mod sim;
pub mod telemetry;
pub mod trace_sampling;
