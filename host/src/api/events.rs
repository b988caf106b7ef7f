//! `POST /events`: append one event or a list, in one transaction.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::error::ApiError;
use super::openapi::ErrorBody;
use super::AppState;
use crate::event::RawObject;
use crate::source::{Appended, NewEvent};

/// The body: one event, or several appended in one transaction.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Read by hand (see `parse`), described here for the document.
pub enum AppendBody {
    One(NewEvent),
    Batch(EventList),
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct EventList {
    #[schema(min_items = 1)]
    events: Vec<NewEvent>,
}

/// Where each event landed, and the last one's position (to wait for with `min_position`).
#[derive(Serialize, ToSchema)]
pub struct AppendedEvents {
    events: Vec<Appended>,
    position: Option<u64>,
}

#[utoipa::path(
    post,
    path = "/events",
    tag = "events",
    request_body(content = AppendBody, description = "An event, or `{\"events\": [...]}` appended in one transaction; with `expected_version`, a stream's append is refused if the stream moved"),
    responses(
        (status = 201, description = "Appended", body = AppendedEvents),
        (status = 400, description = "Not an event: `invalid_event` names the index and the field; `malformed_json`", body = ErrorBody),
        (status = 409, description = "`version_conflict`, `duplicate_id`, `malformed_outbox_row`, or `source_is_kafka`", body = ErrorBody),
        (status = 413, description = "Larger than `http.max_body_bytes`", body = ErrorBody),
        (status = 415, description = "Not `application/json`", body = ErrorBody),
        (status = 503, description = "`lagging` (with `Retry-After`), or the source is unavailable", body = ErrorBody),
    ),
)]
pub async fn append(
    State(app): State<AppState>,
    body: Result<Json<Box<RawValue>>, JsonRejection>,
) -> Result<(StatusCode, Json<AppendedEvents>), ApiError> {
    if app.kafka.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "source_is_kafka",
            "this server takes its events from Kafka (source.kind = \"kafka\"): write them to the outbox table Debezium reads",
        ));
    }
    let Json(body) = body?;
    let events = parse(&body)?;
    app.backpressure.admit(&app.projections).await?;
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
        Json(AppendedEvents {
            events: appended,
            position,
        }),
    ))
}

/// One event object, or `{"events": [...]}`; errors name the event's index and the field.
///
/// The body is never parsed into a `serde_json::Value`: that would turn `18446744073709551616`
/// into `1.8446744073709552e19` and `-0` into `-0.0`. Each payload keeps its exact text.
fn parse(body: &RawValue) -> Result<Vec<NewEvent>, ApiError> {
    let shape = || {
        ApiError::bad_request(
            "invalid_event",
            "the body must be an event object or {\"events\": [...]}",
        )
    };
    let text = body.get();
    if !text.starts_with('{') {
        return Err(shape());
    }
    // The top level's keys only: values stay raw.
    let fields: Vec<(String, &RawValue)> = serde_json::from_str::<RawObject>(text)
        .map_err(|_| shape())?
        .0;
    let (items, batch): (Vec<&RawValue>, bool) = match fields.iter().find(|(k, _)| k == "events") {
        Some(_) if fields.len() > 1 => {
            return Err(ApiError::bad_request(
                "invalid_event",
                "a batch is {\"events\": [...]} with no other fields",
            ))
        }
        Some((_, events)) => match serde_json::from_str::<Vec<&RawValue>>(events.get()) {
            Ok(items) => (items, true),
            Err(_) => {
                return Err(ApiError::bad_request(
                    "invalid_event",
                    "`events` must be a list of events",
                ))
            }
        },
        None => (vec![body], false),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let at = |field: &str| match (batch, field) {
                (true, ".") => format!("events[{index}]: "),
                (true, _) => format!("events[{index}].{field}: "),
                (false, ".") => String::new(),
                (false, _) => format!("{field}: "),
            };
            let mut de = serde_json::Deserializer::from_str(item.get());
            serde_path_to_error::deserialize::<_, NewEvent>(&mut de).map_err(|err| {
                let field = err.path().to_string();
                ApiError::bad_request("invalid_event", format!("{}{}", at(&field), err.inner()))
                    .with("index", index)
            })
        })
        .collect()
}
