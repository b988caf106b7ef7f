//! Reading projections: their state, one document, or a filtered page of a collection, each
//! optionally after waiting until the projection has committed past a position.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::openapi::{ErrorBody, WaitFailed};
use super::AppState;
use crate::consistency::{self, StreamVersion, WaitError};
use crate::metrics::ProjectionMetrics;
use crate::runner::Projection;
use crate::runtime::CollectionSpec;
use crate::source::kafka::PartitionLag;
use crate::store::{DeadLetter, Document, ListQuery, ParkedStream, ProjectionStatus};
use serde::Serialize;
use utoipa::{IntoParams, ToSchema};

/// The read-your-writes parameters, and what is left of the query string.
#[derive(Default)]
struct ReadParams {
    wait_for: Vec<StreamVersion>,
    /// Event ids (the outbox row's id the application wrote) to wait for.
    wait_for_event: Vec<String>,
    min_position: Option<u64>,
    timeout_ms: Option<u64>,
    limit: Option<u32>,
    cursor: Option<String>,
    /// A version other than the serving one (a rebuild, checked before it goes live).
    version: Option<String>,
    filters: Vec<(String, String)>,
}

/// Read-your-writes: before answering, wait until the projection has applied these (each is
/// optional; several combine).
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read by hand (`ReadParams`), described here for the document.
pub struct WaitQuery {
    /// `stream@version`, repeatable: wait until the projection has applied that event (409
    /// `dead_lettered` if it set it aside).
    wait_for: Option<Vec<String>>,
    /// An event's id (the outbox row's `id`), repeatable.
    wait_for_event: Option<Vec<String>>,
    /// Wait until the projection has committed this position.
    min_position: Option<u64>,
    /// How long to wait before 504: default `http.wait_timeout_ms`, at most
    /// `http.max_wait_timeout_ms`.
    timeout_ms: Option<u64>,
    /// Read this version instead of the serving one (a rebuild, before it goes live).
    version: Option<String>,
}

/// A page of a collection, in key order.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ListPage {
    /// Documents per page: 1 to `http.max_page_size` (default `http.default_page_size`).
    #[param(minimum = 1)]
    limit: Option<u32>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
    /// Filters on indexed fields, `field=value` (exact match; every other parameter name is
    /// taken as a field).
    #[param(style = Form, explode)]
    filters: Option<std::collections::BTreeMap<String, String>>,
}

/// A page of dead letters, in position order.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct LetterPage {
    /// The `next_after` of the page before (0: from the start).
    after: Option<u64>,
    /// Letters per page, clamped to 1..`http.max_page_size`.
    limit: Option<u32>,
}

fn parse_number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ApiError> {
    value.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_parameter",
            format!("`{name}` must be a whole number, not {value:?}"),
        )
    })
}

