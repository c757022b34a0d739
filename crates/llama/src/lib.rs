//! llama.cpp behind tokenfab's interfaces: [`LlamaExecutor`] runs the engine's batches on
//! llama.cpp kernels (through `llama-cpp-2`), [`LoadedModel`] tokenizes and renders chat
//! templates from the GGUF metadata, and [`pull`] resolves model names to verified local
//! files.
//!
//! This is the only crate that talks to llama.cpp and the only one allowed `unsafe`. It
//! must not know about HTTP, tenants or scheduling policy.

mod executor;
mod lazy_kv;
mod model;
pub mod pull;
mod sample;
mod template;

pub use executor::{KvLayout, LlamaExecutor, LlamaExecutorConfig};
pub use model::{LoadedModel, ModelError};
