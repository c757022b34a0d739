//! Who is calling: API keys → tenant, and the admin key.
//!
//! Keys are looked up by their public id through a short-lived cache (revocation through
//! the admin API takes effect at once; through `tokenfab keys revoke` in another process
//! within [`KEY_TTL`], and a revoked key can never reserve budget, which the ledger checks
//! on every request). Secrets are compared by SHA-256 in constant time.

use crate::error::ApiError;
use axum::http::{header, HeaderMap};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokenfab_ledger::{secret, KeyRecord, LedgerStore};
use tokenfab_types::ErrorCode;

/// How long a looked-up key is trusted before it is read again.
pub const KEY_TTL: Duration = Duration::from_secs(1);

/// How requests are authenticated.
#[derive(Clone)]
pub enum AuthMode {
    /// Local single-user mode: no keys, every request is accepted and not metered.
    Open,
    /// Every request needs a live API key.
    Keys(Arc<KeyCache>),
}

pub struct KeyCache {
    store: Arc<dyn LedgerStore>,
    cache: Mutex<HashMap<String, (KeyRecord, Instant)>>,
}

impl KeyCache {
    pub fn new(store: Arc<dyn LedgerStore>) -> Self {
        KeyCache {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Forget a key (after the admin API revoked or rotated it).
    pub fn invalidate(&self, id: &str) {
        if let Ok(mut c) = self.cache.lock() {
            c.remove(id);
        }
    }

    async fn lookup(&self, id: &str) -> Result<Option<KeyRecord>, ApiError> {
        let now = Instant::now();
        if let Ok(c) = self.cache.lock() {
            if let Some((k, at)) = c.get(id) {
                if now.duration_since(*at) < KEY_TTL {
                    return Ok(Some(k.clone()));
                }
            }
        }
        let found = self
            .store
            .key(id)
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        if let (Some(k), Ok(mut c)) = (&found, self.cache.lock()) {
            c.insert(id.to_owned(), (k.clone(), now));
        }
        Ok(found)
    }

    /// The live key a request presents, or the 401 to answer.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<KeyRecord, ApiError> {
        let presented = bearer(headers).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidApiKey,
                "Missing API key: send it as `Authorization: Bearer tfk-…`.",
            )
        })?;
        let wrong = || ApiError::new(ErrorCode::InvalidApiKey, "Incorrect API key provided.");
        let (id, sec) = secret::parse(presented).ok_or_else(wrong)?;
        let key = self.lookup(id).await?.ok_or_else(wrong)?;
        if !secret::verify(sec, &key.hash) {
            return Err(wrong());
        }
        if key.revoked {
            return Err(ApiError::new(
                ErrorCode::InvalidApiKey,
                "This API key has been revoked.",
            ));
        }
        Ok(key)
    }
}

/// The bearer token of `Authorization` (or `x-api-key`, as some clients send it).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty());
    }
    headers.get("x-api-key")?.to_str().ok()
}

/// The admin key's SHA-256; checked in constant time.
#[derive(Clone)]
pub struct AdminKey([u8; 32]);

impl AdminKey {
    pub fn new(key: &str) -> Self {
        AdminKey(secret::hash(key))
    }

    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let presented = bearer(headers)
            .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey, "Missing admin key."))?;
        if secret::verify(presented, &self.0) {
            Ok(())
        } else if secret::parse(presented).is_some() {
            Err(ApiError::new(
                ErrorCode::PermissionDenied,
                "This route needs the admin key; a tenant key may not use it.",
            ))
        } else {
            Err(ApiError::new(
                ErrorCode::InvalidApiKey,
                "Incorrect admin key provided.",
            ))
        }
    }
}

/// The authenticated caller of a `/v1` route: its key, or `None` in open mode.
#[derive(Clone)]
pub struct Caller(pub Option<KeyRecord>);

/// Middleware on `/v1`: authenticate before the body is read, so a request without a
/// valid key is refused 401 whatever its body holds.
pub async fn require_key(
    axum::extract::State(s): axum::extract::State<crate::state::AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let caller = match &s.auth {
        AuthMode::Open => Caller(None),
        AuthMode::Keys(keys) => match keys.authenticate(req.headers()).await {
            Ok(k) => Caller(Some(k)),
            Err(e) => return e.into_response(),
        },
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}
