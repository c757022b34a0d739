//! The `tokenfab` binary: `serve`, `worker`, `pull`, `bench`, `sim`, `calibrate`, `config`, `keys`, `usage`.
//!
//! Wiring only: it parses flags and config, builds the engine with the llama.cpp executor
//! and hands it to the gateway. Logic belongs in the library crates.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use tokenfab::config::Config;
use tokenfab::{admin, bench, calibrate, serve, sim, telemetry};

#[derive(Parser)]
#[command(
    name = "tokenfab",
    version,
    about = "Serve open models as a multi-tenant, metered token service"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "TOKENFAB_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (pulls the model first if needed).
    Serve(ServeArgs),
    /// Run an engine alone, for a gateway in front (`[[fleet.workers]]`) to route to: no
    /// keys or ledger of its own; it trusts the tenant the gateway forwards. Port 8081
    /// unless given.
    Worker(ServeArgs),
    /// Fetch a model into the cache and verify it.
    Pull {
        /// Catalog name, local .gguf path, or hf:<owner>/<repo>/<file>.
        #[arg(default_value = tokenfab_llama::pull::DEFAULT_MODEL)]
        model: String,
    },
    /// Load-test any OpenAI-compatible endpoint (streaming).
    Bench(bench::BenchArgs),
    /// Replay a trace on a simulated cluster (the production scheduler and router, in
    /// virtual time) and compare routing policies.
    Sim(sim::SimArgs),
    /// Time the real engine on this machine and write its step-time profile for `sim`
    /// and `worker --mock` (`$TOKENFAB_HOME/profiles.toml`).
    Calibrate(calibrate::CalibrateArgs),
    /// Print the resolved configuration as TOML.
    Config(ServeArgs),
    /// Manage API keys in the ledger.
    Keys {
        #[command(subcommand)]
        command: admin::KeysCommand,
    },
    /// Print usage from the ledger.
    Usage(admin::UsageArgs),
}

/// Flags shared by `serve` and `config`; each overrides the config file and is also read
/// from its `TOKENFAB_*` environment variable.
#[derive(Args, Clone)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "TOKENFAB_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "TOKENFAB_HOST")]
    host: Option<String>,
    #[arg(long, env = "TOKENFAB_PORT")]
    port: Option<u16>,
    /// Catalog name, local .gguf path, or hf:<owner>/<repo>/<file>.
    #[arg(long, env = "TOKENFAB_MODEL")]
    model: Option<String>,
    /// Serve a timing model instead of a model: `instant` or
    /// `linear:BASE_MS:PER_TOKEN_US[:PER_SEQ_US]` (placeholder tokens, model name `mock`).
    #[arg(long, env = "TOKENFAB_MOCK")]
    mock: Option<String>,
    /// KV cells (tokens) of all sequences together.
    #[arg(long, env = "TOKENFAB_KV_TOKENS")]
    kv_tokens: Option<u32>,
    /// KV layout: `unified` (one pool) or `per-sequence` (kv-tokens / slots per slot).
    #[arg(long, env = "TOKENFAB_KV_LAYOUT")]
    kv_layout: Option<tokenfab_llama::KvLayout>,
    /// Sequence slots of the llama.cpp context (running + prefix-cache entries).
    #[arg(long, env = "TOKENFAB_SLOTS")]
    slots: Option<u32>,
    /// Sequences in the running batch at most.
    #[arg(long, env = "TOKENFAB_MAX_RUNNING")]
    max_running: Option<u32>,
    /// CPU threads for the kernels (0 = all cores).
    #[arg(long, env = "TOKENFAB_THREADS")]
    threads: Option<u32>,
    /// Token budget of one engine step.
    #[arg(long, env = "TOKENFAB_MAX_STEP_TOKENS")]
    max_step_tokens: Option<u32>,
    /// Bounded queue length (requests).
    #[arg(long, env = "TOKENFAB_MAX_WAITING")]
    max_waiting: Option<u32>,
    /// Ledger: SQLite path, postgres://…, or memory. Default: $TOKENFAB_HOME/ledger.db.
    #[arg(long, env = "TOKENFAB_LEDGER")]
    ledger: Option<String>,
    /// Admin key for /admin/v1/* (turns on keyed mode).
    #[arg(long, env = "TOKENFAB_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// This process's name in the ledger. Default: <hostname>:<port>.
    #[arg(long, env = "TOKENFAB_NODE")]
    node: Option<String>,
    /// Keep rate-limit counters in Redis (`redis://host:port/db`), shared by every
    /// gateway replica using the same URL. Default: in this process.
    #[arg(long, env = "TOKENFAB_RATE_LIMITS")]
    rate_limits: Option<String>,
    /// Export one OpenTelemetry trace per request to this OTLP/HTTP collector
    /// (e.g. http://127.0.0.1:4318). Default: off.
    #[arg(long, env = "TOKENFAB_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// A remote worker to route to, `URL` or `URL=MODEL[+MODEL...]` (repeatable; added to
    /// `[[fleet.workers]]`). Without models, the worker's `/v1/models` is asked at start.
    #[arg(long = "worker", value_name = "URL[=MODELS]")]
    workers: Vec<String>,
    /// Routing policy for models without their own: prefix-load, round-robin,
    /// least-tokens, dynamo-kv, llmd-weighted, sglang-cache-aware.
    #[arg(long, env = "TOKENFAB_ROUTE")]
    route: Option<String>,
}

