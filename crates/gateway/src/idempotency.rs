//! `Idempotency-Key`: a retried request with the same key and body gets the stored
//! response without running or being billed again; the same key with another body is
//! refused (422), and while the first is still running a retry gets 409.
//!
//! Claims live in the ledger, so they hold across restarts and across replicas sharing
//! PostgreSQL. Keys are scoped per tenant. The body is compared by the SHA-256 of its
//! canonical JSON (the parsed request serialised again), so formatting does not matter.
//! Streams are replayed too: the whole event stream is stored before its final events are
//! sent, and a retry gets it back as one SSE body. A stream cut short (client gone, or a
//! failure) stores nothing and releases its claim, so a retry runs again.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::meter::unix_now;
use crate::state::AppState;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokenfab_ledger::{Idempotency, IdempotencyClaim, LedgerStore};
use tokenfab_types::{ErrorCode, TenantId};
use tokio_util::task::TaskTracker;

/// A claimed key: complete it with the response, or it is released on drop.
pub struct Claim {
    ledger: Arc<dyn LedgerStore>,
    tenant: TenantId,
    key: String,
    tracker: TaskTracker,
    done: bool,
}

pub enum Outcome {
    /// No header: run normally.
    None,
    /// Run, then store the response through the claim.
    Run(Claim),
    /// Already answered: this is the stored response.
    Replay(Response),
}

/// Claim the request's `Idempotency-Key`, if it has one.
pub async fn claim<T: serde::Serialize>(
    s: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    request: &T,
) -> Result<Outcome, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(Outcome::None);
    };
    let key = v
        .to_str()
        .ok()
        .filter(|k| (1..=255).contains(&k.len()))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                "Idempotency-Key must be 1-255 visible ASCII characters.",
            )
        })?;
    let canonical = serde_json::to_vec(request)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let tenant = caller
        .0
        .as_ref()
        .map_or_else(TenantId::local, |k| k.tenant.clone());
    let c = IdempotencyClaim {
        tenant: tenant.clone(),
        key: key.to_owned(),
        body: Sha256::digest(&canonical).into(),
        node: s.config.node.clone(),
        now: unix_now(),
    };
    match s.ledger.idempotency_claim(&c).await? {
        Idempotency::Claimed => Ok(Outcome::Run(Claim {
            ledger: s.ledger.clone(),
            tenant,
            key: key.to_owned(),
            tracker: s.tracker.clone(),
            done: false,
        })),
        Idempotency::InFlight => Err(ApiError::new(
            ErrorCode::IdempotencyInFlight,
            "A request with this Idempotency-Key is still running; retry when it has finished.",
        )),
        Idempotency::Mismatch => Err(ApiError::new(
            ErrorCode::IdempotencyMismatch,
            "This Idempotency-Key was used with a different request body.",
        )),
        Idempotency::Done(body) => {
            // Stored whole responses are JSON objects; stored streams are SSE text.
            let content_type = if body.starts_with(b"data:") {
                "text/event-stream"
            } else {
                "application/json"
            };
            let mut resp = body.into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            h.insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(Outcome::Replay(resp))
        }
    }
}

impl Claim {
    /// Store the response durably; call before returning it.
    pub async fn complete(mut self, body: &[u8]) -> Result<(), ApiError> {
        self.ledger
            .idempotency_complete(&self.tenant, &self.key, body)
            .await?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (ledger, tenant, key) = (self.ledger.clone(), self.tenant.clone(), self.key.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.tracker.spawn_on(
                async move {
                    if let Err(e) = ledger.idempotency_release(&tenant, &key).await {
                        tracing::warn!(error = %e, "releasing an idempotency key failed");
                    }
                },
                &rt,
            );
        }
    }
}
