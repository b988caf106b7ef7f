//! Plugins changed while the host runs (`PUT /admin/plugins/{name}`): a same-version swap
//! between two batches, a new version rebuilt beside the serving one with an atomic cut-over,
//! manual cut-over and rollback, bad uploads refused with nothing changed, a rebuild killed
//! midway, two instances, and `serve --watch`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::isolation::TOKEN;
use crate::support::{
    eventually, fixture_path, on_both_stores, outbox_rows, plugin_path, plugin_set, plugins_dir,
    tempdir, Api, Backend, Server,
};

const NAME: &str = "account-balance";
const V1: &str = "1.0.0";
const V2: &str = "2.0.0";

/// An account-balance variant built by `scripts/build-plugins.sh`: `same` (other code, same
/// version and output) or `v2` (version 2.0.0, `"schema": 2` in every document).
fn variant(which: &str) -> PathBuf {
    plugins_dir()
        .join("variants")
        .join(format!("account-balance-{which}"))
        .join("account-balance.wasm")
}

fn admin_env() -> Vec<(&'static str, &'static str)> {
    vec![("PROJECTOR_ADMIN__TOKEN", TOKEN)]
}

/// An admin request with the test's token: (status, JSON body).
async fn admin_call(api: &Api, method: &str, path: &str, body: Option<Vec<u8>>) -> (u16, Value) {
    let mut request = api
        .http
        .request(method.parse().unwrap(), format!("{}{path}", api.base))
        .bearer_auth(TOKEN);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/wasm")
            .body(body);
    }
    let response = request.send().await.expect("admin request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn upload(api: &Api, file: &PathBuf, query: &str) -> (u16, Value) {
    let bytes = std::fs::read(file).expect("read the plugin");
    admin_call(
        api,
        "PUT",
        &format!("/admin/plugins/{NAME}{query}"),
        Some(bytes),
    )
    .await
}

/// The serving version's sha256 on this instance, from `GET /admin/plugins`.
async fn active_sha(api: &Api) -> String {
    let (status, body) = admin_call(api, "GET", "/admin/plugins", None).await;
    assert_eq!(status, 200, "{body}");
    body["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == NAME && p["role"] == "active")
        .map(|p| p["sha256"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn sha256_of(file: &PathBuf) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(std::fs::read(file).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `accounts` accounts, `deposits` deposits of 1 spread over them, 50 per request.
async fn backlog(api: &Api, accounts: usize, deposits: usize) {
    for a in 0..accounts {
        api.open_account(&format!("acct-{a}"), "ann").await;
    }
    let mut events = Vec::new();
    for d in 0..deposits {
        events.push(
            json!({"stream": format!("acct-{}", d % accounts), "stream_type": "Account",
            "type": "Deposited", "payload": {"amount": 1}}),
        );
        if events.len() == 50 || d + 1 == deposits {
            let (status, body) = api
                .post("/events", &json!({ "events": std::mem::take(&mut events) }))
                .await;
            assert_eq!(status, 201, "{body}");
        }
    }
}

/// What runs beside the changes: writers that append a deposit and read it back at once
/// (`wait_for`), and a reader that pages through the accounts and checks that no page mixes
/// documents of two versions.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Every answer that was not a success, and every page mixing versions.
    problems: Arc<Mutex<Vec<String>>>,
    /// Reads answered 200 after a `wait_for`.
    reads: Arc<std::sync::atomic::AtomicU64>,
}

impl Load {
    fn start(api: &Api, accounts: usize, writers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let problems = Arc::new(Mutex::new(Vec::new()));
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (api, stop, problems, reads) =
                (api.clone(), stop.clone(), problems.clone(), reads.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    let stream = format!("acct-{}", n % accounts);
                    n += writers;
                    let (status, body) = api
                        .post("/events", &json!({"stream": stream, "stream_type": "Account",
                            "type": "Deposited", "payload": {"amount": 1}}))
                        .await;
                    if status != 201 {
                        problems.lock().unwrap().push(format!("append {status}: {body}"));
                        continue;
                    }
                    let version = body["events"][0]["version"].as_u64().unwrap();
                    let (status, body) = api
                        .get(&format!(
                            "/projections/{NAME}/accounts/{stream}?wait_for={stream}@{version}&timeout_ms=30000"
                        ))
                        .await;
                    if status == 200 {
                        reads.fetch_add(1, Ordering::Relaxed);
                    } else {
                        problems.lock().unwrap().push(format!("read {status}: {body}"));
                    }
                }
            }));
        }
        let (api2, stop2, problems2) = (api.clone(), stop.clone(), problems.clone());
        tasks.push(tokio::spawn(async move {
            while !stop2.load(Ordering::Relaxed) {
                let (status, body) = api2
                    .get(&format!("/projections/{NAME}/accounts?limit=100"))
                    .await;
                if status != 200 {
                    problems2
                        .lock()
                        .unwrap()
                        .push(format!("page {status}: {body}"));
                    continue;
                }
                let schemas: std::collections::BTreeSet<String> = body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d["document"]["schema"].to_string())
                    .collect();
                if schemas.len() > 1 {
                    problems2
                        .lock()
                        .unwrap()
                        .push(format!("a page mixes versions: schemas {schemas:?}"));
                }
            }
        }));
        Self {
            stop,
            tasks,
            problems,
            reads,
        }
    }

    async fn stop(self) -> (Vec<String>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        let problems = self.problems.lock().unwrap().clone();
        (problems, self.reads.load(Ordering::Relaxed))
    }
}

