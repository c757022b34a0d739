//! OpenAI-compatible wire types and SSE framing: what goes over HTTP, as serde structs.
//!
//! No logic and no HTTP framework here: validation lives in the gateway, and this crate
//! must not depend on axum, the engine or anything with state.

mod chat;
mod common;
mod completions;

pub use chat::*;
pub use common::*;
pub use completions::*;
