//! The fleet: one API over many workers — this process's engine, remote OpenAI-compatible
//! servers (vLLM, SGLang, llama.cpp's server, TGI, Ollama, another `tokenfab worker`) and
//! hosted APIs as fallback tiers. It picks a worker per request with `sched::route`'s
//! policies, tracks each worker's load and health (active checks, ejection on consecutive
//! failures with growing backoff, a circuit breaker), and bounds retries.
//!
//! Must not depend on the gateway or on HTTP serving: it is a client of workers. The
//! decisions themselves stay in `sched` (pure); this crate holds the state and the I/O.

mod anthropic;
mod discovery;
mod fleet;
mod health;
mod metrics;
mod remote;
mod spec;

pub use discovery::{refresh, Discovery, StaticDns};
pub use fleet::{Fleet, Lease, Member, MemberKind, Pick, PickError, BLOCK_BYTES, BLOCK_TOKENS};
pub use health::{Breaker, Change, Health, HealthPolicy};
pub use metrics::FleetMetrics;
pub use remote::{
    list_models, Endpoint, Failure, RemoteEvent, RemoteStream, RemoteUsage, RemoteWorker,
    WorkerError,
};
pub use spec::{AliasSpec, FleetSpec, WorkerSpec};
pub use tokenfab_sched::route::{text_block_hashes, Policy};
