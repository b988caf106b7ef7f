//! The HTTP API (axum). JSON everywhere; errors as `{"error": {"code", "message", ...}}`.

mod error;
mod events;
mod health;
mod metrics;
mod query;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;

use crate::config::HttpConfig;
use crate::runner::Projection;
use crate::source::Source;
use crate::store::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub source: Arc<dyn Source>,
    pub store: Arc<dyn Store>,
    pub projections: Arc<BTreeMap<String, Arc<Projection>>>,
    pub config: Arc<HttpConfig>,
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
        .route(
            "/projections/{name}/{collection}",
            get(query::list_documents),
        )
        .route(
            "/projections/{name}/{collection}/{key}",
            get(query::get_document),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .fallback(|| async {
            ApiError::not_found("no_route", "no such endpoint; see the README for the API")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}