/// Every account's balance and deposit count equal what the outbox holds: nothing lost,
/// nothing applied twice. Returns the documents.
async fn read_model_matches_the_log(
    api: &Api,
    backend: &Backend,
    data_dir: &std::path::Path,
) -> Vec<Value> {
    // stream -> (balance, deposits)
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut head = 0;
    for row in outbox_rows(backend, data_dir).await {
        let payload: Value = serde_json::from_str(&row.payload).unwrap();
        let entry = expected.entry(row.stream.clone()).or_default();
        if let Some(amount) = payload["amount"].as_i64() {
            entry.0 += amount;
            entry.1 += 1;
        }
        head = head.max(row.position);
    }
    let mut docs = Vec::new();
    for (stream, (balance, deposits)) in &expected {
        let (status, body) = api
            .get(&format!(
                "/projections/{NAME}/accounts/{stream}?min_position={head}&timeout_ms=30000"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        let doc = body["document"].clone();
        assert_eq!(doc["balance"], *balance, "{stream}: {doc}");
        assert_eq!(doc["tx_count"], *deposits, "{stream}: {doc}");
        docs.push(doc);
    }
    docs
}

/// Polls `check` until it gives a value; the panic names the test line that waited.
#[track_caller]
fn soon<T, F, Fut>(within: Duration, mut check: F) -> impl std::future::Future<Output = T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let at = std::panic::Location::caller();
    async move {
        eventually(within, || {
            let checked = check();
            async move {
                checked
                    .await
                    .ok_or_else(|| format!("the wait at {at} never ended"))
            }
        })
        .await
    }
}

/// Deposits `amount` into acct-1 and reads the account back once the deposit is applied.
async fn deposit_and_read(api: &Api, amount: i64) -> Value {
    let (_, position) = api
        .append("acct-1", "Deposited", json!({ "amount": amount }))
        .await;
    let (status, doc) = api
        .get(&format!(
            "/projections/{NAME}/accounts/acct-1?min_position={position}"
        ))
        .await;
    assert_eq!(status, 200, "{doc}");
    doc
}

async fn counter(api: &Api, line_start: &str) -> f64 {
    let (_, text) = api.get_text("/metrics").await;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

on_both_stores! {
    /// Five same-version swaps and one new version under live load: every write is read back,
    /// no page mixes versions, the final read model equals the log, folded by the final plugin.
    async fn swaps_and_a_rebuild_under_load_lose_nothing_and_no_page_mixes_versions(backend) {
        let data = tempdir("swap");
        let server = Server::start_on(&backend, &plugin_set(&[NAME], &[]), &data, &admin_env());
        let api = server.api();
        let accounts = 20;
        backlog(&api, accounts, 3000).await;
        let load = Load::start(&api, accounts, 4);
        let originals = [variant("same"), plugin_path(NAME)];
        for round in 0..5 {
            let file = &originals[round % 2];
            let before = api.projection(NAME).await["checkpoint"].as_u64().unwrap();
            let (status, body) = upload(&api, file, "").await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["action"], "swapped", "{body}");
            assert_eq!(active_sha(&api).await, sha256_of(file));
            // The next batches run on the new code.
            soon(Duration::from_secs(30), || async {
                let now = api.projection(NAME).await["checkpoint"].as_u64().unwrap();
                (now > before + 20).then_some(())
            })
            .await;
        }
        let (status, body) = upload(&api, &variant("v2"), "").await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["action"], "rebuilding");
        assert_eq!(body["active"], V1);
        assert_eq!(body["building"], V2);
        let summary = soon(Duration::from_secs(120), || async {
            let summary = api.projection(NAME).await;
            (summary["version"] == V2).then_some(summary)
        })
        .await;
        assert!(summary["building"].is_null(), "{summary}");
        assert_eq!(summary["active"]["version"], V2);
        // Reads and writes go on after the cut-over, on the new version.
        let reads_at_cutover = load.reads.load(Ordering::Relaxed);
        soon(Duration::from_secs(30), || async {
            (load.reads.load(Ordering::Relaxed) > reads_at_cutover + 20).then_some(())
        })
        .await;
        let (problems, reads) = load.stop().await;
        assert!(problems.is_empty(), "{} problems, first: {:?}", problems.len(), problems.first());
        assert!(reads > 100, "only {reads} reads");
        let docs = read_model_matches_the_log(&api, &backend, &data).await;
        assert!(docs.iter().all(|d| d["schema"] == 2), "a document of version 1 after the cut-over");
        assert_eq!(
            counter(&api, &format!("projector_plugin_swaps_total{{projection=\"{NAME}\",outcome=\"swapped\"}}")).await,
            5.0
        );
        assert_eq!(
            counter(&api, &format!("projector_plugin_swaps_total{{projection=\"{NAME}\",outcome=\"cut_over\"}}")).await,
            1.0
        );
        println!("{reads} writes read back; swaps and a rebuild, nothing lost");
    }

    /// `?cutover=manual`: the new version catches up and waits; `?version=` reads it before it
    /// serves; `activate` cuts over, and activating the old version rolls back.
    async fn a_manual_cutover_waits_for_activate_and_activate_rolls_back(backend) {
        let data = tempdir("manual");
        let server = Server::start_on(&backend, &plugin_set(&[NAME], &[]), &data, &admin_env());
        let api = server.api();
        backlog(&api, 5, 500).await;
        let (status, body) = upload(&api, &variant("v2"), "?cutover=manual").await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["manual_cutover"], true);
        // Caught up, and still not serving.
        let building = soon(Duration::from_secs(60), || async {
            let summary = api.projection(NAME).await;
            let b = summary["building"].clone();
            (b["checkpoint"] == summary["head"] && b["lag"] == 0).then_some(b)
        })
        .await;
        assert_eq!(building["version"], V2);
        assert_eq!(building["cutover"], "manual");
        let (_, head) = api.get(&format!("/projections/{NAME}")).await;
        assert_eq!(head["version"], V1);
        let (status, doc) = api.get(&format!("/projections/{NAME}/accounts/acct-1?version={V2}")).await;
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["document"]["schema"], 2);
        let (status, doc) = api.get(&format!("/projections/{NAME}/accounts/acct-1")).await;
        assert_eq!(status, 200);
        assert!(doc["document"]["schema"].is_null(), "served by version 1: {doc}");
        let (status, _) = api.get(&format!("/projections/{NAME}/accounts/acct-1?version=9.9.9")).await;
        assert_eq!(status, 404);

        let (status, body) = admin_call(&api, "POST", &format!("/admin/projections/{NAME}/activate?version={V2}"), None).await;
        assert!(status == 200 || status == 202, "{status} {body}");
        soon(Duration::from_secs(30), || async {
            (api.projection(NAME).await["version"] == V2).then_some(())
        })
        .await;
        let (_, doc) = api.get(&format!("/projections/{NAME}/accounts/acct-1")).await;
        assert_eq!(doc["document"]["schema"], 2);

        // Dropping the serving version is refused; rolling back, then dropping 2.0.0, is not.
        let (status, body) = admin_call(&api, "DELETE", &format!("/admin/projections/{NAME}/versions/{V2}"), None).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "active_version");
        api.append("acct-1", "Deposited", json!({"amount": 5})).await;
        let (status, body) = admin_call(&api, "POST", &format!("/admin/projections/{NAME}/activate?version={V1}"), None).await;
        assert!(status == 200 || status == 202, "{status} {body}");
        soon(Duration::from_secs(30), || async {
            (api.projection(NAME).await["version"] == V1).then_some(())
        })
        .await;
        read_model_matches_the_log(&api, &backend, &data).await;
        let (status, body) = admin_call(&api, "DELETE", &format!("/admin/projections/{NAME}/versions/{V2}"), None).await;
        assert_eq!(status, 200, "{body}");
        let (status, _) = admin_call(&api, "POST", &format!("/admin/projections/{NAME}/activate?version={V2}"), None).await;
        assert_eq!(status, 404, "a dropped version is gone");

        // Removing the projection: its reads are gone.
        let (status, body) = admin_call(&api, "DELETE", &format!("/admin/projections/{NAME}"), None).await;
        assert_eq!(status, 200, "{body}");
        let (status, _) = api.get(&format!("/projections/{NAME}")).await;
        assert_eq!(status, 404);
    }
}

