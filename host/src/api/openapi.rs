//! The API's contract: an OpenAPI 3.1 document built from the handlers' own `#[utoipa::path]`
//! attributes and the response types they return, served at `GET /openapi.json`. The routers
//! register each handler through [`utoipa_axum::routes!`], so a route cannot be served without
//! being documented, nor documented without being served.

use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

/// The parts of the document no handler carries: title, tags, the admin token's scheme and
/// the error shape every route shares.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "projector",
        description = "Event-sourcing projections and observers as sandboxed WebAssembly components: append events, read projections with read-your-writes waits, operate the host. Every error is `{\"error\": {\"code\", \"message\", ...}}` with a stable `code`.",
        license(name = "MIT OR Apache-2.0"),
    ),
    tags(
        (name = "events", description = "Appending to the outbox"),
        (name = "projections", description = "Read models and how far they are"),
        (name = "observers", description = "Observers and the actions they decided"),
        (name = "admin", description = "Operator commands, behind `Authorization: Bearer <admin.token>`"),
        (name = "operations", description = "Health, metrics, the page and this document"),
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&AdminToken),
)]
pub struct ApiDoc;

/// The `admin_token` security scheme the admin routes name.
struct AdminToken;

impl Modify for AdminToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// Every error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable `code` to branch on, a `message` for a person, and details that
/// depend on the code (`stream`, `position`, `retry_after_s`, `request_id`, ...).
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// The answers of every admin route without the token it needs.
#[derive(IntoResponses)]
#[allow(dead_code)] // Described for the document; `admin::authorize` answers them.
pub enum AdminAuth {
    /// `unauthorized`: no or a wrong token
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `admin_disabled`: no `admin.token` configured
    #[response(status = 403)]
    Disabled(ErrorBody),
}

/// How a command sent to a projection's or an observer's runner can fail.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum CommandFailed {
    /// `unknown_projection`, `unknown_observer`, `unknown_dead_letter`
    #[response(status = 404)]
    Unknown(ErrorBody),
    /// `wrong_state`, `dead_letter_resolved`, `parked_behind`, `projection_failed`
    #[response(status = 409)]
    Refused(ErrorBody),
    /// `unavailable`
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// `command_timeout`
    #[response(status = 504)]
    Timeout(ErrorBody),
}

/// How a read that waits (`wait_for`, `wait_for_event`, `min_position`) can end besides its
/// answer.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum WaitFailed {
    /// `dead_lettered`: an event waited for was set aside
    #[response(status = 409)]
    DeadLettered(ErrorBody),
    /// `projection_failed`, `projection_removed`, `store_unavailable`
    #[response(status = 503)]
    Unavailable(ErrorBody),
    /// `wait_timeout`: not applied within `timeout_ms`
    #[response(status = 504)]
    Timeout(ErrorBody),
}

/// `GET /openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json")),
)]
pub async fn document() -> impl axum::response::IntoResponse {
    // Built once: it depends on the code only, never on the configuration.
    static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        // A tree of strings, maps and numbers: serializing it cannot fail.
        super::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serializes")
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}
