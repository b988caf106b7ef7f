//! `/admin/...`: operator commands, behind a bearer token. A route only sends a command to the
//! projection's supervisor and waits for the answer; it never touches a runner's state.
//!
//! Without a configured token every admin route answers 403 saying how to enable it; a missing
//! or wrong token is 401 with `WWW-Authenticate: Bearer`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, RawQuery};
use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::openapi::{AdminAuth, CommandFailed, ErrorBody};
use super::AppState;
use crate::control::{Command, CommandError, Outcome};
use crate::deploy::{DeployError, Deployed, Loaded};
use crate::observer::{ActionState, Logged};

/// Every admin route, `(method, path)`: the router is built from this list, and the tests
/// walk it, so a route added here is guarded and checked like the others.
pub const ADMIN_ROUTES: &[(&str, &str)] = &[
    ("POST", "/admin/projections/{name}/pause"),
    ("POST", "/admin/projections/{name}/resume"),
    ("POST", "/admin/projections/{name}/restart"),
    (
        "POST",
        "/admin/projections/{name}/dead-letters/{position}/retry",
    ),
    (
        "POST",
        "/admin/projections/{name}/dead-letters/{position}/skip",
    ),
    ("PUT", "/admin/plugins/{name}"),
    ("GET", "/admin/plugins"),
    ("POST", "/admin/projections/{name}/activate"),
    ("POST", "/admin/projections/{name}/rebuild"),
    ("DELETE", "/admin/projections/{name}/versions/{version}"),
    ("DELETE", "/admin/projections/{name}"),
    ("POST", "/admin/observers/{name}/pause"),
    ("POST", "/admin/observers/{name}/resume"),
    ("POST", "/admin/observers/{name}/restart"),
    ("POST", "/admin/observers/{name}/reset"),
    ("POST", "/admin/observers/{name}/dead-letters/{id}/retry"),
    ("POST", "/admin/observers/{name}/dead-letters/{id}/skip"),
];

/// How long a route waits for a command's answer (a retry runs the plugin; a command for
/// another instance goes through the database).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The admin routes, each registered with its `#[utoipa::path]` (relative to `/admin`).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(restart))
        .routes(routes!(retry))
        .routes(routes!(skip))
        .routes(routes!(upload))
        .routes(routes!(list_plugins))
        .routes(routes!(activate))
        .routes(routes!(rebuild))
        .routes(routes!(drop_version))
        .routes(routes!(remove))
        .routes(routes!(pause_observer))
        .routes(routes!(resume_observer))
        .routes(routes!(restart_observer))
        .routes(routes!(reset_observer))
        .routes(routes!(retry_action))
        .routes(routes!(skip_action))
}

/// `routes`, to nest under `/admin`, each behind the token check; unknown `/admin` paths are
/// guarded too. Only an upload reads a body, so the plugin size limit is the admin routes'.
pub fn guarded(routes: OpenApiRouter<AppState>, state: AppState) -> OpenApiRouter<AppState> {
    let max_plugin = state.admin.max_plugin_mb.saturating_mul(1 << 20);
    routes
        .fallback(|| async {
            ApiError::not_found("no_route", "no such admin endpoint; see the README")
        })
        .layer(DefaultBodyLimit::max(max_plugin))
        .layer(axum::middleware::from_fn_with_state(state, authorize))
}

async fn authorize(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let configured = app.admin.token.as_bytes();
    if configured.is_empty() {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "the admin API is off: set admin.token in the config file (or PROJECTOR_ADMIN__TOKEN) and send it as `Authorization: Bearer <token>`",
        )
        .into_response();
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        // The scheme is case-insensitive (RFC 7235).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let ok = given.is_some_and(|given| same_secret(given.as_bytes(), configured));
    if !ok {
        let message = if given.is_none() {
            "this admin route needs `Authorization: Bearer <admin.token>`"
        } else {
            "wrong admin token"
        };
        let mut response =
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"projector admin\""),
        );
        return response;
    }
    next.run(request).await
}

/// Compares in time that depends on neither secret's content nor length: both are hashed
/// first, and the digests compared without an early exit.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |diff, (x, y)| diff | (x ^ y))
        == 0
}

impl From<CommandError> for ApiError {
    fn from(err: CommandError) -> Self {
        let mut error = ApiError::new(err.status(), err.code(), err.to_string());
        if let Ok(Value::Object(details)) = serde_json::to_value(&err) {
            for (key, value) in details {
                if key != "error" {
                    error = error.with(&key, value);
                }
            }
        }
        error
    }
}

