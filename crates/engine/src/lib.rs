//! The engine loop: one thread that owns an [`Executor`] and the scheduling core
//! (`tokenfab-sched`), turns the core's step plans into executor batches, and streams the
//! sampled tokens to each request's [`Generation`].
//!
//! The engine knows tokens, not text: tokenizing, templates, stop strings and HTTP live
//! above it. It must not depend on a concrete executor (llama.cpp lives in
//! `tokenfab-llama`, the timing model in `tokenfab-sim`).

mod engine;
mod executor;
mod metrics;
mod request;
mod tokenizer;

pub use engine::{Engine, EngineConfig, EngineError, KvShare};
pub use executor::{BatchEntry, ExecError, Executor, ExecutorCapacity, Sampled, SamplingParams};
pub use metrics::EngineMetrics;
pub use request::{Event, GenerateRequest, Generation, Usage};
pub use tokenfab_sched::{Band, FinishReason, Rejection, Slo};
pub use tokenizer::{ChatTurn, Tokenizer, Utf8Stream};
