use crate::metrics::HttpMetrics;
use std::sync::Arc;
use tokenfab_engine::{Engine, Tokenizer};

/// HTTP-level settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 2 << 20,
        }
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<dyn Tokenizer>,
    /// The name the model is served under (`model` in requests, `/v1/models`).
    pub model: String,
    pub registry: prometheus::Registry,
    pub http: HttpMetrics,
    pub config: GatewayConfig,
    /// Unix time the server started, reported as the model's `created`.
    pub started: u64,
}
