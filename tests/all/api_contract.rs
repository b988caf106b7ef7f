//! The API's contract: `GET /openapi.json` is an OpenAPI 3.1 document of every route, and
//! schemathesis (`scripts/schemathesis.sh`, settings in `tests/api/schemathesis.toml`) finds no
//! server error and no answer that departs from it, on each store.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::{eventually, plugin_set, repo_root, tempdir, Backend, Server};

const TOKEN: &str = "contract-token";

#[tokio::test]
async fn the_document_names_every_route_with_its_errors() {
    let server = Server::on(&Backend::Sqlite, &plugin_set(&["account-balance"], &[]));
    let (status, doc) = server.api().get("/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    let public = [
        ("post", "/events"),
        ("get", "/projections"),
        ("get", "/projections/{name}"),
        ("get", "/projections/{name}/{collection}"),
        ("get", "/projections/{name}/{collection}/{key}"),
        ("get", "/projections/{name}/_streams/{stream}"),
        ("get", "/projections/{name}/_dead_letters"),
        ("get", "/projections/{name}/_parked"),
        ("get", "/observers"),
        ("get", "/observers/{name}"),
        ("get", "/observers/{name}/_dead_letters"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/ui"),
        ("get", "/openapi.json"),
    ]
    .map(|(m, p)| (m.to_owned(), p));
    let admin = projector::api::ADMIN_ROUTES
        .iter()
        .map(|(m, p)| (m.to_lowercase(), *p));
    for (method, path) in public.into_iter().chain(admin) {
        let operation = &paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the document"))[&method];
        assert!(
            operation.is_object(),
            "{method} {path} is not in the document"
        );
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| r.keys().any(|k| k.starts_with('2'))),
            "{method} {path} documents no success"
        );
    }
    // A read documents its read-your-writes parameters and the errors a wait can end in.
    let read = &paths["/projections/{name}/{collection}/{key}"]["get"];
    let params: Vec<&str> = read["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for name in [
        "wait_for",
        "wait_for_event",
        "min_position",
        "timeout_ms",
        "version",
    ] {
        assert!(params.contains(&name), "{name} missing from {params:?}");
    }
    for status in ["400", "404", "409", "504"] {
        assert_eq!(
            read["responses"][status]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody",
            "{status}"
        );
    }
}

/// A server on `backend` holding documents, a dead letter and an observer, checked by
/// schemathesis against its own document.
async fn schemathesis_finds_nothing_on(backend: Backend) {
    let plugins = plugin_set(&["account-balance", "large-withdrawal-alert"], &["poison"]);
    let server = Server::start_on(
        &backend,
        &plugins,
        &tempdir("contract"),
        &[
            ("PROJECTOR_ADMIN__TOKEN", TOKEN),
            // Every wait the fuzzer asks for ends within this.
            ("PROJECTOR_HTTP__MAX_WAIT_TIMEOUT_MS", "300"),
        ],
    );
    let api = server.api();
    // The names in tests/api/schemathesis.toml's dictionaries: documents under acct-1 and
    // acct-2, and a dead letter (poison's stream s-1) whose position the run is given.
    let (status, body) = api
        .post(
            "/events",
            &json!({"events": [
                {"stream": "acct-1", "stream_type": "Account", "type": "AccountOpened", "payload": {"owner": "a", "currency": "EUR"}},
                {"stream": "acct-2", "stream_type": "Account", "type": "AccountOpened", "payload": {"owner": "b", "currency": "EUR"}},
                {"stream": "acct-1", "stream_type": "Account", "type": "Deposited", "payload": {"amount": 5000}},
                {"stream": "acct-1", "stream_type": "Account", "type": "Withdrawn", "payload": {"amount": 2000}},
                {"stream": "s-1", "stream_type": "T", "type": "E", "payload": {"poison": "error"}},
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let poisoned = body["events"][4]["position"].as_u64().unwrap();
    eventually(Duration::from_secs(60), || async {
        let (_, poison) = api.get("/projections/poison/_dead_letters").await;
        let (_, balance) = api.get("/projections/account-balance").await;
        if poison["items"][0]["position"] == poisoned && balance["checkpoint"] == poisoned {
            Ok(())
        } else {
            Err(format!("{poison} {balance}"))
        }
    })
    .await;

    let output = Command::new("bash")
        .arg(repo_root().join("scripts/schemathesis.sh"))
        .args(["run", &api.base, TOKEN])
        .env("SCHEMATHESIS_DEAD_LETTER", poisoned.to_string())
        .output()
        .expect("run scripts/schemathesis.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found failures on {backend:?}:\n{stdout}\n{stderr}"
    );
    // It tested every operation it selected, and all of them.
    let figure = |label: &str| {
        let at = stdout
            .find(label)
            .unwrap_or_else(|| panic!("no {label} in {stdout}"));
        stdout[at + label.len()..]
            .split(|c: char| !c.is_ascii_digit() && c != '/')
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let selected = figure("Selected: ");
    let tested = figure("Tested: ");
    let (chosen, total) = selected.split_once('/').expect("Selected: N/M");
    assert_eq!(chosen, total, "{stdout}");
    assert_eq!(tested, chosen, "{stdout}");
    assert!(tested.parse::<u32>().unwrap() >= 32, "{stdout}");
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_mismatch_on_sqlite() {
    schemathesis_finds_nothing_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_mismatch_on_postgres() {
    schemathesis_finds_nothing_on(Backend::postgres().await).await;
}