/// What a command did to a projection or an observer.
#[derive(Serialize, ToSchema)]
pub struct CommandAnswer {
    projection: String,
    outcome: Outcome,
}

/// A dead action retried or skipped.
#[derive(Serialize, ToSchema)]
pub struct ActionAnswer {
    observer: String,
    outcome: ActionOutcome,
    action: Logged,
}

#[derive(Serialize, ToSchema)]
pub struct ActionOutcome {
    status: ActionState,
    message: String,
}

/// A WebAssembly component, as bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct ComponentBytes(#[allow(dead_code)] Vec<u8>);

/// What this instance has loaded.
#[derive(Serialize, ToSchema)]
pub struct PluginList {
    plugins: Vec<Loaded>,
}

/// A version's tables dropped.
#[derive(Serialize, ToSchema)]
pub struct Dropped {
    projection: String,
    dropped: String,
}

/// A projection removed, every version's tables with it.
#[derive(Serialize, ToSchema)]
pub struct Removed {
    projection: String,
    removed: bool,
}

async fn send(
    app: &AppState,
    name: &str,
    command: Command,
) -> Result<Json<CommandAnswer>, ApiError> {
    let supervised = app.projections.supervised(name).ok_or_else(|| {
        ApiError::not_found(
            "unknown_projection",
            format!("no projection named {name:?}"),
        )
        .with("projections", json!(app.projections.names()))
    })?;
    let outcome = supervised.send(command, COMMAND_TIMEOUT).await?;
    Ok(Json(CommandAnswer {
        projection: name.to_owned(),
        outcome,
    }))
}

fn position(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_position",
            format!("{text:?} is not a position (a dead letter's `position`)"),
        )
    })
}

#[utoipa::path(
    post,
    path = "/projections/{name}/pause",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The projection")),
    responses(
        (status = 200, description = "Paused: it reads nothing until resumed", body = CommandAnswer),
        AdminAuth,
        CommandFailed,
    ),
)]
async fn pause(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<CommandAnswer>, ApiError> {
    send(&app, &name, Command::Pause).await
}

#[utoipa::path(
    post,
    path = "/projections/{name}/resume",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The projection")),
    responses(
        (status = 200, description = "Running again", body = CommandAnswer),
        AdminAuth,
        CommandFailed,
    ),
)]
async fn resume(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<CommandAnswer>, ApiError> {
    send(&app, &name, Command::Resume).await
}

#[utoipa::path(
    post,
    path = "/projections/{name}/restart",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The projection")),
    responses(
        (status = 200, description = "Restarted from its checkpoint", body = CommandAnswer),
        AdminAuth,
        CommandFailed,
    ),
)]
async fn restart(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<CommandAnswer>, ApiError> {
    send(&app, &name, Command::Restart).await
}

#[utoipa::path(
    post,
    path = "/projections/{name}/dead-letters/{position}/retry",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The projection"), ("position" = String, Path, description = "The dead letter's `position`")),
    responses(
        (status = 200, description = "Run again; its parked stream follows", body = CommandAnswer),
        AdminAuth,
        CommandFailed,
        (status = 400, description = "`invalid_position`", body = ErrorBody),
    ),
)]
async fn retry(
    State(app): State<AppState>,
    Path((name, at)): Path<(String, String)>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let position = position(&at)?;
    send(&app, &name, Command::Retry { position }).await
}

#[utoipa::path(
    post,
    path = "/projections/{name}/dead-letters/{position}/skip",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The projection"), ("position" = String, Path, description = "The dead letter's `position`")),
    responses(
        (status = 200, description = "Passed over; its parked stream goes on", body = CommandAnswer),
        AdminAuth,
        CommandFailed,
        (status = 400, description = "`invalid_position`", body = ErrorBody),
    ),
)]
async fn skip(
    State(app): State<AppState>,
    Path((name, at)): Path<(String, String)>,
) -> Result<Json<CommandAnswer>, ApiError> {
    let position = position(&at)?;
    send(&app, &name, Command::Skip { position }).await
}

