//! `POST /events`: append one event or a list, in one transaction.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::source::NewEvent;

pub async fn append(
    State(app): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(body) = body?;
    let events = parse(body)?;
    // In its own task: a client that hangs up mid-commit must not cancel the wake-up of the
    // runners and waiting reads that follows the commit.
    let (source, appends) = (app.source.clone(), app.appends.clone());
    let appended = tokio::spawn(async move {
        let appended = source.append(events).await?;
        appends.appended(&appended);
        Ok::<_, crate::source::AppendError>(appended)
    })
    .await
    .map_err(|err| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "append_aborted",
            format!("the append task failed: {err}"),
        )
    })??;
    let position = appended.last().map(|a| a.position);
    Ok((
        StatusCode::CREATED,
        Json(json!({ "events": appended, "position": position })),
    ))
}

/// One event object, or `{"events": [...]}`; errors name the event's index and the field.
fn parse(body: Value) -> Result<Vec<NewEvent>, ApiError> {
    let (items, batch) = match body {
        Value::Object(mut map) if map.contains_key("events") => match map.remove("events") {
            Some(Value::Array(items)) if map.is_empty() => (items, true),
            Some(Value::Array(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_event",
                    "a batch is {\"events\": [...]} with no other fields",
                ))
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_event",
                    "`events` must be a list of events",
                ))
            }
        },
        single @ Value::Object(_) => (vec![single], false),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_event",
                "the body must be an event object or {\"events\": [...]}",
            ))
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            serde_path_to_error::deserialize::<_, NewEvent>(item).map_err(|err| {
                let field = err.path().to_string();
                let at = match (batch, field.as_str()) {
                    (true, ".") => format!("events[{index}]: "),
                    (true, _) => format!("events[{index}].{field}: "),
                    (false, ".") => String::new(),
                    (false, _) => format!("{field}: "),
                };
                ApiError::bad_request("invalid_event", format!("{at}{}", err.inner()))
                    .with("index", index)
            })
        })
        .collect()
}
