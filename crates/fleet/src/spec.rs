//! What the fleet is made of, as configured (`[fleet]` in the TOML file).

use serde::{Deserialize, Serialize};

/// A remote worker: any server speaking OpenAI's `/v1/chat/completions` and
/// `/v1/completions` with streaming (vLLM, SGLang, llama.cpp's server, TGI, Ollama, a
/// hosted API, another tokenfab).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSpec {
    /// Unique name (a metric label and the `x-tokenfab-worker` header). Empty: the URL's
    /// host and port.
    pub name: String,
    /// Base URL, e.g. `http://10.0.0.7:8000` (the `/v1/...` paths are appended). A DNS
    /// name that resolves to several addresses becomes one worker per address, re-resolved
    /// every `fleet.dns_refresh_s`.
    pub url: String,
    /// Model names this worker serves, as clients ask for them.
    pub models: Vec<String>,
    /// The name the worker itself knows the model by, when it differs (a hosted API's
    /// model id); empty: the same name.
    pub upstream_model: String,
    /// Free-form accelerator kind (`h100`, `ascend-910b`, `cpu`), reported in metrics.
    pub accelerator: String,
    /// What the worker costs, USD per hour (routing prefers cheaper workers that still
    /// meet a request's TTFT target).
    pub price_usd_per_hour: f64,
    /// Bearer key sent to the worker (Anthropic: `x-api-key`); empty: none.
    pub api_key: String,
    /// The API the worker speaks: `openai` (default: `/v1/chat/completions`,
    /// `/v1/completions`) or `anthropic` (`/v1/messages`, translated both ways).
    pub api: String,
    /// Failover tier: 0 is tried first; a higher tier only when no lower one has a
    /// healthy worker for the model (e.g. a hosted API as the last resort).
    pub tier: u8,
    /// Prefill speed for TTFT prediction, prompt tokens per second.
    pub prefill_tokens_per_s: u64,
    /// Extra step time per running sequence, milliseconds.
    pub decode_ms_per_seq: f64,
    /// Active health checks (`GET <url>/health`); off for hosted APIs without one.
    pub health_check: bool,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        WorkerSpec {
            name: String::new(),
            url: String::new(),
            models: Vec::new(),
            upstream_model: String::new(),
            accelerator: String::new(),
            price_usd_per_hour: 0.0,
            api_key: String::new(),
            api: "openai".into(),
            tier: 0,
            prefill_tokens_per_s: 2_000,
            decode_ms_per_seq: 1.0,
            health_check: true,
        }
    }
}

impl WorkerSpec {
    /// `name` with its default applied.
    pub fn display_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        let rest = self.url.split("://").nth(1).unwrap_or(&self.url);
        rest.split('/').next().unwrap_or(rest).to_owned()
    }
}

/// A model alias routed by request size: small requests (short prompt, few output
/// tokens) to `small`, the rest to `large`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AliasSpec {
    pub name: String,
    pub small: String,
    pub large: String,
    /// A request is small when its prompt (estimated tokens) and its `max_tokens` are at
    /// most these.
    pub small_max_prompt_tokens: u64,
    pub small_max_tokens: u64,
    /// Priority bands (the key's, or the request's) allowed on the small model; others
    /// always get `large`. Empty: every band.
    pub small_bands: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSpec {
    pub workers: Vec<WorkerSpec>,
    pub aliases: Vec<AliasSpec>,
    /// Routing policy per model name; models not listed use `default_policy`.
    pub policies: std::collections::BTreeMap<String, String>,
    /// `prefix-load` (default), `round-robin`, `least-tokens`, `dynamo-kv`,
    /// `llmd-weighted`, `sglang-cache-aware`.
    pub default_policy: String,
    /// Header whose value pins a session to one worker (rendezvous hashing).
    pub session_header: String,
    pub health_interval_ms: u64,
    /// Consecutive failures (connection errors, 5xx, timeouts) that eject a worker.
    pub eject_after_failures: u32,
    /// First ejection lasts this long; each further one doubles it, up to `eject_max_ms`.
    pub eject_base_ms: u64,
    pub eject_max_ms: u64,
    /// How long to wait for a worker's response headers, and then between stream events.
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub dns_refresh_s: u64,
    /// Prefix blocks remembered per worker for prefix-aware routing.
    pub prefix_blocks_per_worker: usize,
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            workers: Vec::new(),
            aliases: Vec::new(),
            policies: Default::default(),
            default_policy: "prefix-load".into(),
            session_header: "x-session-id".into(),
            health_interval_ms: 1_000,
            eject_after_failures: 3,
            eject_base_ms: 1_000,
            eject_max_ms: 60_000,
            timeout_ms: 120_000,
            connect_timeout_ms: 2_000,
            dns_refresh_s: 30,
            prefix_blocks_per_worker: 65_536,
        }
    }
}
