//! Configuration: defaults < TOML file (`--config`) < `TOKENFAB_*` environment < flags.
//! clap applies environment and flags (flags win); this module applies them over the file.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub model: ModelConfig,
    pub scheduler: SchedulerConfig,
    pub gateway: GatewaySection,
    pub observability: ObservabilitySection,
    /// Remote workers, aliases and routing (`[[fleet.workers]]`, `[[fleet.aliases]]`,
    /// `[fleet.policies]`); empty: this process's engine serves everything.
    pub fleet: tokenfab_fleet::FleetSpec,
    /// Price per model name served, in USD per million tokens.
    pub prices: BTreeMap<String, PriceConfig>,
    /// Set by `tokenfab worker`: an engine behind a gateway (open, in-memory ledger, the
    /// forwarded tenant trusted). Not a file setting.
    #[serde(skip)]
    pub worker: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilitySection {
    /// OTLP/HTTP collector base URL (e.g. `http://127.0.0.1:4318`); empty = no trace
    /// export. Spans are sent as protobuf to `<url>/v1/traces`.
    pub otlp_endpoint: String,
    /// Gateway series updated per request (false only to measure what they cost; the
    /// engine's series and `/metrics` stay).
    pub metrics: bool,
    /// Share of API requests traced, 0–1, when export is on (head sampling: evenly spread,
    /// and a client's `traceparent` sampled flag decides for its request). A traced
    /// request costs the gateway ~20 µs of CPU; an untraced one nothing.
    pub trace_sample_ratio: f64,
    /// Most traces started per second, whatever the ratio or a client's flag (0: no
    /// limit): keeps tracing's cost fixed under heavy traffic.
    pub trace_max_per_second: u64,
}

impl Default for ObservabilitySection {
    fn default() -> Self {
        ObservabilitySection {
            otlp_endpoint: String::new(),
            metrics: true,
            trace_sample_ratio: 1.0,
            trace_max_per_second: 100,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// Ledger store: a SQLite file path, `postgres://…`, or `memory`. Empty: SQLite at
    /// `$TOKENFAB_HOME/ledger.db`.
    pub ledger: String,
    /// Admin key for `/admin/v1/*`. Setting it (or creating any API key) turns on keyed
    /// mode; with neither, the server runs open in local single-user mode.
    pub admin_key: String,
    /// This process's name in the ledger (a restart with the same name resolves what it
    /// left open). Empty: `<hostname>:<port>`.
    pub node: String,
    /// Response cache (`x-tokenfab-cache: on`): most entries kept, and for how long.
    pub response_cache_entries: usize,
    pub response_cache_ttl_s: u64,
    /// Where rate-limit counters live: empty = in this process; `redis://…` = in Redis,
    /// shared by all replicas pointing at it.
    pub rate_limits: String,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            ledger: String::new(),
            admin_key: String::new(),
            node: String::new(),
            response_cache_entries: 10_000,
            response_cache_ttl_s: 3600,
            rate_limits: String::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriceConfig {
    pub prompt_usd_per_mtok: f64,
    /// Prompt tokens served from the prefix cache.
    pub cached_usd_per_mtok: f64,
    pub completion_usd_per_mtok: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Largest request body accepted, in bytes (larger → 413).
    pub max_body_bytes: usize,
    /// Largest request head (request line + headers), in bytes.
    pub max_header_bytes: usize,
    /// A client must send its request head within this many milliseconds.
    pub header_read_timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Catalog name, local .gguf path, or hf:<owner>/<repo>/<file>; `none`: no local
    /// engine (a gateway that only routes to `[fleet]` workers).
    pub name: String,
    /// KV cells of all sequences together (tokens).
    pub kv_tokens: u32,
    /// `unified` (one pool for all slots; least memory, prefixes shared without copies)
    /// or `per-sequence` (`kv_tokens / slots` cells reserved per slot, as llama-server
    /// with `-np`; faster batched decode, each sequence limited to its slot's cells).
    pub kv_layout: tokenfab_llama::KvLayout,
    /// Sequence slots of the llama.cpp context: running sequences plus finished ones kept
    /// as prefix-cache entries.
    pub slots: u32,
    /// Kernel micro-batch (llama.cpp n_ubatch); smaller saves compute-buffer memory.
    pub ubatch_tokens: u32,
    /// CPU threads for llama.cpp kernels; 0 = all cores.
    pub threads: u32,
    /// Instead of a model, a timing model of an accelerator emitting placeholder tokens:
    /// `instant` or `linear:BASE_MS:PER_TOKEN_US[:PER_SEQ_US]`. Served as model `mock`.
    pub mock: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Token budget of one engine step (decodes first, then prefill chunks).
    pub max_step_tokens: u32,
    /// Largest prefill chunk of one sequence per step.
    pub max_prefill_chunk: u32,
    /// Sequences in the running batch at most.
    pub max_running: u32,
    /// KV block size in tokens.
    pub block_tokens: u32,
    /// Bounded queue: requests waiting (more → 503 with Retry-After).
    pub max_waiting: u32,
    /// Bounded queue: prompt tokens waiting.
    pub max_waiting_tokens: u64,
    /// Step time to keep while sequences stream (ms); prefill chunks are sized from
    /// measured step times to fit it. 0 = always use the whole step budget.
    pub target_step_ms: u32,
    /// After a step that ended requests, wait this long (ms) for their clients' next
    /// requests before a step that would only prefill prompts already running. 0 = plan
    /// at once.
    pub linger_ms: u32,
    /// A short request of a tenant far below its share of the batch (and the least
    /// served) gets steps of its own until its first token; the busier tenants' streams
    /// wait those steps.
    pub isolate_quiet_starts: bool,
    /// KV cache shares of named tenants: `[scheduler.tenants.NAME]`.
    pub tenants: BTreeMap<String, TenantKvConfig>,
}

/// A tenant's share of the KV cache (fractions of the whole, 0–1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantKvConfig {
    /// The most the tenant may hold, its prefix-cache entries included (absent: no cap).
    /// Also its longest sequence: longer prompts are rejected, max_tokens clamped.
    pub kv_max_share: Option<f64>,
    /// What the tenant keeps however busy others are: their requests never evict or
    /// preempt it below this.
    pub kv_min_share: f64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 2 << 20,
            max_header_bytes: 64 << 10,
            header_read_timeout_ms: 10_000,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: tokenfab_llama::pull::DEFAULT_MODEL.into(),
            // llama-server's shape (`-c 131072 -np 16`, plus 16 slots for prefix-cache
            // entries): 4,096 cells per sequence, decode at the kernels' rate. The 2.9 GB
            // of f16 KV (SmolLM2-135M) is address space: its zero pages go back to the
            // kernel after startup (~140 MB resident idle), and a page costs memory once a
            // sequence writes it. Startup touches it all once: lower `kv_tokens` where
            // memory is that tight.
            kv_tokens: 131_072,
            kv_layout: tokenfab_llama::KvLayout::PerSequence,
            slots: 32,
            ubatch_tokens: 256,
            threads: 0,
            mock: String::new(),
        }
    }
}

