//! The ledger: API keys, budgets held by Try-Confirm-Cancel reservations, and usage.
//!
//! One trait ([`LedgerStore`]) with three stores — [`MemoryStore`] (tests), [`SqlStore`]
//! over SQLite (default) or PostgreSQL (shared by several gateway processes) — and one
//! [`conformance`] suite that all of them pass. This crate knows nothing of HTTP, the
//! engine or the scheduler; it depends only on `tokenfab-types`.

mod backend_sqlite;
mod backend_sqlx;
pub mod conformance;
mod memory;
mod model;
mod price;
pub mod secret;
mod sql;
mod sql_text;
mod store;
pub mod testkit;
mod usage;
mod writer;

pub use memory::MemoryStore;
pub use model::{
    parse_day, parse_since, utc_day, AttemptId, GroupBy, KeyRecord, KeySpec, Outcome, Recovery,
    Reservation, Settled, Settlement, TokenUsage, UsageQuery, UsageRow,
};
pub use price::Price;
pub use sql::{Dialect, SqlStore};
pub use store::{Idempotency, IdempotencyClaim, LedgerError, LedgerStore, Result};

use std::sync::Arc;
use tokenfab_types::NanoUsd;

/// Make a key record for `spec` and the secret text to show once.
pub fn new_key(spec: &KeySpec, now: i64, rng: &mut impl rand::RngCore) -> (KeyRecord, String) {
    let s = secret::generate(rng);
    let rec = KeyRecord {
        id: s.id,
        tenant: spec.tenant.clone(),
        hash: s.hash,
        rpm: spec.rpm,
        tpm: spec.tpm,
        max_concurrency: spec.max_concurrency,
        budget: spec.budget,
        spent: NanoUsd(0),
        reserved: NanoUsd(0),
        priority: spec.priority,
        weight: spec.weight.max(1),
        response_cache: spec.response_cache,
        created_at: now,
        revoked: false,
    };
    (rec, s.text)
}

/// Issue a key: store it and return the record and the secret text to show once.
pub async fn issue_key(
    store: &dyn LedgerStore,
    spec: &KeySpec,
    now: i64,
) -> Result<(KeyRecord, String)> {
    let (rec, text) = new_key(spec, now, &mut rand::thread_rng());
    store.create_key(&rec).await?;
    Ok((rec, text))
}

/// Give a live key a new secret (the old one stops working); the new secret text, or
/// `None` when there is no such live key.
pub async fn rotate_key(store: &dyn LedgerStore, id: &str) -> Result<Option<String>> {
    let s = secret::regenerate(id, &mut rand::thread_rng());
    Ok(store.rotate_key(id, s.hash).await?.then_some(s.text))
}

/// USD as written by people (`--budget-usd 12.5`) → nano-USD.
pub fn usd(v: f64) -> std::result::Result<NanoUsd, String> {
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        return Err(format!(
            "an amount in USD must be between 0 and 1e9, got {v}"
        ));
    }
    Ok(NanoUsd((v * 1e9).round() as u64))
}

/// Open the store a `--ledger` value names: `memory`, `postgres://…`, or a SQLite path;
/// `serving` for the gateway that reserves against it (see [`SqlStore::open_serving`]).
pub async fn open(url: &str, serving: bool) -> Result<Arc<dyn LedgerStore>> {
    if url == "memory" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    let store = if serving {
        SqlStore::open_serving(url).await?
    } else {
        SqlStore::open(url).await?
    };
    Ok(Arc::new(store))
}