impl ReadParams {
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut params = Self::default();
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*name {
                "wait_for" => params
                    .wait_for
                    .push(value.parse().map_err(|reason: String| {
                        ApiError::bad_request("invalid_parameter", format!("`wait_for`: {reason}"))
                    })?),
                "wait_for_event" => {
                    if value.is_empty() {
                        return Err(ApiError::bad_request(
                            "invalid_parameter",
                            "`wait_for_event` names no event id",
                        ));
                    }
                    params.wait_for_event.push(value.into_owned())
                }
                "min_position" => params.min_position = Some(parse_number(&name, &value)?),
                "timeout_ms" => params.timeout_ms = Some(parse_number(&name, &value)?),
                "limit" => params.limit = Some(parse_number(&name, &value)?),
                "cursor" => params.cursor = Some(value.into_owned()),
                "version" => params.version = Some(value.into_owned()),
                _ => params.filters.push((name.into_owned(), value.into_owned())),
            }
        }
        Ok(params)
    }

    /// The version to read: the one asked for, or the one serving.
    fn projection(&self, app: &AppState, name: &str) -> Result<Arc<Projection>, ApiError> {
        let Some(version) = &self.version else {
            return projection(app, name);
        };
        app.projections.version(name, version).ok_or_else(|| {
            let loaded: Vec<String> = app
                .projections
                .entry(name)
                .map(|e| {
                    std::iter::once(&e.active)
                        .chain(e.building.as_ref())
                        .map(|s| s.projection.descriptor().version.clone())
                        .collect()
                })
                .unwrap_or_default();
            ApiError::not_found(
                "unknown_version",
                format!("{name} has no version {version:?} running here (serving or building)"),
            )
            .with("versions", json!(loaded))
        })
    }

    /// Waits, if asked to, until `projection` has committed past what the caller needs; the
    /// version to read then. A cut-over while it waits moves the wait to the version that
    /// serves now, so the answer comes from one version, never a mix.
    async fn wait(
        &self,
        app: &AppState,
        mut projection: Arc<Projection>,
    ) -> Result<Arc<Projection>, ApiError> {
        if self.wait_for.is_empty() && self.min_position.is_none() && self.wait_for_event.is_empty()
        {
            return Ok(projection);
        }
        let http = &app.config;
        let started = std::time::Instant::now();
        let deadline = consistency::deadline(
            self.timeout_ms,
            http.wait_timeout_ms,
            http.max_wait_timeout_ms,
        );
        let (target, positions) =
            consistency::target_position(&app.appends, self.min_position, &self.wait_for, deadline)
                .await?;
        let events =
            consistency::event_positions(app.source.as_ref(), &self.wait_for_event, deadline)
                .await?;
        let target = events.iter().copied().fold(target, u64::max);
        loop {
            match projection.committed().wait_for(target, deadline).await {
                Err(WaitError::Retired { reached }) if self.version.is_none() => {
                    match app.projections.get(projection.name()) {
                        Some(now) if !Arc::ptr_eq(&now, &projection) => projection = now,
                        _ => return Err(WaitError::Retired { reached }.into()),
                    }
                }
                waited => {
                    waited?;
                    break;
                }
            }
        }
        app.http.read_wait.observe(started.elapsed());
        // Passed is not applied: an event set aside (or parked behind one) is not in the
        // documents, and a reader waiting for it must not take them for its write.
        for (wanted, position) in self.wait_for.iter().zip(positions) {
            if projection.surely_applied(position) {
                continue;
            }
            let letters = app
                .store
                .dead_letters(projection.descriptor(), position.saturating_sub(1), 1)
                .await?;
            if let Some(letter) = letters
                .into_iter()
                .find(|l| l.position == position && l.is_open())
            {
                return Err(WaitError::DeadLettered {
                    stream: wanted.stream.clone(),
                    version: wanted.version,
                    position,
                    reason: letter.reason,
                }
                .into());
            }
        }
        for (id, position) in self.wait_for_event.iter().zip(events) {
            if projection.surely_applied(position) {
                continue;
            }
            let letters = app
                .store
                .dead_letters(projection.descriptor(), position.saturating_sub(1), 1)
                .await?;
            if let Some(letter) = letters
                .into_iter()
                .find(|l| l.position == position && l.is_open())
            {
                return Err(WaitError::EventDeadLettered {
                    id: id.clone(),
                    position,
                    reason: letter.reason,
                }
                .into());
            }
        }
        Ok(projection)
    }
}

fn projection(app: &AppState, name: &str) -> Result<Arc<Projection>, ApiError> {
    app.projections.get(name).ok_or_else(|| {
        let known = app.projections.names();
        ApiError::not_found(
            "unknown_projection",
            format!("no projection named {name:?}"),
        )
        .with("projections", json!(known))
    })
}

fn check_collection(projection: &Projection, collection: &str) -> Result<(), ApiError> {
    if projection.descriptor().collection(collection).is_some() {
        return Ok(());
    }
    let known: Vec<&str> = projection
        .descriptor()
        .collections
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    Err(ApiError::not_found(
        "unknown_collection",
        format!(
            "projection {:?} has no collection {collection:?}",
            projection.name()
        ),
    )
    .with("collections", json!(known)))
}

