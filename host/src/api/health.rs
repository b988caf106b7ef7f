//! `/healthz`: the process answers. `/readyz`: the database answers, every projection runs and
//! the outbox watermark is not held past `outbox.watermark_warn_ms`; a failed projection or a
//! long-held watermark makes the instance not ready, and the body says which and why.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::metrics::ProjectionMetrics;
use crate::store::ProjectionStatus;

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Value>) {
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
    if problems.is_empty() {
        let mut body = json!({ "status": "ready" });
        if !notes.is_empty() {
            body["notes"] = json!(notes);
        }
        (StatusCode::OK, Json(body))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "problems": problems })),
        )
    }
}
