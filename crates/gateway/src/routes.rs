//! Routes and thin handlers.

use crate::admin;
use crate::auth::{self, Caller};
use crate::cache;
use crate::dispatch::{self, Job};
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::idempotency;
use crate::limits::RateInfo;
use crate::metrics::track;
use crate::output::Started;
use crate::state::AppState;
use crate::stream::{self, Kind};
use crate::trace::XRequestId;
use crate::validate::{self, Spec};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Extension, Json, Router};
use tokenfab_api::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
    CompletionChoice, CompletionRequest, Model, ModelList,
};
use tokenfab_engine::ChatTurn;
use tokenfab_fleet::Endpoint;
use tokenfab_types::{ErrorCode, TokenId};

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/usage", get(admin::own_usage))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    Router::new()
        .merge(v1)
        .merge(admin::routes(state.clone()))
        .merge(crate::dashboard::routes(state.clone()))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.metrics.clone(), track))
        .layer(middleware::from_fn(crate::trace::identify))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "No such route.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "Method not allowed on this route.",
    )
}

/// Liveness plus load: the local engine's (a gateway routing to this process reads its
/// KV use from here) and, on a routing gateway, each worker's state.
async fn health(State(s): State<AppState>) -> Response {
    let mut body = serde_json::json!({ "status": "ok", "model": s.model });
    if let Some(e) = &s.engine {
        let snap = e.snapshot();
        body["running"] = snap.running.into();
        body["waiting"] = snap.waiting.iter().sum::<u32>().into();
        body["kv_blocks_used"] = snap.kv_blocks_used.into();
        body["kv_blocks_total"] = snap.kv_blocks_total.into();
        body["cached_seqs"] = snap.cached_seqs.into();
    }
    if let Some(f) = &s.fleet {
        body["workers"] = crate::dashboard::fleet_workers(f);
    }
    Json(body).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    // Read at scrape time; a slow ledger leaves the last value rather than stall scrapes.
    let open = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        s.ledger.open_reservations(),
    )
    .await;
    if let Ok(Ok(n)) = open {
        s.metrics
            .open_reservations
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let families = s.registry.gather();
    match prometheus::TextEncoder::new().encode_to_string(&families) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => ApiError::new(ErrorCode::Internal, format!("metrics encoding failed: {e}"))
            .into_response(),
    }
}

async fn models(State(s): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: s
            .served()
            .into_iter()
            .map(|id| Model {
                id,
                object: "model".into(),
                created: s.started,
                owned_by: "tokenfab".into(),
            })
            .collect(),
    })
}

/// Rate-limit headers on a successful response (`x-request-id` is set on every response
/// by `trace::identify`).
fn decorate(mut resp: Response, rate: Option<&RateInfo>, worker: Option<&str>) -> Response {
    if let Some(rate) = rate {
        rate.write(resp.headers_mut());
    }
    if let Some(v) = worker.and_then(|w| HeaderValue::from_str(w).ok()) {
        resp.headers_mut().insert("x-tokenfab-worker", v);
    }
    resp
}

/// The prompt as the local model sees it (template rendered, tokens) when this process's
/// engine may serve `model`, else the conversation as plain text (a remote worker applies
/// its own template; the text sizes the reservation and keys prefix routing).
fn chat_prompt(
    s: &AppState,
    model: &str,
    turns: &[ChatTurn],
) -> Result<(String, Option<Vec<TokenId>>), ApiError> {
    if !local_may_serve(s, model) {
        let text = turns
            .iter()
            .map(|t| format!("{}: {}\n", t.role, t.content))
            .collect();
        return Ok((text, None));
    }
    let text = s
        .tokenizer
        .render_chat(turns)
        .map_err(|e| ApiError::invalid("messages", format!("chat template failed: {e}")))?;
    let tokens = s.tokenizer.encode(&text);
    Ok((text, Some(tokens)))
}

/// Whether the local engine may end up serving a request for `model` (itself, or an
/// alias that may resolve to it).
fn local_may_serve(s: &AppState, model: &str) -> bool {
    s.engine.is_some()
        && (model == s.model
            || s.fleet
                .as_ref()
                .is_some_and(|f| f.may_resolve_to(model, &s.model)))
}

