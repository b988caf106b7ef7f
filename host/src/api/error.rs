//! Every API error in one place: its status, a stable code, a message saying what was wrong,
//! and any details, rendered as `{"error": {"code", "message", ...}}`.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::consistency::WaitError;
use crate::source::{AppendError, SourceError};
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }

    /// A failure of ours, not the caller's: logged with its cause, answered without internals.
    fn internal(code: &'static str, err: &dyn std::error::Error) -> Self {
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            chain.push_str(": ");
            chain.push_str(&cause.to_string());
            source = cause.source();
        }
        tracing::error!(code, error = %chain, "request failed");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, chain)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.details;
        body.insert("code".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        (self.status, Json(json!({ "error": body }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "malformed_json",
        };
        Self::new(status, code, rejection.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        Self::internal("store_unavailable", &err)
    }
}

impl From<SourceError> for ApiError {
    fn from(err: SourceError) -> Self {
        Self::internal("source_unavailable", &err)
    }
}

impl From<AppendError> for ApiError {
    fn from(err: AppendError) -> Self {
        let message = err.to_string();
        match err {
            AppendError::VersionConflict {
                stream,
                expected,
                current,
            } => Self::new(StatusCode::CONFLICT, "version_conflict", message)
                .with("stream", stream)
                .with("expected_version", expected)
                .with("current_version", current),
            AppendError::DuplicateId { id } => {
                Self::new(StatusCode::CONFLICT, "duplicate_id", message).with("id", id)
            }
            AppendError::Invalid { index, .. } => {
                Self::bad_request("invalid_event", message).with("index", index)
            }
            AppendError::Unsupported => Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "append_unsupported",
                message,
            ),
            AppendError::Contended => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "append_contended", message)
            }
            AppendError::Source(err) => err.into(),
        }
    }
}

impl From<WaitError> for ApiError {
    fn from(err: WaitError) -> Self {
        let message = err.to_string();
        match err {
            WaitError::Timeout { reached, target } => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "wait_timeout", message)
                    .with("position", reached)
                    .with("target", target)
            }
            WaitError::NotAppended { stream, version } => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "wait_timeout", message)
                    .with("stream", stream)
                    .with("version", version)
            }
            WaitError::Failed { reached, target } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "projection_failed",
                message,
            )
            .with("position", reached)
            .with("target", target),
            WaitError::DeadLettered {
                stream,
                version,
                position,
                reason,
            } => Self::new(StatusCode::CONFLICT, "dead_lettered", message)
                .with("stream", stream)
                .with("version", version)
                .with("position", position)
                .with("reason", reason),
            WaitError::Source(err) => err.into(),
        }
    }
}
