//! Every API error in one place: its status, a stable code, a message saying what was wrong,
//! and any details, rendered as `{"error": {"code", "message", ...}}`.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use crate::backpressure::Lagging;
use crate::consistency::WaitError;
use crate::source::{AppendError, SourceError};
use crate::store::sqlite::FileLost;
use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Map<String, Value>,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Map::new(),
            retry_after: None,
        }
    }

    /// Tells the caller when to try again (`Retry-After`, in seconds).
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self.with("retry_after_s", seconds)
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

    /// A failure of ours, not the caller's: logged with its whole cause chain (SQL, paths,
    /// URLs) under a fresh request id; answered with that id and a short summary only.
    fn internal(code: &'static str, summary: &str, err: &dyn std::error::Error) -> Self {
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut chain = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            chain.push_str(": ");
            chain.push_str(&cause.to_string());
            source = cause.source();
        }
        tracing::error!(request_id = %request_id, code, error = %chain, "request failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code,
            format!("{summary}; the server log has the cause under request id {request_id}"),
        )
        .with("request_id", request_id)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.details;
        body.insert("code".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        let mut response = (self.status, Json(json!({ "error": body }))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
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
        if let StoreError::FileLost(lost) = err {
            return lost.into();
        }
        Self::internal("store_unavailable", "the store failed", &err)
    }
}

impl From<Lagging> for ApiError {
    fn from(lagging: Lagging) -> Self {
        let retry = lagging.retry_after_s;
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "lagging",
            lagging.to_string(),
        )
        .with("projection", lagging.projection)
        .with("lag_ms", lagging.lag_ms)
        .retry_after(retry)
    }
}

impl From<FileLost> for ApiError {
    fn from(lost: FileLost) -> Self {
        // The path stays in the log: the caller learns what happened and that retrying here
        // will not help until an operator acts.
        tracing::error!(path = %lost.path, reason = %lost.reason, "request refused: the database file is gone");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_file_lost",
            format!(
                "the server's database file {}: it refuses writes until an operator restarts it \
                 on the right file (see its log)",
                lost.reason
            ),
        )
    }
}

impl From<SourceError> for ApiError {
    fn from(err: SourceError) -> Self {
        let err = match err {
            SourceError::FileLost(lost) => return lost.into(),
            SourceError::Group(shared) => match &*shared {
                SourceError::FileLost(lost) => return lost.clone().into(),
                _ => SourceError::Group(shared),
            },
            err => err,
        };
        // A row another writer stored that the request runs into (an append to its stream):
        // named by position and id for the caller; no outage, and retrying will not help.
        if let SourceError::Malformed {
            position,
            id,
            stream,
            ..
        } = &err
        {
            let message = err.to_string();
            tracing::warn!(
                position,
                id = ?id,
                stream = ?stream,
                error = %message,
                "request refused: a malformed outbox row"
            );
            return Self::new(StatusCode::CONFLICT, "malformed_outbox_row", message)
                .with("position", *position)
                .with("id", id.clone())
                .with("stream", stream.clone());
        }
        Self::internal("source_unavailable", "the event source failed", &err)
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
            WaitError::EventNotAppended { id } => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "wait_timeout", message).with("event", id)
            }
            WaitError::EventDeadLettered {
                id,
                position,
                reason,
            } => Self::new(StatusCode::CONFLICT, "dead_lettered", message)
                .with("event", id)
                .with("position", position)
                .with("reason", reason),
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
            // The query routes wait again on the version that serves now; this answers only
            // a projection removed while a read waited on it.
            WaitError::Retired { reached } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "projection_removed",
                message,
            )
            .with("position", reached),
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::Layer;

    use super::*;

    /// One logged event: its fields and values, as text.
    type Logged = Vec<(String, String)>;

    /// The fields of every event logged while it is the default subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<Logged>>>);

    impl<S: tracing::Subscriber> Layer<S> for Captured {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            struct Fields(Vec<(String, String)>);
            impl tracing::field::Visit for Fields {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    self.0.push((field.name().to_owned(), format!("{value:?}")));
                }
                fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                    self.0.push((field.name().to_owned(), value.to_owned()));
                }
            }
            let mut fields = Fields(Vec::new());
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }

    async fn body(err: ApiError) -> (StatusCode, Value) {
        let response = err.into_response();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn nested() -> StoreError {
        StoreError::Database {
            context: "reading \"projector\".\"p_accounts_v1\"".into(),
            source: sqlx::Error::Io(std::io::Error::other(
                "SELECT doc FROM secret_table: refused at /var/run/postgresql/.s.PGSQL.5432",
            )),
        }
    }

    #[tokio::test]
    async fn a_malformed_outbox_row_is_named_in_the_answer() {
        let err = AppendError::Source(SourceError::Malformed {
            position: 7,
            id: Some("bad-row".into()),
            stream: Some("acct-1".into()),
            event_type: None,
            reason: "its version 'abc' (text) is not a whole number".into(),
        });
        let (status, body) = body(ApiError::from(err)).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "malformed_outbox_row");
        assert_eq!(body["error"]["position"], 7);
        assert_eq!(body["error"]["id"], "bad-row");
        assert_eq!(body["error"]["stream"], "acct-1");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("position 7") && message.contains("bad-row"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn an_internal_error_answers_a_request_id_and_logs_the_cause_chain() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(captured.clone());
        let (first, second) = {
            let _guard = tracing::subscriber::set_default(subscriber);
            (ApiError::from(nested()), ApiError::from(nested()))
        };
        let (status, first) = body(first).await;
        let (_, second) = body(second).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(first["error"]["code"], "store_unavailable");
        let text = first.to_string();
        for inner in ["p_accounts_v1", "secret_table", "/var/run", "communicating"] {
            assert!(!text.contains(inner), "the body tells {inner:?}: {text}");
        }
        let id = first["error"]["request_id"].as_str().expect("a request_id");
        assert!(!id.is_empty());
        assert!(
            first["error"]["message"].as_str().unwrap().contains(id),
            "{first}"
        );
        assert_ne!(
            Some(id),
            second["error"]["request_id"].as_str(),
            "two errors share a request id"
        );
        // The log has the whole chain, under the same id.
        let logged = captured.0.lock().unwrap().clone();
        let line = logged
            .iter()
            .find(|fields| fields.iter().any(|(k, v)| k == "request_id" && v == id))
            .unwrap_or_else(|| panic!("no log line with request_id {id}: {logged:?}"));
        let error = &line.iter().find(|(k, _)| k == "error").unwrap().1;
        assert!(
            error.contains("p_accounts_v1") && error.contains("secret_table"),
            "{error}"
        );
    }
}
