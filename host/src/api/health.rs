//! `/healthz`: the process answers. `/readyz`: the database answers and every projection runs;
//! a failed projection makes the instance not ready, and the body says which and why.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::store::ProjectionStatus;

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Value>) {
    let mut problems = Vec::new();
    if let Err(err) = app.store.ping().await {
        problems.push(json!({ "component": "database", "error": err.to_string() }));
    }
    for projection in app.projections.values() {
        let health = projection.health();
        if health.status == ProjectionStatus::Failed {
            problems.push(json!({ "component": format!("projection {}", projection.name()), "error": health.error }));
        } else if let Some(error) = health.retrying {
            problems.push(
                json!({ "component": format!("projection {}", projection.name()), "error": error }),
            );
        }
    }
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "problems": problems })),
        )
    }
}