fn body_of<T: serde::Serialize>(req: &T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(req).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

async fn chat(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<XRequestId>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("gen_ai.operation.name", "chat");
    let (turns, spec) = validate::chat(&req, &s)?;
    let (claim, cached) = match before(&s, &caller, &headers, &req, &spec).await? {
        Before::Answer(resp) => return Ok(resp),
        Before::Run { claim, cached } => (claim, cached),
    };
    let (text, tokens) = chat_prompt(&s, &req.model, &turns)?;
    let job = Job {
        endpoint: Endpoint::Chat,
        model: req.model.clone(),
        text,
        tokens,
        body: body_of(&req)?,
        spec: spec.clone(),
    };
    let id = response_id("chatcmpl");
    let (started, attempts) = dispatch::start(&s, &headers, &caller, (&id, &rid.0), job).await?;
    let model = attempts.model().to_owned();
    if spec.stream {
        return Ok(streamed(
            (Kind::Chat, &id, model),
            &spec,
            started,
            claim,
            &cached,
        ));
    }
    let c = attempts.collect(started).await?;
    let body = ChatCompletion {
        id: id.clone(),
        object: "chat.completion".into(),
        created: stream::unix_now(),
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content: c.text,
            },
            finish_reason: c.finish_reason.into(),
            logprobs: None,
        }],
        usage: c.usage,
    };
    let resp = respond(&s, &body, claim, &cached).await?;
    Ok(decorate(resp, c.rate.as_ref(), c.worker.as_deref()))
}

async fn completions(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<XRequestId>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("gen_ai.operation.name", "text_completion");
    let (text, spec) = validate::completion(&req, &s)?;
    let (claim, cached) = match before(&s, &caller, &headers, &req, &spec).await? {
        Before::Answer(resp) => return Ok(resp),
        Before::Run { claim, cached } => (claim, cached),
    };
    let tokens = local_may_serve(&s, &req.model).then(|| s.tokenizer.encode(&text));
    let job = Job {
        endpoint: Endpoint::Completions,
        model: req.model.clone(),
        text,
        tokens,
        body: body_of(&req)?,
        spec: spec.clone(),
    };
    let id = response_id("cmpl");
    let (started, attempts) = dispatch::start(&s, &headers, &caller, (&id, &rid.0), job).await?;
    let model = attempts.model().to_owned();
    if spec.stream {
        return Ok(streamed(
            (Kind::Text, &id, model),
            &spec,
            started,
            claim,
            &cached,
        ));
    }
    let c = attempts.collect(started).await?;
    let body = Completion {
        id: id.clone(),
        object: "text_completion".into(),
        created: stream::unix_now(),
        model,
        choices: vec![CompletionChoice {
            index: 0,
            text: c.text,
            finish_reason: Some(c.finish_reason.into()),
            logprobs: None,
        }],
        usage: Some(c.usage),
    };
    let resp = respond(&s, &body, claim, &cached).await?;
    Ok(decorate(resp, c.rate.as_ref(), c.worker.as_deref()))
}

/// What is decided before a request runs: answer at once (an idempotent replay, a cache
/// hit), or run it holding its idempotency claim and cache lookup.
enum Before {
    Answer(Response),
    Run {
        claim: Option<idempotency::Claim>,
        cached: cache::Lookup,
    },
}

async fn before<T: serde::Serialize>(
    s: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    req: &T,
    spec: &Spec,
) -> Result<Before, ApiError> {
    let claim = match idempotency::claim(s, caller, headers, req).await? {
        idempotency::Outcome::Replay(resp) => return Ok(Before::Answer(resp)),
        idempotency::Outcome::Run(c) => Some(c),
        idempotency::Outcome::None => None,
    };
    let cached = s.cache.lookup(caller, &s.model, headers, req, spec)?;
    if let cache::Lookup::Hit(body) = cached {
        return Ok(Before::Answer(cache::hit(body)));
    }
    Ok(Before::Run { claim, cached })
}

/// The SSE response of a started request.
fn streamed(
    (kind, id, model): (Kind, &str, String),
    spec: &Spec,
    started: Started,
    claim: Option<idempotency::Claim>,
    cached: &cache::Lookup,
) -> Response {
    let rate = started.out.meter().rate.clone();
    let worker = started.worker.clone();
    let resp = stream::sse(
        kind,
        id.to_owned(),
        model,
        spec.include_usage,
        started,
        claim,
    );
    let mut resp = decorate(resp, rate.as_ref(), worker.as_deref());
    cache::mark(&mut resp, cached);
    resp
}

/// A JSON response, stored first under its idempotency claim (if any) and in the
/// response cache (on a miss).
async fn respond<T: serde::Serialize>(
    s: &AppState,
    body: &T,
    claim: Option<idempotency::Claim>,
    cached: &cache::Lookup,
) -> Result<Response, ApiError> {
    let bytes =
        serde_json::to_vec(body).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    if let Some(c) = claim {
        c.complete(&bytes).await?;
    }
    if let cache::Lookup::Miss(key) = cached {
        s.cache.store(*key, &bytes);
    }
    let mut resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response();
    cache::mark(&mut resp, cached);
    Ok(resp)
}

/// A new response id, `<prefix>-<uuid>`. Time-ordered (UUID v7): the id is also the
/// ledger row's key, and ids that grow keep each group commit's index writes on the
/// B-tree's last page instead of one random page per request (measured: the writer's
/// fsync and pwrite time is what bounds the keyed gateway's throughput).
fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}