/// Where a runner's serving version is: what projections and observers show alike.
#[derive(Serialize, ToSchema)]
pub struct RunnerState {
    name: String,
    /// The serving version.
    version: String,
    status: ProjectionStatus,
    error: Option<String>,
    /// The error it retries after (a database outage), if any.
    retrying: Option<String>,
    checkpoint: u64,
    head: u64,
    /// Positions behind the head.
    lag: u64,
    /// The age of the oldest event not applied yet, read or not (0: none).
    lag_seconds: f64,
    /// Empty: every type.
    event_types: Vec<String>,
}

impl RunnerState {
    pub async fn of(runner: &Projection, head: u64, source: &dyn crate::source::Source) -> Self {
        let checkpoint = runner.checkpoint();
        let health = runner.health();
        let descriptor = runner.descriptor();
        Self {
            name: descriptor.name.clone(),
            version: descriptor.version.clone(),
            status: health.status,
            error: health.error,
            retrying: health.retrying,
            checkpoint,
            head,
            lag: head.saturating_sub(checkpoint),
            lag_seconds: (runner.lag_seconds_behind(source).await * 1000.0).round() / 1000.0,
            event_types: descriptor.event_types.clone(),
        }
    }
}

/// A projection: where its serving version is, what it has set aside, and a rebuild beside it.
#[derive(Serialize, ToSchema)]
pub struct ProjectionSummary {
    #[serde(flatten)]
    state: RunnerState,
    collections: Vec<CollectionSpec>,
    /// Null when the store could not be asked.
    parked_streams: Option<u64>,
    parked_events: Option<u64>,
    dead_letters: DeadLetterCounts,
    /// When other code last replaced the serving version's (ms since the epoch).
    code_changed_at: Option<i64>,
    active: VersionSummary,
    /// A version rebuilt beside the serving one.
    building: Option<VersionSummary>,
    /// With the Kafka source: where the serving version stands in each partition this
    /// instance holds (`next_offset`: the next message it applies; `lag`: the messages from
    /// there to the high watermark).
    #[serde(skip_serializing_if = "Option::is_none")]
    partitions: Option<Vec<PartitionLag>>,
}

#[derive(Serialize, ToSchema)]
pub struct DeadLetterCounts {
    /// Open dead letters to retry or skip (the events parked behind them not counted).
    open: Option<u64>,
    malformed_since_start: u64,
    plugin_since_start: u64,
}

/// One version of a projection: where it is, and for a rebuild how far and how long to go.
#[derive(Serialize, ToSchema)]
pub struct VersionSummary {
    version: String,
    status: ProjectionStatus,
    error: Option<String>,
    checkpoint: u64,
    head: u64,
    lag: u64,
    /// 0 to 1.
    progress: f64,
    positions_per_second: f64,
    /// Null while it has no rate yet.
    eta_seconds: Option<f64>,
    /// `auto` or `manual`, for a version being built.
    cutover: Option<&'static str>,
    sha256: Option<String>,
    code_changed_at: Option<i64>,
    swap_pauses: u64,
    last_swap_pause_ms: f64,
    /// When this instance loaded its code (ms since the epoch).
    loaded_at: Option<i64>,
}

async fn summary(app: &AppState, projection: &Projection) -> ProjectionSummary {
    let head = *app.source.head().borrow();
    let state = RunnerState::of(projection, head, app.source.as_ref()).await;
    let descriptor = projection.descriptor();
    // Counted by the store: the same on every instance, whichever runs the projection.
    let counts = app.store.letter_counts(descriptor).await.ok();
    let partitions = match &app.kafka {
        Some(kafka) => kafka.applied(state.checkpoint).await.ok(),
        None => None,
    };
    ProjectionSummary {
        state,
        collections: descriptor.collections.clone(),
        parked_streams: counts.map(|c| c.parked_streams),
        parked_events: counts.map(|c| c.parked_events),
        dead_letters: DeadLetterCounts {
            open: counts.map(|c| c.open),
            malformed_since_start: ProjectionMetrics::get(
                &projection.metrics.dead_letters_malformed,
            ),
            plugin_since_start: ProjectionMetrics::get(&projection.metrics.dead_letters_plugin),
        },
        code_changed_at: app
            .deploy
            .loaded()
            .into_iter()
            .find(|l| l.stored.name == descriptor.name && l.stored.version == descriptor.version)
            .and_then(|l| l.stored.code_changed_at),
        active: version_summary(app, projection, head),
        building: app
            .projections
            .entry(&descriptor.name)
            .and_then(|e| e.building)
            .map(|b| version_summary(app, &b.projection, head)),
        partitions,
    }
}

