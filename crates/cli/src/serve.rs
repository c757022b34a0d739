//! `tokenfab serve`: pull → load → engine thread → HTTP.

use crate::config::Config;
use anyhow::Context;
use std::sync::Arc;
use tokenfab_engine::{Engine, EngineMetrics};
use tokenfab_gateway::{AppState, GatewayConfig, HttpMetrics};
use tokenfab_llama::{LlamaExecutor, LlamaExecutorConfig, LoadedModel};

/// A ready server: the HTTP router and the engine behind it.
pub struct App {
    pub router: axum::Router,
    pub engine: Engine,
    pub model: Arc<LoadedModel>,
}

/// Pull and load the model, start the engine thread, build the router.
pub fn build(cfg: &Config) -> anyhow::Result<App> {
    let pulled = tokenfab_llama::pull::pull(&cfg.model.name, &tokenfab_llama::pull::home())?;
    let model = LoadedModel::load(&pulled.path, &pulled.name)?;
    build_with_model(cfg, model)
}

/// As [`build`], for a model already loaded (tests share one model between engines).
pub fn build_with_model(cfg: &Config, model: Arc<LoadedModel>) -> anyhow::Result<App> {
    let registry = prometheus::Registry::new();
    let engine_metrics = EngineMetrics::new(&registry, model.name())?;
    let exec_cfg = LlamaExecutorConfig {
        kv_tokens: cfg.model.kv_tokens,
        slots: cfg.model.slots,
        batch_tokens: cfg.scheduler.max_step_tokens,
        ubatch_tokens: cfg.model.ubatch_tokens,
        threads: cfg.model.threads,
    };
    let m = model.clone();
    let engine = Engine::spawn(cfg.engine(), engine_metrics, move || {
        LlamaExecutor::new(&m, &exec_cfg).map_err(|e| e.to_string())
    })?;
    let cap = engine.capacity();
    tracing::info!(
        model = model.name(),
        kv_tokens = cap.kv_tokens,
        slots = cap.slots,
        context = cap.max_seq_tokens,
        "engine ready"
    );
    let state = AppState {
        engine: engine.clone(),
        tokenizer: model.clone() as Arc<dyn tokenfab_engine::Tokenizer>,
        model: model.name().to_owned(),
        http: HttpMetrics::new(&registry)?,
        registry,
        config: GatewayConfig {
            max_body_bytes: cfg.server.max_body_bytes,
        },
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    Ok(App {
        router: tokenfab_gateway::router(state),
        engine,
        model,
    })
}

pub fn run(cfg: Config) -> anyhow::Result<()> {
    let app = build(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!(
            "serving {} on http://{addr} (local single-user mode: no API keys configured, every request is accepted)",
            app.model.name()
        );
        axum::serve(listener, app.router)
            .with_graceful_shutdown(shutdown(app.engine))
            .await
            .context("server failed")
    })
}

/// Resolve on SIGINT or SIGTERM; stop admitting, let in-flight requests finish.
async fn shutdown(engine: Engine) {
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
    engine.drain();
}
