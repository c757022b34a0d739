//! Rate-limit counters in Redis, shared by every gateway replica that points at it.
//!
//! One Lua script per admission refills the key's buckets on Redis's clock (`TIME`, so
//! replicas' clocks do not matter), applies the same checks in the same order as
//! [`refusal`](crate::limits::refusal) and takes everything or nothing — atomic, because
//! Redis runs a script alone. Concurrency is a sorted set of leases (request id → expiry),
//! so a replica that dies without releasing frees its slots when their leases run out
//! ([`LEASE`]). Keys share a hash tag, so the script stays on one slot of a Redis Cluster.
//!
//! If Redis cannot be reached the request is admitted and the failure logged: rate limits
//! protect capacity, while money is guarded exactly by the ledger, which does not depend
//! on Redis.

use crate::error::ApiError;
use crate::limits::{refusal, Level, Levels, RateInfo};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use std::time::Duration;
use tokenfab_ledger::KeyRecord;

/// How long a concurrency slot outlives a replica that died holding it; also the longest
/// request a slot is counted for.
pub const LEASE: Duration = Duration::from_secs(15 * 60);

/// KEYS: bucket hash, lease set. ARGV: rpm cap, tpm cap, max concurrency (each -1 when
/// unlimited), tokens, request id, lease ms.
/// Returns {refusal (0 none, 1 concurrency, 2 requests, 3 too large, 4 tokens),
/// rpm level, tpm level (as strings; "-1" when unlimited), active}.
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local function level(name, cap)
  if cap < 0 then return nil end
  local v = redis.call('HMGET', KEYS[1], name .. '_level', name .. '_at', name .. '_cap')
  local lvl, at, old = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  if lvl == nil then return cap end
  if old ~= cap then lvl = math.min(lvl, cap) end
  return math.min(cap, lvl + math.max(0, now - at) * cap / 60000)
end
local rl, tl = level('rpm', rpm), level('tpm', tpm)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local active = redis.call('ZCARD', KEYS[2])
local refused = 0
if conc >= 0 and active >= conc then refused = 1
elseif rl and rl < 1 then refused = 2
elseif tl and tokens > tpm then refused = 3
elseif tl and tl < tokens then refused = 4 end
if refused == 0 then
  if rl then rl = rl - 1 end
  if tl then tl = tl - tokens end
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[6]))
  active = active + 1
end
if rl then redis.call('HSET', KEYS[1], 'rpm_level', tostring(rl), 'rpm_at', now, 'rpm_cap', rpm) end
if tl then redis.call('HSET', KEYS[1], 'tpm_level', tostring(tl), 'tpm_at', now, 'tpm_cap', tpm) end
-- An idle key's buckets are full again after a minute: its state can go.
redis.call('PEXPIRE', KEYS[1], 120000)
return {refused, tostring(rl or -1), tostring(tl or -1), active}
"#;

/// KEYS: bucket hash, lease set. ARGV: request id, tokens to refund, tpm cap.
const RELEASE: &str = r#"
redis.call('ZREM', KEYS[2], ARGV[1])
local refund = tonumber(ARGV[2])
if refund > 0 then
  local v = redis.call('HGET', KEYS[1], 'tpm_level')
  if v then
    local lvl = math.min(tonumber(ARGV[3]), tonumber(v) + refund)
    redis.call('HSET', KEYS[1], 'tpm_level', tostring(lvl))
  end
end
return 1
"#;

pub struct RedisLimits {
    conn: ConnectionManager,
    acquire: Script,
    release: Script,
}

fn keys(key_id: &str) -> (String, String) {
    (
        format!("tokenfab:rl:{{{key_id}}}"),
        format!("tokenfab:rl:{{{key_id}}}:active"),
    )
}

fn cap(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

impl RedisLimits {
    pub async fn connect(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("rate limits: {url}: {e}"))?;
        // Bounded waits everywhere: a Redis that is down or stalls costs a request at most
        // the response timeout before it is admitted without counters.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_millis(500))
            .set_number_of_retries(2)
            .set_max_delay(1000);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| format!("rate limits: cannot reach Redis at {url}: {e}"))?;
        Ok(RedisLimits {
            conn,
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
        })
    }

    pub async fn acquire(
        &self,
        key: &KeyRecord,
        tokens: u64,
        request_id: &str,
    ) -> Result<RateInfo, ApiError> {
        let (buckets, leases) = keys(&key.id);
        let mut conn = self.conn.clone();
        let reply: redis::RedisResult<(i64, String, String, u64)> = self
            .acquire
            .key(&buckets)
            .key(&leases)
            .arg(cap(key.rpm))
            .arg(cap(key.tpm))
            .arg(cap(key.max_concurrency))
            .arg(tokens)
            .arg(request_id)
            .arg(LEASE.as_millis() as u64)
            .invoke_async(&mut conn)
            .await;
        let (refused, rpm, tpm, active) = match reply {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, key = %key.id, "rate limits unavailable (Redis); admitting without them");
                return Ok(RateInfo::default());
            }
        };
        let level = |cap: Option<u64>, level: &str| {
            cap.map(|c| Level {
                cap: c as f64,
                level: level.parse().unwrap_or(0.0),
            })
        };
        let levels = Levels {
            rpm: level(key.rpm, &rpm),
            tpm: level(key.tpm, &tpm),
            active,
        };
        if refused == 0 {
            return Ok(levels.info());
        }
        // The script refused with the levels it found; the same rule names the reason.
        match refusal(&levels, tokens, key.max_concurrency) {
            Some(r) => Err(r.error(&levels, tokens, key)),
            None => {
                // Only reachable if the script and `refusal` disagree: refuse, plainly.
                tracing::error!(refused, key = %key.id, "rate-limit script and rule disagree");
                Err(crate::limits::Refusal::Requests.error(&levels, tokens, key))
            }
        }
    }

    pub async fn release(&self, key: &KeyRecord, request_id: &str, refund_tokens: u64) {
        let (buckets, leases) = keys(&key.id);
        let mut conn = self.conn.clone();
        let done: redis::RedisResult<i64> = self
            .release
            .key(&buckets)
            .key(&leases)
            .arg(request_id)
            .arg(refund_tokens)
            .arg(cap(key.tpm))
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, key = %key.id, "releasing a rate-limit slot in Redis failed; its lease frees it");
        }
    }
}
