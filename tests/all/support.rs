//! Shared test plumbing: the compiled plugins, event builders.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use projector::event::Event;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_owned()
}

/// The folder of compiled plugins; builds them first unless the test script already did
/// (it sets `PROJECTOR_PLUGINS_BUILT`).
pub fn plugins_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            if std::env::var_os("PROJECTOR_PLUGINS_BUILT").is_none() {
                let status = Command::new("bash")
                    .arg(root.join("scripts/build-plugins.sh"))
                    .status()
                    .expect("run scripts/build-plugins.sh");
                assert!(status.success(), "building the plugins failed");
            }
            root.join("target/plugins")
        })
        .clone()
}

pub fn plugin_path(name: &str) -> PathBuf {
    plugins_dir().join(format!("{name}.wasm"))
}

pub fn fixture_path(name: &str) -> PathBuf {
    plugins_dir().join("fixtures").join(format!("{name}.wasm"))
}

/// Builds events with per-stream versions and global positions, like the outbox does.
#[derive(Default)]
pub struct Events {
    versions: std::collections::HashMap<String, u64>,
    position: u64,
}

impl Events {
    pub fn next(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) -> Event {
        let version = self.versions.entry(stream.to_owned()).or_insert(0);
        *version += 1;
        self.position += 1;
        Event {
            id: format!("{stream}-{version}"),
            stream: stream.to_owned(),
            stream_type: "Test".into(),
            event_type: event_type.to_owned(),
            version: *version,
            position: self.position,
            timestamp_ms: 1_700_000_000_000 + self.position * 1000,
            payload: serde_json::value::to_raw_value(&payload).expect("payload serializes"),
            headers: vec![],
        }
    }
}

/// Polls `check` until it answers `Ok`, and returns that; panics with its last `Err` after
/// `within`. Waiting on state, not on time: a slow machine only makes it poll longer.
pub async fn eventually<T, F, Fut>(within: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if std::time::Instant::now() >= deadline => {
                panic!("not within {within:?}: {last}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// A fresh folder under the system temp dir.
pub fn tempdir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("projector-{prefix}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A plugins folder holding the named example plugins and fixtures.
pub fn plugin_set(examples: &[&str], fixtures: &[&str]) -> PathBuf {
    let dir = tempdir("plugins");
    for name in examples {
        std::fs::copy(plugin_path(name), dir.join(format!("{name}.wasm"))).unwrap();
    }
    for name in fixtures {
        std::fs::copy(fixture_path(name), dir.join(format!("{name}.wasm"))).unwrap();
    }
    dir
}

/// The store a test server runs on. PostgreSQL tests share the cluster `scripts/test.sh`
/// starts (`PROJECTOR_TEST_POSTGRES`), one fresh database each.
#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    Postgres { url: String },
}

/// The admin URL of the test cluster.
pub fn postgres_admin_url() -> String {
    std::env::var("PROJECTOR_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "PROJECTOR_TEST_POSTGRES is not set: run the tests with `bash scripts/test.sh`, which \
             starts a throwaway PostgreSQL cluster, or point it at one \
             (scripts/pg-test-cluster.sh start DIR prints the URL)"
        )
    })
}

/// A fresh, empty database on the cluster at `admin_url`; returns its URL.
pub async fn create_database(admin_url: &str) -> String {
    use sqlx::Connection;
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connect to the test cluster");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let _ = admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').expect("a URL with a database");
    format!("{base}/{name}")
}

impl Backend {
    pub async fn postgres() -> Self {
        Self::Postgres {
            url: create_database(&postgres_admin_url()).await,
        }
    }

    /// The environment that points a server at this store.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Sqlite => vec![],
            Self::Postgres { url } => vec![("PROJECTOR_DATABASE_URL", url.clone())],
        }
    }

    pub fn url(&self) -> Option<&str> {
        match self {
            Self::Sqlite => None,
            Self::Postgres { url } => Some(url),
        }
    }
}

/// Defines each test once per store, as `name::sqlite` and `name::postgres`.
macro_rules! on_both_stores {
    ($(#[doc = $doc:literal])* async fn $name:ident($backend:ident) $body:block $($rest:tt)*) => {
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn run($backend: crate::support::Backend) $body
            #[tokio::test]
            async fn sqlite() {
                run(crate::support::Backend::Sqlite).await
            }
            #[tokio::test]
            async fn postgres() {
                run(crate::support::Backend::postgres().await).await
            }
        }
        on_both_stores! { $($rest)* }
    };
    () => {};
}
pub(crate) use on_both_stores;

