//! A JSON body extractor whose every failure is an OpenAI error envelope.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use tokenfab_types::ErrorCode;

pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge, "The request body is too large.")
            } else {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("Could not read the request body: {r}"),
                )
            }
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("Invalid request body: {e}"),
                ),
                Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                    ErrorCode::InvalidJson,
                    format!("The request body is not valid JSON: {e}"),
                ),
            }
        })
    }
}
