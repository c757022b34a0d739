//! Per-key rate limits: requests per minute, tokens per minute and concurrent requests.
//!
//! Token buckets refilled continuously (a limit of N per minute holds N and refills N/60
//! per second). A check takes everything it needs or nothing, in one atomic step, so
//! limits are exact under any concurrency. Tokens are taken as prompt + max_tokens at
//! admission and the unused part is refunded when the request ends.
//!
//! Two places hold the counters, one decision rule ([`decide`]):
//! - [`Limiter::local`]: in this process, under one lock (one gateway).
//! - [`Limiter::redis`] (`limits_redis.rs`): in Redis, checked and taken by one Lua script
//!   on Redis's clock, so any number of gateway replicas share one limit instead of each
//!   allowing the full limit.

use crate::error::ApiError;
use crate::limits_redis::RedisLimits;
use axum::http::{HeaderMap, HeaderValue};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokenfab_ledger::KeyRecord;
use tokenfab_types::{ErrorCode, Nanos};

#[derive(Clone, Copy, Debug)]
struct Bucket {
    cap: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(cap: u64, now: Instant) -> Self {
        Bucket {
            cap: cap as f64,
            level: cap as f64,
            at: now,
        }
    }

    fn refill(&mut self, cap: u64, now: Instant) {
        let cap = cap as f64;
        if cap != self.cap {
            self.level = self.level.min(cap);
            self.cap = cap;
        }
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.cap / 60.0).min(self.cap);
        self.at = now;
    }

    fn level(&self) -> Level {
        Level {
            cap: self.cap,
            level: self.level,
        }
    }
}

/// A bucket's capacity and current level, wherever it is kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Level {
    pub cap: f64,
    pub level: f64,
}

impl Level {
    /// Time until `n` would be available (zero if it is).
    fn wait_for(&self, n: f64) -> Duration {
        if self.level >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - self.level) * 60.0 / self.cap.max(1e-9))
        }
    }

    fn until_full(&self) -> Duration {
        self.wait_for(self.cap)
    }
}

/// What a check found, before anything is taken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Levels {
    pub rpm: Option<Level>,
    pub tpm: Option<Level>,
    pub active: u64,
}

/// Why a request is refused, or `None` when it may take `tokens`. The one rule both
/// counter stores apply (the Redis script encodes the same order of checks).
pub(crate) fn refusal(
    levels: &Levels,
    tokens: u64,
    max_concurrency: Option<u64>,
) -> Option<Refusal> {
    if max_concurrency.is_some_and(|max| levels.active >= max) {
        return Some(Refusal::Concurrency);
    }
    if levels.rpm.is_some_and(|b| b.level < 1.0) {
        return Some(Refusal::Requests);
    }
    if let Some(b) = levels.tpm {
        if tokens as f64 > b.cap {
            return Some(Refusal::TooLarge);
        }
        if b.level < tokens as f64 {
            return Some(Refusal::Tokens);
        }
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Concurrency,
    Requests,
    TooLarge,
    Tokens,
}

impl Refusal {
    /// The 429 for this refusal; `levels` as found (nothing taken).
    pub(crate) fn error(self, levels: &Levels, tokens: u64, key: &KeyRecord) -> ApiError {
        let rate = levels.info();
        let (message, wait) = match self {
            Refusal::Concurrency => (
                format!(
                    "Too many concurrent requests for this key (limit {}).",
                    key.max_concurrency.unwrap_or(0)
                ),
                Duration::from_secs(1),
            ),
            Refusal::Requests => {
                let b = levels.rpm.unwrap_or(Level {
                    cap: 0.0,
                    level: 0.0,
                });
                (
                    format!("Rate limit reached: {} requests per minute.", b.cap),
                    b.wait_for(1.0),
                )
            }
            Refusal::TooLarge => {
                let b = levels.tpm.unwrap_or(Level {
                    cap: 0.0,
                    level: 0.0,
                });
                (
                    format!(
                        "Request too large: it may use {tokens} tokens (prompt + max_tokens) \
                         but this key allows {} tokens per minute.",
                        b.cap
                    ),
                    b.until_full(),
                )
            }
            Refusal::Tokens => {
                let b = levels.tpm.unwrap_or(Level {
                    cap: 0.0,
                    level: 0.0,
                });
                (
                    format!(
                        "Rate limit reached: {} tokens per minute (this request reserves {tokens}).",
                        b.cap
                    ),
                    b.wait_for(tokens as f64),
                )
            }
        };
        let mut e = ApiError::new(ErrorCode::RateLimited, message);
        e.retry_after = Some(Nanos::from(wait.max(Duration::from_millis(1))));
        e.rate = Some(Box::new(rate));
        e
    }
}

impl Levels {
    pub(crate) fn info(&self) -> RateInfo {
        let part =
            |b: &Option<Level>| b.map(|b| (b.cap as u64, b.level.max(0.0) as u64, b.until_full()));
        RateInfo {
            requests: part(&self.rpm),
            tokens: part(&self.tpm),
        }
    }
}

#[derive(Default)]
struct KeyState {
    rpm: Option<Bucket>,
    tpm: Option<Bucket>,
    active: u64,
}

/// What the `x-ratelimit-*` headers report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateInfo {
    /// (limit, remaining, reset)
    pub requests: Option<(u64, u64, Duration)>,
    pub tokens: Option<(u64, u64, Duration)>,
}

