use crate::auth::{AdminKey, AuthMode};
use crate::cache::ResponseCache;
use crate::limits::Limiter;
use crate::metrics::GatewayMetrics;
use std::sync::Arc;
use tokenfab_engine::{Engine, Tokenizer};
use tokenfab_ledger::{LedgerStore, Price};
use tokio_util::task::TaskTracker;

/// HTTP-level settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// This process's name in the ledger: a restart with the same name resolves the
    /// reservations it left open.
    pub node: String,
    /// Price of the served model.
    pub price: Price,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 2 << 20,
            node: "local".into(),
            price: Price::default(),
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
    pub metrics: GatewayMetrics,
    pub config: GatewayConfig,
    /// Unix time the server started, reported as the model's `created`.
    pub started: u64,
    pub auth: AuthMode,
    /// Guards `/admin/v1/*`; `None` disables the admin API.
    pub admin: Option<AdminKey>,
    pub ledger: Arc<dyn LedgerStore>,
    pub limiter: Arc<Limiter>,
    /// Settlements of dropped requests; graceful shutdown waits for them.
    pub tracker: TaskTracker,
    pub cache: Arc<ResponseCache>,
}
