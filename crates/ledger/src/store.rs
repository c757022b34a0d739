//! The one trait every ledger store implements, and its errors.

use crate::model::{
    AttemptId, KeyRecord, Recovery, Reservation, Settled, Settlement, TokenUsage, UsageQuery,
    UsageRow,
};
use async_trait::async_trait;
use tokenfab_types::{ErrorCode, NanoUsd, TenantId};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("no such API key: {0}")]
    UnknownKey(String),
    #[error("API key {0} has been revoked")]
    Revoked(String),
    #[error("insufficient budget: this request may cost {needed:?} nano-USD, {remaining:?} nano-USD remain")]
    InsufficientBudget { needed: NanoUsd, remaining: NanoUsd },
    #[error("reservation {0:?} already exists")]
    DuplicateReservation(AttemptId),
    #[error("no open reservation {0:?} (never made, or already settled)")]
    NotOpen(AttemptId),
    #[error("ledger storage failed: {0}")]
    Storage(String),
}

impl LedgerError {
    pub fn code(&self) -> ErrorCode {
        match self {
            LedgerError::UnknownKey(_) | LedgerError::Revoked(_) => ErrorCode::InvalidApiKey,
            LedgerError::InsufficientBudget { .. } => ErrorCode::InsufficientQuota,
            LedgerError::DuplicateReservation(_)
            | LedgerError::NotOpen(_)
            | LedgerError::Storage(_) => ErrorCode::Internal,
        }
    }
}

impl From<sqlx::Error> for LedgerError {
    fn from(e: sqlx::Error) -> Self {
        LedgerError::Storage(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, LedgerError>;

/// Keys, reservations and usage. Every implementation passes [`crate::conformance`].
///
/// Reservations follow Try-Confirm-Cancel: [`reserve`](Self::reserve) holds the worst-case
/// cost atomically against the key's budget (never overspent, under any concurrency, on any
/// number of processes sharing the store); [`settle`](Self::settle) ends it exactly once,
/// charging what was really served and releasing the rest. Each mutating call returns only
/// once its effect is durable.
#[async_trait]
pub trait LedgerStore: Send + Sync {
    async fn create_key(&self, key: &KeyRecord) -> Result<()>;
    async fn key(&self, id: &str) -> Result<Option<KeyRecord>>;
    /// All keys (of one tenant), ordered by id.
    async fn list_keys(&self, tenant: Option<&TenantId>) -> Result<Vec<KeyRecord>>;
    /// `false` when there is no such key.
    async fn revoke_key(&self, id: &str, now: i64) -> Result<bool>;
    /// Replace the secret's hash; `false` when there is no such live key.
    async fn rotate_key(&self, id: &str, hash: [u8; 32]) -> Result<bool>;

    /// TRY. On return the hold is effective against every other reservation; it may
    /// become durable with the request's next progress or settlement (which nothing is
    /// released before). An id is used once: reusing one is refused (as a duplicate, or
    /// for budget if that check fails first).
    async fn reserve(&self, r: &Reservation) -> Result<()>;
    /// Record what an open reservation has served so far, so that a crash bills it.
    async fn progress(&self, id: &AttemptId, usage: TokenUsage) -> Result<()>;
    /// CONFIRM or CANCEL, exactly once.
    async fn settle(&self, id: &AttemptId, s: Settlement) -> Result<Settled>;
    /// At startup: end every reservation `node` left open, confirmed from its recorded
    /// progress (released when nothing was served), and drop its unfinished idempotency
    /// claims.
    async fn recover(&self, node: &str, now: i64) -> Result<Recovery>;
    /// Reservations still open (all nodes).
    async fn open_reservations(&self) -> Result<u64>;

    /// Settled requests summed per group.
    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>>;

    /// Claim an `Idempotency-Key` of a tenant for a request whose canonical body hashes to
    /// `body`. Exactly one caller gets [`Idempotency::Claimed`]; the others learn whether
    /// it is still running, finished (its stored response), or claimed for another body.
    async fn idempotency_claim(&self, c: &IdempotencyClaim) -> Result<Idempotency>;
    /// Store the response of a claimed key (durable before it is returned to the client).
    async fn idempotency_complete(
        &self,
        tenant: &TenantId,
        key: &str,
        response: &[u8],
    ) -> Result<()>;
    /// Give a claim up (the request failed): a retry may run again.
    async fn idempotency_release(&self, tenant: &TenantId, key: &str) -> Result<()>;
}

/// A claim on an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyClaim {
    pub tenant: TenantId,
    pub key: String,
    pub body: [u8; 32],
    /// Claims left running by a crash of this node are dropped by [`LedgerStore::recover`].
    pub node: String,
    pub now: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Idempotency {
    /// This caller runs the request.
    Claimed,
    /// The same key and body are running elsewhere.
    InFlight,
    /// Finished: the stored response.
    Done(Vec<u8>),
    /// The key was used for a different body.
    Mismatch,
}
