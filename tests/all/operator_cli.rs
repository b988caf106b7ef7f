//! The operator's terminal commands, run as the real binary against a real server.

use std::process::Command;

use serde_json::{json, Value};

use crate::support::{eventually, plugin_set, plugins_dir, tempdir, Server};

const TOKEN: &str = "cli-token";

fn cli(base: &str, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
    command
        .args(args)
        .arg("--url")
        .arg(base)
        .env_remove("PROJECTOR_TOKEN");
    if let Some(token) = token {
        command.env("PROJECTOR_TOKEN", token);
    }
    let out = command.output().expect("projector runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn status_dead_letters_and_plugins_from_the_terminal() {
    let server = Server::start_with(
        &plugin_set(&["account-balance"], &[]),
        &tempdir("cli"),
        &[("PROJECTOR_ADMIN__TOKEN", TOKEN)],
    );
    let api = server.api();
    let base = api.base.clone();
    api.open_account("acct-1", "ann").await;
    // A deposit to an account never opened: dead-lettered, and its stream parked behind it.
    let (status, body) = api
        .post("/events", &json!({"events": [
            {"stream": "ghost", "stream_type": "Account", "type": "Deposited", "payload": {"amount": 5}},
            {"stream": "ghost", "stream_type": "Account", "type": "AccountOpened", "payload": {"owner": "gus", "currency": "EUR"}},
        ]}))
        .await;
    assert_eq!(status, 201, "{body}");
    let position = body["events"][0]["position"].as_u64().unwrap();
    eventually(std::time::Duration::from_secs(30), || async {
        let (_, p) = api.get("/projections/account-balance").await;
        if p["parked_streams"] == 1 {
            Ok(())
        } else {
            Err(p.to_string())
        }
    })
    .await;

    let (ok, out, err) = cli(&base, None, &["status"]);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("LAG"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("account-balance"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains("projection") && row.contains("running"),
        "{row}"
    );
    let (ok, out, _) = cli(&base, None, &["status", "--json"]);
    assert!(ok);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["projections"][0]["parked_streams"], 1, "{status}");

    let (ok, out, _) = cli(&base, None, &["dead-letters", "list", "account-balance"]);
    assert!(ok);
    assert!(
        out.contains("never opened") && out.contains(&position.to_string()),
        "{out}"
    );
    // Acting needs the token, and says so.
    let target = position.to_string();
    let (ok, _, err) = cli(
        &base,
        None,
        &["dead-letters", "skip", "account-balance", &target],
    );
    assert!(!ok);
    assert!(
        err.starts_with("error: ") && err.contains("admin token"),
        "{err}"
    );
    let (ok, out, err) = cli(
        &base,
        Some(TOKEN),
        &["dead-letters", "skip", "account-balance", &target],
    );
    assert!(ok, "{err}");
    assert!(out.contains("skipped") || out.contains("applied"), "{out}");
    let (status, doc) = api
        .get("/projections/account-balance/accounts/ghost?wait_for=ghost@2")
        .await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["document"]["owner"], "gus");
    // An unknown projection: the API's error, once.
    let (ok, _, err) = cli(&base, None, &["dead-letters", "list", "nope"]);
    assert!(!ok);
    assert!(err.contains("unknown_projection"), "{err}");

    let (ok, out, err) = cli(&base, Some(TOKEN), &["plugins", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("account-balance") && l.contains("active")),
        "{out}"
    );
    let variant = plugins_dir().join("variants/account-balance-same/account-balance.wasm");
    let (ok, out, err) = cli(
        &base,
        Some(TOKEN),
        &["plugins", "upload", variant.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(out.contains("account-balance 1.0.0: swapped"), "{out}");
}
