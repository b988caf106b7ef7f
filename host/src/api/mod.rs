//! The HTTP API (axum). JSON everywhere; errors as `{"error": {"code", "message", ...}}`.

mod admin;
mod error;
mod events;
mod health;
mod metrics;
mod observers;
mod query;
pub mod server;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use admin::ADMIN_ROUTES;
pub use error::ApiError;

use crate::backpressure::Backpressure;
use crate::config::{AdminConfig, HttpConfig};
use crate::consistency::Appends;
use crate::registry::Registry;
use crate::source::Source;
use crate::store::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub source: Arc<dyn Source>,
    /// The reads waiting for stream versions; appends through the API resolve them.
    pub appends: Appends,
    pub store: Arc<dyn Store>,
    pub projections: Arc<Registry>,
    /// Uploads, swaps, rebuilds and cut-overs.
    pub deploy: Arc<crate::deploy::Deployer>,
    pub config: Arc<HttpConfig>,
    pub admin: Arc<AdminConfig>,
    pub backpressure: Backpressure,
    /// The Kafka consumer's counters and partitions, with `source.kind = "kafka"`.
    pub kafka: Option<Arc<crate::source::kafka::KafkaStats>>,
    /// Request durations and read-your-writes waits.
    pub http: Arc<crate::metrics::HttpMetrics>,
}

pub fn router(state: AppState) -> Router {
    let max_body = state.config.max_body_bytes;
    Router::new()
        .route("/events", post(events::append))
        .route("/projections", get(query::list_projections))
        .route("/projections/{name}", get(query::get_projection))
        .route(
            "/projections/{name}/_streams/{stream}",
            get(query::get_stream),
        )
        .route(
            "/projections/{name}/_dead_letters",
            get(query::list_dead_letters),
        )
        .route("/projections/{name}/_parked", get(query::list_parked))
        .route(
            "/projections/{name}/{collection}",
            get(query::list_documents),
        )
        .route(
            "/projections/{name}/{collection}/{key}",
            get(query::get_document),
        )
        .route("/observers", get(observers::list_observers))
        .route("/observers/{name}", get(observers::get_observer))
        .route(
            "/observers/{name}/_dead_letters",
            get(observers::list_dead_letters),
        )
        .route("/ui", get(ui))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .nest("/admin", admin::router(state.clone()))
        .fallback(|| async {
            ApiError::not_found("no_route", "no such endpoint; see the README for the API")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), timed))
        .with_state(state)
}

/// `GET /ui`: the operator's page, one file embedded in the binary (no CDN, no fonts: it works
/// offline). It reads the same API as anyone; the admin token it asks for stays in the tab.
async fn ui() -> impl axum::response::IntoResponse {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/html; charset=utf-8",
            ),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("ui/index.html"),
    )
}

/// Times every request by its route template (`/projections/:name/:collection/:key`, not the
/// path: a label per document would have no end) and status.
async fn timed(
    axum::extract::State(app): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        // `:name` rather than `{name}`: some scrapers' parsers stop a label value at a brace.
        .map_or_else(
            || "unmatched".to_owned(),
            |m| m.as_str().replace('{', ":").replace('}', ""),
        );
    // The caller's id when it sends one, else ours: on every log line of the request (a span)
    // and in the answer's `x-request-id`.
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let span = tracing::info_span!("request", request_id = %id, method = %request.method(), route = %route);
    let start = std::time::Instant::now();
    let mut response = tracing::Instrument::instrument(next.run(request), span).await;
    app.http
        .observe_request(&route, response.status().as_u16(), start.elapsed());
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
