//! The one place where an [`ErrorCode`] becomes an HTTP status and an OpenAI error
//! `type`/`code`.

use crate::limits::RateInfo;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokenfab_api::{ErrorBody, ErrorDetail};
use tokenfab_engine::EngineError;
use tokenfab_ledger::LedgerError;
use tokenfab_types::{ErrorCode, Nanos};

/// An error on its way to the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<Nanos>,
    /// Rate-limit state for the `x-ratelimit-*` headers.
    pub rate: Option<Box<RateInfo>>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            rate: None,
        }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_owned()),
            ..ApiError::new(ErrorCode::InvalidRequest, message)
        }
    }

    pub fn status(&self) -> StatusCode {
        status_of(self.code)
    }

    pub fn body(&self) -> ErrorBody {
        let (kind, code) = openai_kind(self.code);
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: kind.to_owned(),
                param: self.param.clone(),
                code: code.map(str::to_owned),
            },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ApiError {
            code: e.code(),
            param: (e.code() == ErrorCode::ContextLengthExceeded).then(|| "messages".to_owned()),
            retry_after: e.retry_after(),
            rate: None,
            message: e.to_string(),
        }
    }
}

impl From<tokenfab_fleet::WorkerError> for ApiError {
    /// A worker's refusal of the request itself keeps its status' meaning; anything else
    /// is the worker's failure.
    fn from(e: tokenfab_fleet::WorkerError) -> Self {
        let code = match (e.failure, e.status) {
            (tokenfab_fleet::Failure::Rejected, Some(404)) => ErrorCode::ModelNotFound,
            (tokenfab_fleet::Failure::Rejected, Some(413)) => ErrorCode::PayloadTooLarge,
            (tokenfab_fleet::Failure::Rejected, _) => ErrorCode::InvalidRequest,
            (tokenfab_fleet::Failure::Busy, _) => ErrorCode::Overloaded,
            (tokenfab_fleet::Failure::Broken, _) => ErrorCode::UpstreamFailed,
        };
        let mut err = ApiError::new(code, e.to_string());
        if code == ErrorCode::Overloaded {
            err.retry_after = Some(Nanos::from_millis(1000));
        }
        err
    }
}

impl From<tokenfab_fleet::PickError> for ApiError {
    fn from(e: tokenfab_fleet::PickError) -> Self {
        let mut err = ApiError::new(ErrorCode::Overloaded, e.to_string());
        err.retry_after = Some(Nanos::from_millis(1000));
        err
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

/// HTTP status of each error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest | ErrorCode::InvalidJson | ErrorCode::ContextLengthExceeded => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::ModelNotFound | ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::InvalidApiKey => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::RateLimited | ErrorCode::InsufficientQuota => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::IdempotencyInFlight => StatusCode::CONFLICT,
        ErrorCode::Overloaded | ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::UpstreamFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// OpenAI's error `type` and `code` for each error code.
fn openai_kind(code: ErrorCode) -> (&'static str, Option<&'static str>) {
    match code {
        ErrorCode::InvalidRequest => ("invalid_request_error", None),
        ErrorCode::InvalidJson => ("invalid_request_error", Some("invalid_json")),
        ErrorCode::ContextLengthExceeded => {
            ("invalid_request_error", Some("context_length_exceeded"))
        }
        ErrorCode::ModelNotFound => ("invalid_request_error", Some("model_not_found")),
        ErrorCode::NotFound => ("invalid_request_error", Some("not_found")),
        ErrorCode::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed")),
        ErrorCode::PayloadTooLarge => ("invalid_request_error", Some("payload_too_large")),
        ErrorCode::InvalidApiKey => ("invalid_request_error", Some("invalid_api_key")),
        ErrorCode::PermissionDenied => ("invalid_request_error", Some("permission_denied")),
        ErrorCode::RateLimited => ("requests", Some("rate_limit_exceeded")),
        ErrorCode::InsufficientQuota => ("insufficient_quota", Some("insufficient_quota")),
        ErrorCode::IdempotencyMismatch => {
            ("invalid_request_error", Some("idempotency_key_mismatch"))
        }
        ErrorCode::IdempotencyInFlight => {
            ("invalid_request_error", Some("idempotency_key_in_flight"))
        }
        ErrorCode::Overloaded => ("server_error", Some("overloaded")),
        ErrorCode::ShuttingDown => ("server_error", Some("shutting_down")),
        ErrorCode::UpstreamFailed => ("server_error", Some("upstream_failed")),
        ErrorCode::Internal => ("server_error", Some("internal_error")),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self.code.origin() {
            tokenfab_types::ErrorOrigin::Internal => {
                tracing::error!(code = self.code.as_str(), message = %self.message, "request failed")
            }
            _ => {
                tracing::debug!(code = self.code.as_str(), message = %self.message, "request refused")
            }
        }
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            let secs = after.0.div_ceil(1_000_000_000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if let Some(rate) = &self.rate {
            rate.write(resp.headers_mut());
        }
        resp
    }
}
