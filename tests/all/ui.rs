//! The operator's page in a real browser: Debian's chromium, driven through its chromedriver
//! (both installed by `scripts/browser.sh`; nothing downloads a browser of its own). Each step
//! saves a screenshot to `target/ui-screenshots/`. One test times the page's first load, on the
//! browser's clock, with 51 projections and 10,000 open dead letters.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::support::{
    eventually, plugin_path, plugin_set, plugins_dir, repo_root, tempdir, Api, Server,
};

const TOKEN: &str = "ui-token";

/// chromedriver on a free port, killed with the test.
pub(crate) struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn program(names: &[&str]) -> PathBuf {
    for name in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
            let path = PathBuf::from(dir).join(name);
            if path.is_file() {
                return path;
            }
        }
    }
    panic!("none of {names:?} is installed: run `bash scripts/browser.sh` (scripts/test.sh does)")
}

pub(crate) async fn driver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(program(&["chromedriver"]))
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    Driver { child, url }
}

pub(crate) async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": program(&["chromium", "chromium-browser"]),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session")
}

pub(crate) async fn screenshot(client: &Client, step: &str) {
    let dir = repo_root().join("target/ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{step}.png")), png).unwrap();
}

/// The text of the first element `css` finds, once `check` accepts it.
async fn until_text(client: &Client, css: &str, check: impl Fn(&str) -> bool) -> String {
    eventually(Duration::from_secs(60), || async {
        let text = match client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.map_err(|e| e.to_string())?,
            Err(e) => return Err(format!("{css}: {e}")),
        };
        if check(&text) {
            Ok(text)
        } else {
            Err(format!("{css}: {text:?}"))
        }
    })
    .await
}

