//! The ledger's records: API keys, reservations, settlements and usage rows.

use crate::price::Price;
use serde::Serialize;
use tokenfab_types::{Band, NanoUsd, TenantId, Tokens};

/// What `keys create` asks for. Limits are per key; `None` means unlimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    pub tenant: TenantId,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_concurrency: Option<u64>,
    pub budget: Option<NanoUsd>,
    pub priority: Band,
    pub weight: u32,
    /// Answer this key's deterministic requests from the response cache by default
    /// (a request's `x-tokenfab-cache: off` still opts out).
    pub response_cache: bool,
}

impl KeySpec {
    pub fn new(tenant: TenantId) -> Self {
        KeySpec {
            tenant,
            rpm: None,
            tpm: None,
            max_concurrency: None,
            budget: None,
            priority: Band::Standard,
            weight: 1,
            response_cache: false,
        }
    }
}

/// A stored API key. The secret itself is never stored, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    /// Public identifier (also embedded in the secret), e.g. `k3f9a0c1d2e4b`.
    pub id: String,
    pub tenant: TenantId,
    #[serde(skip)]
    pub hash: [u8; 32],
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_concurrency: Option<u64>,
    /// Budget in nano-USD; `None` = no budget.
    pub budget: Option<NanoUsd>,
    /// Confirmed spend.
    pub spent: NanoUsd,
    /// Held by open reservations.
    pub reserved: NanoUsd,
    pub priority: Band,
    pub weight: u32,
    /// Response cache on by default for this key's requests.
    pub response_cache: bool,
    /// Unix seconds.
    pub created_at: i64,
    pub revoked: bool,
}

impl KeyRecord {
    /// Budget left for new reservations (`None` = unlimited).
    pub fn remaining(&self) -> Option<NanoUsd> {
        self.budget.map(|b| b - self.spent - self.reserved)
    }
}

/// A reservation's identity: each attempt of a request holds at most one, and each ends
/// exactly once.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptId {
    pub request_id: String,
    pub attempt: u32,
}

impl AttemptId {
    pub fn new(request_id: impl Into<String>, attempt: u32) -> Self {
        AttemptId {
            request_id: request_id.into(),
            attempt,
        }
    }
}

/// Tokens of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TokenUsage {
    pub prompt: Tokens,
    /// Of `prompt`, how many were served from the prefix cache.
    pub cached: Tokens,
    pub completion: Tokens,
}

impl TokenUsage {
    pub fn is_empty(&self) -> bool {
        self.prompt.0 == 0 && self.completion.0 == 0
    }
}

/// TRY: hold the worst-case cost of a request against its key's budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub id: AttemptId,
    /// The process that owns it; a restart of the same node resolves what it left open.
    pub node: String,
    pub key_id: String,
    pub tenant: TenantId,
    pub model: String,
    /// Prompt tokens and `max_tokens`: the most the request can use.
    pub prompt: Tokens,
    pub max_completion: Tokens,
    /// The price the request is billed at, fixed at admission.
    pub price: Price,
    /// Unix seconds.
    pub now: i64,
    /// The request's `x-request-id` (the client's, or the one the gateway gave it), to
    /// find its row from logs and traces.
    pub x_request_id: Option<String>,
}

impl Reservation {
    /// The amount held: the cost of the whole prompt uncached plus `max_completion`.
    pub fn amount(&self) -> NanoUsd {
        self.price.worst_case(self.prompt, self.max_completion)
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Finished normally.
    Completed,
    /// The client went away; what was generated is billed.
    Cancelled,
    /// Failed after admission; what was generated is billed.
    Failed,
    /// Left open by a crash and resolved at the next start from recorded progress.
    Recovered,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
            Outcome::Recovered => "recovered",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        [
            Outcome::Completed,
            Outcome::Cancelled,
            Outcome::Failed,
            Outcome::Recovered,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// CONFIRM (usage > 0) or CANCEL (usage empty): end a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settlement {
    pub usage: TokenUsage,
    pub outcome: Outcome,
    /// Unix seconds.
    pub now: i64,
}

impl Settlement {
    /// How a restart ends a reservation its node left open: at its recorded progress.
    pub fn recovered(usage: TokenUsage, now: i64) -> Self {
        Settlement {
            usage,
            outcome: Outcome::Recovered,
            now,
        }
    }
}

/// What settling charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settled {
    pub cost: NanoUsd,
    /// The amount that had been held (now released).
    pub held: NanoUsd,
}

/// What a restart resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Confirmed from recorded progress.
    pub confirmed: u64,
    /// Nothing had been served: released.
    pub released: u64,
}

impl Recovery {
    /// Count one reservation resolved at `usage`.
    pub fn count(&mut self, usage: &TokenUsage) {
        if usage.is_empty() {
            self.released += 1;
        } else {
            self.confirmed += 1;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Model,
    Day,
    Key,
    Tenant,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        match s {
            "model" => Some(GroupBy::Model),
            "day" => Some(GroupBy::Day),
            "key" => Some(GroupBy::Key),
            "tenant" => Some(GroupBy::Tenant),
            _ => None,
        }
    }
}

/// Which settled requests to sum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageQuery {
    pub tenant: Option<TenantId>,
    pub key_id: Option<String>,
    /// Unix seconds, inclusive.
    pub since: Option<i64>,
    pub group_by: GroupBy,
}

/// One group of settled requests. Ordered by `group`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    pub group: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub cost_nano_usd: u64,
}

/// The UTC calendar day (`YYYY-MM-DD`) of a unix time, as the SQL stores group it.
pub fn utc_day(unix: i64) -> String {
    // Civil-from-days (H. Hinnant's algorithm), valid for the proleptic Gregorian calendar.
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Unix seconds at 00:00 UTC of a `YYYY-MM-DD` day; `None` if it is not a real date.
pub fn parse_day(s: &str) -> Option<i64> {
    let mut it = s.splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || s.len() != 10 {
        return None;
    }
    // Days-from-civil (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let unix = (era * 146_097 + doe - 719_468) * 86_400;
    // Reject days that do not exist (2026-02-30): they do not round-trip.
    (utc_day(unix) == s).then_some(unix)
}

/// What `--since` / `?since=` accept: a `YYYY-MM-DD` day (UTC) or unix seconds.
pub fn parse_since(s: &str) -> Option<i64> {
    parse_day(s).or_else(|| s.parse::<i64>().ok().filter(|v| *v >= 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_round_trip() {
        assert_eq!(parse_day("2026-11-23"), Some(1_795_392_000));
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2000-02-29"), Some(951_782_400));
        assert_eq!(parse_day("2026-02-30"), None);
        assert_eq!(parse_day("2026-1-3"), None);
        assert_eq!(parse_since("1795392000"), Some(1_795_392_000));
        assert_eq!(parse_since("yesterday"), None);
    }

    #[test]
    fn utc_days() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(951_782_400), "2000-02-29");
        assert_eq!(utc_day(1_795_478_399), "2026-11-23");
    }
}
