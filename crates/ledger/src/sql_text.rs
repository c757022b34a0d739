//! The writer's SQL, shared by both backends. Parameters are `$1..$n`, numbered in order
//! of first appearance, which PostgreSQL and SQLite both bind by position.

/// Hold: $1 amount, $2 key id.
pub(crate) const HOLD: &str = "UPDATE api_keys SET reserved = reserved + $1 WHERE id = $2
    AND revoked_at IS NULL AND (budget IS NULL OR spent + reserved + $1 <= budget)";
/// Why a hold failed: (revoked 0/1, budget, spent, reserved) of the key.
pub(crate) const KEY_STATE: &str = "SELECT CAST(CASE WHEN revoked_at IS NULL THEN 0 ELSE 1 END
    AS BIGINT), budget, spent, reserved FROM api_keys WHERE id = $1";
/// A key's (budget, spent, reserved).
pub(crate) const BALANCE: &str = "SELECT budget, spent, reserved FROM api_keys WHERE id = $1";
/// Undo a hold: $1 amount, $2 key id.
pub(crate) const UNHOLD: &str = "UPDATE api_keys SET reserved = reserved - $1 WHERE id = $2";
pub(crate) const INSERT: &str = "INSERT INTO reservations (request_id, attempt, node, key_id,
    tenant, model, amount, price_prompt, price_cached, price_completion, state, day, created_at,
    x_request_id)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'open', $11, $12, $13)
    ON CONFLICT (request_id, attempt) DO NOTHING";
pub(crate) const PROGRESS: &str = "UPDATE reservations SET prompt_tokens = $1,
    cached_tokens = $2, completion_tokens = $3
    WHERE request_id = $4 AND attempt = $5 AND state = 'open'";
pub(crate) const HELD: &str = "SELECT key_id, amount, price_prompt, price_cached,
    price_completion FROM reservations WHERE request_id = $1 AND attempt = $2 AND state = 'open'";
pub(crate) const SETTLE: &str = "UPDATE reservations SET state = $1, outcome = $2,
    prompt_tokens = $3, cached_tokens = $4, completion_tokens = $5, cost = $6, settled_at = $7
    WHERE request_id = $8 AND attempt = $9 AND state = 'open'";
/// $1 held amount, $2 cost, $3 key id.
pub(crate) const CHARGE: &str =
    "UPDATE api_keys SET reserved = reserved - $1, spent = spent + $2 WHERE id = $3";

/// `confirmed` when anything was served, else `released`.
pub(crate) fn settled_state(usage: &crate::model::TokenUsage) -> &'static str {
    if usage.is_empty() {
        "released"
    } else {
        "confirmed"
    }
}

/// The refusal for a hold that failed, from the key's state (`KEY_STATE`).
pub(crate) fn hold_failure(
    r: &crate::model::Reservation,
    needed: tokenfab_types::NanoUsd,
    key: Option<(i64, Option<i64>, i64, i64)>,
) -> crate::store::LedgerError {
    use crate::store::LedgerError;
    use tokenfab_types::NanoUsd;
    let n = |v: i64| NanoUsd(u64::try_from(v).unwrap_or(0));
    match key {
        None => LedgerError::UnknownKey(r.key_id.clone()),
        Some((revoked, ..)) if revoked != 0 => LedgerError::Revoked(r.key_id.clone()),
        Some((_, budget, spent, reserved)) => LedgerError::InsufficientBudget {
            needed,
            remaining: budget.map_or(NanoUsd(0), |b| n(b) - n(spent) - n(reserved)),
        },
    }
}
