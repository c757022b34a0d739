//! Routes and thin handlers.

use crate::admin;
use crate::auth::{self, Caller};
use crate::cache;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::idempotency;
use crate::limits::RateInfo;
use crate::meter::{self, Meter};
use crate::metrics::track;
use crate::output::{Piece, Started, TextOutput};
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
use tokenfab_engine::{Band, GenerateRequest, Slo};
use tokenfab_ledger::Outcome;
use tokenfab_types::{ErrorCode, TenantId, TokenId, Tokens};
use tracing::Instrument;

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

async fn health(State(s): State<AppState>) -> Response {
    let snap = s.engine.snapshot();
    Json(serde_json::json!({
        "status": "ok",
        "model": s.model,
        "running": snap.running,
        "waiting": snap.waiting.iter().sum::<u32>(),
        "kv_blocks_used": snap.kv_blocks_used,
        "kv_blocks_total": snap.kv_blocks_total,
        "cached_seqs": snap.cached_seqs,
    }))
    .into_response()
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
        data: vec![Model {
            id: s.model.clone(),
            object: "model".into(),
            created: s.started,
            owned_by: "tokenfab".into(),
        }],
    })
}

/// The band a request runs in: the `x-tokenfab-priority` header, else the key's default.
/// A header may lower a key's priority, never raise it.
fn band(headers: &HeaderMap, caller: &Caller) -> Result<Band, ApiError> {
    let default = caller.0.as_ref().map_or(Band::Standard, |k| k.priority);
    let Some(v) = headers.get("x-tokenfab-priority") else {
        return Ok(default);
    };
    let asked = v.to_str().ok().and_then(Band::parse).ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "x-tokenfab-priority must be one of: interactive, standard, batch",
        )
    })?;
    if caller.0.is_some() && asked < default {
        return Err(ApiError::new(
            ErrorCode::PermissionDenied,
            format!(
                "This key may use priority `{}` at most; `{}` was asked.",
                default.as_str(),
                asked.as_str()
            ),
        ));
    }
    Ok(asked)
}

/// `x-tokenfab-cache-scope: NAME` opts into a prefix cache shared by every tenant that
/// names the same scope; without it, cached prefixes stay private to the tenant.
fn cache_scope(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("x-tokenfab-cache-scope") else {
        return Ok(None);
    };
    let ok = |s: &str| {
        (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    match v.to_str() {
        Ok(s) if ok(s) => Ok(Some(s.to_owned())),
        _ => Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "x-tokenfab-cache-scope must be 1-64 characters of [A-Za-z0-9._-]",
        )),
    }
}

/// Admit (limits, budget), submit, and wait for the first piece, so that a rejection
/// becomes an HTTP status instead of an error inside a 200 stream.
async fn start(
    s: &AppState,
    headers: &HeaderMap,
    caller: &Caller,
    (request_id, x_request_id): (&str, &str),
    prompt: Vec<TokenId>,
    spec: &Spec,
) -> Result<Started, ApiError> {
    let band = band(headers, caller)?;
    let cache_scope = cache_scope(headers)?;
    let prompt_tokens = prompt.len() as u64;
    let ctx = s.engine.capacity().max_seq_tokens;
    let max_new = spec
        .max_tokens
        .unwrap_or_else(|| ctx.saturating_sub(prompt_tokens).max(1));
    let (tenant, weight) = caller
        .0
        .as_ref()
        .map_or((TenantId::local(), 1), |k| (k.tenant.clone(), k.weight));
    let span = tracing::Span::current();
    span.record("tenant", tenant.0.as_str());
    span.record("worker", s.config.node.as_str());
    span.record("gen_ai.request.model", s.model.as_str());
    span.record("gen_ai.request.max_tokens", max_new);
    span.record("gen_ai.response.id", request_id);
    let timer = s.metrics.request(&s.model, band, span);
    let mut meter = meter::admit(
        s,
        caller.0.as_ref(),
        (request_id, x_request_id),
        timer,
        prompt_tokens,
        max_new,
    )
    .instrument(tracing::info_span!("admission"))
    .await?;
    let submitted = s.engine.submit(GenerateRequest {
        tenant,
        band,
        weight,
        prompt,
        max_new: Tokens(max_new),
        seed: spec.seed,
        sampling: spec.sampling.clone(),
        slo: Slo::default(),
        cache_scope,
    });
    let generation = match submitted {
        Ok(g) => g,
        Err(e) => return Err(fail(&mut meter, e.into()).await),
    };
    let mut out = TextOutput::new(
        generation,
        s.tokenizer.clone(),
        spec.stop.clone(),
        prompt_tokens,
        meter,
        spec.stream,
    );
    // Pieces come billed: an error here has already been settled.
    match out.next().await {
        Some(Piece::Error(e)) => Err(e),
        Some(first) => Ok(Started { out, first }),
        None => Err(ApiError::new(ErrorCode::Internal, "empty generation")),
    }
}