fn version_summary(app: &AppState, projection: &Projection, head: u64) -> VersionSummary {
    let checkpoint = projection.checkpoint();
    let health = projection.health();
    let rate = projection.positions_per_second();
    let left = head.saturating_sub(checkpoint);
    let loaded = app.deploy.loaded().into_iter().find(|l| {
        l.stored.name == projection.name() && l.stored.version == projection.descriptor().version
    });
    VersionSummary {
        version: projection.descriptor().version.clone(),
        status: health.status,
        error: health.error,
        checkpoint,
        head,
        lag: left,
        progress: (projection.progress_towards(head) * 1000.0).round() / 1000.0,
        positions_per_second: (rate * 10.0).round() / 10.0,
        eta_seconds: if left == 0 {
            Some(0.0)
        } else if rate > 0.0 {
            Some((left as f64 / rate * 10.0).round() / 10.0)
        } else {
            None
        },
        cutover: projection.is_building().then(|| {
            if app.deploy.manual_cutover(projection.name()) {
                "manual"
            } else {
                "auto"
            }
        }),
        sha256: loaded.as_ref().map(|l| l.stored.sha256.clone()),
        code_changed_at: loaded.as_ref().and_then(|l| l.stored.code_changed_at),
        swap_pauses: projection.metrics.swap_pause.count(),
        last_swap_pause_ms: ProjectionMetrics::get(&projection.metrics.last_swap_pause_micros)
            as f64
            / 1000.0,
        loaded_at: loaded.map(|l| l.loaded_at),
    }
}

/// Every projection (observers have their own list), the source's watermark and, with the
/// Kafka source, its partitions.
#[derive(Serialize, ToSchema)]
pub struct ProjectionList {
    projections: Vec<ProjectionSummary>,
    /// Null for a source without one; else whether it is held, and by which transaction.
    #[schema(value_type = Option<Object>)]
    watermark: Value,
    kafka: Option<KafkaSummary>,
}

/// What the Kafka consumer took in, since start, and where each partition is.
#[derive(Serialize, ToSchema)]
pub struct KafkaSummary {
    partitions: Vec<PartitionLag>,
    events: u64,
    duplicates: u64,
    tombstones: u64,
    bad: u64,
}

#[utoipa::path(
    get,
    path = "/projections",
    tag = "projections",
    responses((status = 200, description = "Every projection", body = ProjectionList)),
)]
pub async fn list_projections(State(app): State<AppState>) -> Json<ProjectionList> {
    let projections = app.projections.projections();
    let mut all = Vec::with_capacity(projections.len());
    // Observers have a list of their own (`GET /observers`).
    for projection in projections.iter().filter(|p| !p.is_observer()) {
        all.push(summary(&app, projection).await);
    }
    let kafka = app.kafka.as_ref().map(|k| {
        let (events, duplicates, tombstones, bad) = k.counts();
        KafkaSummary {
            partitions: k.partitions(),
            events,
            duplicates,
            tombstones,
            bad,
        }
    });
    Json(ProjectionList {
        projections: all,
        watermark: watermark(&app),
        kafka,
    })
}

/// The source's watermark: held or not, and by which transaction (null for a source without
/// one). Every projection reads below it.
fn watermark(app: &AppState) -> Value {
    match app.source.watermark() {
        None => Value::Null,
        Some(w) => match w.hold() {
            Some(hold) => hold.to_json(),
            None => json!({ "held": false, "held_seconds": 0 }),
        },
    }
}