impl ServeArgs {
    fn resolve(&self) -> anyhow::Result<Config> {
        let mut c = Config::load(self.config.as_deref())?;
        if let Some(v) = &self.host {
            c.server.host.clone_from(v);
        }
        if let Some(v) = self.port {
            c.server.port = v;
        }
        if let Some(v) = &self.model {
            c.model.name.clone_from(v);
        }
        if let Some(v) = &self.mock {
            c.model.mock.clone_from(v);
        }
        if let Some(v) = self.kv_tokens {
            c.model.kv_tokens = v;
        }
        if let Some(v) = self.kv_layout {
            c.model.kv_layout = v;
        }
        if let Some(v) = self.slots {
            c.model.slots = v;
        }
        if let Some(v) = self.max_running {
            c.scheduler.max_running = v;
        }
        if let Some(v) = self.threads {
            c.model.threads = v;
        }
        if let Some(v) = self.max_step_tokens {
            c.scheduler.max_step_tokens = v;
        }
        if let Some(v) = self.max_waiting {
            c.scheduler.max_waiting = v;
        }
        if let Some(v) = &self.ledger {
            c.gateway.ledger.clone_from(v);
        }
        if let Some(v) = &self.admin_key {
            c.gateway.admin_key.clone_from(v);
        }
        if let Some(v) = &self.node {
            c.gateway.node.clone_from(v);
        }
        if let Some(v) = &self.rate_limits {
            c.gateway.rate_limits.clone_from(v);
        }
        if let Some(v) = &self.otlp_endpoint {
            c.observability.otlp_endpoint.clone_from(v);
        }
        for w in &self.workers {
            let (url, models) = w.split_once('=').unwrap_or((w, ""));
            c.fleet.workers.push(tokenfab_fleet::WorkerSpec {
                url: url.to_owned(),
                models: models
                    .split('+')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect(),
                ..tokenfab_fleet::WorkerSpec::default()
            });
        }
        if let Some(v) = &self.route {
            c.fleet.default_policy.clone_from(v);
        }
        Ok(c)
    }

    /// As [`ServeArgs::resolve`], for `tokenfab worker`: port 8081 by default, open, an
    /// in-memory ledger, the forwarded tenant trusted.
    fn resolve_worker(&self) -> anyhow::Result<Config> {
        let mut c = self.resolve()?;
        if self.port.is_none() && c.server.port == Config::default().server.port {
            c.server.port = 8081;
        }
        if !c.gateway.admin_key.is_empty() {
            anyhow::bail!(
                "a worker has no keys of its own; authenticate at the gateway in front of it"
            );
        }
        c.gateway.ledger = "memory".into();
        c.worker = true;
        Ok(c)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let json = matches!(cli.log_format, LogFormat::Json);
    if let Command::Serve(args) | Command::Worker(args) = &cli.command {
        let cfg = match &cli.command {
            Command::Worker(_) => args.resolve_worker()?,
            _ => args.resolve()?,
        };
        let o = &cfg.observability;
        let _telemetry = telemetry::init(
            json,
            &o.otlp_endpoint,
            o.trace_sample_ratio,
            o.trace_max_per_second,
        )?;
        return serve::run(cfg);
    }
    let _telemetry = telemetry::init(json, "", 1.0, 0)?;
    match cli.command {
        Command::Serve(_) | Command::Worker(_) => Ok(()),
        Command::Pull { model } => {
            let pulled = tokenfab_llama::pull::pull(&model, &tokenfab_llama::pull::home())?;
            println!("{}", pulled.path.display());
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::Sim(args) => sim::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Keys { command } => admin::keys(command),
        Command::Usage(args) => admin::usage(args),
        Command::Config(args) => {
            let mut c = args.resolve()?;
            if !c.gateway.admin_key.is_empty() {
                c.gateway.admin_key = "<redacted>".into();
            }
            print!("{}", toml::to_string(&c)?);
            Ok(())
        }
    }
}