/// Each bad upload is a 4xx that names what was wrong, and the serving plugin stays.
#[tokio::test]
async fn bad_uploads_are_refused_with_the_reason_and_nothing_changes() {
    let mut env = admin_env();
    env.push(("PROJECTOR_ADMIN__MAX_PLUGIN_MB", "1"));
    let server = Server::start_on(
        &Backend::Sqlite,
        &plugin_set(&[NAME], &[]),
        &tempdir("bad"),
        &env,
    );
    let api = server.api();
    api.open_account("acct-1", "ann").await;
    let serving = active_sha(&api).await;
    assert_eq!(serving, sha256_of(&plugin_path(NAME)));
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "random bytes",
            b"definitely not wasm".to_vec(),
            422,
            "not_a_component",
        ),
        (
            "a component exporting nothing",
            b"\0asm\x0d\x00\x01\x00".to_vec(),
            422,
            "wrong_world",
        ),
        (
            "an observer of another name",
            std::fs::read(fixture_path("relay")).unwrap(),
            422,
            "name_mismatch",
        ),
        (
            "a future contract",
            std::fs::read(fixture_path("future-contract")).unwrap(),
            422,
            "unsupported_contract",
        ),
        (
            "a describe that panics",
            std::fs::read(fixture_path("describe-panic")).unwrap(),
            422,
            "describe_failed",
        ),
        (
            "another projection",
            std::fs::read(fixture_path("misbehave")).unwrap(),
            422,
            "name_mismatch",
        ),
        ("too big", vec![0u8; 2 << 20], 413, "plugin_too_large"),
    ];
    // A refused upload's connection closes without the rest of its body being read: each
    // goes on a connection of its own, never pooled for the next request.
    let unpooled = Api {
        base: api.base.clone(),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
    };
    for (what, bytes, status, code) in cases {
        let (got, body) = admin_call(
            &unpooled,
            "PUT",
            &format!("/admin/plugins/{NAME}"),
            Some(bytes),
        )
        .await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            !body["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{what}"
        );
        assert_eq!(active_sha(&api).await, serving, "{what} changed the plugin");
    }
    // The same version with another shape (one more indexed field).
    let (got, body) = upload(&api, &variant("reshape"), "").await;
    assert_eq!(got, 409, "{body}");
    assert_eq!(body["error"]["code"], "shape_changed", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("bump the version to rebuild"), "{message}");
    assert_eq!(active_sha(&api).await, serving);
    // Not sent as a component.
    let response = api
        .http
        .put(format!("{}/admin/plugins/{NAME}", api.base))
        .bearer_auth(TOKEN)
        .body(std::fs::read(plugin_path(NAME)).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 415);
    // The projection still runs the code it ran.
    let doc = deposit_and_read(&api, 3).await;
    assert_eq!(doc["document"]["balance"], 3);
}

