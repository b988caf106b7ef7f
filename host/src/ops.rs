//! The operator's terminal: thin clients of the HTTP API (`status`, `dead-letters`,
//! `plugins`), human tables by default, the API's JSON with `--json`.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::Value;

/// Where the server is and how to be let in.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--url {url:?} is not an http(s) URL");
        }
        Ok(Self {
            base,
            token: token.filter(|t| !t.is_empty()),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(130))
                .build()
                .context("building the HTTP client")?,
        })
    }

    async fn call(&self, request: reqwest::RequestBuilder, admin: bool) -> anyhow::Result<Value> {
        let request = match (&self.token, admin) {
            (Some(token), _) => request.bearer_auth(token),
            (None, true) => bail!(
                "this command needs the admin token: --token or PROJECTOR_TOKEN (the server's \
                 admin.token)"
            ),
            (None, false) => request,
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach projector at {}", self.base))?;
        let status = response.status();
        let text = response.text().await.context("reading the answer")?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let error = &body["error"];
            match (error["code"].as_str(), error["message"].as_str()) {
                (Some(code), Some(message)) => bail!("{status}: {code}: {message}"),
                _ => bail!("{status}: {body}"),
            }
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.get(format!("{}{path}", self.base)), false)
            .await
    }

    pub async fn admin_get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.get(format!("{}{path}", self.base)), true)
            .await
    }

    pub async fn admin_post(&self, path: &str) -> anyhow::Result<Value> {
        self.call(self.http.post(format!("{}{path}", self.base)), true)
            .await
    }

    pub async fn upload(&self, name: &str, bytes: Vec<u8>, manual: bool) -> anyhow::Result<Value> {
        let query = if manual { "?cutover=manual" } else { "" };
        let request = self
            .http
            .put(format!("{}/admin/plugins/{name}{query}", self.base))
            .header("content-type", "application/wasm")
            .body(bytes);
        self.call(request, true).await
    }
}

/// Columns padded to their widest cell; the last one left ragged.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `projector status`: projections and observers, one line each.
pub async fn status(client: &Client, json: bool) -> anyhow::Result<String> {
    let projections = client.get("/projections").await?;
    let observers = client.get("/observers").await?;
    if json {
        return Ok(serde_json::to_string_pretty(&serde_json::json!({
            "projections": projections["projections"],
            "observers": observers["observers"],
            "kafka": projections["kafka"],
        }))?);
    }
    let mut rows = Vec::new();
    for p in projections["projections"].as_array().into_iter().flatten() {
        let building = &p["building"];
        let building = if building.is_null() {
            "-".to_owned()
        } else {
            format!(
                "{} {:.0}% eta {}s",
                text(&building["version"]),
                building["progress"].as_f64().unwrap_or(0.0) * 100.0,
                text(&building["eta_seconds"])
            )
        };
        rows.push(vec![
            text(&p["name"]),
            "projection".into(),
            text(&p["version"]),
            text(&p["status"]),
            text(&p["checkpoint"]),
            text(&p["lag"]),
            text(&p["parked_streams"]),
            text(&p["dead_letters"]["open"]),
            building,
        ]);
    }
    for o in observers["observers"].as_array().into_iter().flatten() {
        rows.push(vec![
            text(&o["name"]),
            "observer".into(),
            text(&o["version"]),
            text(&o["status"]),
            text(&o["checkpoint"]),
            text(&o["lag"]),
            text(&o["blocked_streams"]),
            text(&o["dead_letters"]),
            format!("pending {}", text(&o["actions"]["pending"])),
        ]);
    }
    Ok(table(
        &[
            "NAME",
            "KIND",
            "VERSION",
            "STATUS",
            "CHECKPOINT",
            "LAG",
            "PARKED",
            "DEAD",
            "BUILDING",
        ],
        &rows,
    ))
}

/// `projector dead-letters list`: a projection's (or, with `observer`, an observer's dead
/// actions), oldest first.
pub async fn dead_letters(
    client: &Client,
    name: &str,
    observer: bool,
    limit: u32,
    json: bool,
) -> anyhow::Result<String> {
    let kind = if observer { "observers" } else { "projections" };
    let page = client
        .get(&format!("/{kind}/{name}/_dead_letters?limit={limit}"))
        .await?;
    if json {
        return Ok(serde_json::to_string_pretty(&page)?);
    }
    let items = page["items"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|l| {
            if observer {
                vec![
                    text(&l["id"]),
                    text(&l["stream"]),
                    text(&l["kind"]),
                    text(&l["attempts"]),
                    text(&l["last_status"]),
                    text(&l["last_error"]),
                ]
            } else {
                vec![
                    text(&l["position"]),
                    text(&l["stream"]),
                    text(&l["kind"]),
                    text(&l["state"]),
                    text(&l["reason"]),
                ]
            }
        })
        .collect();
    Ok(if observer {
        table(
            &["ID", "STREAM", "KIND", "ATTEMPTS", "STATUS", "ERROR"],
            &rows,
        )
    } else {
        table(&["POSITION", "STREAM", "KIND", "STATE", "REASON"], &rows)
    })
}

/// `projector dead-letters retry|skip`.
pub async fn resolve(
    client: &Client,
    name: &str,
    target: &str,
    observer: bool,
    action: &str,
    json: bool,
) -> anyhow::Result<String> {
    let kind = if observer { "observers" } else { "projections" };
    let answer = client
        .admin_post(&format!(
            "/admin/{kind}/{name}/dead-letters/{target}/{action}"
        ))
        .await?;
    if json {
        return Ok(serde_json::to_string_pretty(&answer)?);
    }
    Ok(format!(
        "{}: {}",
        text(&answer["outcome"]["status"]),
        text(&answer["outcome"]["message"])
    ))
}

/// `projector plugins upload FILE`: named by what the component says of itself (checked here
/// first, as the server would), unless `--name` says otherwise.
pub async fn upload(
    client: &Client,
    file: &Path,
    name: Option<String>,
    manual: bool,
    json: bool,
) -> anyhow::Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = match name {
        Some(name) => name,
        None => {
            let runtime = projector::runtime::Runtime::new(Default::default())?;
            let plugin = runtime.load_bytes(&file.display().to_string(), &bytes)?;
            plugin.name().to_owned()
        }
    };
    let answer = client.upload(&name, bytes, manual).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&answer)?);
    }
    Ok(format!(
        "{} {}: {} (active {}, building {})",
        text(&answer["name"]),
        text(&answer["version"]),
        text(&answer["action"]),
        text(&answer["active"]),
        text(&answer["building"])
    ))
}

/// `projector plugins list`.
pub async fn plugins(client: &Client, json: bool) -> anyhow::Result<String> {
    let answer = client.admin_get("/admin/plugins").await?;
    if json {
        return Ok(serde_json::to_string_pretty(&answer)?);
    }
    let rows: Vec<Vec<String>> = answer["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                text(&p["name"]),
                text(&p["version"]),
                text(&p["role"]),
                text(&p["world"]),
                text(&p["origin"]),
                text(&p["sha256"]).chars().take(12).collect(),
            ]
        })
        .collect();
    Ok(table(
        &["NAME", "VERSION", "ROLE", "WORLD", "ORIGIN", "SHA256"],
        &rows,
    ))
}
