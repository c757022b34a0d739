//! Exact response cache, opt-in per request (`x-tokenfab-cache: on`) or per key (created
//! with `response_cache`; a request opts out with `x-tokenfab-cache: off`).
//!
//! The key is SHA-256 over the tenant, the served model and the canonical request (the
//! parsed request serialised again, sampling parameters included), so one tenant can never
//! be answered from another's entries. Only deterministic requests are cached — greedy
//! (`temperature: 0`) or with a fixed `seed` — and only whole (non-streaming) responses.
//! A hit is marked `x-tokenfab-cache: hit`, runs nothing and is not billed; other answers
//! say `miss` or, when the request cannot be cached, `bypass`. Entries live in this
//! process (LRU, bounded count, TTL).

use crate::auth::Caller;
use crate::error::ApiError;
use crate::validate::Spec;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokenfab_types::{ErrorCode, TenantId};

pub const HEADER: &str = "x-tokenfab-cache";

/// Stored at, response body.
type Entry = (Instant, Vec<u8>);

pub struct ResponseCache {
    entries: Mutex<lru::LruCache<[u8; 32], Entry>>,
    ttl: Duration,
}

/// What the cache says about one request.
pub enum Lookup {
    /// Not asked for.
    Off,
    /// Asked for, but the request is not deterministic or is a stream.
    Bypass,
    /// Run it, then store the response under this key.
    Miss([u8; 32]),
    /// The stored response body.
    Hit(Vec<u8>),
}

impl ResponseCache {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        ResponseCache {
            entries: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN),
            )),
            ttl,
        }
    }

    pub fn lookup<T: serde::Serialize>(
        &self,
        caller: &Caller,
        model: &str,
        headers: &HeaderMap,
        request: &T,
        spec: &Spec,
    ) -> Result<Lookup, ApiError> {
        let key_default = caller.0.as_ref().is_some_and(|k| k.response_cache);
        match headers.get(HEADER).map(|v| v.to_str()) {
            None if key_default => {}
            None | Some(Ok("off")) => return Ok(Lookup::Off),
            Some(Ok("on")) => {}
            Some(_) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "x-tokenfab-cache must be `on` or `off`.",
                ))
            }
        }
        let deterministic = spec.sampling.temperature == 0.0 || spec.seed.is_some();
        if spec.stream || !deterministic {
            return Ok(Lookup::Bypass);
        }
        let tenant = caller
            .0
            .as_ref()
            .map_or_else(TenantId::local, |k| k.tenant.clone());
        let canonical = serde_json::to_vec(request)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        let mut h = Sha256::new();
        for part in [tenant.0.as_bytes(), model.as_bytes(), &canonical] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let key: [u8; 32] = h.finalize().into();
        let mut entries = self
            .entries
            .lock()
            .map_err(|_| ApiError::new(ErrorCode::Internal, "response cache lock poisoned"))?;
        if let Some((at, body)) = entries.get(&key) {
            if at.elapsed() < self.ttl {
                return Ok(Lookup::Hit(body.clone()));
            }
            entries.pop(&key);
        }
        Ok(Lookup::Miss(key))
    }

    pub fn store(&self, key: [u8; 32], body: &[u8]) {
        if let Ok(mut e) = self.entries.lock() {
            e.put(key, (Instant::now(), body.to_vec()));
        }
    }
}

/// The response for a hit.
pub fn hit(body: Vec<u8>) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(HEADER, HeaderValue::from_static("hit"));
    resp
}

/// Mark a response with what the cache did.
pub fn mark(resp: &mut Response, lookup: &Lookup) {
    let v = match lookup {
        Lookup::Off | Lookup::Hit(_) => return,
        Lookup::Bypass => "bypass",
        Lookup::Miss(_) => "miss",
    };
    resp.headers_mut()
        .insert(HEADER, HeaderValue::from_static(v));
}
