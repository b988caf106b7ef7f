//! The admin API's guard: every admin route, walked from the list the router is built from,
//! is 403 with no token configured and 401 (with `WWW-Authenticate: Bearer`) without the token
//! or with a wrong one.

use projector::api::ADMIN_ROUTES;

use crate::isolation::TOKEN;
use crate::support::{plugin_set, tempdir, Backend, Server};

/// Every admin route (and an unknown `/admin` path) with its parameters filled in.
fn admin_paths() -> Vec<(String, String)> {
    let mut paths: Vec<(String, String)> = ADMIN_ROUTES
        .iter()
        .map(|&(method, path)| {
            (
                method.to_owned(),
                path.replace("{name}", "account-balance")
                    .replace("{position}", "1")
                    .replace("{version}", "1"),
            )
        })
        .collect();
    paths.push(("POST".into(), "/admin/no-such-route".into()));
    paths.push((
        "GET".into(),
        "/admin/projections/account-balance/pause".into(),
    ));
    paths
}

async fn call(base: &str, method: &str, path: &str, token: Option<&str>) -> reqwest::Response {
    let http = reqwest::Client::new();
    let mut request = http.request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request")
}

#[tokio::test]
async fn without_a_configured_token_every_admin_route_is_403_saying_how_to_enable_it() {
    let server = Server::on(&Backend::Sqlite, &plugin_set(&["account-balance"], &[]));
    assert!(ADMIN_ROUTES.len() >= 5);
    for (method, path) in admin_paths() {
        for token in [None, Some("anything")] {
            let response = call(&server.base, &method, &path, token).await;
            assert_eq!(response.status().as_u16(), 403, "{method} {path}");
            let body: serde_json::Value = response.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("admin.token"), "{message}");
            assert!(message.contains("PROJECTOR_ADMIN__TOKEN"), "{message}");
        }
    }
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_401_on_every_admin_route() {
    let server = Server::start_on(
        &Backend::Sqlite,
        &plugin_set(&["account-balance"], &[]),
        &tempdir("data"),
        &[("PROJECTOR_ADMIN__TOKEN", TOKEN)],
    );
    for (method, path) in admin_paths() {
        for token in [None, Some("wrong"), Some(&TOKEN[..TOKEN.len() - 1])] {
            let response = call(&server.base, &method, &path, token).await;
            assert_eq!(response.status().as_u16(), 401, "{method} {path} {token:?}");
            let challenge = response.headers().get("www-authenticate").cloned();
            assert!(
                challenge.is_some_and(|c| c.to_str().unwrap().starts_with("Bearer")),
                "{method} {path}"
            );
        }
    }
    // The right token passes the guard: pause, then resume, answer 200.
    for action in ["pause", "resume"] {
        let response = call(
            &server.base,
            "POST",
            &format!("/admin/projections/account-balance/{action}"),
            Some(TOKEN),
        )
        .await;
        assert_eq!(response.status().as_u16(), 200, "{action}");
        let body: serde_json::Value = response.json().await.unwrap();
        let expected = if action == "pause" {
            "paused"
        } else {
            "running"
        };
        assert_eq!(body["outcome"]["status"], expected, "{body}");
    }
    // An unknown dead letter is a 404 naming it.
    let response = call(
        &server.base,
        "POST",
        "/admin/projections/account-balance/dead-letters/42/retry",
        Some(TOKEN),
    )
    .await;
    assert_eq!(response.status().as_u16(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_dead_letter", "{body}");
}
