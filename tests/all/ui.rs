//! The operator's page in a real browser: Debian's chromium, driven through its chromedriver
//! (both installed by `scripts/browser.sh`; nothing downloads a browser of its own). Each step
//! saves a screenshot to `target/ui-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::support::{eventually, plugin_set, plugins_dir, repo_root, tempdir, Server};

const TOKEN: &str = "ui-token";

/// chromedriver on a free port, killed with the test.
struct Driver {
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

async fn driver() -> Driver {
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

async fn browser(driver: &Driver) -> Client {
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

async fn screenshot(client: &Client, step: &str) {
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