/// kill -9 while a new version rebuilds: after the restart the old version serves, and the
/// rebuild goes on from its own checkpoint to the cut-over.
#[tokio::test]
async fn a_rebuild_killed_midway_resumes_while_the_old_version_serves() {
    let backend = Backend::Sqlite;
    let data = tempdir("rebuild-kill");
    let mut env = admin_env();
    // Small batches: the rebuild takes long enough to be killed in the middle.
    env.push(("PROJECTOR_RUNNER__MAX_BATCH_EVENTS", "100"));
    let mut server = Server::start_on(&backend, &plugin_set(&[NAME], &[]), &data, &env);
    let api = server.api();
    backlog(&api, 10, 30_000).await;
    let (status, body) = upload(&api, &variant("v2"), "").await;
    assert_eq!(status, 202, "{body}");
    let at_kill = soon(Duration::from_secs(60), || async {
        let b = api.projection(NAME).await["building"].clone();
        let checkpoint = b["checkpoint"].as_u64().unwrap_or(0);
        (checkpoint > 1000).then_some(checkpoint)
    })
    .await;
    server.kill();
    let server = Server::start_on(&backend, &server.plugins.clone(), &data, &env);
    let api = server.api();
    let summary = api.projection(NAME).await;
    assert_eq!(
        summary["version"], V1,
        "the old version serves after the restart: {summary}"
    );
    let (status, doc) = api
        .get(&format!("/projections/{NAME}/accounts/acct-1"))
        .await;
    assert_eq!(status, 200);
    assert!(doc["document"]["schema"].is_null(), "{doc}");
    let building = &summary["building"];
    assert_eq!(building["version"], V2, "{summary}");
    assert!(
        building["checkpoint"].as_u64().unwrap() >= at_kill - 100,
        "the rebuild restarted from scratch: {building}"
    );
    soon(Duration::from_secs(120), || async {
        (api.projection(NAME).await["version"] == V2).then_some(())
    })
    .await;
    let docs = read_model_matches_the_log(&api, &backend, &data).await;
    assert!(docs.iter().all(|d| d["schema"] == 2));
}