#[tokio::test]
async fn the_page_shows_lag_retries_a_dead_letter_and_runs_a_rebuild() {
    let driver = driver().await;
    let plugins = plugin_set(&["account-balance"], &["poison"]);
    let server = Server::start_with(
        &plugins,
        &tempdir("ui"),
        &[("PROJECTOR_ADMIN__TOKEN", TOKEN)],
    );
    let api = server.api();
    let client = browser(&driver).await;
    client.goto(&format!("{}/ui", api.base)).await.unwrap();

    // Appends: the lag column falls back to 0.
    let mut events = Vec::new();
    for n in 0..200 {
        events.push(json!({"stream": format!("acct-{}", n % 20), "stream_type": "Account", "type": "AccountOpened", "payload": {"owner": "o", "currency": "EUR"}}));
    }
    let (status, body) = api.post("/events", &json!({ "events": events })).await;
    assert_eq!(status, 201, "{body}");
    let row = "#projections tr[data-name='account-balance']";
    until_text(&client, &format!("{row} td.num"), |t| t == "200").await;
    until_text(&client, &format!("{row} td.lag"), |t| t == "0").await;
    screenshot(&client, "1-lag").await;

    // A poisoned event: dead-lettered, its stream parked; the fixed code uploaded from the page
    // (same name and version: a swap), then retried with a click.
    let (status, body) = api
        .post(
            "/events",
            &json!({"events": [
                {"stream": "s1", "stream_type": "T", "type": "E", "payload": {"poison": "error"}},
                {"stream": "s1", "stream_type": "T", "type": "E", "payload": {"amount": 1}},
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let poisoned = body["events"][0]["position"].as_u64().unwrap();
    until_text(
        &client,
        "#projections tr[data-name='poison'] td.parked",
        |t| t == "1",
    )
    .await;
    // The token, asked once for the tab.
    client
        .find(Locator::Id("token-button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    client.send_alert_text(TOKEN).await.unwrap();
    client.accept_alert().await.unwrap();
    until_text(&client, "#token-state", |t| t == "admin").await;
    let select = client.find(Locator::Id("letters-of")).await.unwrap();
    select.select_by_value("p:poison").await.unwrap();
    until_text(
        &client,
        &format!("#letters tr[data-target='{poisoned}'] td.reason"),
        |t| t.contains("poison"),
    )
    .await;
    screenshot(&client, "2-dead-letter").await;
    let fixed = plugins_dir().join("fixtures/poison-fixed/poison.wasm");
    client
        .find(Locator::Id("upload-file"))
        .await
        .unwrap()
        .send_keys(fixed.to_str().unwrap())
        .await
        .unwrap();
    client
        .find(Locator::Id("upload"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&client, "#message", |t| t.contains("poison 1.0.0: swapped")).await;
    let retry = format!("#letters tr[data-target='{poisoned}'] button.retry");
    eventually(Duration::from_secs(30), || async {
        match client.find(Locator::Css(&retry)).await {
            Ok(button) => button.click().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    until_text(
        &client,
        "#projections tr[data-name='poison'] td.parked",
        |t| t == "0",
    )
    .await;
    screenshot(&client, "3-retried").await;

    // A new version uploaded from the page: rebuilt beside the live one, then cut over.
    let v2 = plugins_dir().join("variants/account-balance-v2/account-balance.wasm");
    let input = client.find(Locator::Id("upload-file")).await.unwrap();
    input.send_keys(v2.to_str().unwrap()).await.unwrap();
    client
        .find(Locator::Id("upload"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&client, "#message", |t| t.contains("rebuilding")).await;
    until_text(&client, &format!("{row} td:nth-child(3)"), |t| t == "2.0.0").await;
    until_text(&client, &format!("{row} td.rebuild"), |t| t == "–").await;
    screenshot(&client, "4-cut-over").await;
    client.close().await.unwrap();
}

/// The name `account-balance` gives itself in `describe()`, and how many of its copies the
/// load test runs beside it.
const BALANCE: &[u8] = b"account-balance";
const COPIES: usize = 49;
const POISONED: usize = 10_000;

/// `account-balance.wasm` under another name of the same length: the one occurrence of the
/// name in the component (the string literal `describe()` returns, in the data segment) is
/// replaced byte for byte. Equivalent to compiling the plugin with another name (there is no
/// build-time name knob): the code, offsets and sizes stay the same, so the component is as
/// valid as the original, and the host loads it like any other plugin.
fn renamed_account_balance(dir: &Path, name: &str) {
    assert_eq!(name.len(), BALANCE.len(), "{name}: a same-length name only");
    let mut wasm = std::fs::read(plugin_path("account-balance")).unwrap();
    let at: Vec<usize> = wasm
        .windows(BALANCE.len())
        .enumerate()
        .filter(|(_, w)| *w == BALANCE)
        .map(|(i, _)| i)
        .collect();
    assert!(!at.is_empty(), "account-balance.wasm does not name itself");
    for i in at {
        wasm[i..i + BALANCE.len()].copy_from_slice(name.as_bytes());
    }
    std::fs::write(dir.join(format!("{name}.wasm")), wasm).unwrap();
}

/// Every projection in `GET /projections`, once each has read up to the head.
async fn all_caught_up(api: &Api, at_least: usize) -> Result<Vec<serde_json::Value>, String> {
    let (status, body) = api.get("/projections").await;
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    let list = body["projections"].as_array().cloned().unwrap_or_default();
    if list.len() < at_least {
        return Err(format!("{} projections, not {at_least}", list.len()));
    }
    for p in &list {
        if p["status"] != "running" || p["lag"] != 0 {
            return Err(format!(
                "{}: {} lag {} {}",
                p["name"], p["status"], p["lag"], p["error"]
            ));
        }
    }
    Ok(list)
}

#[tokio::test]
async fn the_page_loads_within_a_second_with_50_projections_and_10000_dead_letters() {
    let started = Instant::now();
    let plugins = plugin_set(&["account-balance"], &["poison"]);
    let names: Vec<String> = (1..=COPIES)
        .map(|n| format!("acct-balance-{n:02}"))
        .collect();
    for name in &names {
        renamed_account_balance(&plugins, name);
    }
    let projections = COPIES + 2;
    // Batches of 50: isolation sets aside at most 50 culprits of one batch before it stops the
    // projection instead (a plugin failing on every event is a bad deploy, not 10,000 bad
    // events), and here every event `poison` gets is a culprit.
    let server = Server::start_with(
        &plugins,
        &tempdir("ui-load"),
        &[
            ("PROJECTOR_RUNNER__MAX_BATCH_EVENTS", "50"),
            // Appends go in at once (no backpressure): the test times how long `poison` takes.
            ("PROJECTOR_RUNNER__MAX_LAG_MS", "0"),
        ],
    );
    let api = server.api();
    // Every copy loaded under its own name.
    let list = eventually(Duration::from_secs(30), || all_caught_up(&api, projections)).await;
    assert_eq!(list.len(), projections, "{list:?}");
    for name in names
        .iter()
        .map(String::as_str)
        .chain(["account-balance", "poison"])
    {
        assert!(
            list.iter().any(|p| p["name"] == name),
            "{name} is not served: {list:?}"
        );
    }

    // Some accounts, for every account-balance to have documents.
    let events: Vec<_> = (0..200)
        .map(|n| json!({"stream": format!("acct-{n}"), "stream_type": "Account", "type": "AccountOpened", "payload": {"owner": "o", "currency": "EUR"}}))
        .collect();
    let (status, body) = api.post("/events", &json!({ "events": events })).await;
    assert_eq!(status, 201, "{body}");

    // 10,000 poisoned events, each on its own stream, of a type only `poison` subscribes to
    // (it takes every type): each one a dead letter of `poison`, its stream parked.
    let produce = Instant::now();
    for chunk in 0..POISONED / 1000 {
        let events: Vec<_> = (0..1000)
            .map(|n| json!({"stream": format!("p-{}", chunk * 1000 + n), "stream_type": "T", "type": "Poisoned", "payload": {"poison": "error"}}))
            .collect();
        let (status, body) = api.post("/events", &json!({ "events": events })).await;
        assert_eq!(status, 201, "{body}");
    }
    let appended = produce.elapsed();
    eventually(Duration::from_secs(120), || async {
        let poison = api.projection("poison").await;
        assert_ne!(poison["status"], "failed", "{poison}");
        match poison["dead_letters"]["open"].as_u64() {
            Some(n) if n == POISONED as u64 => Ok(()),
            other => Err(format!(
                "poison: {other:?} open dead letters, {} {} lag {}",
                poison["status"], poison["error"], poison["lag"]
            )),
        }
    })
    .await;
    let produced = produce.elapsed();
    eventually(Duration::from_secs(60), || all_caught_up(&api, projections)).await;
    println!(
        "dead_letters={POISONED} appended_ms={} produced_ms={}",
        appended.as_millis(),
        produced.as_millis()
    );
    // Every one of them listed by the API, page by page.
    let mut after = 0;
    let mut letters = 0;
    loop {
        let (status, page) = api
            .get(&format!(
                "/projections/poison/_dead_letters?limit=1000&after={after}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        for l in page["items"].as_array().unwrap() {
            assert_eq!(
                (l["kind"].as_str(), l["state"].as_str()),
                (Some("plugin"), Some("open")),
                "{l}"
            );
            letters += 1;
        }
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(letters, POISONED);

    // The page, from navigation start to its first complete render (`window.__firstRender`,
    // set by the page once the projections, the dead letters and the rest are on screen),
    // measured by the browser's own clock.
    let driver = driver().await;
    let client = browser(&driver).await;
    client.goto(&format!("{}/ui", api.base)).await.unwrap();
    let timing = eventually(Duration::from_secs(30), || async {
        let value = client
            .execute(
                "const n = performance.getEntriesByType('navigation')[0];\
                 return window.__firstRender == null ? null : {\
                   render: window.__firstRender, start: n.startTime,\
                   response: n.responseEnd, dom: n.domContentLoadedEventEnd, load: n.loadEventEnd,\
                   fetches: performance.getEntriesByType('resource').map((r) =>\
                     [r.name.replace(location.origin, ''), Math.round(r.startTime), Math.round(r.responseEnd)]) };",
                vec![],
            )
            .await
            .map_err(|e| e.to_string())?;
        if value.is_null() {
            Err("not rendered yet".to_owned())
        } else {
            Ok(value)
        }
    })
    .await;
    let load_ms = timing["render"].as_f64().unwrap() - timing["start"].as_f64().unwrap();
    println!("ui_load_ms={load_ms:.1} timing={timing}");
    screenshot(&client, "5-loaded-50-projections-10000-dead-letters").await;

    // What that render showed: every projection, poison's 10,000 open dead letters, and of
    // them a first page with "More", not all.
    let rows = client
        .find_all(Locator::Css("#projections tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), projections);
    let open = client
        .find(Locator::Css(
            "#projections tr[data-name='poison'] td.letters",
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(open, POISONED.to_string());
    let select = client.find(Locator::Id("letters-of")).await.unwrap();
    assert_eq!(
        select.prop("value").await.unwrap().as_deref(),
        Some("p:poison")
    );
    let shown = client
        .find_all(Locator::Css("#letters tbody tr"))
        .await
        .unwrap()
        .len();
    assert!(
        (1..=100).contains(&shown),
        "{shown} dead letters on the page: a first page is expected"
    );
    let more = client.find(Locator::Id("letters-more")).await.unwrap();
    assert!(more.is_displayed().await.unwrap(), "no 'More' button");
    client
        .execute(
            "document.getElementById('letters-of').scrollIntoView();",
            vec![],
        )
        .await
        .unwrap();
    screenshot(&client, "6-first-page-of-10000-dead-letters").await;
    assert!(
        load_ms < 1000.0,
        "the page took {load_ms:.0} ms to load with {projections} projections and {POISONED} dead letters"
    );
    client.close().await.unwrap();
    println!("ui_load_test_s={:.1}", started.elapsed().as_secs_f64());
}
