//! `/healthz`: the process answers. `/readyz`: the database answers, every projection runs and
//! the outbox watermark is not held past `outbox.watermark_warn_ms`; a failed projection or a
//! long-held watermark makes the instance not ready, and the body says which and why.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::AppState;
use crate::metrics::ProjectionMetrics;
use crate::store::ProjectionStatus;

/// `{"status": "ok"}`.
#[derive(Serialize, ToSchema)]
pub struct Alive {
    status: &'static str,
}

/// `ready`, or `not_ready` with the problems; notes on what serves but needs an operator.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    status: &'static str,
    /// Each `{"component", "error", ...}`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    problems: Vec<Value>,
    /// Each `{"component", "parked_streams"}`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    notes: Vec<Value>,
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process answers", body = Alive)),
)]
pub async fn healthz() -> Json<Alive> {
    Json(Alive { status: "ok" })
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = Readiness),
        (status = 503, description = "Not ready: the database, a projection or the watermark, named in `problems`", body = Readiness),
    ),
)]
pub async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let mut problems = Vec::new();
    if let Err(err) = app.store.ping().await {
        problems.push(json!({ "component": "database", "error": err.to_string() }));
    }
    let mut notes = Vec::new();
    for projection in app.projections.projections() {
        let health = projection.health();
        let parked = ProjectionMetrics::get(&projection.metrics.parked_streams);
        if parked > 0 {
            // It serves, and the rest of its streams go on: ready, and saying so.
            notes.push(json!({ "component": format!("projection {}", projection.name()), "parked_streams": parked }));
        }
        if health.status == ProjectionStatus::Failed {
            problems.push(json!({ "component": format!("projection {}", projection.name()), "error": health.error }));
        } else if let Some(error) = health.retrying {
            problems.push(
                json!({ "component": format!("projection {}", projection.name()), "error": error }),
            );
        }
    }
    // Held past the threshold, every projection's reads are that stale and every read that
    // waits for a write times out: not ready, like a projection retrying after a database
    // error, and the body names the transaction to end.
    if let Some(watermark) = app.source.watermark() {
        if let Some(hold) = watermark
            .hold()
            .filter(|h| h.is_stale(watermark.warn_after))
        {
            let mut problem = hold.to_json();
            problem["component"] = json!("outbox watermark");
            problem["error"] = json!(match &hold.holder {
                Some(h) => format!(
                    "committed events wait for open transaction {} to end",
                    h.xid
                ),
                None => "committed events wait behind the watermark".to_owned(),
            });
            problems.push(problem);
        }
    }
    let (code, status) = if problems.is_empty() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    (
        code,
        Json(Readiness {
            status,
            problems,
            notes,
        }),
    )
}
