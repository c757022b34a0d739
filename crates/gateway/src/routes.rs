//! Routes and thin handlers.

use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::metrics::track;
use crate::output::{Piece, TextOutput};
use crate::state::AppState;
use crate::stream::{self, Kind};
use crate::validate::{self, Spec};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use tokenfab_api::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
    CompletionChoice, CompletionRequest, Model, ModelList,
};
use tokenfab_engine::{Band, GenerateRequest, Slo};
use tokenfab_types::{ErrorCode, TenantId, TokenId, Tokens};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.http.clone(), track))
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

fn band(headers: &HeaderMap) -> Result<Band, ApiError> {
    match headers.get("x-tokenfab-priority") {
        None => Ok(Band::Standard),
        Some(v) => v.to_str().ok().and_then(Band::parse).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                "x-tokenfab-priority must be one of: interactive, standard, batch",
            )
        }),
    }
}

/// Submit and wait for the first piece, so that a rejection becomes an HTTP status
/// instead of an error inside a 200 stream.
async fn start(
    s: &AppState,
    headers: &HeaderMap,
    prompt: Vec<TokenId>,
    spec: &Spec,
) -> Result<(TextOutput, Piece), ApiError> {
    let band = band(headers)?;
    let prompt_tokens = prompt.len() as u64;
    let ctx = s.engine.capacity().max_seq_tokens;
    let max_new = spec
        .max_tokens
        .unwrap_or_else(|| ctx.saturating_sub(prompt_tokens).max(1));
    let generation = s.engine.submit(GenerateRequest {
        tenant: TenantId::local(),
        band,
        weight: 1,
        prompt,
        max_new: Tokens(max_new),
        seed: spec.seed,
        sampling: spec.sampling.clone(),
        slo: Slo::default(),
        cache_scope: None,
    })?;
    let mut out = TextOutput::new(
        generation,
        s.tokenizer.clone(),
        spec.stop.clone(),
        prompt_tokens,
    );
    match out.next().await {
        Some(Piece::Error(e)) => Err(e),
        Some(first) => Ok((out, first)),
        None => Err(ApiError::new(ErrorCode::Internal, "empty generation")),
    }
}

/// Collect a whole generation: (text, finish_reason, usage).
async fn collect(
    mut out: TextOutput,
    first: Piece,
) -> Result<(String, &'static str, tokenfab_api::Usage), ApiError> {
    let mut text = String::new();
    let mut piece = Some(first);
    while let Some(p) = piece {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::End {
                finish_reason,
                usage,
            } => return Ok((text, finish_reason, usage)),
            Piece::Error(e) => return Err(e),
        }
        piece = out.next().await;
    }
    Err(ApiError::new(
        ErrorCode::Internal,
        "generation ended without a result",
    ))
}

async fn chat(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let (turns, spec) = validate::chat(&req, &s.model)?;
    let text = s
        .tokenizer
        .render_chat(&turns)
        .map_err(|e| ApiError::invalid("messages", format!("chat template failed: {e}")))?;
    let prompt = s.tokenizer.encode(&text);
    let (out, first) = start(&s, &headers, prompt, &spec).await?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if spec.stream {
        return Ok(stream::sse(
            Kind::Chat,
            id,
            s.model.clone(),
            spec.include_usage,
            out,
            first,
        ));
    }
    let (content, finish_reason, usage) = collect(out, first).await?;
    Ok(Json(ChatCompletion {
        id,
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
    })
    .into_response())
}

async fn completions(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let (text, spec) = validate::completion(&req, &s.model)?;
    let prompt = s.tokenizer.encode(&text);
    let (out, first) = start(&s, &headers, prompt, &spec).await?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    if spec.stream {
        return Ok(stream::sse(
            Kind::Text,
            id,
            s.model.clone(),
            spec.include_usage,
            out,
            first,
        ));
    }
    let (text, finish_reason, usage) = collect(out, first).await?;
    Ok(Json(Completion {
        id,
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
    })
    .into_response())
}