/// The real `projector serve` binary as a child process, on a free port.
pub struct Server {
    child: std::process::Child,
    pub base: String,
    pub data_dir: PathBuf,
    pub plugins: PathBuf,
    env: Vec<(String, String)>,
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Server {
    /// A server on `backend`, with a fresh data folder.
    pub fn on(backend: &Backend, plugins: &Path) -> Self {
        Self::start_on(backend, plugins, &tempdir("data"), &[])
    }

    /// A server on `backend` with extra settings in `env`.
    pub fn start_on(
        backend: &Backend,
        plugins: &Path,
        data_dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let owned = backend.env();
        let mut all: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(env);
        Self::start_with(plugins, data_dir, &all)
    }

    pub fn start_with(plugins: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_under(&[], plugins, data_dir, env)
    }

    /// A server run by `wrapper` (a command that execs the rest of its arguments, such as
    /// `prlimit --nofile=...`), so the process keeps the server's pid.
    pub fn start_under(
        wrapper: &[&str],
        plugins: &Path,
        data_dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        use std::io::BufRead;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))
            .expect("open server log");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(env!("CARGO_BIN_EXE_projector"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_projector")),
        };
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .arg("--plugins")
            .arg(plugins)
            .stdout(std::process::Stdio::piped())
            .stderr(log);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start projector serve");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the listening line");
        let base = line
            .trim()
            .strip_prefix("projector listening on ")
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
                panic!("server did not start: {line:?}\n{log}")
            })
            .to_owned();
        Self {
            child,
            base,
            data_dir: data_dir.to_owned(),
            plugins: plugins.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            _stdout: stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("poll the server process")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills this server and starts another on the same data and plugins.
    pub fn restart(&mut self) {
        self.kill();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let next = Self::start_with(&self.plugins.clone(), &self.data_dir.clone(), &env);
        *self = next;
    }

    pub fn api(&self) -> Api {
        Api {
            base: self.base.clone(),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("POST");
        Self::decode(response).await
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("POST");
        Self::decode(response).await
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, text) = self.get_text(path).await;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, body)
    }

    /// The response's text as sent, for checks a parse into `Value` would blur (numbers).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// The value of an unlabelled gauge on `/metrics`.
    pub async fn gauge(&self, name: &str) -> Result<f64, String> {
        let (status, text) = self.get_text("/metrics").await;
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .ok_or_else(|| format!("{status}: no {name} on /metrics"))?
            .parse()
            .map_err(|e| format!("{name}: {e}"))
    }

    async fn decode(response: reqwest::Response) -> (u16, serde_json::Value) {
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, body)
    }

    /// Appends one event; panics unless it is accepted. Returns (version, position).
    pub async fn append(
        &self,
        stream: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> (u64, u64) {
        let (status, body) = self
            .post(
                "/events",
                &serde_json::json!({
                    "stream": stream, "stream_type": "Account", "type": event_type, "payload": payload,
                }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let e = &body["events"][0];
        (
            e["version"].as_u64().unwrap(),
            e["position"].as_u64().unwrap(),
        )
    }

    /// Opens an account (an `AccountOpened` in EUR); returns (version, position).
    pub async fn open_account(&self, stream: &str, owner: &str) -> (u64, u64) {
        self.append(
            stream,
            "AccountOpened",
            serde_json::json!({"owner": owner, "currency": "EUR"}),
        )
        .await
    }

    /// The projection's entry in `GET /projections`.
    pub async fn projection(&self, name: &str) -> serde_json::Value {
        let (status, body) = self.get(&format!("/projections/{name}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// One row of the outbox, as the server stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: String,
    pub stream: String,
    pub version: i64,
    pub position: i64,
    pub payload: String,
}

/// The outbox a server writes to, read from its database directly, in position order.
pub async fn outbox_rows(backend: &Backend, data_dir: &Path) -> Vec<OutboxRow> {
    let rows: Vec<(String, String, i64, i64, String)> = match backend {
        Backend::Sqlite => {
            let url = format!(
                "sqlite://{}?mode=ro",
                data_dir.join("projector.db").display()
            );
            let db = sqlx::SqlitePool::connect(&url).await.unwrap();
            let rows = sqlx::query_as(
                "SELECT id, stream, version, position, payload FROM outbox ORDER BY position",
            )
            .fetch_all(&db)
            .await
            .unwrap();
            db.close().await;
            rows
        }
        Backend::Postgres { url } => {
            let db = sqlx::PgPool::connect(url).await.unwrap();
            let rows = sqlx::query_as(
                "SELECT id::text, aggregateid, version, position, payload::text FROM outbox \
                 ORDER BY position",
            )
            .fetch_all(&db)
            .await
            .unwrap();
            db.close().await;
            rows
        }
    };
    rows.into_iter()
        .map(|(id, stream, version, position, payload)| OutboxRow {
            id,
            stream,
            version,
            position,
            payload,
        })
        .collect()
}
