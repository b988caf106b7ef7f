//! `GET /observers`, `GET /observers/{name}`, `GET /observers/{name}/_dead_letters`: what
//! observers decided and how delivering it goes. (The events an observer's plugin failed on are
//! dead letters like a projection's: `GET /projections/{name}/_dead_letters`.)

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::metrics::{ACTION_KINDS, DELIVERY_OUTCOMES};
use crate::observer::{ActionState, Logged};
use crate::runner::Projection;

/// The observer named `name`, or a 404 listing those there are.
pub(super) fn observer(app: &AppState, name: &str) -> Result<Arc<Projection>, ApiError> {
    match app.projections.get(name) {
        Some(p) if p.is_observer() => Ok(p),
        found => {
            let known: Vec<String> = app
                .projections
                .projections()
                .iter()
                .filter(|p| p.is_observer())
                .map(|p| p.name().to_owned())
                .collect();
            let message = match found {
                Some(_) => {
                    format!("{name:?} is a projection, not an observer: see /projections/{name}")
                }
                None => format!("no observer named {name:?}"),
            };
            Err(ApiError::not_found("unknown_observer", message).with("observers", json!(known)))
        }
    }
}

async fn summary(app: &AppState, observer: &Projection) -> Value {
    let head = *app.source.head().borrow();
    let checkpoint = observer.checkpoint();
    let health = observer.health();
    let descriptor = observer.descriptor();
    // Counted from the store: the same on every instance.
    let counts = app.store.action_counts(&descriptor.name).await.ok();
    let parked = app.store.parked(descriptor).await.ok();
    let delivery = app.deploy.delivery_for(&descriptor.name);
    let d = &observer.delivery;
    let mut since_start = serde_json::Map::new();
    for (k, kind) in ACTION_KINDS.iter().enumerate() {
        let mut outcomes = serde_json::Map::new();
        for (o, outcome) in DELIVERY_OUTCOMES.iter().enumerate() {
            outcomes.insert(outcome.as_str().into(), json!(d.counted(k, o)));
        }
        since_start.insert((*kind).into(), Value::Object(outcomes));
    }
    json!({
        "name": descriptor.name,
        "version": descriptor.version,
        "status": health.status,
        "error": health.error,
        "retrying": health.retrying,
        "checkpoint": checkpoint,
        "head": head,
        "lag": head.saturating_sub(checkpoint),
        "event_types": descriptor.event_types,
        "actions": counts,
        "in_flight": d.in_flight.load(Relaxed),
        "queued": d.queued.load(Relaxed),
        "blocked_streams": d.blocked.load(Relaxed),
        "attempts_since_start": d.attempts.load(Relaxed),
        "since_start": since_start,
        "dead_letters": counts.map(|c| c.dead),
        "event_dead_letters": parked.as_ref().map(Vec::len),
        "delivery": delivery,
    })
}

pub async fn list_observers(State(app): State<AppState>) -> Json<Value> {
    let mut all = Vec::new();
    for observer in app.projections.projections() {
        if observer.is_observer() {
            all.push(summary(&app, &observer).await);
        }
    }
    Json(json!({ "observers": all }))
}

pub async fn get_observer(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let observer = observer(&app, &name)?;
    Ok(Json(summary(&app, &observer).await))
}

/// `?after=ID&limit=N`: the dead actions, in log order.
pub async fn list_dead_letters(
    State(app): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let observer = observer(&app, &name)?;
    let mut after = 0i64;
    let mut limit = app.config.default_page_size;
    for (field, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        let bad = || {
            ApiError::bad_request(
                "invalid_parameter",
                format!("{field}={value:?} is not a number"),
            )
        };
        match &*field {
            "after" => after = value.parse().map_err(|_| bad())?,
            "limit" => limit = value.parse().map_err(|_| bad())?,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!("unknown parameter `{field}` (dead letters take after and limit)"),
                ))
            }
        }
    }
    let limit = limit.clamp(1, app.config.max_page_size);
    let dead: Vec<Logged> = app
        .store
        .list_actions(observer.name(), ActionState::Dead, after, limit)
        .await?;
    let next = (dead.len() == limit as usize)
        .then(|| dead.last().map(|a| a.id))
        .flatten();
    Ok(Json(json!({ "items": dead, "next_after": next })))
}