#[utoipa::path(
    get,
    path = "/projections/{name}",
    tag = "projections",
    params(("name" = String, Path, description = "The projection")),
    responses(
        (status = 200, description = "The projection", body = ProjectionSummary),
        (status = 404, description = "`unknown_projection`", body = ErrorBody),
    ),
)]
pub async fn get_projection(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ProjectionSummary>, ApiError> {
    let projection = projection(&app, &name)?;
    Ok(Json(summary(&app, &projection).await))
}

/// How far a projection has applied one stream.
#[utoipa::path(
    get,
    path = "/projections/{name}/_streams/{stream}",
    tag = "projections",
    params(
        ("name" = String, Path, description = "The projection"),
        ("stream" = String, Path, description = "The stream"),
        WaitQuery,
    ),
    responses(
        (status = 200, description = "The stream's last version the projection has applied", body = StreamApplied),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 404, description = "`unknown_projection`, `unknown_version`", body = ErrorBody),
        WaitFailed,
    ),
)]
pub async fn get_stream(
    State(app): State<AppState>,
    Path((name, stream)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<StreamApplied>, ApiError> {
    let params = ReadParams::parse(query.as_deref())?;
    let projection = params.projection(&app, &name)?;
    let projection = params.wait(&app, projection).await?;
    let position = projection.checkpoint();
    let version = app.source.version_at(&stream, position).await?;
    Ok(Json(StreamApplied {
        stream,
        applied_version: version,
        position,
    }))
}

/// `GET /projections/{name}/_dead_letters?after=POSITION&limit=N`: the events this projection
/// set aside, in position order.
#[utoipa::path(
    get,
    path = "/projections/{name}/_dead_letters",
    tag = "projections",
    params(("name" = String, Path, description = "The projection or observer"), LetterPage),
    responses(
        (status = 200, description = "Dead letters, oldest first; `next_after` is null on the last page", body = Page<DeadLetter>),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 404, description = "`unknown_projection`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    ),
)]
pub async fn list_dead_letters(
    State(app): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Page<DeadLetter>>, ApiError> {
    let projection = projection(&app, &name)?;
    let mut after = 0;
    let mut limit = app.config.default_page_size;
    for (field, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*field {
            "after" => after = parse_number(&field, &value)?,
            "limit" => limit = parse_number(&field, &value)?,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!("unknown parameter `{field}` (dead letters take after and limit)"),
                ))
            }
        }
    }
    let limit = limit.clamp(1, app.config.max_page_size);
    let letters = app
        .store
        .dead_letters(projection.descriptor(), after, limit)
        .await?;
    let next = (letters.len() == limit as usize)
        .then(|| letters.last().map(|l| l.position))
        .flatten();
    Ok(Json(Page {
        items: letters,
        next_after: Some(next),
        ..Page::default()
    }))
}

/// `GET /projections/{name}/_parked`: the streams held back behind a dead letter, each with
/// the letter and how many events wait.
#[utoipa::path(
    get,
    path = "/projections/{name}/_parked",
    tag = "projections",
    params(("name" = String, Path, description = "The projection or observer")),
    responses(
        (status = 200, description = "The streams held back behind a dead letter", body = Page<ParkedStream>),
        (status = 404, description = "`unknown_projection`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    ),
)]
pub async fn list_parked(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Page<ParkedStream>>, ApiError> {
    let projection = projection(&app, &name)?;
    let parked = app.store.parked(projection.descriptor()).await?;
    Ok(Json(Page {
        items: parked,
        ..Page::default()
    }))
}

#[utoipa::path(
    get,
    path = "/projections/{name}/{collection}/{key}",
    tag = "projections",
    params(
        ("name" = String, Path, description = "The projection"),
        ("collection" = String, Path, description = "One of its collections"),
        ("key" = String, Path, description = "The document's key"),
        WaitQuery,
    ),
    responses(
        (status = 200, description = "The document, and the position it is at least as fresh as", body = DocumentAt),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 404, description = "`not_found` (with the position read at), `unknown_projection`, `unknown_collection`, `unknown_version`", body = ErrorBody),
        WaitFailed,
    ),
)]
pub async fn get_document(
    State(app): State<AppState>,
    Path((name, collection, key)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<DocumentAt>, ApiError> {
    let params = ReadParams::parse(query.as_deref())?;
    let projection = params.projection(&app, &name)?;
    check_collection(&projection, &collection)?;
    if let Some((field, _)) = params.filters.first() {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!("unknown parameter `{field}` (a document read takes wait_for, wait_for_event, min_position, timeout_ms and version)"),
        ));
    }
    let projection = params.wait(&app, projection).await?;
    // Read before the document: the document is at least this fresh.
    let position = projection.checkpoint();
    let doc = app
        .store
        .document(projection.descriptor(), &collection, &key)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "not_found",
                format!("no document {key:?} in {name}/{collection}"),
            )
            .with("position", position)
        })?;
    Ok(Json(DocumentAt { doc, position }))
}