/// Two instances on one PostgreSQL database: an upload on one runs on the other within the
/// catalog's poll, and a cut-over is seen by both.
#[tokio::test]
async fn an_upload_on_one_instance_runs_on_the_other() {
    let backend = Backend::postgres().await;
    let plugins = plugin_set(&[NAME], &[]);
    let a = Server::start_on(&backend, &plugins, &tempdir("two-a"), &admin_env());
    let b = Server::start_on(&backend, &plugins, &tempdir("two-b"), &admin_env());
    let (api_a, api_b) = (a.api(), b.api());
    backlog(&api_a, 5, 200).await;
    let same = variant("same");
    let (status, body) = upload(&api_a, &same, "").await;
    assert_eq!(status, 200, "{body}");
    let uploaded = Instant::now();
    let want = sha256_of(&same);
    soon(Duration::from_secs(10), || async {
        (active_sha(&api_b).await == want).then_some(())
    })
    .await;
    println!(
        "the other instance runs the upload {:?} after it was stored",
        uploaded.elapsed()
    );
    let (status, body) = upload(&api_a, &variant("v2"), "").await;
    assert_eq!(status, 202, "{body}");
    for api in [&api_a, &api_b] {
        soon(Duration::from_secs(60), || async {
            (api.projection(NAME).await["version"] == V2).then_some(())
        })
        .await;
        let (status, doc) = api
            .get(&format!(
                "/projections/{NAME}/accounts/acct-1?min_position=1"
            ))
            .await;
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["document"]["schema"], 2);
    }
}

/// `serve --watch`: a plugin file that changes is deployed (the plugin author's loop).
#[tokio::test]
async fn watch_deploys_a_plugin_file_when_it_changes() {
    let plugins = plugin_set(&[NAME], &[]);
    let mut env = admin_env();
    env.push(("PROJECTOR_WATCH_PLUGINS", "true"));
    let server = Server::start_on(&Backend::Sqlite, &plugins, &tempdir("watch"), &env);
    let api = server.api();
    api.open_account("acct-1", "ann").await;
    let same = variant("same");
    // Written beside, then renamed over: the watcher never reads half a file.
    let staged = plugins.join("account-balance.wasm.part");
    std::fs::copy(&same, &staged).unwrap();
    std::fs::rename(&staged, plugins.join("account-balance.wasm")).unwrap();
    let want = sha256_of(&same);
    soon(Duration::from_secs(10), || async {
        (active_sha(&api).await == want).then_some(())
    })
    .await;
    let doc = deposit_and_read(&api, 2).await;
    assert_eq!(doc["document"]["balance"], 2);
}