/// OpenAI's reset format: `1s`, `6m0s`, `120ms`.
fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs_f64().ceil() as u64;
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{}s", s / 60, s % 60)
    }
}

impl RateInfo {
    pub fn write(&self, headers: &mut HeaderMap) {
        let mut put = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(name, v);
            }
        };
        if let Some((limit, remaining, reset)) = self.requests {
            put("x-ratelimit-limit-requests", limit.to_string());
            put("x-ratelimit-remaining-requests", remaining.to_string());
            put("x-ratelimit-reset-requests", reset_text(reset));
        }
        if let Some((limit, remaining, reset)) = self.tokens {
            put("x-ratelimit-limit-tokens", limit.to_string());
            put("x-ratelimit-remaining-tokens", remaining.to_string());
            put("x-ratelimit-reset-tokens", reset_text(reset));
        }
    }
}

/// The rate limits of every key, in this process or in Redis.
pub enum Limiter {
    Local(LocalLimits),
    Redis(Box<RedisLimits>),
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::local()
    }
}

impl Limiter {
    pub fn local() -> Self {
        Limiter::Local(LocalLimits::default())
    }

    /// Counters shared through the Redis server at `url` (`redis://host:port/db`).
    pub async fn redis(url: &str) -> Result<Self, String> {
        Ok(Limiter::Redis(Box::new(RedisLimits::connect(url).await?)))
    }

    /// Admit request `request_id` of `tokens` (prompt + max_tokens) for `key`, or say why
    /// not.
    pub async fn acquire(
        &self,
        key: &KeyRecord,
        tokens: u64,
        request_id: &str,
    ) -> Result<RateInfo, ApiError> {
        match self {
            Limiter::Local(l) => l.acquire(key, tokens, Instant::now()),
            Limiter::Redis(r) => r.acquire(key, tokens, request_id).await,
        }
    }

    /// The request ended: free its concurrency slot and refund tokens it did not use.
    pub async fn release(&self, key: &KeyRecord, request_id: &str, refund_tokens: u64) {
        match self {
            Limiter::Local(l) => l.release(&key.id, refund_tokens),
            Limiter::Redis(r) => r.release(key, request_id, refund_tokens).await,
        }
    }
}

/// Counters in this process, under one lock.
#[derive(Default)]
pub struct LocalLimits {
    keys: Mutex<HashMap<String, KeyState>>,
}

