use crate::auth::{AdminKey, AuthMode};
use crate::cache::ResponseCache;
use crate::limits::Limiter;
use crate::metrics::GatewayMetrics;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokenfab_engine::{Engine, Tokenizer};
use tokenfab_fleet::Fleet;
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
    /// Price per model name (a model not listed is free).
    pub prices: BTreeMap<String, Price>,
    /// Trust `x-tokenfab-tenant` / `x-tokenfab-weight` from the caller: set on a
    /// `tokenfab worker`, which only a gateway (that authenticated the tenant) talks to.
    pub trust_forwarded_tenant: bool,
}

impl GatewayConfig {
    pub fn price_of(&self, model: &str) -> Price {
        self.prices.get(model).copied().unwrap_or_default()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_body_bytes: 2 << 20,
            node: "local".into(),
            prices: BTreeMap::new(),
            trust_forwarded_tenant: false,
        }
    }
}

/// What every handler can reach: one shared [`Shared`], so the clone of the state axum
/// makes for each extractor of each request is an atomic increment, not a copy of the
/// config (copying it — prices map, names, a dozen handles — was ~2 % of a request's CPU).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The state's contents (see [`AppState`]).
pub struct Shared {
    /// This process's engine; `None` on a gateway that only routes to remote workers.
    pub engine: Option<Engine>,
    /// The local model's tokenizer (on a routing-only gateway, bytes: an upper bound of
    /// any byte-level tokenizer's count, used to size reservations).
    pub tokenizer: Arc<dyn Tokenizer>,
    /// The name the local model is served under (`model` in requests, `/v1/models`); empty
    /// without a local engine.
    pub model: String,
    /// The workers behind this gateway, when it routes (`[fleet]`); `None`: every request
    /// goes to the local engine.
    pub fleet: Option<Arc<Fleet>>,
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

impl Shared {
    /// Every model name a request may ask for.
    pub fn served(&self) -> Vec<String> {
        match &self.fleet {
            Some(f) => f.models(),
            None => vec![self.model.clone()],
        }
    }

    /// Whether `model` (as asked) is served here.
    pub fn serves(&self, model: &str) -> bool {
        match &self.fleet {
            Some(f) => f.serves(model),
            None => model == self.model,
        }
    }
}