#[utoipa::path(
    post,
    path = "/observers/{name}/pause",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The observer")),
    responses(
        (status = 200, description = "Paused: it observes nothing until resumed", body = CommandAnswer),
        AdminAuth,
        CommandFailed,
    ),
)]
async fn pause_observer(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<CommandAnswer>, ApiError> {
    super::observers::observer(&app, &name)?;
    send(&app, &name, Command::Pause).await
}

#[utoipa::path(
    post,
    path = "/observers/{name}/resume",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The observer")),
    responses(
        (status = 200, description = "Running again", body = CommandAnswer),
        AdminAuth,
        CommandFailed,
    ),
)]
async fn resume_observer(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<CommandAnswer>, ApiError> {
    super::observers::observer(&app, &name)?;
    send(&app, &name, Command::Resume).await
}

#[utoipa::path(
    post,
    path = "/observers/{name}/restart",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The observer")),
    responses(
        (status = 200, description = "Restarted from its checkpoint", body = CommandAnswer),
        AdminAuth,
        CommandFailed,
    ),
)]
async fn restart_observer(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<CommandAnswer>, ApiError> {
    super::observers::observer(&app, &name)?;
    send(&app, &name, Command::Restart).await
}

/// `POST /admin/observers/{name}/reset?position=N` (default 0): the observer observes the
/// events after N again; what it decides again was logged already and is not delivered twice.
#[utoipa::path(
    post,
    path = "/observers/{name}/reset",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The observer"), ("position" = Option<u64>, Query, description = "Observe the events after this position again (default 0)")),
    responses(
        (status = 200, description = "Reset", body = CommandAnswer),
        AdminAuth,
        CommandFailed,
        (status = 400, description = "`invalid_position`, `invalid_parameter`", body = ErrorBody),
    ),
)]
async fn reset_observer(
    State(app): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<CommandAnswer>, ApiError> {
    super::observers::observer(&app, &name)?;
    let params = query_params(query.as_deref(), &["position"])?;
    let position = match params.get("position") {
        Some(text) => text.parse().map_err(|_| {
            ApiError::bad_request(
                "invalid_position",
                format!("position={text:?} is not a position"),
            )
        })?,
        None => 0,
    };
    send(&app, &name, Command::Reset { position }).await
}

#[utoipa::path(
    post,
    path = "/observers/{name}/dead-letters/{id}/retry",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The observer"), ("id" = String, Path, description = "The dead action's `id`")),
    responses(
        (status = 200, description = "Delivered again from its first attempt; its stream's waiting actions follow", body = ActionAnswer),
        AdminAuth,
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "`unknown_observer`, `unknown_dead_letter`", body = ErrorBody),
        (status = 409, description = "`not_dead`: only a dead action can be retried or skipped", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    ),
)]
async fn retry_action(
    State(app): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<ActionAnswer>, ApiError> {
    resolve_action(&app, &name, &id, true).await
}

#[utoipa::path(
    post,
    path = "/observers/{name}/dead-letters/{id}/skip",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The observer"), ("id" = String, Path, description = "The dead action's `id`")),
    responses(
        (status = 200, description = "Skipped; its stream's waiting actions go on", body = ActionAnswer),
        AdminAuth,
        (status = 400, description = "`invalid_id`", body = ErrorBody),
        (status = 404, description = "`unknown_observer`, `unknown_dead_letter`", body = ErrorBody),
        (status = 409, description = "`not_dead`: only a dead action can be retried or skipped", body = ErrorBody),
        (status = 503, description = "`store_unavailable`", body = ErrorBody),
    ),
)]
async fn skip_action(
    State(app): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<ActionAnswer>, ApiError> {
    resolve_action(&app, &name, &id, false).await
}

/// A dead action's retry (pending again, attempts from 0) or skip; the dispatcher (here, or on
/// the instance that runs the observer, within a second) lets its stream go on.
async fn resolve_action(
    app: &AppState,
    name: &str,
    id: &str,
    retry: bool,
) -> Result<Json<ActionAnswer>, ApiError> {
    let observer = super::observers::observer(app, name)?;
    let id: i64 = id.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_id",
            format!("{id:?} is not an action id (a dead letter's `id`)"),
        )
    })?;
    let Some(action) = app.store.resolve_action(name, id, retry).await? else {
        let found = app.store.actions_by_id(name, &[id]).await?;
        return Err(match found.first() {
            Some(action) => ApiError::new(
                StatusCode::CONFLICT,
                "not_dead",
                format!(
                    "action {id} of {name} is {}, not dead: only a dead action can be retried or skipped",
                    action.state.as_str()
                ),
            ),
            None => ApiError::not_found(
                "unknown_dead_letter",
                format!("{name} has no action {id}"),
            ),
        });
    };
    observer.nudge();
    let verb = if retry { "retried" } else { "skipped" };
    tracing::info!(observer = %name, action = id, key = %action.key, "dead action {verb} by an operator");
    let message = if retry {
        format!("action {id} is delivered again, from its first attempt; its stream's waiting actions follow it")
    } else {
        format!("action {id} is skipped; its stream's waiting actions go on")
    };
    Ok(Json(ActionAnswer {
        observer: name.to_owned(),
        outcome: ActionOutcome {
            status: action.state,
            message,
        },
        action,
    }))
}