impl LocalLimits {
    pub fn acquire(
        &self,
        key: &KeyRecord,
        tokens: u64,
        now: Instant,
    ) -> Result<RateInfo, ApiError> {
        let mut keys = self
            .keys
            .lock()
            .map_err(|_| ApiError::new(ErrorCode::Internal, "rate limiter lock poisoned"))?;
        let st = keys.entry(key.id.clone()).or_default();
        for (bucket, limit) in [(&mut st.rpm, key.rpm), (&mut st.tpm, key.tpm)] {
            match limit {
                None => *bucket = None,
                Some(cap) => bucket
                    .get_or_insert_with(|| Bucket::new(cap, now))
                    .refill(cap, now),
            }
        }
        let levels = Levels {
            rpm: st.rpm.map(|b| b.level()),
            tpm: st.tpm.map(|b| b.level()),
            active: st.active,
        };
        if let Some(r) = refusal(&levels, tokens, key.max_concurrency) {
            return Err(r.error(&levels, tokens, key));
        }
        if let Some(b) = &mut st.rpm {
            b.level -= 1.0;
        }
        if let Some(b) = &mut st.tpm {
            b.level -= tokens as f64;
        }
        st.active += 1;
        Ok(Levels {
            rpm: st.rpm.map(|b| b.level()),
            tpm: st.tpm.map(|b| b.level()),
            active: st.active,
        }
        .info())
    }

    pub fn release(&self, key_id: &str, refund_tokens: u64) {
        if let Ok(mut keys) = self.keys.lock() {
            if let Some(st) = keys.get_mut(key_id) {
                st.active = st.active.saturating_sub(1);
                if let Some(b) = &mut st.tpm {
                    b.level = (b.level + refund_tokens as f64).min(b.cap);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenfab_ledger::{new_key, KeySpec};
    use tokenfab_types::TenantId;

    fn key(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u64>) -> KeyRecord {
        let mut spec = KeySpec::new(TenantId("t".into()));
        spec.rpm = rpm;
        spec.tpm = tpm;
        spec.max_concurrency = conc;
        new_key(&spec, 0, &mut rand::thread_rng()).0
    }

    #[test]
    fn rpm_is_exact_and_refills() {
        let l = LocalLimits::default();
        let k = key(Some(3), None, None);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.acquire(&k, 1, t0).expect("within limit");
            l.release(&k.id, 0);
        }
        let e = l
            .acquire(&k, 1, t0)
            .expect_err("fourth in the same instant");
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.retry_after.is_some());
        assert_eq!(
            e.rate.as_ref().and_then(|r| r.requests).map(|r| r.1),
            Some(0)
        );
        // 20 s later one request's worth has refilled.
        l.acquire(&k, 1, t0 + Duration::from_secs(20))
            .expect("refilled");
    }

    #[test]
    fn tpm_refunds_unused_tokens_and_concurrency_is_bounded() {
        let l = LocalLimits::default();
        let k = key(None, Some(100), Some(2));
        let t0 = Instant::now();
        l.acquire(&k, 60, t0).expect("fits");
        assert!(l.acquire(&k, 60, t0).is_err(), "only 40 left");
        l.release(&k.id, 50); // used 10 of 60
        l.acquire(&k, 60, t0).expect("refund made room");
        l.acquire(&k, 1, t0).expect("second concurrent");
        let e = l.acquire(&k, 1, t0).expect_err("third concurrent");
        assert!(e.message.contains("concurrent"), "{}", e.message);
        l.release(&k.id, 0);
        l.release(&k.id, 0);
        let big = l.acquire(&k, 101, t0 + Duration::from_secs(600));
        assert!(big.is_err_and(|e| e.message.contains("too large")));
    }

    #[test]
    fn reset_format_matches_openai() {
        assert_eq!(reset_text(Duration::from_millis(120)), "120ms");
        assert_eq!(reset_text(Duration::from_secs(1)), "1s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    }
}