/// `serve`'s KV block size. llama.cpp keeps KV per token, so a block is only the
/// prefix cache's unit of matching, and a small one reuses more of a shared prefix: the
/// chat template's common opening is ~24 tokens of SmolLM2, of which 16-token blocks
/// reused 16, and the tail after the last full block, which is always its own piece, is
/// at most 4 tokens instead of 16. (The simulator keeps `EngineConfig`'s 16: paged GPU
/// engines such as vLLM match prefixes in blocks of that size.)
pub const SERVE_BLOCK_TOKENS: u32 = 4;

impl Default for SchedulerConfig {
    fn default() -> Self {
        let e = tokenfab_engine::EngineConfig::default();
        SchedulerConfig {
            max_step_tokens: e.max_step_tokens,
            max_prefill_chunk: e.max_prefill_chunk,
            max_running: e.max_running,
            block_tokens: SERVE_BLOCK_TOKENS,
            max_waiting: e.max_waiting,
            max_waiting_tokens: e.max_waiting_tokens,
            target_step_ms: e.target_step_ms,
            linger_ms: e.linger_ms,
            isolate_quiet_starts: e.isolate_quiet_starts,
            tenants: BTreeMap::new(),
        }
    }
}

impl Config {
    /// Defaults, overlaid with the TOML file when one is given.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = file else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))
    }

    /// The ledger URL, with the default applied.
    pub fn ledger_url(&self) -> String {
        if self.gateway.ledger.is_empty() {
            tokenfab_llama::pull::home()
                .join("ledger.db")
                .display()
                .to_string()
        } else {
            self.gateway.ledger.clone()
        }
    }

    /// The ledger node name, with the default applied.
    pub fn node(&self) -> String {
        if !self.gateway.node.is_empty() {
            return self.gateway.node.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        format!("{host}:{}", self.server.port)
    }

    /// The configured prices per model name (a model not listed is free).
    pub fn prices(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<String, tokenfab_ledger::Price>> {
        self.prices
            .iter()
            .map(|(model, p)| {
                let price = tokenfab_ledger::Price::from_usd_per_mtok(
                    p.prompt_usd_per_mtok,
                    p.cached_usd_per_mtok,
                    p.completion_usd_per_mtok,
                )
                .map_err(|e| anyhow::anyhow!("prices.{model}: {e}"))?;
                Ok((model.clone(), price))
            })
            .collect()
    }

    /// Whether this process runs no engine of its own (`model.name = "none"`).
    pub fn routing_only(&self) -> bool {
        self.model.name == "none" && self.model.mock.is_empty()
    }

    pub fn engine(&self) -> anyhow::Result<tokenfab_engine::EngineConfig> {
        let mut floors = 0.0;
        let mut kv_shares = BTreeMap::new();
        for (name, t) in &self.scheduler.tenants {
            let share = |v: f64, what: &str| {
                if (0.0..=1.0).contains(&v) {
                    Ok((v * 1000.0).round() as u32)
                } else {
                    anyhow::bail!(
                        "scheduler.tenants.{name}.{what} = {v}: a share is between 0 and 1"
                    )
                }
            };
            let max_permille = t
                .kv_max_share
                .map(|v| share(v, "kv_max_share"))
                .transpose()?;
            let min_permille = share(t.kv_min_share, "kv_min_share")?;
            if max_permille.is_some_and(|m| m < min_permille) {
                anyhow::bail!("scheduler.tenants.{name}: kv_min_share exceeds kv_max_share");
            }
            floors += t.kv_min_share;
            let id = tokenfab_types::TenantId(name.clone());
            kv_shares.insert(
                id,
                tokenfab_engine::KvShare {
                    max_permille,
                    min_permille,
                },
            );
        }
        if floors > 1.0 {
            anyhow::bail!("scheduler.tenants: the kv_min_share values add up to {floors:.2}, more than the whole cache");
        }
        Ok(tokenfab_engine::EngineConfig {
            kv_shares,
            max_step_tokens: self.scheduler.max_step_tokens,
            max_prefill_chunk: self.scheduler.max_prefill_chunk,
            max_running: self.scheduler.max_running,
            block_tokens: self.scheduler.block_tokens,
            max_waiting: self.scheduler.max_waiting,
            max_waiting_tokens: self.scheduler.max_waiting_tokens,
            target_step_ms: self.scheduler.target_step_ms,
            linger_ms: self.scheduler.linger_ms,
            isolate_quiet_starts: self.scheduler.isolate_quiet_starts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's fleet example is a valid config file.
    #[test]
    fn the_readme_fleet_example_parses() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("```toml\n[model]").expect("the fleet example") + 8;
        let len = readme[start..].find("```").expect("its end");
        let cfg: Config = toml::from_str(&readme[start..start + len]).expect("valid config");
        assert_eq!(cfg.fleet.workers.len(), 2);
        assert_eq!(cfg.fleet.workers[1].api, "anthropic");
        assert_eq!(cfg.fleet.aliases[0].small_max_tokens, 256);
        assert!(cfg.routing_only());
    }

    #[test]
    fn file_overrides_defaults_and_unknown_keys_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[server]\nport = 9000\n").expect("write");
        let c = Config::load(Some(&p)).expect("load");
        assert_eq!(c.server.port, 9000);
        assert_eq!(c.server.host, "127.0.0.1");
        std::fs::write(&p, "[server]\nprot = 9000\n").expect("write");
        let err = Config::load(Some(&p))
            .expect_err("typo must fail")
            .to_string();
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn tenant_kv_shares_become_quotas_and_bad_shares_are_errors() {
        let parse = |t: &str| toml::from_str::<Config>(t).expect("parse").engine();
        let e = parse("[scheduler.tenants.acme]\nkv_max_share = 0.5\nkv_min_share = 0.1\n")
            .expect("valid");
        let share = e.kv_shares[&tokenfab_types::TenantId("acme".into())];
        assert_eq!((share.max_permille, share.min_permille), (Some(500), 100));
        for (bad, says) in [
            ("[scheduler.tenants.a]\nkv_max_share = 1.5\n", "between 0 and 1"),
            ("[scheduler.tenants.a]\nkv_max_share = 0.1\nkv_min_share = 0.2\n", "exceeds"),
            (
                "[scheduler.tenants.a]\nkv_min_share = 0.6\n[scheduler.tenants.b]\nkv_min_share = 0.6\n",
                "add up to",
            ),
        ] {
            let err = parse(bad).expect_err(bad).to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn printed_config_parses_back() {
        let c = Config::default();
        let text = toml::to_string(&c).expect("serialize");
        assert_eq!(toml::from_str::<Config>(&text).expect("parse"), c);
    }
}
