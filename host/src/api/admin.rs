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
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;
use crate::control::{Command, CommandError};
use crate::deploy::DeployError;

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

/// The admin routes, to nest under `/admin`, each behind the token check; unknown `/admin`
/// paths are guarded too.
pub fn router(state: AppState) -> Router<AppState> {
    let mut router = Router::new();
    let max_plugin = state.admin.max_plugin_mb.saturating_mul(1 << 20);
    for &(method, path) in ADMIN_ROUTES {
        let inner = path.strip_prefix("/admin").unwrap_or(path);
        router = router.route(inner, handler(method, path, max_plugin));
    }
    router
        .fallback(|| async {
            ApiError::not_found("no_route", "no such admin endpoint; see the README")
        })
        .layer(axum::middleware::from_fn_with_state(state, authorize))
}

fn handler(method: &str, path: &str, max_plugin: usize) -> MethodRouter<AppState> {
    if path.starts_with("/admin/observers/") {
        return match path.rsplit('/').next().unwrap_or_default() {
            "reset" => post(reset_observer),
            "retry" => post(retry_action),
            "skip" => post(skip_action),
            "pause" => post(pause),
            "resume" => post(resume),
            "restart" => post(restart),
            _ => post(unknown_admin_route),
        };
    }
    match (method, path.rsplit('/').next().unwrap_or_default()) {
        ("PUT", _) => put(upload).layer(DefaultBodyLimit::max(max_plugin)),
        ("GET", _) => get(list_plugins),
        ("DELETE", "{version}") => delete(drop_version),
        ("DELETE", _) => delete(remove),
        (_, "activate") => post(activate),
        (_, "rebuild") => post(rebuild),
        (_, "pause") => post(pause),
        (_, "resume") => post(resume),
        (_, "restart") => post(restart),
        (_, "retry") => post(retry),
        _ => post(skip),
    }
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

async fn send(app: &AppState, name: &str, command: Command) -> Result<Json<Value>, ApiError> {
    let supervised = app.projections.supervised(name).ok_or_else(|| {
        ApiError::not_found(
            "unknown_projection",
            format!("no projection named {name:?}"),
        )
        .with("projections", json!(app.projections.names()))
    })?;
    let outcome = supervised.send(command, COMMAND_TIMEOUT).await?;
    Ok(Json(json!({ "projection": name, "outcome": outcome })))
}

fn position(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_position",
            format!("{text:?} is not a position (a dead letter's `position`)"),
        )
    })
}

async fn pause(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    send(&app, &name, Command::Pause).await
}

async fn resume(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    send(&app, &name, Command::Resume).await
}

async fn restart(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    send(&app, &name, Command::Restart).await
}

async fn retry(
    State(app): State<AppState>,
    Path((name, at)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let position = position(&at)?;
    send(&app, &name, Command::Retry { position }).await
}

async fn skip(
    State(app): State<AppState>,
    Path((name, at)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let position = position(&at)?;
    send(&app, &name, Command::Skip { position }).await
}

async fn unknown_admin_route() -> ApiError {
    ApiError::not_found("no_route", "no such admin endpoint; see the README")
}

/// `POST /admin/observers/{name}/reset?position=N` (default 0): the observer observes the
/// events after N again; what it decides again was logged already and is not delivered twice.
async fn reset_observer(
    State(app): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
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

async fn retry_action(
    State(app): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    resolve_action(&app, &name, &id, true).await
}

async fn skip_action(
    State(app): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    resolve_action(&app, &name, &id, false).await
}

/// A dead action's retry (pending again, attempts from 0) or skip; the dispatcher (here, or on
/// the instance that runs the observer, within a second) lets its stream go on.
async fn resolve_action(
    app: &AppState,
    name: &str,
    id: &str,
    retry: bool,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({
        "observer": name,
        "outcome": {
            "status": action.state,
            "message": if retry {
                format!("action {id} is delivered again, from its first attempt; its stream's waiting actions follow it")
            } else {
                format!("action {id} is skipped; its stream's waiting actions go on")
            },
        },
        "action": action,
    })))
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
async fn list_plugins(State(app): State<AppState>) -> Json<Value> {
    Json(json!({ "plugins": app.deploy.loaded() }))
}

/// `POST /admin/projections/{name}/activate?version=V`: cut over to `V` (a manual rebuild that
/// has caught up), or roll back to an older version (it catches up from its own checkpoint
/// first, then cuts over).
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
async fn rebuild(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let deployed = app.deploy.rebuild(&name).await?;
    Ok((StatusCode::ACCEPTED, Json(deployed)).into_response())
}

/// `DELETE /admin/projections/{name}/versions/{version}`: drops an inactive version's tables.
async fn drop_version(
    State(app): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    app.deploy.drop_version(&name, &version).await?;
    Ok(Json(json!({ "projection": name, "dropped": version })))
}

/// `DELETE /admin/projections/{name}`: removes a projection and every version's tables.
async fn remove(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    app.deploy.remove(&name).await?;
    Ok(Json(json!({ "projection": name, "removed": true })))
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
    fn every_listed_route_has_its_own_handler_name() {
        for &(method, path) in ADMIN_ROUTES {
            let last = path.rsplit('/').next().unwrap();
            let known = match method {
                "POST" if path.starts_with("/admin/observers/") => {
                    ["pause", "resume", "restart", "retry", "skip", "reset"].contains(&last)
                }
                "POST" => [
                    "pause", "resume", "restart", "retry", "skip", "activate", "rebuild",
                ]
                .contains(&last),
                "PUT" | "GET" => path.starts_with("/admin/plugins"),
                "DELETE" => path.starts_with("/admin/projections/"),
                _ => false,
            };
            assert!(known, "{method} {path} has no handler");
        }
    }
}
