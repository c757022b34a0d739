/// Who caused an error: decides logging level, metrics and whether a retry elsewhere helps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorOrigin {
    Client,
    Upstream,
    Internal,
}

/// The closed set of errors tokenfab reports. Every crate's error enum maps into one of
/// these; the gateway maps each to an HTTP status and an OpenAI error `type`/`code` in one
/// place (`tokenfab_gateway::error`). Nothing is classified by parsing message text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed JSON, wrong types, out-of-range parameters.
    InvalidRequest,
    /// The body could not be parsed as JSON at all.
    InvalidJson,
    /// prompt + max_tokens does not fit the model's context.
    ContextLengthExceeded,
    /// The named model is not served here.
    ModelNotFound,
    /// No route for this path.
    NotFound,
    /// The method is not allowed on this path.
    MethodNotAllowed,
    /// Body over the configured limit.
    PayloadTooLarge,
    /// No API key, or one that is malformed, unknown or revoked.
    InvalidApiKey,
    /// The key is valid but may not do this (an admin route, another tenant's data).
    PermissionDenied,
    /// Over the key's requests-per-minute, tokens-per-minute or concurrency limit.
    RateLimited,
    /// The key's budget cannot cover the request's worst-case cost.
    InsufficientQuota,
    /// An `Idempotency-Key` reused with a different request body.
    IdempotencyMismatch,
    /// A request with this `Idempotency-Key` is still running.
    IdempotencyInFlight,
    /// Bounded queue full, or the request's SLO cannot be met: retry later.
    Overloaded,
    /// The engine is shutting down.
    ShuttingDown,
    /// The worker serving the request failed (and no other could take it).
    UpstreamFailed,
    /// A failure inside tokenfab.
    Internal,
}

impl ErrorCode {
    pub fn origin(self) -> ErrorOrigin {
        match self {
            ErrorCode::Overloaded | ErrorCode::ShuttingDown | ErrorCode::UpstreamFailed => {
                ErrorOrigin::Upstream
            }
            ErrorCode::Internal => ErrorOrigin::Internal,
            _ => ErrorOrigin::Client,
        }
    }

    /// Whether sending the same request again (later, or elsewhere) may succeed.
    pub fn retry_safe(self) -> bool {
        matches!(
            self,
            ErrorCode::Overloaded
                | ErrorCode::ShuttingDown
                | ErrorCode::UpstreamFailed
                | ErrorCode::RateLimited
                | ErrorCode::IdempotencyInFlight
        )
    }

    /// A stable snake_case name, used as a bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::ContextLengthExceeded => "context_length_exceeded",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::RateLimited => "rate_limit_exceeded",
            ErrorCode::InsufficientQuota => "insufficient_quota",
            ErrorCode::IdempotencyMismatch => "idempotency_key_mismatch",
            ErrorCode::IdempotencyInFlight => "idempotency_key_in_flight",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::UpstreamFailed => "upstream_failed",
            ErrorCode::Internal => "internal",
        }
    }
}
