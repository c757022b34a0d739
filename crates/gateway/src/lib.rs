//! The HTTP edge: OpenAI-compatible routes on axum, request validation, the OpenAI error
//! envelope, SSE streaming and `/metrics`.
//!
//! Handlers stay thin: extract, validate, call the engine, convert. Only this crate knows
//! HTTP; it must not reach into llama.cpp or the scheduler's internals.

mod admin;
mod auth;
mod cache;
mod dashboard;
mod dispatch;
mod error;
mod extract;
mod idempotency;
mod limits;
mod limits_redis;
mod meter;
mod metrics;
mod output;
mod routes;
mod server;
mod state;
mod stop;
mod stream;
pub mod testkit;
pub mod trace;
mod validate;

pub use admin::{key_spec, KeyParams};
pub use auth::{AdminKey, AuthMode, KeyCache};
pub use cache::ResponseCache;
pub use error::{status_of, ApiError};
pub use limits::{Limiter, LocalLimits, RateInfo};
pub use meter::unix_now;
pub use metrics::GatewayMetrics;
pub use routes::router;
pub use server::{serve, ServerLimits};
pub use state::{AppState, GatewayConfig, Shared};
