//! The ledger: API keys, budgets held by Try-Confirm-Cancel reservations, and usage.
//!
//! One trait ([`LedgerStore`]) with three stores — [`MemoryStore`] (tests), [`SqlStore`]
//! over SQLite (default) or PostgreSQL (shared by several gateway processes) — and one
//! [`conformance`] suite that all of them pass. This crate knows nothing of HTTP, the
//! engine or the scheduler; it depends only on `tokenfab-types`.

pub mod conformance;
mod memory;
mod model;
mod price;
pub mod secret;
mod sql;
mod store;
pub mod testkit;
mod usage;

pub use memory::MemoryStore;
pub use model::{
    utc_day, AttemptId, GroupBy, KeyRecord, KeySpec, Outcome, Recovery, Reservation, Settled,
    Settlement, TokenUsage, UsageQuery, UsageRow,
};
pub use price::Price;
pub use sql::{Dialect, SqlStore};
pub use store::{LedgerError, LedgerStore, Result};

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
        created_at: now,
        revoked: false,
    };
    (rec, s.text)
}

/// Open the store a `--ledger` value names: `memory`, `postgres://…`, or a SQLite path.
pub async fn open(url: &str) -> Result<Arc<dyn LedgerStore>> {
    if url == "memory" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    Ok(Arc::new(SqlStore::open(url).await?))
}