impl From<DeployError> for ApiError {
    fn from(err: DeployError) -> Self {
        let status = err.status();
        ApiError::new(status, err.code(), err.to_string())
    }
}

/// The query parameters of `text`, refusing any not in `known`.
fn query_params(
    text: Option<&str>,
    known: &[&str],
) -> Result<std::collections::HashMap<String, String>, ApiError> {
    let mut params = std::collections::HashMap::new();
    for (key, value) in form_urlencoded::parse(text.unwrap_or("").as_bytes()) {
        if !known.contains(&&*key) {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!(
                    "unknown parameter `{key}` (this route takes: {})",
                    known.join(", ")
                ),
            ));
        }
        params.insert(key.into_owned(), value.into_owned());
    }
    Ok(params)
}

#[utoipa::path(
    put,
    path = "/plugins/{name}",
    tag = "admin",
    security(("admin_token" = [])),
    params(
        ("name" = String, Path, description = "The plugin's name, as its `describe()` gives it"),
        ("cutover" = Option<String>, Query, description = "`auto` (default) or `manual`: a rebuild waits for `activate`"),
    ),
    request_body(
        description = "The component's bytes (at most `admin.max_plugin_mb`)",
        content((ComponentBytes = "application/wasm"), (ComponentBytes = "application/octet-stream")),
    ),
    responses(
        (status = 200, description = "`swapped` (new code for the running version) or `unchanged`", body = Deployed),
        (status = 201, description = "`created`: a new projection or observer", body = Deployed),
        (status = 202, description = "`rebuilding`: a new version builds beside the serving one", body = Deployed),
        (status = 400, description = "`invalid_parameter`, `unreadable_body`", body = ErrorBody),
        AdminAuth,
        (status = 409, description = "`shape_changed` (bump the version to rebuild), `world_changed`, `rebuild_running`", body = ErrorBody),
        (status = 413, description = "`plugin_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: send `application/wasm`", body = ErrorBody),
        (status = 422, description = "Not loadable: `not_a_component`, `wrong_world`, `unsupported_contract`, `unsupported_import`, `describe_failed`, `invalid_descriptor`, `name_mismatch`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`, `unavailable`", body = ErrorBody),
    ),
)]
/// `PUT /admin/plugins/{name}` with the component's bytes: a swap (same version), a rebuild
/// beside the serving version (new version; `?cutover=manual` waits for `activate`), or a new
/// projection.
async fn upload(
    State(app): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let params = query_params(query.as_deref(), &["cutover"])?;
    let manual = match params.get("cutover").map(String::as_str) {
        None | Some("auto") => false,
        Some("manual") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("`cutover` is `auto` or `manual`, not {other:?}"),
            ))
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !["application/wasm", "application/octet-stream"].contains(&essence) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send the component's bytes as `Content-Type: application/wasm` (got {content_type:?}); with curl: --data-binary @plugin.wasm -H 'Content-Type: application/wasm'"),
        ));
    }
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "plugin_too_large",
                format!(
                    "the plugin is larger than admin.max_plugin_mb ({} MiB)",
                    app.admin.max_plugin_mb
                ),
            )
        } else {
            ApiError::bad_request("unreadable_body", rejection.body_text())
        }
    })?;
    let deployed = app
        .deploy
        .deploy(Some(&name), bytes.to_vec(), "upload", manual)
        .await?;
    let status = match deployed.action {
        "created" => StatusCode::CREATED,
        "rebuilding" => StatusCode::ACCEPTED,
        _ => StatusCode::OK,
    };
    Ok((status, Json(deployed)).into_response())
}

/// `GET /admin/plugins`: what this instance has loaded.
#[utoipa::path(
    get,
    path = "/plugins",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Each loaded plugin: name, world, contract, version, sha256, when loaded", body = PluginList),
        AdminAuth,
    ),
)]
async fn list_plugins(State(app): State<AppState>) -> Json<PluginList> {
    Json(PluginList {
        plugins: app.deploy.loaded(),
    })
}