/// End a request that failed after admission: bill what was served, return the error
/// (or the ledger's, if settling failed).
async fn fail(meter: &mut Meter, e: ApiError) -> ApiError {
    let served = meter.usage();
    match meter.finish(served, Outcome::Failed).await {
        Ok(()) => e,
        Err(le) => le,
    }
}

/// Collect a whole (billed) generation: (text, finish_reason, usage, rate limits).
async fn collect(
    started: Started,
) -> Result<(String, &'static str, tokenfab_api::Usage, Option<RateInfo>), ApiError> {
    let Started { mut out, first } = started;
    let mut text = String::new();
    let mut piece = Some(first);
    while let Some(p) = piece {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::End {
                finish_reason,
                usage,
            } => return Ok((text, finish_reason, usage, out.meter().rate.clone())),
            Piece::Error(e) => return Err(e),
        }
        piece = out.next().await;
    }
    Err(ApiError::new(
        ErrorCode::Internal,
        "generation ended without a result",
    ))
}

/// Rate-limit headers on a successful response (`x-request-id` is set on every response
/// by `trace::identify`).
fn decorate(mut resp: Response, rate: Option<&RateInfo>) -> Response {
    if let Some(rate) = rate {
        rate.write(resp.headers_mut());
    }
    resp
}

async fn chat(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<XRequestId>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("gen_ai.operation.name", "chat");
    let (turns, spec) = validate::chat(&req, &s.model)?;
    let (claim, cached) = match before(&s, &caller, &headers, &req, &spec).await? {
        Before::Answer(resp) => return Ok(resp),
        Before::Run { claim, cached } => (claim, cached),
    };
    let text = s
        .tokenizer
        .render_chat(&turns)
        .map_err(|e| ApiError::invalid("messages", format!("chat template failed: {e}")))?;
    let prompt = s.tokenizer.encode(&text);
    let id = response_id("chatcmpl");
    let started = start(&s, &headers, &caller, (&id, &rid.0), prompt, &spec).await?;
    if spec.stream {
        return Ok(streamed(
            &s,
            (Kind::Chat, &id),
            &spec,
            started,
            claim,
            &cached,
        ));
    }
    let (content, finish_reason, usage, rate) = collect(started).await?;
    let body = ChatCompletion {
        id: id.clone(),
        object: "chat.completion".into(),
        created: stream::unix_now(),
        model: s.model.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content,
            },
            finish_reason: finish_reason.into(),
            logprobs: None,
        }],
        usage,
    };
    let resp = respond(&s, &body, claim, &cached).await?;
    Ok(decorate(resp, rate.as_ref()))
}

async fn completions(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(rid): Extension<XRequestId>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    tracing::Span::current().record("gen_ai.operation.name", "text_completion");
    let (text, spec) = validate::completion(&req, &s.model)?;
    let (claim, cached) = match before(&s, &caller, &headers, &req, &spec).await? {
        Before::Answer(resp) => return Ok(resp),
        Before::Run { claim, cached } => (claim, cached),
    };
    let prompt = s.tokenizer.encode(&text);
    let id = response_id("cmpl");
    let started = start(&s, &headers, &caller, (&id, &rid.0), prompt, &spec).await?;
    if spec.stream {
        return Ok(streamed(
            &s,
            (Kind::Text, &id),
            &spec,
            started,
            claim,
            &cached,
        ));
    }
    let (text, finish_reason, usage, rate) = collect(started).await?;
    let body = Completion {
        id: id.clone(),
        object: "text_completion".into(),
        created: stream::unix_now(),
        model: s.model.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text,
            finish_reason: Some(finish_reason.into()),
            logprobs: None,
        }],
        usage: Some(usage),
    };
    let resp = respond(&s, &body, claim, &cached).await?;
    Ok(decorate(resp, rate.as_ref()))
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
    s: &AppState,
    (kind, id): (Kind, &str),
    spec: &Spec,
    started: Started,
    claim: Option<idempotency::Claim>,
    cached: &cache::Lookup,
) -> Response {
    let rate = started.out.meter().rate.clone();
    let resp = stream::sse(
        kind,
        id.to_owned(),
        s.model.clone(),
        spec.include_usage,
        started,
        claim,
    );
    let mut resp = decorate(resp, rate.as_ref());
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