/// Other code under the same version, at a restart with the changed file in the folder: taken,
/// but said (a warning naming both digests) and shown (`code_changed_at`).
#[tokio::test]
async fn other_code_under_the_same_version_is_warned_about_and_shown() {
    let plugins = plugin_set(&[NAME], &[]);
    let data = tempdir("code-changed");
    let mut server = Server::start_with(&plugins, &data, &admin_env());
    let api = server.api();
    api.open_account("acct-1", "ann").await;
    let summary = api.projection(NAME).await;
    assert!(summary["code_changed_at"].is_null(), "{summary}");
    let old = sha256_of(&plugin_path(NAME));
    let new = sha256_of(&variant("same"));
    std::fs::copy(variant("same"), plugins.join(format!("{NAME}.wasm"))).unwrap();
    server.kill();
    server.restart();
    let api = server.api();
    let summary = api.projection(NAME).await;
    assert!(summary["code_changed_at"].as_i64().is_some(), "{summary}");
    assert_eq!(summary["active"]["sha256"], new, "{summary}");
    let log = std::fs::read_to_string(data.join("server.log")).unwrap();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("other code under the same version"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(
        warning.contains(&old) && warning.contains(&new),
        "{warning}"
    );
}

/// A fix shipped under the same version changes only what is written after it; `rebuild`
/// makes the serving version again beside itself with the current code, cuts over, and leaves
/// documents equal to a replay of the log with that code.
#[tokio::test]
async fn rebuild_remakes_the_serving_version_with_its_current_code() {
    let data = tempdir("rebuild-same");
    let server = Server::start_with(&plugin_set(&[NAME], &[]), &data, &admin_env());
    let api = server.api();
    let mut log: Vec<Value> = Vec::new();
    let mut append = |stream: &str, event_type: &str, payload: Value| {
        log.push(json!({"stream": stream, "stream_type": "Account", "type": event_type, "payload": payload}));
        log.last().cloned().unwrap()
    };
    let mut batch = Vec::new();
    for a in 0..6 {
        batch.push(append(
            &format!("acct-{a}"),
            "AccountOpened",
            json!({"owner": "o", "currency": "EUR"}),
        ));
        batch.push(append(
            &format!("acct-{a}"),
            "Deposited",
            json!({"amount": 10 + a}),
        ));
    }
    let (status, body) = api.post("/events", &json!({ "events": batch })).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = upload(&api, &variant("fixed"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["action"], "swapped", "{body}");
    // Only the accounts written after the fix carry it.
    let (status, body) = api
        .post(
            "/events",
            &json!({ "events": [append("acct-0", "Deposited", json!({"amount": 5}))] }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let position = body["position"].as_u64().unwrap();
    let (_, page) = api
        .get(&format!(
            "/projections/{NAME}/accounts?min_position={position}&timeout_ms=30000"
        ))
        .await;
    let fixed = |page: &Value| {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["document"]["fixed"] == true)
            .count()
    };
    assert_eq!(fixed(&page), 1, "{page}");
    assert!(api.projection(NAME).await["code_changed_at"].is_i64());
    let (status, body) = admin_call(
        &api,
        "POST",
        &format!("/admin/projections/{NAME}/rebuild"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["building"], "1.0.0~r1", "{body}");
    let (status, again) = admin_call(
        &api,
        "POST",
        &format!("/admin/projections/{NAME}/rebuild"),
        None,
    )
    .await;
    assert!(status == 409 || again["active"] == "1.0.0~r1", "{again}");
    let summary = soon(Duration::from_secs(60), || async {
        let summary = api.projection(NAME).await;
        (summary["version"] == "1.0.0~r1").then_some(summary)
    })
    .await;
    assert!(summary["code_changed_at"].is_null(), "{summary}");
    // Every document as a replay of the whole log with the fixed code makes it.
    let dir = tempdir("rebuild-replay");
    let events = dir.join("events.jsonl");
    let lines: Vec<String> = log.iter().map(Value::to_string).collect();
    std::fs::write(&events, lines.join("\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(["replay", "--plugin"])
        .arg(variant("fixed"))
        .arg("--events")
        .arg(&events)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let model: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (_, page) = api
        .get(&format!("/projections/{NAME}/accounts?limit=100"))
        .await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 6, "{page}");
    assert_eq!(fixed(&page), 6, "{page}");
    for item in items {
        let key = item["key"].as_str().unwrap();
        assert_eq!(item["document"], model["accounts"][key], "{key}");
    }
    // The fixed code uploaded again is what serves: unchanged.
    let (status, body) = upload(&api, &variant("fixed"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["action"], "unchanged", "{body}");
}