/// `POST /admin/projections/{name}/activate?version=V`: cut over to `V` (a manual rebuild that
/// has caught up), or roll back to an older version (it catches up from its own checkpoint
/// first, then cuts over).
#[utoipa::path(
    post,
    path = "/projections/{name}/activate",
    tag = "admin",
    security(("admin_token" = [])),
    params(
        ("name" = String, Path, description = "The projection"),
        ("version" = String, Query, description = "The version to make serve"),
    ),
    responses(
        (status = 200, description = "Cut over: `version` serves", body = Deployed),
        (status = 202, description = "An older version catches up from its checkpoint, then cuts over", body = Deployed),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        AdminAuth,
        (status = 404, description = "`unknown_projection`, `unknown_version`", body = ErrorBody),
        (status = 409, description = "`rebuild_running`, `active_version`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`, `unavailable`", body = ErrorBody),
    ),
)]
async fn activate(
    State(app): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(query.as_deref(), &["version"])?;
    let version = params.get("version").ok_or_else(|| {
        ApiError::bad_request(
            "invalid_parameter",
            "`version` is required: the version to make serve",
        )
    })?;
    let deployed = app.deploy.activate(&name, version).await?;
    let status = if deployed.active == *version {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(deployed)).into_response())
}

/// `POST /admin/projections/{name}/rebuild`: the serving version rebuilt beside itself with its
/// current code (stored as `V~rN`), cut over once caught up; 202 while it builds.
#[utoipa::path(
    post,
    path = "/projections/{name}/rebuild",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The projection")),
    responses(
        (status = 202, description = "The serving version rebuilds beside itself (as `V~rN`)", body = Deployed),
        AdminAuth,
        (status = 404, description = "`unknown_projection`", body = ErrorBody),
        (status = 409, description = "`rebuild_running`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`, `unavailable`", body = ErrorBody),
    ),
)]
async fn rebuild(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let deployed = app.deploy.rebuild(&name).await?;
    Ok((StatusCode::ACCEPTED, Json(deployed)).into_response())
}

/// `DELETE /admin/projections/{name}/versions/{version}`: drops an inactive version's tables.
#[utoipa::path(
    delete,
    path = "/projections/{name}/versions/{version}",
    tag = "admin",
    security(("admin_token" = [])),
    params(
        ("name" = String, Path, description = "The projection"),
        ("version" = String, Path, description = "An inactive version"),
    ),
    responses(
        (status = 200, description = "Its tables dropped", body = Dropped),
        AdminAuth,
        (status = 404, description = "`unknown_projection`, `unknown_version`", body = ErrorBody),
        (status = 409, description = "`active_version`, `rebuild_running`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`, `unavailable`", body = ErrorBody),
    ),
)]
async fn drop_version(
    State(app): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Dropped>, ApiError> {
    app.deploy.drop_version(&name, &version).await?;
    Ok(Json(Dropped {
        projection: name,
        dropped: version,
    }))
}

/// `DELETE /admin/projections/{name}`: removes a projection and every version's tables.
#[utoipa::path(
    delete,
    path = "/projections/{name}",
    tag = "admin",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The projection or observer")),
    responses(
        (status = 200, description = "Removed, with every version's tables", body = Removed),
        AdminAuth,
        (status = 404, description = "`unknown_projection`", body = ErrorBody),
        (status = 503, description = "`store_unavailable`, `unavailable`", body = ErrorBody),
    ),
)]
async fn remove(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Removed>, ApiError> {
    app.deploy.remove(&name).await?;
    Ok(Json(Removed {
        projection: name,
        removed: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_content() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3cres"));
        assert!(!same_secret(b"s3cret", b"s3cret-longer"));
        assert!(!same_secret(b"", b"s3cret"));
    }

    #[test]
    fn the_listed_routes_are_the_documented_ones() {
        let doc = serde_json::to_value(crate::api::openapi()).unwrap();
        let mut documented: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(path, _)| path.starts_with("/admin/"))
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .map(|method| (method.to_uppercase(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut listed: Vec<(String, String)> = ADMIN_ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        documented.sort();
        listed.sort();
        assert_eq!(documented, listed);
        for (method, path) in &listed {
            let operation = &doc["paths"][path][method.to_lowercase()];
            assert_eq!(
                operation["security"],
                json!([{ "admin_token": [] }]),
                "{method} {path} does not name the admin token"
            );
            for status in ["401", "403"] {
                assert!(
                    operation["responses"][status].is_object(),
                    "{method} {path} does not document {status}"
                );
            }
        }
    }
}
