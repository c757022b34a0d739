//! Per-key rate limits: requests per minute, tokens per minute and concurrent requests.
//!
//! Token buckets refilled continuously (a limit of N per minute holds N and refills N/60
//! per second). Checks and takes happen under one lock, all-or-nothing, so limits are exact
//! under any concurrency within this process. Tokens are taken as prompt + max_tokens at
//! admission and the unused part is refunded when the request ends.
//!
//! Counters live in this process: with several gateway replicas each enforces its own
//! limits (shared counters in Redis are not built yet; see ARCHITECTURE.md).

use crate::error::ApiError;
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

#[derive(Default)]
pub struct Limiter {
    keys: Mutex<HashMap<String, KeyState>>,
}

fn info(st: &KeyState) -> RateInfo {
    let part =
        |b: &Option<Bucket>| b.map(|b| (b.cap as u64, b.level.max(0.0) as u64, b.until_full()));
    RateInfo {
        requests: part(&st.rpm),
        tokens: part(&st.tpm),
    }
}

fn limited(message: String, wait: Duration, rate: RateInfo) -> ApiError {
    let mut e = ApiError::new(ErrorCode::RateLimited, message);
    e.retry_after = Some(Nanos::from(wait.max(Duration::from_millis(1))));
    e.rate = Some(Box::new(rate));
    e
}

impl Limiter {
    /// Admit one request of `tokens` (prompt + max_tokens) for `key`, or say why not.
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
        if let Some(max) = key.max_concurrency {
            if st.active >= max {
                return Err(limited(
                    format!("Too many concurrent requests for this key (limit {max})."),
                    Duration::from_secs(1),
                    info(st),
                ));
            }
        }
        if let Some(b) = &st.rpm {
            let wait = b.wait_for(1.0);
            if !wait.is_zero() {
                return Err(limited(
                    format!("Rate limit reached: {} requests per minute.", b.cap),
                    wait,
                    info(st),
                ));
            }
        }
        if let Some(b) = &st.tpm {
            if tokens as f64 > b.cap {
                return Err(limited(
                    format!(
                        "Request too large: it may use {tokens} tokens (prompt + max_tokens) \
                         but this key allows {} tokens per minute.",
                        b.cap
                    ),
                    b.until_full(),
                    info(st),
                ));
            }
            let wait = b.wait_for(tokens as f64);
            if !wait.is_zero() {
                return Err(limited(
                    format!(
                        "Rate limit reached: {} tokens per minute (this request reserves {tokens}).",
                        b.cap
                    ),
                    wait,
                    info(st),
                ));
            }
        }
        if let Some(b) = &mut st.rpm {
            b.level -= 1.0;
        }
        if let Some(b) = &mut st.tpm {
            b.level -= tokens as f64;
        }
        st.active += 1;
        Ok(info(st))
    }

    /// The request ended: free its concurrency slot and refund tokens it did not use.
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
        let l = Limiter::default();
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
        let l = Limiter::default();
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
