//! `/admin/v1/*` (keys and usage of every tenant, behind the admin key) and `/v1/usage`
//! (a tenant's own usage, with its own key).

use crate::auth::AuthMode;
use crate::auth::{Caller, KeyCache};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::meter::unix_now;
use crate::state::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use tokenfab_ledger::{parse_since, GroupBy, KeyRecord, KeySpec, UsageQuery};
use tokenfab_types::{Band, ErrorCode, TenantId};

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin/v1/keys", post(create_key).get(list_keys))
        .route("/admin/v1/keys/{id}", delete(revoke_key))
        .route("/admin/v1/keys/{id}/rotate", post(rotate_key))
        .route("/admin/v1/usage", get(all_usage))
        .route_layer(axum::middleware::from_fn_with_state(state, require_admin))
}

async fn require_admin(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match &s.admin {
        None => ApiError::new(
            ErrorCode::NotFound,
            "The admin API is disabled: start the server with an admin key \
             (`--admin-key` or TOKENFAB_ADMIN_KEY).",
        )
        .into_response(),
        Some(admin) => match admin.check(req.headers()) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        },
    }
}

/// What a new key should allow: the body of `POST /admin/v1/keys` and the flags of
/// `tokenfab keys create`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyParams {
    pub tenant: String,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_concurrency: Option<u64>,
    pub budget_usd: Option<f64>,
    pub priority: Option<String>,
    pub weight: Option<u32>,
    /// Response cache on by default for the key's requests.
    #[serde(default)]
    pub response_cache: bool,
}

/// A key spec from its parameters, checked.
pub fn key_spec(p: &KeyParams) -> Result<KeySpec, ApiError> {
    let tenant = p.tenant.as_str();
    let tenant_ok = (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !tenant_ok {
        return Err(ApiError::invalid(
            "tenant",
            "tenant must be 1-64 characters of [A-Za-z0-9._-]",
        ));
    }
    let mut spec = KeySpec::new(TenantId(tenant.to_owned()));
    spec.rpm = p.rpm;
    spec.tpm = p.tpm;
    spec.max_concurrency = p.max_concurrency;
    spec.response_cache = p.response_cache;
    if let Some(b) = p.budget_usd {
        spec.budget =
            Some(tokenfab_ledger::usd(b).map_err(|e| ApiError::invalid("budget_usd", e))?);
    }
    if let Some(band) = &p.priority {
        spec.priority = Band::parse(band).ok_or_else(|| {
            ApiError::invalid(
                "priority",
                "priority must be interactive, standard or batch",
            )
        })?;
    }
    if let Some(w) = p.weight {
        if !(1..=1000).contains(&w) {
            return Err(ApiError::invalid("weight", "weight must be 1-1000"));
        }
        spec.weight = w;
    }
    Ok(spec)
}

fn key_json(k: &KeyRecord, secret: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::to_value(k).unwrap_or_default();
    if let (Some(secret), Some(obj)) = (secret, v.as_object_mut()) {
        obj.insert("key".into(), secret.into());
    }
    v
}

async fn create_key(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<KeyParams>,
) -> Result<Response, ApiError> {
    let spec = key_spec(&req)?;
    let (rec, text) = tokenfab_ledger::issue_key(s.ledger.as_ref(), &spec, unix_now()).await?;
    Ok((StatusCode::CREATED, Json(key_json(&rec, Some(&text)))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFilter {
    tenant: Option<String>,
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("Invalid query: {e}")))
}

async fn list_keys(
    State(s): State<AppState>,
    q: Result<Query<KeyFilter>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let f = query(q)?;
    let tenant = f.tenant.map(TenantId);
    let keys = s.ledger.list_keys(tenant.as_ref()).await?;
    let data: Vec<_> = keys.iter().map(|k| key_json(k, None)).collect();
    Ok(Json(serde_json::json!({ "object": "list", "data": data })))
}

fn forget(s: &AppState, id: &str) {
    if let AuthMode::Keys(cache) = &s.auth {
        KeyCache::invalidate(cache, id);
    }
}

async fn revoke_key(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !s.ledger.revoke_key(&id, unix_now()).await? {
        return Err(ApiError::new(ErrorCode::NotFound, format!("No key {id}.")));
    }
    forget(&s, &id);
    Ok(Json(serde_json::json!({ "id": id, "revoked": true })))
}

async fn rotate_key(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(text) = tokenfab_ledger::rotate_key(s.ledger.as_ref(), &id).await? else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("No live key {id}."),
        ));
    };
    forget(&s, &id);
    Ok(Json(serde_json::json!({ "id": id, "key": text })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    tenant: Option<String>,
    key: Option<String>,
    since: Option<String>,
    group_by: Option<String>,
}

fn usage_query(p: UsageParams, tenant: Option<TenantId>) -> Result<UsageQuery, ApiError> {
    let since = match p.since.as_deref() {
        None => None,
        Some(s) => Some(parse_since(s).ok_or_else(|| {
            ApiError::invalid("since", "since must be YYYY-MM-DD (UTC) or unix seconds")
        })?),
    };
    let group_by = match p.group_by.as_deref() {
        None => GroupBy::Model,
        Some(g) => GroupBy::parse(g).ok_or_else(|| {
            ApiError::invalid("group_by", "group_by must be model, day, key or tenant")
        })?,
    };
    Ok(UsageQuery {
        tenant: tenant.or(p.tenant.map(TenantId)),
        key_id: p.key,
        since,
        group_by,
    })
}

async fn all_usage(
    State(s): State<AppState>,
    q: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = usage_query(query(q)?, None)?;
    let rows = s.ledger.usage(&q).await?;
    Ok(Json(serde_json::json!({ "object": "list", "data": rows })))
}

/// `GET /v1/usage`: the caller's own tenant only, whatever `tenant` it names.
pub async fn own_usage(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let params = query(q)?;
    let Some(key) = caller.0 else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "Usage is metered per API key; this server runs in local mode without keys.",
        ));
    };
    if params.tenant.as_ref().is_some_and(|t| t != &key.tenant.0) {
        return Err(ApiError::new(
            ErrorCode::PermissionDenied,
            "A key may read only its own tenant's usage.",
        ));
    }
    let q = usage_query(params, Some(key.tenant.clone()))?;
    let rows = s.ledger.usage(&q).await?;
    Ok(Json(serde_json::json!({ "object": "list", "data": rows })))
}
