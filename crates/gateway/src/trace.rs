//! Request identity and spans. Every request gets an `x-request-id` — the client's when it
//! sends a usable one, else `req-<uuid v7>` — returned on every response (errors
//! included), carried by the request's `tracing` span (so each log line of the request
//! names it, in human and JSON logs) and stored on its ledger row. With OpenTelemetry
//! export on (`observability.otlp_endpoint`), that span is the request's trace root and a
//! W3C `traceparent` sent by the client becomes its parent (see `tokenfab::telemetry`).

use crate::error::ApiError;
use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokenfab_types::ErrorCode;
use tracing::Instrument;

pub const HEADER: &str = "x-request-id";

/// The request's id, as returned in `x-request-id`.
#[derive(Clone, Debug)]
pub struct XRequestId(pub String);

/// Extracts a W3C trace context from request headers and makes it the parent of a span.
/// Installed by the binary when trace export is on; without it spans start new traces.
pub type ParentFromHeaders = fn(&tracing::Span, &axum::http::HeaderMap);

static PARENT: std::sync::OnceLock<ParentFromHeaders> = std::sync::OnceLock::new();

/// Install the `traceparent` handling (once per process).
pub fn set_parent_extractor(f: ParentFromHeaders) {
    let _ = PARENT.set(f);
}

/// Decides whether a request is traced (head sampling), from its headers. Installed with
/// trace export; without it no request is marked traced.
pub type SampleRequest = fn(&axum::http::HeaderMap) -> bool;

static SAMPLE: std::sync::OnceLock<SampleRequest> = std::sync::OnceLock::new();

/// Install the sampling decision (once per process).
pub fn set_sampler(f: SampleRequest) {
    let _ = SAMPLE.set(f);
}

/// Target of the spans of a traced request (the sampler said yes).
pub const TRACED: &str = "tokenfab_gateway::traced";
/// Target of the spans of an untraced request: logs show them, the trace exporter's
/// filter never enables them, so they cost it nothing.
pub const UNTRACED: &str = "tokenfab_gateway::untraced";

/// Whether `span` belongs to a traced request.
pub fn is_traced(span: &tracing::Span) -> bool {
    span.metadata().is_some_and(|m| m.target() == TRACED)
}

/// A span under a request's span (`$parent`), of the request's target: exported with the
/// request when it is traced, seen only by logs when not.
#[macro_export]
macro_rules! child_span {
    ($parent:expr, $name:literal $(, $($fields:tt)*)?) => {{
        let parent: &tracing::Span = $parent;
        if $crate::trace::is_traced(parent) {
            tracing::info_span!(target: $crate::trace::TRACED, parent: parent, $name $(, $($fields)*)?)
        } else {
            tracing::info_span!(target: $crate::trace::UNTRACED, parent: parent, $name $(, $($fields)*)?)
        }
    }};
}

/// Writes the W3C trace context of a span as headers for an outgoing request (a remote
/// worker), so its spans join the request's trace. Installed with trace export.
pub type ContextToHeaders = fn(&tracing::Span) -> Vec<(String, String)>;

static INJECT: std::sync::OnceLock<ContextToHeaders> = std::sync::OnceLock::new();

/// Install the outgoing `traceparent` writer (once per process).
pub fn set_context_injector(f: ContextToHeaders) {
    let _ = INJECT.set(f);
}

/// Trace-context headers to send with a request made on behalf of `span`.
/// With export on, a request not traced here is sent with its sampled flag clear, so the
/// worker does not start a trace of its own.
pub fn outgoing(span: &tracing::Span) -> Vec<(String, String)> {
    match INJECT.get() {
        None => Vec::new(),
        Some(f) if is_traced(span) => f(span),
        Some(_) => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            vec![("traceparent".into(), format!("00-{id}-{}-00", &id[..16]))]
        }
    }
}

fn usable(v: &str) -> bool {
    (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic())
}

pub(crate) async fn identify(mut req: Request, next: Next) -> Response {
    let id = match req.headers().get(HEADER).map(|v| v.to_str()) {
        None => format!("req-{}", uuid::Uuid::now_v7().simple()),
        Some(Ok(v)) if usable(v) => v.to_owned(),
        Some(_) => {
            return ApiError::new(
                ErrorCode::InvalidRequest,
                "x-request-id must be 1-128 visible ASCII characters.",
            )
            .into_response()
        }
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    // One field list, two callsites: the target carries the sampling decision.
    macro_rules! request_span {
        ($target:expr) => {
            tracing::info_span!(
        target: $target,
        "request",
        otel.name = %format!("{} {route}", req.method()),
        otel.kind = "server",
        x_request_id = %id,
        http.request.method = %req.method(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        tenant = tracing::field::Empty,
        worker = tracing::field::Empty,
        gen_ai.operation.name = tracing::field::Empty,
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.request.max_tokens = tracing::field::Empty,
        gen_ai.response.id = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        tokenfab.cost_nano_usd = tracing::field::Empty,
        tokenfab.outcome = tracing::field::Empty,
            )
        };
    }
    // Probes, scrapes and the dashboard's polling are not traced (nor counted against the
    // sampler's budget): only the API and the admin API are.
    let api = route.starts_with("/v1/") || route.starts_with("/admin/");
    let span = if api && SAMPLE.get().is_some_and(|f| f(req.headers())) {
        let span = request_span!(TRACED);
        if let Some(parent) = PARENT.get() {
            parent(&span, req.headers());
        }
        span
    } else {
        request_span!(UNTRACED)
    };
    req.extensions_mut().insert(XRequestId(id.clone()));
    let mut resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(HEADER, v);
    }
    resp
}