#[utoipa::path(
    get,
    path = "/projections/{name}/{collection}",
    tag = "projections",
    params(
        ("name" = String, Path, description = "The projection"),
        ("collection" = String, Path, description = "One of its collections"),
        WaitQuery,
        ListPage,
    ),
    responses(
        (status = 200, description = "A page of documents in key order; `next_cursor` is null on the last page", body = Page<Document>),
        (status = 400, description = "`invalid_parameter`, `invalid_filter` (not an indexed field)", body = ErrorBody),
        (status = 404, description = "`unknown_projection`, `unknown_collection`, `unknown_version`", body = ErrorBody),
        WaitFailed,
    ),
)]
pub async fn list_documents(
    State(app): State<AppState>,
    Path((name, collection)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<Page<Document>>, ApiError> {
    let params = ReadParams::parse(query.as_deref())?;
    let projection = params.projection(&app, &name)?;
    check_collection(&projection, &collection)?;
    let spec = projection
        .descriptor()
        .collection(&collection)
        .ok_or_else(|| ApiError::not_found("unknown_collection", collection.clone()))?;
    for (field, _) in &params.filters {
        if !spec.indexes.contains(field) {
            return Err(ApiError::bad_request(
                "invalid_filter",
                format!("cannot filter {name}/{collection} on `{field}`: only indexed fields can be filtered"),
            )
            .with("indexed_fields", json!(spec.indexes)));
        }
    }
    let limit = params.limit.unwrap_or(app.config.default_page_size);
    if limit == 0 || limit > app.config.max_page_size {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!("`limit` must be 1 to {}", app.config.max_page_size),
        ));
    }
    let projection = params.wait(&app, projection).await?;
    let position = projection.checkpoint();
    let query = ListQuery {
        filters: params.filters.clone(),
        after: params.cursor.clone(),
        // One more than asked tells whether there is a next page.
        limit: limit + 1,
    };
    let mut items = app
        .store
        .list(projection.descriptor(), &collection, &query)
        .await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|d| d.key.clone())
    } else {
        None
    };
    Ok(Json(Page {
        items,
        next_cursor: Some(next_cursor),
        position: Some(position),
        ..Page::default()
    }))
}

// Bodies that carry stored JSON (documents, events) are typed, never built with `json!`:
// `json!` parses the stored text into a `Value`, which rounds `18446744073709551616` to
// `1.8446744073709552e19`. Serialized straight to the response, the text goes out as stored.

/// A page of a listing; `None` fields a listing does not have are left out.
#[derive(Serialize, ToSchema)]
pub struct Page<T> {
    items: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<Option<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<u64>,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            next_cursor: None,
            next_after: None,
            position: None,
        }
    }
}

/// How far a projection has applied one stream.
#[derive(Serialize, ToSchema)]
pub struct StreamApplied {
    stream: String,
    /// Its last version the projection has applied (0: none).
    applied_version: u64,
    /// The projection's checkpoint when asked.
    position: u64,
}

/// A document and the position it is at least as fresh as.
#[derive(Serialize, ToSchema)]
pub struct DocumentAt {
    #[serde(flatten)]
    doc: Document,
    position: u64,
}
