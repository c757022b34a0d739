//! `tokenfab keys …` and `tokenfab usage`: the ledger from the command line (the same
//! operations as `/admin/v1/*`).

use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use tokenfab_ledger::{parse_since, GroupBy, KeyRecord, LedgerStore, UsageQuery, UsageRow};
use tokenfab_types::TenantId;

/// Where the ledger is: the same resolution as `serve`.
#[derive(Args, Clone)]
pub struct LedgerArgs {
    /// TOML config file (its `[gateway] ledger` is used).
    #[arg(long, env = "TOKENFAB_CONFIG")]
    config: Option<PathBuf>,
    /// Ledger: SQLite path, postgres://…, or memory. Default: $TOKENFAB_HOME/ledger.db.
    #[arg(long, env = "TOKENFAB_LEDGER")]
    ledger: Option<String>,
}

impl LedgerArgs {
    async fn open(&self) -> anyhow::Result<std::sync::Arc<dyn LedgerStore>> {
        let mut cfg = crate::config::Config::load(self.config.as_deref())?;
        if let Some(l) = &self.ledger {
            cfg.gateway.ledger.clone_from(l);
        }
        let url = cfg.ledger_url();
        if !url.contains("://") && url != "memory" {
            if let Some(dir) = std::path::Path::new(&url).parent() {
                std::fs::create_dir_all(dir)?;
            }
        }
        Ok(tokenfab_ledger::open(&url, false).await?)
    }
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key for a tenant; prints the secret once.
    Create {
        #[arg(long)]
        tenant: String,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute (prompt + max_tokens reserved at admission).
        #[arg(long)]
        tpm: Option<u64>,
        #[arg(long)]
        max_concurrency: Option<u64>,
        #[arg(long)]
        budget_usd: Option<f64>,
        /// Default (and highest allowed) band: interactive, standard, batch.
        #[arg(long)]
        priority: Option<String>,
        /// Fair-share weight against other tenants.
        #[arg(long)]
        weight: Option<u32>,
        /// Answer the key's deterministic requests from the response cache by default.
        #[arg(long)]
        response_cache: bool,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Revoke a key by id.
    Revoke {
        id: String,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Give a key a new secret (the old one stops working); prints it once.
    Rotate {
        id: String,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
}

#[derive(Args)]
pub struct UsageArgs {
    #[arg(long)]
    tenant: Option<String>,
    /// Key id.
    #[arg(long)]
    key: Option<String>,
    /// YYYY-MM-DD (UTC) or unix seconds.
    #[arg(long)]
    since: Option<String>,
    #[arg(long, default_value = "model")]
    group_by: String,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    #[command(flatten)]
    ledger: LedgerArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn usd(nano: u64) -> String {
    format!("{}.{:09}", nano / 1_000_000_000, nano % 1_000_000_000)
}

fn print_keys(keys: &[KeyRecord], format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(keys)?),
        Format::Table | Format::Csv => {
            let sep = if matches!(format, Format::Csv) {
                ","
            } else {
                "\t"
            };
            println!(
                "{}",
                [
                    "id",
                    "tenant",
                    "priority",
                    "weight",
                    "rpm",
                    "tpm",
                    "concurrency",
                    "budget_usd",
                    "spent_usd",
                    "revoked"
                ]
                .join(sep)
            );
            let opt = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
            for k in keys {
                println!(
                    "{}",
                    [
                        k.id.clone(),
                        k.tenant.0.clone(),
                        k.priority.as_str().into(),
                        k.weight.to_string(),
                        opt(k.rpm),
                        opt(k.tpm),
                        opt(k.max_concurrency),
                        k.budget.map_or_else(|| "-".into(), |b| usd(b.0)),
                        usd(k.spent.0),
                        k.revoked.to_string(),
                    ]
                    .join(sep)
                );
            }
        }
    }
    Ok(())
}

fn print_usage(rows: &[UsageRow], format: Format) -> anyhow::Result<()> {
    if let Format::Json = format {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    let line = |cells: [String; 6]| match format {
        Format::Csv => cells.join(","),
        _ => format!(
            "{:<24} {:>9} {:>14} {:>14} {:>18} {:>14}",
            cells[0], cells[1], cells[2], cells[3], cells[4], cells[5]
        ),
    };
    let head = [
        "group",
        "requests",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "cost_usd",
    ];
    println!("{}", line(head.map(str::to_owned)));
    for r in rows {
        println!(
            "{}",
            line([
                r.group.clone(),
                r.requests.to_string(),
                r.prompt_tokens.to_string(),
                r.cached_tokens.to_string(),
                r.completion_tokens.to_string(),
                usd(r.cost_nano_usd),
            ])
        );
    }
    Ok(())
}

fn spec_error(e: tokenfab_gateway::ApiError) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message)
}

pub fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        match cmd {
            KeysCommand::Create {
                tenant,
                rpm,
                tpm,
                max_concurrency,
                budget_usd,
                priority,
                weight,
                response_cache,
                ledger,
            } => {
                let spec = tokenfab_gateway::key_spec(&tokenfab_gateway::KeyParams {
                    tenant,
                    rpm,
                    tpm,
                    max_concurrency,
                    budget_usd,
                    priority,
                    weight,
                    response_cache,
                })
                .map_err(spec_error)?;
                let store = ledger.open().await?;
                let (rec, text) =
                    tokenfab_ledger::issue_key(store.as_ref(), &spec, tokenfab_gateway::unix_now())
                        .await?;
                eprintln!(
                    "created key {} for tenant {}; the secret below is shown only once:",
                    rec.id, rec.tenant
                );
                println!("{text}");
            }
            KeysCommand::List {
                tenant,
                format,
                ledger,
            } => {
                let store = ledger.open().await?;
                let keys = store.list_keys(tenant.map(TenantId).as_ref()).await?;
                print_keys(&keys, format)?;
            }
            KeysCommand::Revoke { id, ledger } => {
                let store = ledger.open().await?;
                if !store.revoke_key(&id, tokenfab_gateway::unix_now()).await? {
                    anyhow::bail!("no key {id}");
                }
                eprintln!("revoked {id}");
            }
            KeysCommand::Rotate { id, ledger } => {
                let store = ledger.open().await?;
                let Some(text) = tokenfab_ledger::rotate_key(store.as_ref(), &id).await? else {
                    anyhow::bail!("no live key {id}");
                };
                eprintln!(
                    "rotated {id}; the old secret no longer works; the new one is shown only once:"
                );
                println!("{text}");
            }
        }
        Ok(())
    })
}

pub fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let since = match args.since.as_deref() {
        None => None,
        Some(s) => Some(
            parse_since(s)
                .ok_or_else(|| anyhow::anyhow!("--since must be YYYY-MM-DD or unix seconds"))?,
        ),
    };
    let group_by = GroupBy::parse(&args.group_by)
        .ok_or_else(|| anyhow::anyhow!("--group-by must be model, day, key or tenant"))?;
    let q = UsageQuery {
        tenant: args.tenant.map(TenantId),
        key_id: args.key,
        since,
        group_by,
    };
    runtime()?.block_on(async move {
        let store = args.ledger.open().await?;
        let rows = store.usage(&q).await?;
        print_usage(&rows, args.format)
    })
}
