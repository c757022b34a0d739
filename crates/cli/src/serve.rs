//! `tokenfab serve` and `tokenfab worker`: pull → load → engine thread → ledger → fleet →
//! HTTP.

use crate::config::Config;
use anyhow::Context;
use std::sync::Arc;
use tokenfab_engine::{Engine, EngineMetrics, ExecutorCapacity, Tokenizer};
use tokenfab_gateway::{
    AdminKey, AppState, AuthMode, GatewayConfig, GatewayMetrics, KeyCache, Limiter, ResponseCache,
    ServerLimits, Shared,
};
use tokenfab_ledger::LedgerStore;
use tokenfab_llama::{LlamaExecutor, LlamaExecutorConfig, LoadedModel};
use tokenfab_sim::{ByteTokenizer, MockSpec, ModelExecutor};
use tokio_util::task::TaskTracker;

/// A ready server: the HTTP router and the engine behind it.
pub struct App {
    pub router: axum::Router,
    /// `None` on a gateway that only routes to remote workers.
    pub engine: Option<Engine>,
    /// The name the model is served under.
    pub model: String,
    /// Whether API keys are required (else local single-user mode).
    pub keyed: bool,
    /// Settlements of requests that ended by disconnect; wait for them before exiting.
    pub tracker: TaskTracker,
}

/// Pull and load the model (or set up the mock accelerator), start the engine thread,
/// build the router.
pub async fn build(cfg: &Config) -> anyhow::Result<App> {
    if !cfg.model.mock.is_empty() {
        return build_mock(cfg).await;
    }
    if cfg.routing_only() {
        if cfg.fleet.workers.is_empty() {
            anyhow::bail!(
                "model `none` needs at least one [[fleet.workers]] entry (or --worker URL)"
            );
        }
        let registry = prometheus::Registry::new();
        return assemble(cfg, registry, None, Arc::new(ByteTokenizer), String::new()).await;
    }
    let pulled = tokenfab_llama::pull::pull(&cfg.model.name, &tokenfab_llama::pull::home())?;
    let model = LoadedModel::load(&pulled.path, &pulled.name)?;
    build_with_model(cfg, model).await
}

/// Open the ledger and resolve what this node left open (a crash, `kill -9`).
async fn open_ledger(cfg: &Config) -> anyhow::Result<Arc<dyn LedgerStore>> {
    let url = cfg.ledger_url();
    if let Some(dir) = std::path::Path::new(&url).parent() {
        if !url.contains("://") && !dir.as_os_str().is_empty() && url != "memory" {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create ledger directory {}", dir.display()))?;
        }
    }
    let ledger = tokenfab_ledger::open(&url, true)
        .await
        .with_context(|| format!("cannot open the ledger at {url}"))?;
    let node = cfg.node();
    let rec = ledger.recover(&node, tokenfab_gateway::unix_now()).await?;
    if rec.confirmed + rec.released > 0 {
        tracing::warn!(
            node,
            confirmed = rec.confirmed,
            released = rec.released,
            "resolved reservations left open by the previous run"
        );
    }
    Ok(ledger)
}

/// As [`build`], for a model already loaded (tests share one model between engines).
pub async fn build_with_model(cfg: &Config, model: Arc<LoadedModel>) -> anyhow::Result<App> {
    let registry = prometheus::Registry::new();
    let engine_metrics = EngineMetrics::new(&registry, model.name())?;
    let exec_cfg = LlamaExecutorConfig {
        kv_tokens: cfg.model.kv_tokens,
        layout: cfg.model.kv_layout,
        slots: cfg.model.slots,
        batch_tokens: cfg.scheduler.max_step_tokens,
        ubatch_tokens: cfg.model.ubatch_tokens,
        threads: cfg.model.threads,
    };
    let m = model.clone();
    let engine = Engine::spawn(cfg.engine()?, engine_metrics, move || {
        LlamaExecutor::new(&m, &exec_cfg).map_err(|e| e.to_string())
    })?;
    let name = model.name().to_owned();
    assemble(cfg, registry, Some(engine), model, name).await
}

/// `--mock PROFILE`: the same engine loop and scheduler over a timing model that emits
/// placeholder tokens, served as model `mock`.
async fn build_mock(cfg: &Config) -> anyhow::Result<App> {
    let spec = MockSpec::parse(&cfg.model.mock)?;
    let registry = prometheus::Registry::new();
    let engine_metrics = EngineMetrics::new(&registry, MOCK_MODEL)?;
    let capacity = ExecutorCapacity {
        slots: cfg.model.slots,
        kv_tokens: u64::from(cfg.model.kv_tokens),
        max_seq_tokens: u64::from(cfg.model.kv_tokens),
        max_batch_tokens: cfg.scheduler.max_step_tokens,
        stream_per_slot: false,
        fast_prefill_rows: 1,
    };
    let engine = Engine::spawn(cfg.engine()?, engine_metrics, move || {
        Ok(ModelExecutor::new(spec, capacity))
    })?;
    assemble(
        cfg,
        registry,
        Some(engine),
        Arc::new(ByteTokenizer),
        MOCK_MODEL.into(),
    )
    .await
}

/// The model name `--mock` serves.
pub const MOCK_MODEL: &str = "mock";

