//! Timing models of accelerators behind the engine's [`Executor`] trait.
//!
//! Today: [`ModelExecutor`], which runs the engine loop without kernels — placeholder
//! tokens after a modelled step time — [`ByteTokenizer`], and trace readers ([`trace`]). `tokenfab serve --mock`
//! uses them to put the gateway, ledger and scheduler under load without a model (an
//! "instant upstream" for gateway benchmarks). The discrete-event cluster simulator of
//! DESIGN.md grows here; it must stay free of wall-clock reads in its decisions.
//!
//! [`Executor`]: tokenfab_engine::Executor

pub mod cluster;
mod executor;
mod profile;
mod tokenizer;
pub mod trace;
mod worker;

pub use executor::ModelExecutor;
pub use profile::{
    accelerators, parse_profiles, user_profiles_path, Accelerator, MockSpec, ProfileEntry,
    ProfileError, StepProfile, StepShape,
};
pub use tokenizer::ByteTokenizer;
