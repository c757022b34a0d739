//! `/dashboard`: a live page served by the binary (one embedded HTML file, no build step,
//! no external assets) and `/dashboard/data`, the JSON it polls every two seconds.
//!
//! The data is read from the same registry `/metrics` exposes (one source of truth), the
//! engine's snapshot, the ledger (top tenants) and the gateway's ring of recent errors.
//! When the server uses API keys, `/dashboard/data` needs the admin key (the page asks for
//! it and keeps it in the tab's session storage; `#key=…` in the URL also works); in open
//! local mode it is open like everything else.

use crate::auth::AuthMode;
use crate::error::ApiError;
use crate::meter::unix_now;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus::proto::{MetricFamily, MetricType};
use serde_json::{json, Value};
use tokenfab_ledger::{GroupBy, UsageQuery};
use tokenfab_types::ErrorCode;

const PAGE: &str = include_str!("../assets/dashboard.html");

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(page))
        // Browsers ask for it with every page; answering keeps 404s out of "recent errors".
        .route(
            "/favicon.ico",
            get(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route(
            "/dashboard/data",
            get(data).route_layer(axum::middleware::from_fn_with_state(state, guard)),
        )
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if matches!(s.auth, AuthMode::Open) {
        return next.run(req).await;
    }
    match &s.admin {
        None => ApiError::new(
            ErrorCode::NotFound,
            "The dashboard's data needs the admin key, and this server has none \
             (`--admin-key` or TOKENFAB_ADMIN_KEY).",
        )
        .into_response(),
        Some(admin) => match admin.check(req.headers()) {
            Ok(()) => next.run(req).await,
            Err(e) => e.into_response(),
        },
    }
}

/// Sum of every sample of counter or gauge `name` whose labels include `want`.
fn sum(families: &[MetricFamily], name: &str, want: &[(&str, &str)]) -> f64 {
    families
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter().map(move |m| (f.get_field_type(), m)))
        .filter(|(_, m)| {
            want.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|(t, m)| match t {
            MetricType::COUNTER => m.get_counter().get_value(),
            MetricType::GAUGE => m.get_gauge().get_value(),
            _ => 0.0,
        })
        .sum()
}

/// Cumulative buckets `[[le, count], …]` of histogram `name`, summed over its label sets
/// (the page differences two polls to get an interval's quantiles).
fn buckets(families: &[MetricFamily], name: &str) -> Vec<(f64, u64)> {
    let mut out: Vec<(f64, u64)> = Vec::new();
    for m in families
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
    {
        let h = m.get_histogram();
        let mut series: Vec<(f64, u64)> = h
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        series.push((f64::INFINITY, h.get_sample_count()));
        if out.is_empty() {
            out = series;
        } else {
            for (o, s) in out.iter_mut().zip(series) {
                o.1 += s.1;
            }
        }
    }
    out
}

async fn data(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let f = s.registry.gather();
    let mut workers = Vec::new();
    if let Some(e) = &s.engine {
        let engine = e.snapshot();
        workers.push(json!({
            "name": s.config.node,
            "kind": "local engine",
            "model": s.model,
            "status": "ok",
            "running": engine.running,
            "waiting": engine.waiting.iter().sum::<u32>(),
            "kv_used": engine.kv_blocks_used,
            "kv_total": engine.kv_blocks_total,
            "cached_seqs": engine.cached_seqs,
        }));
    }
    if let Some(f) = &s.fleet {
        if let Value::Array(remote) = fleet_workers(f) {
            workers.extend(remote.into_iter().filter(|w| w["kind"] != "local engine"));
        }
    }
    let counter = |name: &str, want: &[(&str, &str)]| sum(&f, name, want) as u64;
    let outcome = |o: &str| counter("tokenfab_gateway_requests_total", &[("outcome", o)]);
    let kind = |k: &str| counter("tokenfab_gateway_tokens_total", &[("kind", k)]);
    let tenants = match s
        .ledger
        .usage(&UsageQuery {
            tenant: None,
            key_id: None,
            since: None,
            group_by: GroupBy::Tenant,
        })
        .await
    {
        Ok(mut rows) => {
            rows.sort_by_key(|r| std::cmp::Reverse(r.prompt_tokens + r.completion_tokens));
            rows.truncate(10);
            rows.iter()
                .map(|r| {
                    json!({"tenant": r.group, "requests": r.requests,
                        "tokens": r.prompt_tokens + r.completion_tokens,
                        "cost_nano_usd": r.cost_nano_usd})
                })
                .collect()
        }
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: ledger usage unavailable");
            Vec::new()
        }
    };
    // `now_ms` drives the page's rates.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let bucket_json = |name: &str| -> Vec<Value> {
        buckets(&f, name)
            .into_iter()
            .map(|(le, c)| {
                json!([
                    if le.is_finite() {
                        json!(le)
                    } else {
                        json!("+Inf")
                    },
                    c
                ])
            })
            .collect()
    };
    Ok(Json(json!({
        "now_ms": now_ms,
        "model": s.served().join(", "),
        "node": s.config.node,
        "uptime_s": u64::try_from(unix_now()).unwrap_or(0).saturating_sub(s.started),
        "workers": workers,
        "counters": {
            "requests_completed": outcome("completed"),
            "requests_failed": outcome("failed"),
            "requests_cancelled": outcome("cancelled"),
            "tokens_prompt": kind("prompt"),
            "tokens_cached": kind("cached"),
            "tokens_completion": kind("completion"),
            "cost_nano_usd": counter("tokenfab_gateway_cost_nano_usd_total", &[]),
            "prefix_queries": counter("vllm:prefix_cache_queries_total", &[]),
            "prefix_hits": counter("vllm:prefix_cache_hits_total", &[]),
        },
        "ttft_buckets": bucket_json("tokenfab_gateway_time_to_first_token_seconds"),
        "tenants": tenants,
        "errors": s.metrics.recent_errors(),
    })))
}

/// The fleet's workers as the router sees them (`/health`, the dashboard).
pub fn fleet_workers(f: &tokenfab_fleet::Fleet) -> Value {
    let now = std::time::Instant::now();
    f.members()
        .iter()
        .map(|m| {
            let remote = m.remote();
            json!({
                "name": m.name,
                "kind": if remote.is_some() { "remote" } else { "local engine" },
                "url": remote.map(|r| r.spec.url.clone()),
                "model": m.models.join(", "),
                "accelerator": m.accelerator,
                "tier": m.tier,
                "status": if m.routable(now) { "ok" } else { "ejected" },
                "running": m.outstanding(),
                // From the worker's health answer (tokenfab workers report it).
                "kv_pct": remote.map(|_| f64::from(m.kv_permille()) / 10.0),
            })
        })
        .collect()
}
