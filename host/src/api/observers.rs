//! `GET /observers`, `GET /observers/{name}`, `GET /observers/{name}/_dead_letters`: what
//! observers decided and how delivering it goes. (The events an observer's plugin failed on are
//! dead letters like a projection's: `GET /projections/{name}/_dead_letters`.)

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::Json;
use serde::Serialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::openapi::ErrorBody;
use super::query::RunnerState;
use super::AppState;
use crate::config::DeliveryConfig;
use crate::metrics::{ACTION_KINDS, DELIVERY_OUTCOMES};
use crate::observer::{ActionState, Counts, Logged};
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

/// An observer: where it is in the log, and how delivering what it decided goes.
#[derive(Serialize, ToSchema)]
pub struct ObserverSummary {
    #[serde(flatten)]
    state: RunnerState,
    /// Actions by state, from the log (null when the store could not be asked).
    actions: Option<Counts>,
    in_flight: u64,
    queued: u64,
    /// Streams waiting behind a dead action.
    blocked_streams: u64,
    attempts_since_start: u64,
    /// Delivery outcomes since start, by action kind and outcome.
    since_start: BTreeMap<String, BTreeMap<String, u64>>,
    /// Dead actions.
    dead_letters: Option<u64>,
    /// Events its plugin failed on (`/projections/{name}/_dead_letters`).
    event_dead_letters: Option<u64>,
    delivery: DeliveryConfig,
}

async fn summary(app: &AppState, observer: &Projection) -> ObserverSummary {
    let head = *app.source.head().borrow();
    let descriptor = observer.descriptor();
    // Counted from the store: the same on every instance.
    let counts = app.store.action_counts(&descriptor.name).await.ok();
    let letters = app.store.letter_counts(descriptor).await.ok();
    let d = &observer.delivery;
    let mut since_start = BTreeMap::new();
    for (k, kind) in ACTION_KINDS.iter().enumerate() {
        let outcomes = DELIVERY_OUTCOMES
            .iter()
            .enumerate()
            .map(|(o, outcome)| (outcome.as_str().to_owned(), d.counted(k, o)))
            .collect();
        since_start.insert((*kind).to_owned(), outcomes);
    }
    ObserverSummary {
        state: RunnerState::of(observer, head, app.source.as_ref()).await,
        actions: counts,
        in_flight: d.in_flight.load(Relaxed),
        queued: d.queued.load(Relaxed),
        blocked_streams: d.blocked.load(Relaxed),
        attempts_since_start: d.attempts.load(Relaxed),
        since_start,
        dead_letters: counts.map(|c| c.dead),
        event_dead_letters: letters.map(|l| l.open),
        delivery: app.deploy.delivery_for(&descriptor.name),
    }
}

/// Every observer.
#[derive(Serialize, ToSchema)]
pub struct ObserverList {
    observers: Vec<ObserverSummary>,
}

#[utoipa::path(
    get,
    path = "/observers",
    tag = "observers",
    responses((status = 200, description = "Every observer", body = ObserverList)),
)]
pub async fn list_observers(State(app): State<AppState>) -> Json<ObserverList> {
    let mut all = Vec::new();
    for observer in app.projections.projections() {
        if observer.is_observer() {
            all.push(summary(&app, &observer).await);
        }
    }
    Json(ObserverList { observers: all })
}

#[utoipa::path(
    get,
    path = "/observers/{name}",
    tag = "observers",
    params(("name" = String, Path, description = "The observer")),
    responses(
        (status = 200, description = "The observer", body = ObserverSummary),
        (status = 404, description = "`unknown_observer`", body = ErrorBody),
    ),
)]
pub async fn get_observer(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ObserverSummary>, ApiError> {
    let observer = observer(&app, &name)?;
    Ok(Json(summary(&app, &observer).await))
}

/// A page of dead actions.
#[derive(Serialize, ToSchema)]
pub struct ActionPage {
    items: Vec<Logged>,
    /// The `after` of the next page; null on the last.
    next_after: Option<i64>,
}

/// A page of dead actions, in log order.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read by hand, described here for the document.
pub struct ActionPageQuery {
    /// The `next_after` of the page before (0: from the start).
    after: Option<i64>,
    /// Actions per page, clamped to 1..`http.max_page_size`.
    limit: Option<u32>,
}

/// `?after=ID&limit=N`: the dead actions, in log order.
#[utoipa::path(
    get,
    path = "/observers/{name}/_dead_letters",
    tag = "observers",
    params(("name" = String, Path, description = "The observer"), ActionPageQuery),
    responses(
        (status = 200, description = "Dead actions, oldest first", body = ActionPage),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 404, description = "`unknown_observer`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    ),
)]
pub async fn list_dead_letters(
    State(app): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<ActionPage>, ApiError> {
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
    Ok(Json(ActionPage {
        items: dead,
        next_after: next,
    }))
}