/// Ledger, auth, fleet and router around a running engine (or none).
async fn assemble(
    cfg: &Config,
    registry: prometheus::Registry,
    engine: Option<Engine>,
    tokenizer: Arc<dyn Tokenizer>,
    name: String,
) -> anyhow::Result<App> {
    let ledger = open_ledger(cfg).await?;
    let admin = (!cfg.gateway.admin_key.is_empty()).then(|| AdminKey::new(&cfg.gateway.admin_key));
    let keyed = admin.is_some() || !ledger.list_keys(None).await?.is_empty();
    let auth = if keyed {
        AuthMode::Keys(Arc::new(KeyCache::new(ledger.clone())))
    } else {
        AuthMode::Open
    };
    if let Some(engine) = &engine {
        let cap = engine.capacity();
        tracing::info!(
            model = name,
            kv_tokens = cap.kv_tokens,
            slots = cap.slots,
            context = cap.max_seq_tokens,
            "engine ready"
        );
    }
    let fleet = fleet(cfg, &registry, engine.as_ref().map(|_| name.clone())).await?;
    let tracker = TaskTracker::new();
    let state = AppState::new(Shared {
        engine: engine.clone(),
        tokenizer,
        model: name.clone(),
        fleet,
        metrics: if cfg.observability.metrics {
            GatewayMetrics::new(&registry)?
        } else {
            GatewayMetrics::new(&registry)?.disabled()
        },
        registry,
        config: GatewayConfig {
            max_body_bytes: cfg.server.max_body_bytes,
            node: cfg.node(),
            prices: cfg.prices()?,
            trust_forwarded_tenant: cfg.worker,
        },
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        auth,
        admin,
        ledger,
        limiter: Arc::new(limiter(cfg).await?),
        tracker: tracker.clone(),
        cache: Arc::new(ResponseCache::new(
            cfg.gateway.response_cache_entries,
            std::time::Duration::from_secs(cfg.gateway.response_cache_ttl_s),
        )),
    });
    Ok(App {
        router: tokenfab_gateway::router(state),
        engine,
        model: name,
        keyed,
        tracker,
    })
}

/// The fleet `cfg` describes (with this process's engine as a member serving
/// `local_model`), its health checks and discovery started; `None` without `[fleet]`.
async fn fleet(
    cfg: &Config,
    registry: &prometheus::Registry,
    local_model: Option<String>,
) -> anyhow::Result<Option<Arc<tokenfab_fleet::Fleet>>> {
    let spec = &cfg.fleet;
    if spec.workers.is_empty() && spec.aliases.is_empty() {
        return Ok(None);
    }
    // Workers configured without models are asked for theirs once, before discovery
    // (which re-reads this list) expands DNS names.
    let mut configured = Vec::with_capacity(spec.workers.len());
    for w in &spec.workers {
        let mut w = w.clone();
        if w.models.is_empty() {
            w.models = tokenfab_fleet::list_models(&w, std::time::Duration::from_secs(10))
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "fleet worker {} has no `models` and could not list them: {e}",
                        w.display_name()
                    )
                })?;
        }
        configured.push(w);
    }
    let discovery: Arc<dyn tokenfab_fleet::Discovery> = Arc::new(tokenfab_fleet::StaticDns {
        workers: configured,
    });
    let mut spec = spec.clone();
    spec.workers = discovery
        .workers()
        .await
        .map_err(|e| anyhow::anyhow!("fleet workers: {e}"))?;
    let metrics = tokenfab_fleet::FleetMetrics::new(registry)?;
    let fleet = Arc::new(
        tokenfab_fleet::Fleet::new(spec, local_model, metrics).map_err(anyhow::Error::msg)?,
    );
    for m in fleet.members() {
        tracing::info!(
            worker = m.name,
            models = m.models.join(","),
            tier = m.tier,
            accelerator = m.accelerator,
            "fleet worker"
        );
    }
    tokio::spawn(fleet.clone().check_health());
    let every = std::time::Duration::from_secs(cfg.fleet.dns_refresh_s.max(1));
    tokio::spawn(tokenfab_fleet::refresh(fleet.clone(), discovery, every));
    Ok(Some(fleet))
}

/// Rate-limit counters where `cfg` puts them.
async fn limiter(cfg: &Config) -> anyhow::Result<Limiter> {
    let url = &cfg.gateway.rate_limits;
    if url.is_empty() {
        return Ok(Limiter::local());
    }
    if !url.starts_with("redis://") && !url.starts_with("rediss://") && !url.starts_with("unix://")
    {
        anyhow::bail!(
            "gateway.rate_limits must be empty (this process) or a redis:// URL, not {url:?}"
        );
    }
    let limiter = Limiter::redis(url).await.map_err(anyhow::Error::msg)?;
    tracing::info!("rate limits shared through Redis");
    Ok(limiter)
}

/// The connection limits `cfg` asks for.
pub fn limits(cfg: &Config) -> ServerLimits {
    ServerLimits {
        header_read_timeout: std::time::Duration::from_millis(cfg.server.header_read_timeout_ms),
        max_header_bytes: cfg.server.max_header_bytes,
    }
}

pub fn run(cfg: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = build(&cfg).await?;
        let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
        let served = if app.model.is_empty() { "the fleet's models".to_owned() } else { app.model.clone() };
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        if cfg.worker {
            tracing::info!(
                "worker serving {served} on http://{addr}: it trusts the tenant a gateway forwards (x-tokenfab-tenant), so only gateways should reach it"
            );
        } else if app.keyed {
            tracing::info!("serving {served} on http://{addr} (API keys required)");
        } else {
            tracing::warn!(
                "serving {served} on http://{addr} in local single-user mode: no API keys or admin key configured, every request is accepted and nothing is metered (`tokenfab keys create --tenant NAME` turns keys on)"
            );
        }
        let served = tokenfab_gateway::serve(listener, app.router, limits(&cfg), shutdown(app.engine))
            .await
            .context("server failed");
        // Requests cut short settle on tracked tasks: let them reach the ledger.
        app.tracker.close();
        app.tracker.wait().await;
        served
    })
}

/// Resolve on SIGINT or SIGTERM; stop admitting, let in-flight requests finish.
async fn shutdown(engine: Option<Engine>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
    if let Some(e) = engine {
        e.drain();
    }
}
