//! The HTTP API (axum). JSON everywhere; errors as `{"error": {"code", "message", ...}}`.

mod admin;
mod error;
mod events;
mod health;
mod metrics;
mod observers;
mod openapi;
mod query;
pub mod server;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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

/// Every public route, each registered with its `#[utoipa::path]` so the document and the
/// router cannot disagree (admin routes: [`admin::routes`]).
fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(events::append))
        .routes(routes!(query::list_projections))
        .routes(routes!(query::get_projection))
        .routes(routes!(query::get_stream))
        .routes(routes!(query::list_dead_letters))
        .routes(routes!(query::list_parked))
        .routes(routes!(query::list_documents))
        .routes(routes!(query::get_document))
        .routes(routes!(observers::list_observers))
        .routes(routes!(observers::get_observer))
        .routes(routes!(observers::list_dead_letters))
        .routes(routes!(ui))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi::document))
}

/// The API's OpenAPI 3.1 document (served at `/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    public_routes()
        .nest("/admin", admin::routes())
        .split_for_parts()
        .1
}

pub fn router(state: AppState) -> Router {
    let max_body = state.config.max_body_bytes;
    let (router, _) = public_routes()
        .nest("/admin", admin::guarded(admin::routes(), state.clone()))
        .split_for_parts();
    router
        .fallback(|| async {
            ApiError::not_found("no_route", "no such endpoint; see the README for the API")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), timed))
        .with_state(state)
}

/// `GET /ui`: the operator's page, one file embedded in the binary (no CDN, no fonts: it works
/// offline). It reads the same API as anyone; the admin token it asks for stays in the tab.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "operations",
    responses((status = 200, description = "The operator's page", content_type = "text/html")),
)]
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
