//! projector-bench: what the pipeline does per second, and what each part costs.
//!
//! `cargo bench -p projector --bench projector-bench [-- SCENARIO...]`, scenarios:
//! `wasm` (plugin call micro-benchmark), `catchup`, `native` (catch-up with the same logic as
//! native Rust: the WASM cost), `live`, `ryw` (read-your-writes seed scenario), `sweep` (batch
//! sizes), `raw` (the same writes straight into SQLite), `read` (the outbox read stage alone),
//! `catchup-poison` (catch-up by the `poison` fixture over a clean log and over the same log
//! with 10 failing events: what isolating them costs), `isolate-loop` (one 5,000-event batch
//! whose event 2,500 loops until a 1 s deadline: how long isolating it takes), `ryw-herd`
//! (appends while 0, 500 and 2,000 waiting reads they do not satisfy are held open: append
//! latency and the server's CPU per append, counted until the server is idle again;
//! `BENCH_HERD_WAITERS` (`0,500,2000`), `BENCH_HERD_APPENDS` (100), `BENCH_HERD_RATE` (50
//! appends/s, one at a time)).
//! `live-sweep`: offered rates (`BENCH_SWEEP_RATES`, default 1000,2000,5000,10000,20000
//! appends/s, `BENCH_SWEEP_SECS` each, default 10) from 64 HTTP writers, one event per
//! `POST /events`, open loop, against `serve` in-process with the account-balance plugin, a
//! fresh database per rate, plus the top rate again with backpressure off; prints achieved
//! appends/s, append and commit → queryable latencies, max lag, refusals, CPU.
//! `append-batching`: the append path alone, closed loop: 64 writers of single-event appends
//! against 64-event batches (`BENCH_BATCHING_MODES=64x1,1x64,4x64,64x64`).
//! `swap`: hot swap under live load, against `serve` in-process on SQLite with the admin API
//! on. A backlog of `BENCH_SWAP_BACKLOG` (200000) events over `BENCH_SWAP_ACCOUNTS` (1000)
//! accounts (their openings, then deposits of 1) is appended before any projection runs; then
//! account-balance 1.0.0 is uploaded (`PUT /admin/plugins/account-balance`) and timed from the
//! upload until it has applied the backlog: the plain catch-up, `catchup_evps` (measured in the
//! same server and database that the rebuild runs in later, with nothing else running). Then
//! live load, open loop from 64 writers: `BENCH_SWAP_RATE` (1000) single-event appends/s for
//! `BENCH_SWAP_SECS` (30) s, each followed by a read of its account with
//! `wait_for=stream@version` (timeout 30 s), and a reader paging `accounts?limit=100`
//! (`BENCH_SWAP_PAGE_RATE` pages/s, 100; 0: back to back) that counts pages mixing documents
//! with and without `schema`. Meanwhile, one upload every `BENCH_SWAP_EVERY_SECS` (2) s:
//! `BENCH_SWAP_COUNT` (5) same-version swaps, alternately the `same` variant and the original,
//! each followed by polling `GET /projections/account-balance` until `active.swap_pauses`
//! moves, its `active.last_swap_pause_ms` recorded (a swap with no event waiting is not
//! measured by the host: another is made, up to as many again); then 2.0.0, rebuilt beside the
//! live version: `rebuild_evps` = the events up to the head seen just before the upload (the
//! backlog and the live appends so far) / the time from the upload until 2.0.0's checkpoint
//! reaches that head, and `cutover_secs` until it serves. The catch-up and the rebuild are both
//! timed from the upload, with the code already in the compile cache. At the end every
//! account's `balance` and `tx_count` must equal the deposits the bench got a 201 for.
//! Prints `RESULT scenario=swap pause_ms_p50=… pause_ms_p99=… rebuild_evps=… catchup_evps=…
//! ratio=… appends=… reads_ok=… errors_5xx=… mixed_pages=… lost_or_twice=…` and more
//! (`ratio` = rebuild_evps / catchup_evps; targets: pause p99 ≤ 50 ms, ratio ≥ 0.7,
//! errors_5xx, mixed_pages and lost_or_twice 0). With five pauses their p99 is their maximum.
//! `rebuild_events` and `rebuild_secs` are printed too (the backlog alone over `rebuild_secs`
//! is the stricter reading), and the cores used during each of the two timed windows by this
//! process and outside it (`*_cpu_outside`: PostgreSQL and anything else on the machine): both
//! rates are CPU-bound, so a ratio measured while other work ran says so there.
//! Needs the variants of `bash scripts/build-plugins.sh`.
//! `PROJECTOR_*` settings in the environment apply to the server of these three.
//! `observer`: the `relay` observer delivering one webhook per event to a local receiver (see
//! `benches/scenarios/observer.rs`); needs `target/plugins/fixtures/relay.wasm`.
//! `kafka` (`kafka-catchup`, `kafka-live`, `kafka-ryw`; by name only; `kafka-consume`, the
//! catch-up's ceiling, by its own name only): the Kafka source against
//! a tansu broker the bench starts (see `benches/scenarios/kafka.rs`).
//! `catchup-python`: the catch-up of `catchup` with the Python account-balance
//! (`plugins/account-balance-py`, componentize-py), printed beside `catch-up-wasm`.
//! Default: all. `catchup-poison` and `isolate-loop` need `target/plugins/fixtures/poison.wasm`
//! (`bash scripts/build-plugins.sh`).
//! On PostgreSQL: `pg-catchup`, `pg-native`, `pg-live`, `pg-ryw`, `pg-live-sweep`,
//! `pg-append-batching`, `pg-swap` (`pg`: all of them, with `pg-read` and `pg-raw`), the same
//! scenarios on a `PgOutbox` and the PostgreSQL store. They run on `BENCH_POSTGRES_URL` (an admin
//! URL, `postgres://postgres@127.0.0.1:PORT/postgres`; `all` includes them only when it is set)
//! or else on a throwaway durable cluster (`scripts/pg-test-cluster.sh start DIR --durable`),
//! in databases the bench creates and drops.
//! Sizes: `BENCH_EVENTS` (200000), `BENCH_STREAMS` (10000), `BENCH_LIVE_SECS` (20),
//! `BENCH_LIVE_RATE` (2000 events/s).
//!
//! Prints a table row and one `RESULT scenario=… events=… evps=… p50_ms=… p99_ms=…` line per
//! scenario; `catchup-poison` prints `RESULT scenario=catchup-poison events=… evps=… clean_evps=…
//! ratio=… dead_letters=… parked_events=… isolation_calls=…` (ratio: poisoned over clean
//! throughput, target ≥ 0.9), `isolate-loop` prints `RESULT scenario=isolate-loop events=5000
//! deadline_ms=1000 secs=… deadline_ratio=… isolation_calls=…` (target deadline_ratio ≤ 3);
//! `ryw-herd` adds `waiters=… server_cpu_ms_per_append=… cpu_ratio=…` (CPU over that with no
//! waiters, target ≤ 1.5 at 2,000).

#[path = "scenarios/kafka.rs"]
mod kafka;
#[path = "scenarios/observer.rs"]
mod observer;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use account_balance::AccountBalance;
use projector::config::{Config, OutboxConfig, PostgresConfig, RunnerConfig};
use projector::event::Event;
use projector::metrics::ProjectionMetrics;
use projector::runner::{Projection, Runner};
use projector::runtime::{
    BatchHandler, BatchOutput, CollectionSpec, Descriptor, DocumentReader, Failed, Limits,
    MemoryDocuments, Plugin, Runtime, RuntimeConfig, RuntimeError,
};
use projector::source::outbox::SqliteOutbox;
use projector::source::pg_outbox::PgOutbox;
use projector::source::{NewEvent, Source};
use projector::store::postgres::Postgres;
use projector::store::sqlite::Sqlite;
use projector::store::{Batch, ProjectionStatus, Store};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn plugin_file() -> PathBuf {
    root().join("target/plugins/account-balance.wasm")
}

/// The same projection in Python (componentize-py), built by `scripts/build-plugins.sh`.
fn python_file() -> PathBuf {
    root().join("target/plugins/variants/account-balance-py/account-balance-py.wasm")
}

/// The fixture that fails on the events whose payload says `"poison": "<how>"`.
fn poison_file() -> PathBuf {
    root().join("target/plugins/fixtures/poison.wasm")
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("projector-bench-{name}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A field of `/proc/self/stat`, counted after the parenthesised command name.
fn proc_stat(field: usize) -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    fields
        .get(field)
        .and_then(|f| f.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// CPU time this process has used (user + system), in seconds: on a machine this small the
/// pipeline is bound by it, and it varies less between runs than wall time.
fn cpu_secs() -> f64 {
    (proc_stat(11) + proc_stat(12)) / 100.0
}

/// Minor page faults so far: each costs a kernel entry and a zeroed page.
fn page_faults() -> f64 {
    proc_stat(7)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn report(scenario: &str, events: usize, secs: f64, latencies_ms: &mut [f64], extra: &str) {
    latencies_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let evps = events as f64 / secs;
    let (p50, p99, max) = (
        percentile(latencies_ms, 0.5),
        percentile(latencies_ms, 0.99),
        latencies_ms.last().copied().unwrap_or(0.0),
    );
    println!(
        "| {scenario:<22} | {events:>8} | {secs:>8.3} s | {evps:>12.0} ev/s | p50 {p50:>7.3} ms | p99 {p99:>7.3} ms | max {max:>7.3} ms | {extra}"
    );
    println!(
        "RESULT scenario={scenario} events={events} evps={evps:.0} p50_ms={p50:.3} p99_ms={p99:.3} max_ms={max:.3} secs={secs:.3} {extra}"
    );
}

/// A ~150-byte payload, as the targets assume.
fn payload(kind: &str, i: usize) -> serde_json::Value {
    match kind {
        "AccountOpened" => json!({"owner": format!("owner-{i}"), "currency": "EUR",
            "branch": "main-street-branch-0042", "channel": "mobile-app",
            "reference": format!("{i:020}")}),
        _ => json!({"amount": 1 + i % 97, "reference": format!("tx-{i:024}"),
            "channel": "sepa-instant-transfer", "note": "monthly savings plan"}),
    }
}

/// Event `i` of the generated log: streams round-robin, each opened by its first event.
fn new_event(i: usize, streams: usize) -> NewEvent {
    let stream = i % streams;
    let kind = match (i / streams, i % 3) {
        (0, _) => "AccountOpened",
        (_, 0) => "Withdrawn",
        _ => "Deposited",
    };
    NewEvent {
        id: None,
        stream: format!("acct-{stream:06}"),
        stream_type: "Account".into(),
        event_type: kind.into(),
        payload: serde_json::value::to_raw_value(&payload(kind, i)).unwrap(),
        expected_version: None,
        headers: Default::default(),
    }
}

/// Events of the generated log that carry `"poison": "<how>"`, by index: the `poison`
/// fixture fails on them that way.
type Poisons = BTreeMap<usize, &'static str>;

/// Ten events spread across the log, one in each tenth of it, each in a stream of its own and
/// none the first of its stream: five whose call returns an error, five that panic.
fn spread_poisons(events: usize, streams: usize) -> Poisons {
    let (count, hows) = (10, ["error", "panic"]);
    assert!(
        streams >= count && events >= streams + 20 * count,
        "catchup-poison needs at least {count} streams and {} events past the streams' first",
        20 * count
    );
    let mut used = BTreeSet::new();
    (0..count)
        .map(|k| {
            // The middle of tenth `k` of the events after each stream's first.
            let mut i = streams + (events - streams) * (2 * k + 1) / (2 * count);
            while !used.insert(i % streams) {
                i += 1;
            }
            (i, hows[k % hows.len()])
        })
        .collect()
}

/// Event `i` of the generated log, poisoned if `poisons` names it.
fn log_event(i: usize, streams: usize, poisons: &Poisons) -> NewEvent {
    let mut event = new_event(i, streams);
    if let Some(&how) = poisons.get(&i) {
        let mut payload = payload(&event.event_type, i);
        payload["poison"] = how.into();
        event.payload = serde_json::value::to_raw_value(&payload).unwrap();
    }
    event
}

/// A database file holding `events` events, `poisons` among them; each catch-up run gets a
/// copy.
async fn template(events: usize, streams: usize, poisons: &Poisons) -> PathBuf {
    let dir = tempdir("template");
    let file = dir.join("projector.db");
    let url = format!("sqlite://{}", file.display());
    let db = Sqlite::open(&url).await.unwrap();
    let outbox = SqliteOutbox::new(db.clone()).await.unwrap();
    fill(&outbox, events, streams, poisons).await;
    db.close().await.unwrap();
    file
}

/// Appends the generated log in chunks of 5,000 through the append path, and says how fast.
async fn fill(outbox: &dyn Source, events: usize, streams: usize, poisons: &Poisons) {
    let start = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(5_000) {
        outbox
            .append(
                chunk
                    .iter()
                    .map(|&i| log_event(i, streams, poisons))
                    .collect(),
            )
            .await
            .unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!("(setup: appended {events} events over {streams} streams in {secs:.2} s, {:.0} ev/s through the append path)", events as f64 / secs);
}

/// A PostgreSQL database holding `events` events; each catch-up run gets a copy
/// (`CREATE DATABASE ... TEMPLATE`). Returns its name.
async fn pg_template(cluster: &PgCluster, events: usize, streams: usize) -> String {
    let name = cluster.create(None).await;
    let (_store, outbox) = open(&cluster.url(&name)).await;
    fill(outbox.as_ref(), events, streams, &Poisons::new()).await;
    name
}

fn remove_template(file: &Path) {
    if let Some(dir) = file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A copy of the template database, and the directory holding it.
async fn copy_of(template: &Path) -> (Sqlite, Arc<SqliteOutbox>, PathBuf) {
    let dir = tempdir("run");
    let file = dir.join("projector.db");
    std::fs::copy(template, &file).unwrap();
    // Flushed before the clock starts: otherwise the first WAL checkpoint's fsync writes out
    // the whole fresh copy inside the measured run (±40 % between runs).
    std::fs::File::open(&file).unwrap().sync_all().unwrap();
    let db = Sqlite::open(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    let outbox = Arc::new(SqliteOutbox::new(db.clone()).await.unwrap());
    (db, outbox, dir)
}

/// A store and the outbox it reads, on `url` (`sqlite://` or `postgres://`), as `serve` opens
/// them.
async fn open(url: &str) -> (Arc<dyn Store>, Arc<dyn Source>) {
    if url.starts_with("sqlite:") {
        let db = Sqlite::open(url).await.unwrap();
        let outbox = SqliteOutbox::new(db.clone()).await.unwrap();
        (Arc::new(db), Arc::new(outbox))
    } else {
        let db = Postgres::open(url, &PostgresConfig::default())
            .await
            .unwrap();
        let outbox = PgOutbox::open(db.clone(), &OutboxConfig::default())
            .await
            .unwrap();
        (Arc::new(db), Arc::new(outbox))
    }
}

/// The log the catch-up scenarios read, copied afresh for each run.
enum Template<'a> {
    /// A database file.
    Sqlite(&'a Path),
    /// A database on the cluster.
    Postgres {
        cluster: &'a PgCluster,
        name: String,
    },
}

impl Template<'_> {
    /// Prefixed to the scenario names.
    fn prefix(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "",
            Self::Postgres { .. } => "pg-",
        }
    }

    fn store(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }

    /// A fresh copy, and what to remove after the run (the SQLite copy's directory, the
    /// PostgreSQL database).
    async fn copy(&self) -> (Arc<dyn Store>, Arc<dyn Source>, Option<String>) {
        match self {
            Self::Sqlite(file) => {
                let (db, outbox, dir) = copy_of(file).await;
                (Arc::new(db), outbox, Some(dir.display().to_string()))
            }
            Self::Postgres { cluster, name } => {
                let copy = cluster.create(Some(name)).await;
                let (store, outbox) = open(&cluster.url(&copy)).await;
                (store, outbox, Some(copy))
            }
        }
    }

    async fn discard(&self, copy: Option<String>) {
        match (self, copy) {
            (Self::Postgres { cluster, .. }, Some(copy)) => cluster.drop_database(&copy).await,
            (Self::Sqlite(_), Some(dir)) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            _ => {}
        }
    }
}

/// The PostgreSQL the `pg-*` scenarios run on: `BENCH_POSTGRES_URL`, or a throwaway durable
/// cluster under `target/`, stopped and removed on drop.
struct PgCluster {
    /// The admin URL (its database is only used to create and drop others).
    admin: String,
    /// The cluster this bench started.
    dir: Option<PathBuf>,
    next: AtomicUsize,
}

impl PgCluster {
    fn start() -> Self {
        if let Some(admin) = std::env::var("BENCH_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
        {
            return Self {
                admin,
                dir: None,
                next: AtomicUsize::new(0),
            };
        }
        let dir = root().join(format!("target/bench-pg-{}", std::process::id()));
        let mut cluster = Self {
            admin: String::new(),
            dir: Some(dir.clone()),
            next: AtomicUsize::new(0),
        };
        let out = pg_test_cluster("start", &dir, &["--durable"]);
        assert!(
            out.status.success(),
            "scripts/pg-test-cluster.sh start failed"
        );
        cluster.admin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        cluster
    }

    /// The URL of `database` on this cluster.
    fn url(&self, database: &str) -> String {
        let mut url = url::Url::parse(&self.admin).unwrap();
        url.set_path(&format!("/{database}"));
        url.to_string()
    }

    async fn admin(&self) -> PgConnection {
        PgConnection::connect(&self.admin).await.unwrap()
    }

    async fn describe(&self) {
        let mut admin = self.admin().await;
        let (version, fsync, sync_commit): (String, String, String) = sqlx::query_as(
            "SELECT current_setting('server_version'), current_setting('fsync'), \
             current_setting('synchronous_commit')",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        let at = match &self.dir {
            Some(dir) => format!("throwaway cluster in {}", dir.display()),
            None => "BENCH_POSTGRES_URL".into(),
        };
        println!("(PostgreSQL {version}, {at}, fsync={fsync} synchronous_commit={sync_commit})");
        admin.close().await.unwrap();
    }

    /// Creates an empty database, or a copy of `template`; returns its name.
    async fn create(&self, template: Option<&str>) -> String {
        let name = format!(
            "bench_{}_{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let sql = match template {
            Some(template) => format!("CREATE DATABASE {name} TEMPLATE {template}"),
            None => format!("CREATE DATABASE {name}"),
        };
        let mut admin = self.admin().await;
        for attempt in 1.. {
            if let Some(template) = template {
                // A template must have no other sessions, and what filled it leaves some behind
                // (pool connections, the outbox's LISTEN connection).
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(template)
                .execute(&mut admin)
                .await
                .unwrap();
            }
            match sqlx::raw_sql(&sql).execute(&mut admin).await {
                Ok(_) => break,
                Err(err) if attempt < 10 => {
                    println!("({sql}: {err}; retrying)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("{sql}: {err}"),
            }
        }
        admin.close().await.unwrap();
        name
    }

    async fn drop_database(&self, name: &str) {
        let mut admin = self.admin().await;
        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            match pg_test_cluster("stop", dir, &[]) {
                out if out.status.success() => {
                    let _ = std::fs::remove_dir_all(dir);
                }
                _ => eprintln!(
                    "projector-bench: could not stop the PostgreSQL cluster in {}",
                    dir.display()
                ),
            }
        }
    }
}

fn pg_test_cluster(command: &str, dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("bash")
        .arg(root().join("scripts/pg-test-cluster.sh"))
        .arg(command)
        .arg(dir)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap()
}

/// The account-balance logic compiled natively, behind the same seam as the WASM plugin.
struct Native {
    descriptor: Descriptor,
}

impl Native {
    fn new() -> Self {
        use projector_sdk::Projection as _;
        let d = AccountBalance::describe();
        Self {
            descriptor: Descriptor {
                name: d.name,
                version: d.version,
                event_types: d.event_types,
                collections: d
                    .collections
                    .into_iter()
                    .map(|c| CollectionSpec {
                        name: c.name,
                        indexes: c.indexes,
                    })
                    .collect(),
            },
        }
    }
}

struct Collect {
    docs: Arc<dyn DocumentReader>,
    out: BatchOutput,
}

impl projector_sdk::Backend for Collect {
    fn get(&mut self, collection: &str, key: &str) -> Option<Vec<u8>> {
        if let Some(w) = self.out.writes.get(collection).and_then(|m| m.get(key)) {
            return w.clone();
        }
        self.docs.get(collection, key).ok().flatten()
    }
    fn put(&mut self, collection: &str, key: &str, document: &[u8]) {
        self.out
            .writes
            .entry(collection.to_owned())
            .or_default()
            .insert(key.to_owned(), Some(document.to_vec()));
    }
    fn delete(&mut self, collection: &str, key: &str) {
        self.out
            .writes
            .entry(collection.to_owned())
            .or_default()
            .insert(key.to_owned(), None);
    }
}

impl BatchHandler for Native {
    fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }
    fn handle(
        &self,
        events: Vec<Event>,
        docs: Arc<dyn DocumentReader>,
    ) -> Result<BatchOutput, Failed> {
        // The same conversion the WASM path makes when it lowers events into the guest.
        let events: Vec<projector_sdk::Event> = events
            .into_iter()
            .map(|e| projector_sdk::Event {
                id: e.id,
                stream: e.stream,
                stream_type: e.stream_type,
                event_type: e.event_type,
                version: e.version,
                position: e.position,
                timestamp_ms: e.timestamp_ms,
                payload: Box::<str>::from(e.payload).into_string().into_bytes(),
                headers: e.headers,
            })
            .collect();
        let mut backend = Collect {
            docs,
            out: BatchOutput::default(),
        };
        // The bench's events are all good: a failure is a bug, with no events to give back.
        projector_sdk::run_batch::<AccountBalance>(&events, &mut backend).map_err(|e| Failed {
            error: Box::new(RuntimeError::Guest {
                plugin: "native".into(),
                index: e.index,
                event_id: String::new(),
                at: String::new(),
                message: e.message,
            }),
            events: Vec::new(),
        })?;
        Ok(backend.out)
    }
}

/// The plugin in `file`, run under `limits`.
fn load(file: &Path, limits: Limits) -> Arc<dyn BatchHandler> {
    let runtime = Runtime::new(RuntimeConfig {
        limits,
        cache_dir: Some(root().join("target/bench-cache")),
        ..Default::default()
    })
    .unwrap();
    match runtime.load_file(file) {
        Ok(plugin) => Arc::new(Loaded {
            plugin,
            _runtime: runtime,
        }),
        Err(err) => panic!(
            "{}: {err} (built by `bash scripts/build-plugins.sh`)",
            file.display()
        ),
    }
}

/// A plugin and the runtime it was loaded by, kept alive together: dropping a `Runtime` stops
/// its deadline clock, and its plugins would then run with no deadline at all.
struct Loaded {
    plugin: Plugin,
    _runtime: Runtime,
}

impl BatchHandler for Loaded {
    fn descriptor(&self) -> &Descriptor {
        self.plugin.descriptor()
    }
    fn handle(
        &self,
        events: Vec<Event>,
        docs: Arc<dyn DocumentReader>,
    ) -> Result<BatchOutput, Failed> {
        BatchHandler::handle(&self.plugin, events, docs)
    }
}

/// Runs a projection from position 0 to the head of a copy of `template`; returns seconds
/// taken and the projection as it ended (its metrics). Panics if the projection failed.
async fn catch_up(
    template: &Template<'_>,
    handler: Arc<dyn BatchHandler>,
    max_batch: usize,
) -> (f64, Arc<Projection>) {
    let (store, outbox, copy) = template.copy().await;
    let head = *outbox.head().borrow();
    let checkpoint = store.register(handler.descriptor()).await.unwrap();
    let projection = Arc::new(Projection::new(handler, checkpoint));
    let mut progress = projection.progress();
    let config = RunnerConfig {
        max_batch_events: max_batch,
        max_batch_bytes: 64 << 20,
        ..RunnerConfig::default()
    };
    let runner = Runner::new(projection.clone(), store, outbox, config);
    let (stop, stopped) = watch::channel(false);
    let (cpu, faults) = (cpu_secs(), page_faults());
    let start = Instant::now();
    let task = tokio::spawn(runner.run(stopped));
    progress
        .wait_for(|p| p.position >= head || p.failed)
        .await
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    let (cpu, faults) = (cpu_secs() - cpu, page_faults() - faults);
    assert!(!progress.borrow().failed, "{:?}", projection.health());
    stop.send(true).unwrap();
    task.await.unwrap();
    template.discard(copy).await;
    // Busy time per stage (they overlap: the runner is a pipeline).
    let m = &projection.metrics;
    let busy = |c: &std::sync::atomic::AtomicU64| ProjectionMetrics::get(c) as f64 / 1e6;
    println!(
        "  (stages busy: read {:.2} s, plugin {:.2} s, commit {:.2} s; process CPU {cpu:.2} s, \
         {faults} page faults)",
        busy(&m.read_micros),
        busy(&m.plugin_micros),
        busy(&m.commit_micros)
    );
    (secs, projection)
}

async fn scenario_wasm() {
    println!("\n## WASM plugin calls (account-balance, in memory)");
    let cache = tempdir("cache");
    let rt = Runtime::new(RuntimeConfig {
        limits: Limits::default(),
        cache_dir: Some(cache.clone()),
        ..Default::default()
    })
    .unwrap();
    let start = Instant::now();
    let _compiled = rt.load_file(&plugin_file()).unwrap();
    let compile_ms = start.elapsed().as_secs_f64() * 1e3;
    let start = Instant::now();
    let plugin = rt.load_file(&plugin_file()).unwrap();
    let cached_ms = start.elapsed().as_secs_f64() * 1e3;
    assert!(plugin.loaded_from_cache());
    let docs = Arc::new(MemoryDocuments::default());
    let streams = 1000;
    let opened: Vec<Event> = (0..streams).map(|i| to_event(i, streams)).collect();
    docs.apply(plugin.handle(opened, docs.clone()).unwrap());
    let rounds = 50;
    let start = Instant::now();
    for _ in 0..rounds {
        plugin.handle(Vec::new(), docs.clone()).unwrap();
    }
    let instantiate_ms = start.elapsed().as_secs_f64() * 1e3 / rounds as f64;
    println!("compile {compile_ms:.1} ms | load from cache {cached_ms:.2} ms | instantiate + empty call {instantiate_ms:.3} ms");
    println!("RESULT scenario=wasm-load compile_ms={compile_ms:.1} cached_load_ms={cached_ms:.2} instantiate_ms={instantiate_ms:.3}");
    for batch in [1usize, 100, 1000] {
        let total = if batch == 1 { 20_000 } else { 200_000 };
        let events: Vec<Event> = (streams..streams + total)
            .map(|i| to_event(i, streams))
            .collect();
        let batches: Vec<Vec<Event>> = events.chunks(batch).map(<[Event]>::to_vec).collect();
        let start = Instant::now();
        for chunk in batches {
            plugin.handle(chunk, docs.clone()).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        report(
            &format!("wasm-handle-batch-{batch}"),
            total,
            secs,
            &mut [],
            "",
        );
    }
}

fn to_event(i: usize, streams: usize) -> Event {
    let e = new_event(i, streams);
    Event {
        id: format!("e{i}"),
        stream: e.stream,
        stream_type: e.stream_type,
        event_type: e.event_type,
        version: (i / streams + 1) as u64,
        position: i as u64 + 1,
        timestamp_ms: 1_700_000_000_000,
        payload: e.payload,
        headers: vec![],
    }
}

/// Catch-up times vary ±10 % run to run on a small VM: run `BENCH_REPEAT` times (3), report
/// the median and list every run; the projections as each run ended.
async fn median_catch_up(
    template: &Template<'_>,
    handler: Arc<dyn BatchHandler>,
) -> (f64, String, Vec<Arc<Projection>>) {
    let mut runs = Vec::new();
    let mut projections = Vec::new();
    for _ in 0..env_usize("BENCH_REPEAT", 3).max(1) {
        let (secs, projection) = catch_up(
            template,
            handler.clone(),
            env_usize("BENCH_BATCH", RunnerConfig::default().max_batch_events),
        )
        .await;
        runs.push(secs);
        projections.push(projection);
    }
    let (secs, listed) = median(runs);
    (secs, listed, projections)
}

/// The median of some runs' seconds, and every run listed (`runs_s=…`).
fn median(mut runs: Vec<f64>) -> (f64, String) {
    let listed = runs
        .iter()
        .map(|r| format!("{r:.3}"))
        .collect::<Vec<_>>()
        .join(",");
    runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (runs[runs.len() / 2], format!("runs_s={listed}"))
}

/// The WASM catch-up (also when only `native` is asked for: its ratio needs it), then the
/// native one.
async fn catch_ups(template: &Template<'_>, events: usize, catchup: bool, native: bool) {
    let mut wasm_secs = None;
    if catchup || native {
        wasm_secs = Some(scenario_catchup(template, events).await);
    }
    if native {
        scenario_native(template, events, wasm_secs).await;
    }
}

async fn scenario_catchup(template: &Template<'_>, events: usize) -> f64 {
    let plugin = load(&plugin_file(), Limits::default());
    let (secs, runs, _) = median_catch_up(template, plugin).await;
    report(
        &format!("{}catch-up-wasm", template.prefix()),
        events,
        secs,
        &mut [],
        &format!("store={} median {runs}", template.store()),
    );
    secs
}

/// The Python account-balance over the same log: what a second language costs, beside
/// `catch-up-wasm` (the Rust one), with the same batches, store and limits.
async fn scenario_catchup_python(template: &Template<'_>, events: usize) {
    let plugin = load(&python_file(), Limits::default());
    let (secs, runs, _) = median_catch_up(template, plugin).await;
    report(
        &format!("{}catch-up-python", template.prefix()),
        events,
        secs,
        &mut [],
        &format!("store={} median {runs}", template.store()),
    );
}

/// The `poison` fixture's catch-up over `clean`, then over the same log with ten poisoned
/// events (`spread_poisons`): each batch holding one fails, is isolated (the culprit
/// dead-lettered, its stream parked) and the rest of it applied. The ratio of the two
/// throughputs is what isolation costs.
async fn scenario_catchup_poison(clean: &Template<'_>, events: usize, streams: usize) {
    println!("\n## Catch-up with poisoned events (poison fixture, SQLite)");
    let poisons = spread_poisons(events, streams);
    let file = template(events, streams, &poisons).await;
    let plugin = load(&poison_file(), Limits::default());
    let (clean_secs, clean_runs, _) = median_catch_up(clean, plugin.clone()).await;
    let (secs, runs, projections) = median_catch_up(&Template::Sqlite(&file), plugin).await;
    remove_template(&file);
    // What each poisoned run set aside and spent: the same in every run.
    let counts = |p: &Projection| {
        let m = &p.metrics;
        [&m.dead_letters_plugin, &m.parked_events, &m.isolation_calls].map(ProjectionMetrics::get)
    };
    let [dead_letters, parked_events, isolation_calls] = counts(&projections[0]);
    for projection in &projections {
        let health = projection.health();
        assert!(
            !projection.progress().borrow().failed && health.status != ProjectionStatus::Failed,
            "the poisoned catch-up failed: {health:?}"
        );
        assert_eq!(counts(projection), counts(&projections[0]));
    }
    assert_eq!(
        dead_letters,
        poisons.len() as u64,
        "plugin dead letters of the poisoned catch-up"
    );
    let (evps, clean_evps) = (events as f64 / secs, events as f64 / clean_secs);
    println!("  (clean {clean_runs}; poisoned {runs})");
    println!(
        "RESULT scenario=catchup-poison events={events} evps={evps:.0} clean_evps={clean_evps:.0} \
         ratio={:.3} dead_letters={dead_letters} parked_events={parked_events} \
         isolation_calls={isolation_calls}",
        evps / clean_evps
    );
}

/// One batch of 5,000 events whose event at position 2,500 loops until the 1 s deadline
/// stops it: the call runs out the deadline, the events before the culprit run again, the
/// culprit runs alone (a limit is confirmed alone) and runs out the deadline again, then the
/// events after it run. Timed from the runner's start to the checkpoint at the head.
async fn scenario_isolate_loop(streams: usize) {
    println!("\n## Isolating a looping event (poison fixture, SQLite)");
    let (events, deadline_ms) = (5_000, 1_000);
    let poisons = Poisons::from([(2_499, "loop")]);
    let file = template(events, streams.min(events / 10).max(1), &poisons).await;
    let limits = Limits {
        deadline_ms,
        ..Limits::default()
    };
    let plugin = load(&poison_file(), limits);
    let template = Template::Sqlite(&file);
    let run = catch_up(&template, plugin, events);
    // A loop the deadline does not stop would hang the bench (and its exit, which waits for
    // the plugin's thread).
    let Ok((secs, projection)) = tokio::time::timeout(Duration::from_secs(60), run).await else {
        eprintln!("isolate-loop: the checkpoint is not at the head after 60 s");
        std::process::exit(1);
    };
    remove_template(&file);
    let m = &projection.metrics;
    assert_eq!(ProjectionMetrics::get(&m.dead_letters_plugin), 1);
    println!(
        "RESULT scenario=isolate-loop events={events} deadline_ms={deadline_ms} secs={secs:.3} \
         deadline_ratio={:.3} isolation_calls={}",
        secs * 1e3 / deadline_ms as f64,
        ProjectionMetrics::get(&m.isolation_calls)
    );
}

async fn scenario_native(template: &Template<'_>, events: usize, wasm_secs: Option<f64>) {
    let (secs, runs, _) = median_catch_up(template, Arc::new(Native::new())).await;
    let ratio = wasm_secs
        .map(|w| format!("wasm_over_native={:.2} ", secs / w))
        .unwrap_or_default();
    report(
        &format!("{}catch-up-native", template.prefix()),
        events,
        secs,
        &mut [],
        &format!("{ratio}median {runs}"),
    );
}

/// Batch sizes 1 and 10 run over a smaller log (`small`), the rest over the full one.
async fn scenario_sweep(small: (&Template<'_>, usize), full: (&Template<'_>, usize)) {
    let plugin = load(&plugin_file(), Limits::default());
    let sizes = std::env::var("BENCH_SWEEP_SIZES")
        .unwrap_or_else(|_| "1,10,100,1000,2000,5000,10000".into());
    for batch in sizes
        .split(',')
        .filter_map(|s| s.trim().parse::<usize>().ok())
    {
        let (template, events) = if batch < 100 { small } else { full };
        let (secs, _) = catch_up(template, plugin.clone(), batch).await;
        report(&format!("sweep-batch-{batch}"), events, secs, &mut [], "");
    }
}

async fn scenario_raw(template: &Template<'_>, events: usize, streams: usize) {
    // The documents the catch-up writes, computed first (untimed), then committed batch by
    // batch with the store's own statements: the floor under the pipeline.
    let batch = env_usize("BENCH_BATCH", RunnerConfig::default().max_batch_events);
    let native = Native::new();
    let docs = Arc::new(MemoryDocuments::default());
    let mut outputs = Vec::new();
    let all: Vec<Event> = (0..events).map(|i| to_event(i, streams)).collect();
    for chunk in all.chunks(batch) {
        let out = native.handle(chunk.to_vec(), docs.clone()).unwrap();
        docs.apply(out.clone());
        outputs.push((out, chunk.last().unwrap().position));
    }
    let mut runs = Vec::new();
    for _ in 0..env_usize("BENCH_REPEAT", 3).max(1) {
        let (db, _, copy) = template.copy().await;
        db.register(native.descriptor()).await.unwrap();
        let start = Instant::now();
        let mut from = 0;
        for (n, (out, position)) in outputs.iter().enumerate() {
            // As the runner does: durable once the head is reached.
            let durable = n + 1 == outputs.len();
            let batch = Batch {
                output: out,
                from,
                to: *position,
                durable,
                ..Default::default()
            };
            db.commit(native.descriptor(), &batch).await.unwrap();
            from = *position;
        }
        runs.push(start.elapsed().as_secs_f64());
        template.discard(copy).await;
    }
    let (secs, listed) = median(runs);
    let name = match template {
        Template::Sqlite(_) => "raw-sqlite-writes",
        Template::Postgres { .. } => "pg-raw-writes",
    };
    report(name, events, secs, &mut [], &format!("median {listed}"));
}

/// Reading the whole outbox in runner-sized batches, nothing else: the read stage's cost.
async fn scenario_read(template: &Template<'_>, events: usize) {
    let (_store, outbox, copy) = template.copy().await;
    let batch = RunnerConfig::default().max_batch_events;
    let start = Instant::now();
    let mut after = 0;
    let mut seen = 0;
    loop {
        let read = outbox.read(after, batch, 64 << 20).await.unwrap();
        let Some(last) = read.last() else { break };
        after = last.position;
        seen += read.len();
    }
    assert_eq!(seen, events);
    let secs = start.elapsed().as_secs_f64();
    report(
        &format!("{}outbox-read", template.prefix()),
        events,
        secs,
        &mut [],
        "",
    );
    template.discard(copy).await;
}

/// `rate` appends of one event per second for `secs` seconds on an empty database; latency from
/// each append's commit to the projection's checkpoint passing its position.
async fn scenario_live(
    prefix: &str,
    (store, outbox): (Arc<dyn Store>, Arc<dyn Source>),
    secs: u64,
    rate: usize,
) {
    let plugin = load(&plugin_file(), Limits::default());
    let checkpoint = store.register(plugin.descriptor()).await.unwrap();
    let projection = Arc::new(Projection::new(plugin, checkpoint));
    let runner = Runner::new(
        projection.clone(),
        store,
        outbox.clone(),
        RunnerConfig::default(),
    );
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(runner.run(stopped));
    let streams = 1000;
    outbox
        .append((0..streams).map(|i| new_event(i, streams)).collect())
        .await
        .unwrap();

    // Appended positions waiting to be seen committed, with the time their append committed.
    let pending: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let monitor = {
        let pending = pending.clone();
        let latencies = latencies.clone();
        let mut progress = projection.progress();
        tokio::spawn(async move {
            while progress.changed().await.is_ok() {
                let now = Instant::now();
                let position = progress.borrow_and_update().position;
                let mut pending = pending.lock().unwrap();
                let passed: Vec<u64> = pending.range(..=position).map(|(p, _)| *p).collect();
                for p in passed {
                    let at = pending.remove(&p).unwrap();
                    latencies
                        .lock()
                        .unwrap()
                        .push((now - at).as_secs_f64() * 1e3);
                }
            }
        })
    };
    // One event per append at a steady `rate`, open loop: each append starts at its due time,
    // whether or not the previous one has returned (a durable commit per append would
    // otherwise cap a single writer below the rate).
    let total = rate * secs as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    let mut last = 0;
    for n in 0..total {
        let due = start + interval * n as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let (outbox, pending, latencies, projection) = (
            outbox.clone(),
            pending.clone(),
            latencies.clone(),
            projection.clone(),
        );
        writers.spawn(async move {
            let appended = outbox
                .append(vec![new_event(streams + n, streams)])
                .await
                .unwrap();
            let position = appended[0].position;
            let mut pending = pending.lock().unwrap();
            if projection.checkpoint() >= position {
                latencies.lock().unwrap().push(0.0);
            } else {
                pending.insert(position, Instant::now());
            }
            position
        });
        while let Some(position) = writers.try_join_next() {
            last = last.max(position.unwrap());
        }
    }
    while let Some(position) = writers.join_next().await {
        last = last.max(position.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    projection
        .progress()
        .wait_for(|p| p.position >= last)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    monitor.abort();
    let mut lat = latencies.lock().unwrap().clone();
    // Achieved: the appends over the time until the last one returned (past the offered
    // window when the appends could not keep up).
    let achieved = total as f64 / elapsed;
    report(
        &format!("{prefix}live-commit-to-queryable"),
        total,
        elapsed,
        &mut lat,
        &format!("rate={rate} offered_aps={rate} achieved_aps={achieved:.0}"),
    );
}

/// The seed scenario over HTTP against `serve`, on `database_url` (default: SQLite in a temp
/// dir).
async fn scenario_ryw(prefix: &str, database_url: Option<String>) {
    let dir = tempdir("ryw");
    let mut config = Config::load(None, Vec::new()).unwrap();
    config.listen = "127.0.0.1:0".into();
    config.data_dir = dir.clone();
    if let Some(url) = database_url {
        config.database_url = url;
    }
    config.plugins.dir = root().join("target/plugins");
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop, mut stopped) = watch::channel(false);
    let server = projector::serve::serve(
        config,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stopped.changed().await;
        },
    );
    let client = ryw_client(addr_rx, stop, format!("{prefix}read-your-writes-seed"));
    let (served, ()) = tokio::join!(server, client);
    served.unwrap();
}

async fn ryw_client(
    addr_rx: tokio::sync::oneshot::Receiver<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    scenario: String,
) {
    let base = format!("http://{}", addr_rx.await.unwrap());
    let http = reqwest::Client::new();
    let mut waits = Vec::new();
    let append = |stream: String, kind: &'static str, payload: serde_json::Value| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let r: serde_json::Value = http
                .post(format!("{base}/events"))
                .json(&json!({"stream": stream, "stream_type": "Account", "type": kind, "payload": payload}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["events"][0]["version"].as_u64().unwrap()
        }
    };
    let start = Instant::now();
    let mut read = async |stream: &str, version: u64| {
        let t = Instant::now();
        let r = http
            .get(format!(
                "{base}/projections/account-balance/accounts/{stream}?wait_for={stream}@{version}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        waits.push(t.elapsed().as_secs_f64() * 1e3);
    };
    for a in 0..100 {
        let id = format!("acct-{a}");
        let v = append(id.clone(), "AccountOpened", payload("AccountOpened", a)).await;
        read(&id, v).await;
    }
    for op in 0..1000 {
        let id = format!("acct-{}", (op * 37) % 100);
        let v = append(id.clone(), "Deposited", payload("Deposited", op)).await;
        read(&id, v).await;
    }
    let secs = start.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    report(&scenario, 1100, secs, &mut waits, "latency=read_with_wait");
}

// ---------------------------------------------------------------------------------------------
// live-sweep and append-batching: HTTP load against `serve` run in-process.

/// One keep-alive HTTP/1 connection, driven by hyper's client directly: reqwest's pool and
/// per-request machinery cost the client more CPU, and the client shares the cores with the
/// server it measures.
struct Http {
    send: hyper::client::conn::http1::SendRequest<axum::body::Body>,
    addr: std::net::SocketAddr,
}

/// A response: status, `Retry-After` if any, body.
struct Answer {
    status: u16,
    retry_after: bool,
    body: bytes::Bytes,
}

impl Http {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|err| panic!("connecting to the bench server at {addr}: {err}"));
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP/1 handshake with the bench server");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { send, addr }
    }

    /// `GET path` (body `None`) or `POST path` with a JSON body. A transport error reconnects
    /// for the next request.
    async fn request(&mut self, path: &str, body: Option<String>) -> Result<Answer, String> {
        use axum::http::{header, Method, Request};
        let builder = Request::builder();
        let request = match body {
            Some(body) => builder
                .method(Method::POST)
                .uri(path)
                .header(header::CONTENT_TYPE, "application/json")
                .body(axum::body::Body::from(body)),
            None => builder
                .method(Method::GET)
                .uri(path)
                .body(axum::body::Body::empty()),
        };
        self.exchange(request.map_err(|e| e.to_string())?).await
    }

    /// `PUT /admin/plugins/{name}` with a component's bytes and the admin token.
    async fn upload(&mut self, name: &str, token: &str, wasm: Vec<u8>) -> Result<Answer, String> {
        use axum::http::{header, Method, Request};
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("/admin/plugins/{name}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/wasm")
            .body(axum::body::Body::from(wasm))
            .map_err(|e| e.to_string())?;
        self.exchange(request).await
    }

    /// Sends `request`; a transport error reconnects for the next one.
    async fn exchange(
        &mut self,
        mut request: axum::http::Request<axum::body::Body>,
    ) -> Result<Answer, String> {
        use axum::http::header;
        request.headers_mut().insert(
            header::HOST,
            header::HeaderValue::from_str(&self.addr.to_string()).map_err(|e| e.to_string())?,
        );
        let result = async {
            self.send.ready().await.map_err(|e| e.to_string())?;
            let response = self
                .send
                .send_request(request)
                .await
                .map_err(|e| e.to_string())?;
            let (parts, body) = response.into_parts();
            let body = axum::body::to_bytes(axum::body::Body::new(body), usize::MAX)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Answer {
                status: parts.status.as_u16(),
                retry_after: parts.headers.contains_key(header::RETRY_AFTER),
                body,
            })
        }
        .await;
        if result.is_err() {
            *self = Self::connect(self.addr).await;
        }
        result
    }
}

/// The `position` field of an answer (`POST /events`, `GET .../_streams/...`).
fn answer_position(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Position {
        position: Option<u64>,
    }
    serde_json::from_slice::<Position>(body).ok()?.position
}

/// One `Deposited` event as an HTTP client sends it (~200 bytes of JSON).
fn event_json(i: usize, streams: usize) -> String {
    format!(
        r#"{{"stream":"acct-{:06}","stream_type":"Account","type":"Deposited","payload":{}}}"#,
        i % streams,
        payload("Deposited", i)
    )
}

/// CPU seconds (user + system) of the calling thread.
fn thread_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / 100.0
}

/// Busy and total jiffies of the whole machine (`/proc/stat`): how loaded it was, everyone's
/// work counted.
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = cpu.iter().sum();
    // idle + iowait
    let idle = cpu.get(3).unwrap_or(&0.0) + cpu.get(4).unwrap_or(&0.0);
    (total - idle, total)
}

/// Where the CPU went over a measured window, in cores (1.0 = one core busy).
#[derive(Default, Clone, Copy)]
struct CpuUse {
    client: f64,
    /// This process minus the client thread: the server (its runtime, SQLite's threads).
    server: f64,
    /// Every process on the machine, the bench included.
    machine: f64,
}

impl CpuUse {
    /// Every other process on the machine (PostgreSQL's among them, and whatever else runs).
    fn outside(&self) -> f64 {
        (self.machine - self.client - self.server).max(0.0)
    }
}

struct CpuMeter {
    at: Instant,
    thread: f64,
    process: f64,
    machine: (f64, f64),
}

impl CpuMeter {
    /// To be read on the client's thread.
    fn start() -> Self {
        Self {
            at: Instant::now(),
            thread: thread_cpu_secs(),
            process: cpu_secs(),
            machine: machine_jiffies(),
        }
    }

    fn stop(&self) -> CpuUse {
        let secs = self.at.elapsed().as_secs_f64();
        let client = (thread_cpu_secs() - self.thread) / secs;
        let process = (cpu_secs() - self.process) / secs;
        let (busy, total) = machine_jiffies();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let machine = (busy - self.machine.0) / (total - self.machine.1).max(1.0) * cores;
        CpuUse {
            client,
            server: process - client,
            machine,
        }
    }
}

/// Runs `serve` with `config` on this runtime and `client` on a thread of its own (a
/// single-threaded runtime: its CPU is measured apart from the server's), then stops the
/// server.
async fn with_server<T, F>(
    config: Config,
    client: impl FnOnce(std::net::SocketAddr) -> F + Send + 'static,
) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop, mut stopped) = watch::channel(false);
    // Joined, not spawned: `serve`'s future is not `Send` for every lifetime (sqlx).
    let server = projector::serve::serve(
        config,
        move |addr| {
            let _ = addr_tx.send(addr);
        },
        async move {
            let _ = stopped.changed().await;
        },
    );
    let client = async move {
        // No address: the server stopped before listening (its error is reported below).
        let addr = addr_rx.await.ok()?;
        let out = tokio::task::spawn_blocking(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the client's runtime")
                .block_on(client(addr))
        })
        .await;
        stop.send(true).unwrap();
        Some(out.expect("the bench client panicked"))
    };
    let (served, out) = tokio::join!(server, client);
    served.expect("the server failed");
    out.expect("the server stopped before listening")
}

/// A server config for the HTTP scenarios: a fresh database (`database_url`, or SQLite in
/// `run_dir`), the compiled-plugin cache shared across runs in `cache_dir` (no recompiling
/// per run), plugins from `plugins`.
fn http_config(
    cache_dir: &Path,
    run_dir: &Path,
    database_url: Option<String>,
    plugins: PathBuf,
    max_lag_ms: u64,
) -> Config {
    // `PROJECTOR_*` settings from the environment apply, as to `projector serve` (e.g.
    // `PROJECTOR_OUTBOX__NOTIFY_TRIGGER=false`).
    let mut config = Config::load(None, std::env::vars()).expect("PROJECTOR_* settings");
    config.listen = "127.0.0.1:0".into();
    config.data_dir = cache_dir.to_owned();
    config.database_url = database_url
        .unwrap_or_else(|| format!("sqlite://{}", run_dir.join("projector.db").display()));
    config.plugins.dir = plugins;
    config.runner.max_lag_ms = max_lag_ms;
    config
}

/// What one offered rate of the live sweep gave.
#[derive(Default)]
struct LivePoint {
    ok: usize,
    refused: usize,
    /// Refusals without `Retry-After` (should be none).
    refused_without_retry_after: usize,
    failed: usize,
    first_failure: Option<String>,
    /// From the first due append to the last answer.
    secs: f64,
    /// Request sent → 201, ms.
    append_ms: Vec<f64>,
    /// How late the appends were sent after their due time, ms (all writers busy).
    late_ms: Vec<f64>,
    /// The 201 → the projection's checkpoint seen past the position, ms.
    queryable_ms: Vec<f64>,
    /// Acknowledged appends never seen queryable before the drain deadline.
    unresolved: usize,
    /// Max of `projector_lag_seconds`, sampled every 100 ms, in ms.
    max_lag_metric_ms: f64,
    /// Long-polls the monitor sent (the server answers each: part of its CPU figure).
    monitor_requests: usize,
    cpu: CpuUse,
}

const LIVE_WRITERS: usize = 64;
const LIVE_STREAMS: usize = 1000;

/// The client of one sweep point: opens the streams, then `LIVE_WRITERS` writers append one
/// event per request at `rate` (open loop) for `secs`, while one monitor long-polls the
/// projection's checkpoint and one sampler reads `/metrics`.
async fn live_client(addr: std::net::SocketAddr, rate: usize, secs: f64) -> LivePoint {
    // Setup (untimed): every stream opened, and applied.
    let mut setup = Http::connect(addr).await;
    let mut head = 0;
    for chunk in (0..LIVE_STREAMS).collect::<Vec<_>>().chunks(100) {
        let events: Vec<serde_json::Value> = chunk
            .iter()
            .map(|&i| {
                let e = new_event(i, LIVE_STREAMS);
                json!({"stream": e.stream, "stream_type": e.stream_type, "type": e.event_type,
                       "payload": serde_json::from_str::<serde_json::Value>(e.payload.get()).unwrap()})
            })
            .collect();
        let answer = setup
            .request("/events", Some(json!({ "events": events }).to_string()))
            .await
            .expect("setup append");
        assert_eq!(answer.status, 201, "setup append: {:?}", answer.body);
        head = answer_position(&answer.body).expect("setup append: no position");
    }
    let answer = setup
        .request(
            &format!(
                "/projections/account-balance/_streams/acct-000000?min_position={head}&timeout_ms=60000"
            ),
            None,
        )
        .await
        .expect("setup wait");
    assert_eq!(answer.status, 200, "setup wait: {:?}", answer.body);

    // The appended positions waiting to be seen queryable (with the time of their 201), and
    // the newest checkpoint the monitor has seen.
    struct Pending {
        seen: u64,
        waiting: BTreeMap<u64, Instant>,
        queryable_ms: Vec<f64>,
    }
    let pending = Arc::new(Mutex::new(Pending {
        seen: head,
        waiting: BTreeMap::new(),
        queryable_ms: Vec::new(),
    }));
    let next = Arc::new(AtomicUsize::new(0));
    let (writers_done_tx, writers_done) = watch::channel(false);

    let mut connections = Vec::new();
    for _ in 0..LIVE_WRITERS {
        connections.push(Http::connect(addr).await);
    }
    let mut monitor_http = Http::connect(addr).await;
    let mut metrics_http = Http::connect(addr).await;
    let meter = CpuMeter::start();
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + Duration::from_secs_f64(secs);

    // The monitor: one long-poll at a time for the smallest position still waiting; its
    // answer carries the checkpoint, and every waiting position at or under it became
    // queryable at the latest when the answer arrived.
    let monitor = {
        let pending = pending.clone();
        let mut writers_done = writers_done.clone();
        tokio::spawn(async move {
            let mut drain_deadline = None;
            let mut requests = 0;
            loop {
                let want = {
                    let p = pending.lock().unwrap();
                    if *writers_done.borrow_and_update() {
                        if p.waiting.is_empty() {
                            return (0, requests);
                        }
                        let deadline = *drain_deadline
                            .get_or_insert_with(|| Instant::now() + Duration::from_secs(30));
                        if Instant::now() > deadline {
                            return (p.waiting.len(), requests);
                        }
                    }
                    p.waiting
                        .keys()
                        .next()
                        .copied()
                        .unwrap_or(p.seen + 1)
                        .max(p.seen + 1)
                };
                let path = format!(
                    "/projections/account-balance/_streams/acct-000000?min_position={want}&timeout_ms=200"
                );
                requests += 1;
                let Ok(answer) = monitor_http.request(&path, None).await else {
                    continue;
                };
                let at = Instant::now();
                // A timeout (nothing committed for 200 ms) answers 504 without a position.
                let Some(position) = answer_position(&answer.body) else {
                    continue;
                };
                let mut p = pending.lock().unwrap();
                p.seen = p.seen.max(position);
                let passed: Vec<u64> = p.waiting.range(..=position).map(|(k, _)| *k).collect();
                for k in passed {
                    let acked = p.waiting.remove(&k).unwrap();
                    p.queryable_ms
                        .push(at.saturating_duration_since(acked).as_secs_f64() * 1e3);
                }
            }
        })
    };
    // `projector_lag_seconds`, every 100 ms until the monitor is done.
    let (monitor_done_tx, mut monitor_done) = watch::channel(false);
    let sampler = tokio::spawn(async move {
        let mut max: f64 = 0.0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = monitor_done.changed() => return max,
            }
            if let Ok(answer) = metrics_http.request("/metrics", None).await {
                for line in String::from_utf8_lossy(&answer.body).lines() {
                    if line.starts_with("projector_lag_seconds{") {
                        let value = line.rsplit(' ').next().and_then(|v| v.parse().ok());
                        max = max.max(value.unwrap_or(0.0));
                    }
                }
            }
        }
    });

    let mut writers = tokio::task::JoinSet::new();
    for mut http in connections {
        let (next, pending) = (next.clone(), pending.clone());
        writers.spawn(async move {
            let mut point = LivePoint::default();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                if due >= end || Instant::now() >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let body = event_json(LIVE_STREAMS + n, LIVE_STREAMS);
                let sent = Instant::now();
                point
                    .late_ms
                    .push(sent.saturating_duration_since(due).as_secs_f64() * 1e3);
                let answer = http.request("/events", Some(body)).await;
                let acked = Instant::now();
                match answer {
                    Ok(a) if a.status == 201 => {
                        point.ok += 1;
                        point.append_ms.push((acked - sent).as_secs_f64() * 1e3);
                        let position = answer_position(&a.body).expect("a 201 without position");
                        let mut p = pending.lock().unwrap();
                        if position <= p.seen {
                            p.queryable_ms.push(0.0);
                        } else {
                            p.waiting.insert(position, acked);
                        }
                    }
                    Ok(a) if a.status == 503 => {
                        point.refused += 1;
                        if !a.retry_after {
                            point.refused_without_retry_after += 1;
                        }
                    }
                    Ok(a) => {
                        point.failed += 1;
                        point.first_failure.get_or_insert_with(|| {
                            format!("{} {}", a.status, String::from_utf8_lossy(&a.body))
                        });
                    }
                    Err(err) => {
                        point.failed += 1;
                        point.first_failure.get_or_insert(err);
                    }
                }
            }
            point
        });
    }
    let mut point = LivePoint::default();
    while let Some(w) = writers.join_next().await {
        let w = w.expect("a writer panicked");
        point.ok += w.ok;
        point.refused += w.refused;
        point.refused_without_retry_after += w.refused_without_retry_after;
        point.failed += w.failed;
        if point.first_failure.is_none() {
            point.first_failure = w.first_failure;
        }
        point.append_ms.extend(w.append_ms);
        point.late_ms.extend(w.late_ms);
    }
    point.secs = start.elapsed().as_secs_f64();
    point.cpu = meter.stop();
    writers_done_tx.send(true).unwrap();
    (point.unresolved, point.monitor_requests) = monitor.await.expect("the monitor panicked");
    monitor_done_tx.send(true).unwrap();
    point.max_lag_metric_ms = sampler.await.expect("the sampler panicked") * 1e3;
    point.queryable_ms = std::mem::take(&mut pending.lock().unwrap().queryable_ms);
    point
}

fn sweep_rates() -> Vec<usize> {
    std::env::var("BENCH_SWEEP_RATES")
        .unwrap_or_else(|_| "1000,2000,5000,10000,20000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn sweep_secs() -> f64 {
    std::env::var("BENCH_SWEEP_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0)
}

/// The fresh database of one run, and how to discard it.
enum RunDb<'a> {
    Sqlite,
    Postgres(&'a PgCluster),
}

impl RunDb<'_> {
    /// A fresh database: its URL (`None`: SQLite in the run's dir) and what to drop after.
    async fn create(&self) -> (Option<String>, Option<String>) {
        match self {
            Self::Sqlite => (None, None),
            Self::Postgres(cluster) => {
                let name = cluster.create(None).await;
                (Some(cluster.url(&name)), Some(name))
            }
        }
    }

    async fn discard(&self, name: Option<String>) {
        if let (Self::Postgres(cluster), Some(name)) = (self, name) {
            cluster.drop_database(&name).await;
        }
    }
}

/// `live-sweep`: for each offered rate, a fresh database and server, 64 writers over HTTP.
async fn scenario_live_sweep(prefix: &str, db: RunDb<'_>) {
    let secs = sweep_secs();
    let rates = sweep_rates();
    let cache = tempdir("sweep-cache");
    let default_max_lag = RunnerConfig::default().max_lag_ms;
    println!(
        "({LIVE_WRITERS} writers over keep-alive HTTP/1, one event per POST /events, open loop, {secs} s per rate; \
         commit→queryable: 201 → the projection's checkpoint seen past the position by one long-poll \
         monitor; lag_metric: max projector_lag_seconds sampled every 100 ms; cpu in cores)"
    );
    println!(
        "| scenario                | max_lag_ms | offered/s | achieved/s | append p50 | append p99 | late p99 | queryable p50 | queryable p99 | queryable max | lag_metric max | refused | failed | cpu client | cpu server | server µs/append | cpu machine |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut runs: Vec<(usize, u64)> = rates.iter().map(|&r| (r, default_max_lag)).collect();
    if let Some(&top) = rates.iter().max() {
        runs.push((top, 0));
    }
    for (rate, max_lag_ms) in runs {
        let run_dir = tempdir("sweep-run");
        let (url, name) = db.create().await;
        let config = http_config(
            &cache,
            &run_dir,
            url,
            root().join("target/plugins"),
            max_lag_ms,
        );
        let mut point = with_server(config, move |addr| live_client(addr, rate, secs)).await;
        db.discard(name).await;
        let _ = std::fs::remove_dir_all(&run_dir);
        let scenario = format!("{prefix}live-sweep");
        for v in [
            &mut point.append_ms,
            &mut point.late_ms,
            &mut point.queryable_ms,
        ] {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        }
        // Over the offered window, or longer if the last answers came after it.
        let achieved = point.ok as f64 / point.secs.max(secs);
        // The server's CPU per acknowledged append (HTTP, group commit, the projection): on a
        // shared machine, the figure that says what the whole machine would carry.
        let server_us = point.cpu.server / achieved.max(1.0) * 1e6;
        let p = |v: &[f64], q: f64| percentile(v, q);
        let max = |v: &[f64]| v.last().copied().unwrap_or(0.0);
        println!(
            "| {scenario:<23} | {max_lag_ms:>10} | {rate:>9} | {achieved:>10.0} | {:>7.2} ms | {:>7.2} ms | {:>5.1} ms | {:>10.2} ms | {:>10.2} ms | {:>10.1} ms | {:>11.0} ms | {:>7} | {:>6} | {:>10.2} | {:>10.2} | {:>16.0} | {:>11.2} |",
            p(&point.append_ms, 0.5),
            p(&point.append_ms, 0.99),
            p(&point.late_ms, 0.99),
            p(&point.queryable_ms, 0.5),
            p(&point.queryable_ms, 0.99),
            max(&point.queryable_ms),
            point.max_lag_metric_ms,
            point.refused,
            point.failed,
            point.cpu.client,
            point.cpu.server,
            server_us,
            point.cpu.machine,
        );
        println!(
            "RESULT scenario={scenario} max_lag_ms={max_lag_ms} offered={rate} achieved={achieved:.0} ok={} secs={:.2} \
             append_p50_ms={:.3} append_p99_ms={:.3} late_p99_ms={:.3} queryable_p50_ms={:.3} queryable_p99_ms={:.3} \
             queryable_max_ms={:.3} lag_metric_max_ms={:.0} refused={} refused_without_retry_after={} failed={} \
             unresolved={} monitor_requests={} cpu_client={:.2} cpu_server={:.2} server_us_per_append={server_us:.0} cpu_machine={:.2}",
            point.ok,
            point.secs,
            p(&point.append_ms, 0.5),
            p(&point.append_ms, 0.99),
            p(&point.late_ms, 0.99),
            p(&point.queryable_ms, 0.5),
            p(&point.queryable_ms, 0.99),
            max(&point.queryable_ms),
            point.max_lag_metric_ms,
            point.refused,
            point.refused_without_retry_after,
            point.failed,
            point.unresolved,
            point.monitor_requests,
            point.cpu.client,
            point.cpu.server,
            point.cpu.machine,
        );
        if let Some(failure) = &point.first_failure {
            println!("(first failure: {failure})");
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// What one batching mode gave.
#[derive(Default)]
struct BatchingPoint {
    requests: usize,
    failed: usize,
    first_failure: Option<String>,
    secs: f64,
    request_ms: Vec<f64>,
    cpu: CpuUse,
}

/// Closed loop: `writers` connections, each sending requests of `batch` events back to back
/// for `secs`.
async fn batching_client(
    addr: std::net::SocketAddr,
    writers: usize,
    batch: usize,
    secs: f64,
) -> BatchingPoint {
    let mut connections = Vec::new();
    for _ in 0..writers {
        connections.push(Http::connect(addr).await);
    }
    let meter = CpuMeter::start();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for (w, mut http) in connections.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut point = BatchingPoint::default();
            let mut i = w * 1_000_000;
            while Instant::now() < end {
                let body = if batch == 1 {
                    event_json(i, LIVE_STREAMS)
                } else {
                    let events: Vec<String> = (i..i + batch)
                        .map(|j| event_json(j, LIVE_STREAMS))
                        .collect();
                    format!(r#"{{"events":[{}]}}"#, events.join(","))
                };
                i += batch;
                let sent = Instant::now();
                match http.request("/events", Some(body)).await {
                    Ok(a) if a.status == 201 => {
                        point.requests += 1;
                        point.request_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(a) => {
                        point.failed += 1;
                        point.first_failure.get_or_insert_with(|| {
                            format!("{} {}", a.status, String::from_utf8_lossy(&a.body))
                        });
                    }
                    Err(err) => {
                        point.failed += 1;
                        point.first_failure.get_or_insert(err);
                    }
                }
            }
            point
        });
    }
    let mut point = BatchingPoint::default();
    while let Some(w) = tasks.join_next().await {
        let w = w.expect("a writer panicked");
        point.requests += w.requests;
        point.failed += w.failed;
        if point.first_failure.is_none() {
            point.first_failure = w.first_failure;
        }
        point.request_ms.extend(w.request_ms);
    }
    point.secs = start.elapsed().as_secs_f64();
    point.cpu = meter.stop();
    point
}

/// `append-batching`: the append path alone (no projection loaded), closed loop: 64 writers
/// of one event per request, against the same events sent as 64-event batches (what a group
/// commit writes per transaction) by 1 and by 4 writers.
async fn scenario_append_batching(prefix: &str, db: RunDb<'_>) {
    let secs = sweep_secs();
    let cache = tempdir("batching-cache");
    let no_plugins = tempdir("no-plugins");
    println!(
        "(the append path alone: no projection loaded; closed loop, {secs} s per mode; request latency: sent → 201)"
    );
    println!(
        "| scenario                     | writers | events/request | events/s | requests/s | request p50 | request p99 | failed | cpu client | cpu server | cpu machine |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    // `BENCH_BATCHING_MODES=WRITERSxBATCH,...`
    let modes: Vec<(usize, usize)> = std::env::var("BENCH_BATCHING_MODES")
        .unwrap_or_else(|_| "64x1,1x64,4x64,64x64".into())
        .split(',')
        .filter_map(|m| {
            let (w, b) = m.trim().split_once('x')?;
            Some((w.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    for (writers, batch) in modes {
        let run_dir = tempdir("batching-run");
        let (url, name) = db.create().await;
        let config = http_config(&cache, &run_dir, url, no_plugins.clone(), 0);
        let mut point = with_server(config, move |addr| {
            batching_client(addr, writers, batch, secs)
        })
        .await;
        db.discard(name).await;
        let _ = std::fs::remove_dir_all(&run_dir);
        point.request_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let rps = point.requests as f64 / point.secs;
        let evps = rps * batch as f64;
        let (p50, p99) = (
            percentile(&point.request_ms, 0.5),
            percentile(&point.request_ms, 0.99),
        );
        let scenario = format!("{prefix}append-batching");
        println!(
            "| {scenario:<28} | {writers:>7} | {batch:>14} | {evps:>8.0} | {rps:>10.0} | {p50:>8.2} ms | {p99:>8.2} ms | {:>6} | {:>10.2} | {:>10.2} | {:>11.2} |",
            point.failed, point.cpu.client, point.cpu.server, point.cpu.machine
        );
        println!(
            "RESULT scenario={scenario} writers={writers} batch={batch} evps={evps:.0} rps={rps:.0} p50_ms={p50:.3} p99_ms={p99:.3} failed={} cpu_client={:.2} cpu_server={:.2} cpu_machine={:.2}",
            point.failed, point.cpu.client, point.cpu.server, point.cpu.machine
        );
        if let Some(failure) = &point.first_failure {
            println!("(first failure: {failure})");
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&no_plugins);
}

// ---------------------------------------------------------------------------------------------
// swap and pg-swap: same-version swaps and a new version's rebuild under live HTTP load.

const SWAP_TOKEN: &str = "projector-bench-admin";
const SWAP_NAME: &str = "account-balance";

/// An account-balance build the swaps upload: `same` (other code, same version and output) or
/// `v2` (version 2.0.0, `"schema": 2` in every document).
fn variant_file(which: &str) -> PathBuf {
    root()
        .join("target/plugins/variants")
        .join(format!("account-balance-{which}"))
        .join("account-balance.wasm")
}

/// One deposit of 1 to `account` as an HTTP client sends it (the live sweep's payload, amount 1:
/// every account's balance and `tx_count` then count its deposits).
fn deposit_json(account: usize, i: usize) -> String {
    format!(
        r#"{{"stream":"acct-{account:06}","stream_type":"Account","type":"Deposited","payload":{{"amount":1,"reference":"tx-{i:024}","channel":"sepa-instant-transfer","note":"monthly savings plan"}}}}"#
    )
}

#[derive(Clone, Copy)]
struct SwapParams {
    /// Events in the log before the live load (the accounts' openings among them).
    backlog: usize,
    accounts: usize,
    rate: usize,
    secs: f64,
    /// Between two uploads.
    every: Duration,
    /// Pages the reader asks for per second (0: one after another).
    page_rate: usize,
    /// Same-version swaps whose pause is measured (5: their p99 is their maximum).
    swaps: usize,
}

/// The components uploaded: the original 1.0.0, `same`, `v2`.
struct SwapCode {
    original: Vec<u8>,
    same: Vec<u8>,
    v2: Vec<u8>,
}

/// Answers that were not what they should be, over every request of the scenario.
#[derive(Default)]
struct Tally {
    errors_5xx: usize,
    transport_errors: usize,
    first_failure: Option<String>,
}

impl Tally {
    /// The answer if it came, counting a 5xx or a transport error.
    fn note(&mut self, what: &str, answer: Result<Answer, String>) -> Option<Answer> {
        match answer {
            Ok(a) => {
                if a.status >= 500 {
                    self.errors_5xx += 1;
                    self.failed(what, &a);
                }
                Some(a)
            }
            Err(err) => {
                self.transport_errors += 1;
                self.first_failure
                    .get_or_insert_with(|| format!("{what}: {err}"));
                None
            }
        }
    }

    fn failed(&mut self, what: &str, a: &Answer) {
        self.first_failure.get_or_insert_with(|| {
            format!("{what}: {} {}", a.status, String::from_utf8_lossy(&a.body))
        });
    }

    fn add(&mut self, other: Tally) {
        self.errors_5xx += other.errors_5xx;
        self.transport_errors += other.transport_errors;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

fn answer_json(a: &Answer) -> serde_json::Value {
    serde_json::from_slice(&a.body).unwrap_or(serde_json::Value::Null)
}

/// `GET /projections/account-balance`, if it answered 200.
async fn swap_summary(http: &mut Http, tally: &mut Tally) -> Option<serde_json::Value> {
    let answer = tally.note(
        "summary",
        http.request(&format!("/projections/{SWAP_NAME}"), None)
            .await,
    )?;
    (answer.status == 200).then(|| answer_json(&answer))
}

/// Long-polls until `version` (`None`: the serving one) has committed `position`; false if it
/// has not within `within`.
async fn swap_wait(
    http: &mut Http,
    tally: &mut Tally,
    version: Option<&str>,
    position: u64,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    let version = version.map(|v| format!("&version={v}")).unwrap_or_default();
    let path = format!(
        "/projections/{SWAP_NAME}/_streams/acct-000000?min_position={position}&timeout_ms=10000{version}"
    );
    while Instant::now() < deadline {
        match tally.note("wait", http.request(&path, None).await) {
            Some(a) if a.status == 200 => return true,
            // Not there yet.
            Some(a) if a.status == 504 => {}
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    false
}

/// What the swap scenario measured.
#[derive(Default)]
struct SwapPoint {
    /// How long account-balance 1.0.0 took to apply the backlog, and the CPU meanwhile.
    catchup_secs: f64,
    catchup_cpu: CpuUse,
    /// `active.last_swap_pause_ms` after each measured swap.
    pauses_ms: Vec<f64>,
    swaps: usize,
    /// Swaps whose pause the host did not measure (no event waiting at the swap).
    unmeasured_swaps: usize,
    /// `PUT` sent → its 200.
    swap_upload_ms: Vec<f64>,
    /// The events up to the head when 2.0.0 was uploaded (its rebuild covers them: the backlog
    /// and the live appends before), and the time from the upload until its checkpoint reached
    /// that head. Counted in events: PostgreSQL's positions are not dense.
    rebuild_events: usize,
    rebuild_secs: f64,
    rebuild_cpu: CpuUse,
    /// From the upload of 2.0.0 until it serves; and whether that was before the live load
    /// ended.
    cutover_secs: f64,
    cutover_under_load: bool,
    appends_ok: usize,
    appends_not_201: usize,
    reads_ok: usize,
    reads_not_200: usize,
    pages: usize,
    pages_not_200: usize,
    mixed_pages: usize,
    /// At the end: accounts whose balance or `tx_count` is not what was appended, and by how
    /// many deposits in all (lost or applied twice); documents without `"schema": 2`.
    accounts: usize,
    wrong_accounts: usize,
    lost_or_twice: u64,
    without_schema: usize,
    /// Append sent → 201; read sent → 200 (it waits for the append); append due → sent.
    append_ms: Vec<f64>,
    read_ms: Vec<f64>,
    late_ms: Vec<f64>,
    /// From the first due append to the last answer.
    live_secs: f64,
    tally: Tally,
    cpu: CpuUse,
}

/// What one live writer did.
#[derive(Default)]
struct SwapWriter {
    /// Deposits acknowledged (201), by account.
    deposits: Vec<u64>,
    /// The position of each acknowledged append.
    positions: Vec<u64>,
    appends_ok: usize,
    appends_not_201: usize,
    reads_ok: usize,
    reads_not_200: usize,
    append_ms: Vec<f64>,
    read_ms: Vec<f64>,
    late_ms: Vec<f64>,
    tally: Tally,
}

/// The swaps and the rebuild, one upload every `every` from `start`.
#[derive(Default)]
struct SwapControl {
    pauses_ms: Vec<f64>,
    swaps: usize,
    unmeasured_swaps: usize,
    swap_upload_ms: Vec<f64>,
    /// The head when 2.0.0 was uploaded.
    rebuild_head: u64,
    rebuild_secs: f64,
    rebuild_cpu: CpuUse,
    cutover_secs: f64,
    cutover_at: Option<Instant>,
    tally: Tally,
}

async fn swap_control(
    addr: std::net::SocketAddr,
    code: Arc<SwapCode>,
    start: Instant,
    p: SwapParams,
) -> SwapControl {
    let every = p.every;
    let mut admin = Http::connect(addr).await;
    let mut poll = Http::connect(addr).await;
    let mut c = SwapControl::default();
    let pauses = |s: &serde_json::Value| s["active"]["swap_pauses"].as_u64().unwrap_or(0);
    // `p.swaps` measured swaps, alternating `same` and the original; a swap the host could not
    // measure (no event was waiting) is made up for by another, up to as many again.
    while c.pauses_ms.len() < p.swaps && c.swaps < 2 * p.swaps {
        tokio::time::sleep_until((start + every * (c.swaps as u32 + 1)).into()).await;
        let Some(before) = swap_summary(&mut poll, &mut c.tally).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let before = pauses(&before);
        let wasm = if c.swaps % 2 == 0 {
            &code.same
        } else {
            &code.original
        };
        c.swaps += 1;
        let sent = Instant::now();
        let Some(answer) = c.tally.note(
            "swap upload",
            admin.upload(SWAP_NAME, SWAP_TOKEN, wasm.clone()).await,
        ) else {
            continue;
        };
        if answer.status != 200 || answer_json(&answer)["action"] != "swapped" {
            c.tally.failed("swap upload", &answer);
            continue;
        }
        c.swap_upload_ms.push(sent.elapsed().as_secs_f64() * 1e3);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut measured = false;
        while Instant::now() < deadline {
            if let Some(s) = swap_summary(&mut poll, &mut c.tally).await {
                if pauses(&s) > before {
                    c.pauses_ms.push(
                        s["active"]["last_swap_pause_ms"]
                            .as_f64()
                            .unwrap_or(f64::NAN),
                    );
                    measured = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !measured {
            c.unmeasured_swaps += 1;
        }
    }

    // The new version: rebuilt from position 0 beside the serving one.
    tokio::time::sleep_until((start + every * (c.swaps as u32 + 1)).into()).await;
    let head = loop {
        if let Some(s) = swap_summary(&mut poll, &mut c.tally).await {
            break s["head"].as_u64().unwrap_or(0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let meter = CpuMeter::start();
    let uploaded = Instant::now();
    let answer = c.tally.note(
        "v2 upload",
        admin.upload(SWAP_NAME, SWAP_TOKEN, code.v2.clone()).await,
    );
    match answer {
        Some(a) if a.status == 202 && answer_json(&a)["action"] == "rebuilding" => {}
        Some(a) => {
            c.tally.failed("v2 upload", &a);
            return c;
        }
        None => return c,
    }
    c.rebuild_head = head;
    if swap_wait(
        &mut poll,
        &mut c.tally,
        Some("2.0.0"),
        head,
        Duration::from_secs(600),
    )
    .await
    {
        c.rebuild_secs = uploaded.elapsed().as_secs_f64();
        c.rebuild_cpu = meter.stop();
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        if let Some(s) = swap_summary(&mut poll, &mut c.tally).await {
            if s["version"] == "2.0.0" {
                c.cutover_at = Some(Instant::now());
                c.cutover_secs = uploaded.elapsed().as_secs_f64();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c
}

/// The client of the swap scenario: the backlog, its catch-up by 1.0.0, then the live load
/// with the swaps and the rebuild, then the check of every account.
async fn swap_client(addr: std::net::SocketAddr, p: SwapParams, code: SwapCode) -> SwapPoint {
    let mut point = SwapPoint::default();
    let mut setup = Http::connect(addr).await;
    // The backlog, before any projection runs: the accounts' openings, then deposits of 1.
    let mut deposits = vec![0u64; p.accounts];
    let mut head = 0;
    let appended = Instant::now();
    let all: Vec<usize> = (0..p.backlog).collect();
    for chunk in all.chunks(500) {
        let events: Vec<String> = chunk
            .iter()
            .map(|&i| {
                if i < p.accounts {
                    let e = new_event(i, p.accounts);
                    json!({"stream": e.stream, "stream_type": e.stream_type, "type": e.event_type,
                           "payload": serde_json::from_str::<serde_json::Value>(e.payload.get()).unwrap()})
                    .to_string()
                } else {
                    deposits[i % p.accounts] += 1;
                    deposit_json(i % p.accounts, i)
                }
            })
            .collect();
        let body = format!(r#"{{"events":[{}]}}"#, events.join(","));
        let answer = setup
            .request("/events", Some(body))
            .await
            .expect("backlog append");
        assert_eq!(answer.status, 201, "backlog append: {:?}", answer.body);
        head = answer_position(&answer.body).expect("backlog append: no position");
    }
    println!(
        "  (setup: {} events over {} accounts appended in {:.2} s)",
        p.backlog,
        p.accounts,
        appended.elapsed().as_secs_f64()
    );

    // The plain catch-up: account-balance 1.0.0 uploaded over the backlog, until it has
    // applied the head (timed like the rebuild below: from the upload).
    let mut admin = Http::connect(addr).await;
    let meter = CpuMeter::start();
    let sent = Instant::now();
    let answer = admin
        .upload(SWAP_NAME, SWAP_TOKEN, code.original.clone())
        .await
        .expect("uploading account-balance 1.0.0");
    assert_eq!(answer.status, 201, "uploading 1.0.0: {:?}", answer.body);
    assert!(
        swap_wait(
            &mut setup,
            &mut point.tally,
            None,
            head,
            Duration::from_secs(600)
        )
        .await,
        "account-balance 1.0.0 did not catch up with the backlog"
    );
    point.catchup_secs = sent.elapsed().as_secs_f64();
    point.catchup_cpu = meter.stop();
    drop(admin);

    // The live load, open loop: each append followed by a read of its account that waits for
    // it; beside it one reader paging through the accounts, and the uploads.
    let code = Arc::new(code);
    let next = Arc::new(AtomicUsize::new(0));
    let mut connections = Vec::new();
    for _ in 0..LIVE_WRITERS {
        connections.push(Http::connect(addr).await);
    }
    let mut pager = Http::connect(addr).await;
    let meter = CpuMeter::start();
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + Duration::from_secs_f64(p.secs);
    let (stop_pager, pager_stopped) = watch::channel(false);
    let reader = tokio::spawn(async move {
        let (mut pages, mut not_200, mut mixed, mut tally) = (0, 0, 0, Tally::default());
        let mut cursor: Option<String> = None;
        let mut paced =
            tokio::time::interval(Duration::from_secs_f64(1.0 / p.page_rate.max(1) as f64));
        paced.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*pager_stopped.borrow() {
            if p.page_rate > 0 {
                paced.tick().await;
            }
            let path = match &cursor {
                Some(c) => format!("/projections/{SWAP_NAME}/accounts?limit=100&cursor={c}"),
                None => format!("/projections/{SWAP_NAME}/accounts?limit=100"),
            };
            let Some(answer) = tally.note("page", pager.request(&path, None).await) else {
                continue;
            };
            pages += 1;
            if answer.status != 200 {
                not_200 += 1;
                tally.failed("page", &answer);
                cursor = None;
                continue;
            }
            let page = answer_json(&answer);
            let items = page["items"].as_array().cloned().unwrap_or_default();
            let with_schema = items
                .iter()
                .filter(|d| !d["document"]["schema"].is_null())
                .count();
            if with_schema > 0 && with_schema < items.len() {
                mixed += 1;
            }
            cursor = page["next_cursor"].as_str().map(str::to_owned);
        }
        (pages, not_200, mixed, tally)
    });
    let control = tokio::spawn(swap_control(addr, code.clone(), start, p));
    let mut writers = tokio::task::JoinSet::new();
    for mut http in connections {
        let next = next.clone();
        writers.spawn(async move {
            let mut w = SwapWriter {
                deposits: vec![0; p.accounts],
                ..SwapWriter::default()
            };
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let due = start + Duration::from_secs_f64(n as f64 / p.rate as f64);
                if due >= end || Instant::now() >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let account = n % p.accounts;
                let sent = Instant::now();
                w.late_ms
                    .push(sent.saturating_duration_since(due).as_secs_f64() * 1e3);
                let answer = http
                    .request("/events", Some(deposit_json(account, p.backlog + n)))
                    .await;
                let Some(answer) = w.tally.note("append", answer) else {
                    w.appends_not_201 += 1;
                    continue;
                };
                if answer.status != 201 {
                    w.appends_not_201 += 1;
                    w.tally.failed("append", &answer);
                    continue;
                }
                w.appends_ok += 1;
                w.deposits[account] += 1;
                w.append_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                let body = answer_json(&answer);
                w.positions.push(body["position"].as_u64().unwrap_or(0));
                let version = body["events"][0]["version"].as_u64().unwrap_or(0);
                let path = format!(
                    "/projections/{SWAP_NAME}/accounts/acct-{account:06}?wait_for=acct-{account:06}@{version}&timeout_ms=30000"
                );
                let sent = Instant::now();
                match w.tally.note("read", http.request(&path, None).await) {
                    Some(a) if a.status == 200 => {
                        w.reads_ok += 1;
                        w.read_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                    }
                    Some(a) => {
                        w.reads_not_200 += 1;
                        w.tally.failed("read", &a);
                    }
                    None => w.reads_not_200 += 1,
                }
            }
            w
        });
    }
    let mut positions = Vec::new();
    while let Some(w) = writers.join_next().await {
        let w = w.expect("a writer panicked");
        for (total, d) in deposits.iter_mut().zip(&w.deposits) {
            *total += d;
        }
        positions.extend(w.positions);
        point.appends_ok += w.appends_ok;
        point.appends_not_201 += w.appends_not_201;
        point.reads_ok += w.reads_ok;
        point.reads_not_200 += w.reads_not_200;
        point.append_ms.extend(w.append_ms);
        point.read_ms.extend(w.read_ms);
        point.late_ms.extend(w.late_ms);
        point.tally.add(w.tally);
    }
    let writers_done = Instant::now();
    point.live_secs = start.elapsed().as_secs_f64();
    point.cpu = meter.stop();
    // The rebuild and the cut-over may outlast the live load: the reader pages on until then.
    let c = control.await.expect("the swap control panicked");
    stop_pager.send(true).unwrap();
    let (pages, not_200, mixed, tally) = reader.await.expect("the page reader panicked");
    (point.pages, point.pages_not_200, point.mixed_pages) = (pages, not_200, mixed);
    point.tally.add(tally);
    point.pauses_ms = c.pauses_ms;
    point.swaps = c.swaps;
    point.unmeasured_swaps = c.unmeasured_swaps;
    point.swap_upload_ms = c.swap_upload_ms;
    point.rebuild_events = p.backlog + positions.iter().filter(|&&at| at <= c.rebuild_head).count();
    point.rebuild_secs = c.rebuild_secs;
    point.rebuild_cpu = c.rebuild_cpu;
    point.cutover_secs = c.cutover_secs;
    point.cutover_under_load = c.cutover_at.is_some_and(|at| at <= writers_done);
    point.tally.add(c.tally);

    // Nothing lost, nothing applied twice: every account as the bench appended it.
    assert!(
        swap_wait(
            &mut setup,
            &mut point.tally,
            None,
            positions.iter().copied().max().unwrap_or(head),
            Duration::from_secs(120)
        )
        .await,
        "the serving version did not reach the last append"
    );
    let mut docs: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/projections/{SWAP_NAME}/accounts?limit=1000&cursor={c}"),
            None => format!("/projections/{SWAP_NAME}/accounts?limit=1000"),
        };
        let answer = setup.request(&path, None).await.expect("listing accounts");
        assert_eq!(answer.status, 200, "listing accounts: {:?}", answer.body);
        let page = answer_json(&answer);
        for item in page["items"].as_array().cloned().unwrap_or_default() {
            let key = item["key"].as_str().unwrap_or_default().to_owned();
            docs.insert(key, item["document"].clone());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    point.accounts = docs.len();
    for (account, &want) in deposits.iter().enumerate() {
        let doc = docs.get(&format!("acct-{account:06}"));
        let got = |field: &str| doc.and_then(|d| d[field].as_i64()).unwrap_or(0);
        let off = (got("balance") - want as i64)
            .unsigned_abs()
            .max((got("tx_count") - want as i64).unsigned_abs());
        if off > 0 || doc.is_none() {
            point.wrong_accounts += 1;
            point.lost_or_twice += off;
        }
    }
    point.without_schema = docs.values().filter(|d| d["schema"] != 2).count();
    point
}

fn swap_params() -> SwapParams {
    let secs = |name: &str, default: f64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let accounts = env_usize("BENCH_SWAP_ACCOUNTS", LIVE_STREAMS).max(1);
    SwapParams {
        backlog: env_usize("BENCH_SWAP_BACKLOG", 200_000).max(accounts),
        accounts,
        rate: env_usize("BENCH_SWAP_RATE", 1_000).max(1),
        secs: secs("BENCH_SWAP_SECS", 30.0),
        every: Duration::from_secs_f64(secs("BENCH_SWAP_EVERY_SECS", 2.0)),
        page_rate: env_usize("BENCH_SWAP_PAGE_RATE", 100),
        swaps: env_usize("BENCH_SWAP_COUNT", 5).max(1),
    }
}

/// `swap`: a backlog caught up by account-balance 1.0.0, then live load during five
/// same-version swaps and the rebuild of 2.0.0 beside the serving version.
async fn scenario_swap(prefix: &str, db: RunDb<'_>) {
    let p = swap_params();
    let read = |file: PathBuf| {
        std::fs::read(&file).unwrap_or_else(|err| {
            panic!(
                "{}: {err} (built by `bash scripts/build-plugins.sh`)",
                file.display()
            )
        })
    };
    let code = SwapCode {
        original: read(plugin_file()),
        same: read(variant_file("same")),
        v2: read(variant_file("v2")),
    };
    let cache = tempdir("swap-cache");
    let run_dir = tempdir("swap-run");
    let no_plugins = tempdir("swap-no-plugins");
    let (url, name) = db.create().await;
    let mut config = http_config(
        &cache,
        &run_dir,
        url,
        no_plugins.clone(),
        RunnerConfig::default().max_lag_ms,
    );
    config.admin.token = SWAP_TOKEN.into();
    // Compiled once before (into the server's cache): every upload below, timed or not, loads
    // its code from the cache, as a repeated upload does.
    let runtime = Runtime::new(RuntimeConfig {
        limits: config.limits.clone(),
        cache_dir: Some(config.data_dir.join("cache")),
        ..Default::default()
    })
    .unwrap();
    for (what, wasm) in [
        ("original", &code.original),
        ("same", &code.same),
        ("v2", &code.v2),
    ] {
        runtime.load_bytes(what, wasm).unwrap();
    }
    drop(runtime);
    println!(
        "({} events of backlog over {} accounts caught up by 1.0.0, then {} appends/s for {} s from \
         {LIVE_WRITERS} writers, open loop, each append followed by a read with wait_for; an upload \
         every {:.1} s: {} measured same-version swaps, then 2.0.0 rebuilt beside live; a reader \
         paging the accounts{}; pause: the host's active.last_swap_pause_ms (p99 of five = max); \
         catch-up and rebuild: events covered / time from the upload; cpu in cores)",
        p.backlog,
        p.accounts,
        p.rate,
        p.secs,
        p.every.as_secs_f64(),
        p.swaps,
        match p.page_rate {
            0 => " back to back".to_owned(),
            n => format!(" at {n} pages/s"),
        }
    );
    let mut point = with_server(config, move |addr| swap_client(addr, p, code)).await;
    db.discard(name).await;
    for dir in [&cache, &run_dir, &no_plugins] {
        let _ = std::fs::remove_dir_all(dir);
    }
    for v in [
        &mut point.pauses_ms,
        &mut point.swap_upload_ms,
        &mut point.append_ms,
        &mut point.read_ms,
        &mut point.late_ms,
    ] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let scenario = format!("{prefix}swap");
    let p50 = |v: &[f64]| percentile(v, 0.5);
    let p99 = |v: &[f64]| percentile(v, 0.99);
    let rate = |events: usize, secs: f64| {
        if secs > 0.0 {
            events as f64 / secs
        } else {
            0.0
        }
    };
    let catchup_evps = rate(p.backlog, point.catchup_secs);
    let rebuild_evps = rate(point.rebuild_events, point.rebuild_secs);
    let ratio = if catchup_evps > 0.0 {
        rebuild_evps / catchup_evps
    } else {
        0.0
    };
    let achieved = point.appends_ok as f64 / point.live_secs.max(p.secs);
    let pauses = point
        .pauses_ms
        .iter()
        .map(|p| format!("{p:.1}"))
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "| scenario | pause p50 | pause p99 (max) | catch-up ev/s | rebuild ev/s | ratio | cut-over | appends/s | append p99 | read p99 | late p99 | 5xx | appends ≠201 | reads ≠200 | mixed pages | lost/twice | cpu server |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {scenario:<8} | {:>6.1} ms | {:>8.1} ms | {catchup_evps:>13.0} | {rebuild_evps:>12.0} | {ratio:>5.2} | {:>6.1} s | {achieved:>9.0} | {:>7.1} ms | {:>6.1} ms | {:>5.1} ms | {:>3} | {:>12} | {:>10} | {:>11} | {:>10} | {:>10.2} |",
        p50(&point.pauses_ms),
        p99(&point.pauses_ms),
        point.cutover_secs,
        p99(&point.append_ms),
        p99(&point.read_ms),
        p99(&point.late_ms),
        point.tally.errors_5xx,
        point.appends_not_201,
        point.reads_not_200,
        point.mixed_pages,
        point.lost_or_twice,
        point.cpu.server,
    );
    println!(
        "RESULT scenario={scenario} pause_ms_p50={:.3} pause_ms_p99={:.3} rebuild_evps={rebuild_evps:.0} \
         catchup_evps={catchup_evps:.0} ratio={ratio:.3} appends={} reads_ok={} errors_5xx={} \
         mixed_pages={} lost_or_twice={} pauses_ms={pauses} swaps={} unmeasured_swaps={} \
         swap_upload_p50_ms={:.1} catchup_events={} catchup_secs={:.3} rebuild_events={} \
         rebuild_secs={:.3} cutover_secs={:.3} cutover_under_load={} offered={} achieved={achieved:.0} \
         appends_not_201={} reads_not_200={} transport_errors={} pages={} pages_not_200={} \
         accounts={} wrong_accounts={} without_schema={} append_p50_ms={:.3} append_p99_ms={:.3} \
         read_p50_ms={:.3} read_p99_ms={:.3} read_max_ms={:.3} late_p99_ms={:.3} cpu_client={:.2} \
         cpu_server={:.2} cpu_machine={:.2} catchup_cpu_server={:.2} catchup_cpu_outside={:.2} \
         rebuild_cpu_client={:.2} rebuild_cpu_server={:.2} rebuild_cpu_outside={:.2}",
        p50(&point.pauses_ms),
        p99(&point.pauses_ms),
        point.appends_ok,
        point.reads_ok,
        point.tally.errors_5xx,
        point.mixed_pages,
        point.lost_or_twice,
        point.swaps,
        point.unmeasured_swaps,
        p50(&point.swap_upload_ms),
        p.backlog,
        point.catchup_secs,
        point.rebuild_events,
        point.rebuild_secs,
        point.cutover_secs,
        point.cutover_under_load,
        p.rate,
        point.appends_not_201,
        point.reads_not_200,
        point.tally.transport_errors,
        point.pages,
        point.pages_not_200,
        point.accounts,
        point.wrong_accounts,
        point.without_schema,
        p50(&point.append_ms),
        p99(&point.append_ms),
        p50(&point.read_ms),
        p99(&point.read_ms),
        point.read_ms.last().copied().unwrap_or(0.0),
        p99(&point.late_ms),
        point.cpu.client,
        point.cpu.server,
        point.cpu.machine,
        point.catchup_cpu.server,
        point.catchup_cpu.outside(),
        point.rebuild_cpu.client,
        point.rebuild_cpu.server,
        point.rebuild_cpu.outside(),
    );
    if let Some(failure) = &point.tally.first_failure {
        println!("(first failure: {failure})");
    }
}

/// Set in the server process `ryw-herd` starts: the bench's own binary, serving on a temp dir.
const HERD_SERVE_ENV: &str = "PROJECTOR_BENCH_HERD_SERVE";

/// The server side of `ryw-herd`: `projector serve` on SQLite in `dir`, in a process of its own
/// so that its CPU time is the server's alone. Prints its address, serves until stdin closes.
async fn herd_server(dir: PathBuf) {
    let mut config = Config::load(None, Vec::new()).unwrap();
    config.listen = "127.0.0.1:0".into();
    config.data_dir = dir;
    config.plugins.dir = root().join("target/plugins");
    // The waiting reads stay open for the whole measurement.
    config.http.max_wait_timeout_ms = 3_600_000;
    let closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            use std::io::Read;
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
    };
    projector::serve::serve(
        config,
        |addr| {
            use std::io::Write;
            println!("listening {addr}");
            let _ = std::io::stdout().flush();
        },
        closed,
    )
    .await
    .unwrap();
}

/// CPU time (user + system) of process `pid`, in seconds.
fn cpu_secs_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / 100.0
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Returns once process `pid` has used (almost) no CPU for 300 ms.
async fn quiet(pid: u32) {
    let mut last = cpu_secs_of(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = cpu_secs_of(pid);
        if now - last < 0.015 {
            return;
        }
        last = now;
    }
}

/// One `ryw-herd` level: a fresh server, `waiters` waiting reads held open that the measured
/// appends never satisfy, then `appends` appends one after another. Returns the append
/// latencies (ms) and the server's CPU seconds per append.
async fn herd_level(waiters: usize, appends: usize, rate: usize) -> (Vec<f64>, f64) {
    let dir = tempdir("herd");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env(HERD_SERVE_ENV, &dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let base = format!(
        "http://{}",
        line.trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("server said {line:?}"))
    );
    let http = reqwest::Client::new();
    let append = |version: u64| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let kind = if version == 1 {
                "AccountOpened"
            } else {
                "Deposited"
            };
            let r = http
                .post(format!("{base}/events"))
                .json(
                    &json!({"stream": "writer", "stream_type": "Account", "type": kind,
                    "payload": payload(kind, version as usize)}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    };
    // Warm up (connections, plugin, caches) before the waiters arrive.
    let warmup = 20;
    for version in 1..=warmup {
        append(version).await;
    }
    let fds_before = open_fds(pid);
    // Each waiting read on a connection of its own, as separate clients would: three in four
    // wait for the first event of a stream nobody appends to, one in four for a position
    // far ahead.
    let held = reqwest::Client::new();
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..waiters {
        let query = if i % 4 == 3 {
            format!("min_position={}", u64::MAX / 2)
        } else {
            format!("wait_for=herd-{i}@1")
        };
        let url = format!(
            "{base}/projections/account-balance/accounts/herd-{i}?{query}&timeout_ms=3600000"
        );
        let held = held.clone();
        reads.spawn(async move { held.get(url).send().await.map(|r| r.status()) });
    }
    // Every read has a connection at the server, and the server has gone quiet: each read
    // has been taken in and is waiting.
    let settle = Instant::now();
    while open_fds(pid) < fds_before + waiters {
        assert!(
            settle.elapsed() < Duration::from_secs(120),
            "the waiting reads did not all connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    quiet(pid).await;
    assert!(
        reads.try_join_next().is_none(),
        "a waiting read answered before the measurement"
    );

    let cpu_start = cpu_secs_of(pid);
    let mut latencies = Vec::with_capacity(appends);
    // Paced, as appends from many clients arrive: back to back, the wake-ups of one append
    // would merge with the next one's and hide what each append costs.
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    for n in 0..appends as u64 {
        if let Some(wait) = (start + interval * n as u32).checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let t = Instant::now();
        append(warmup + 1 + n).await;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The projection's work on the appends counts too: wait until it has applied them.
    let last_version = warmup + appends as u64;
    let r = http
        .get(format!(
            "{base}/projections/account-balance/accounts/writer?wait_for=writer@{last_version}&timeout_ms=60000"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Work the appends set off may still be running (woken reads): counted until it ends.
    quiet(pid).await;
    let cpu = (cpu_secs_of(pid) - cpu_start) / appends as f64;
    assert!(
        reads.try_join_next().is_none(),
        "a waiting read answered during the measurement"
    );
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
    reads.abort_all();
    let _ = std::fs::remove_dir_all(dir);
    (latencies, cpu)
}

/// `ryw-herd`: what waiting reads cost the appends that do not satisfy them. The server runs
/// in a process of its own (this binary again), so its CPU time excludes the load generator's.
async fn scenario_ryw_herd() {
    let appends = env_usize("BENCH_HERD_APPENDS", 100);
    let rate = env_usize("BENCH_HERD_RATE", 50);
    let levels: Vec<usize> = std::env::var("BENCH_HERD_WAITERS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![0, 500, 2_000]);
    let mut base_cpu = None;
    for waiters in levels {
        let (mut latencies, cpu) = herd_level(waiters, appends, rate).await;
        let base = *base_cpu.get_or_insert(cpu);
        report(
            "ryw-herd",
            appends,
            latencies.iter().sum::<f64>() / 1e3,
            &mut latencies,
            &format!(
                "waiters={waiters} rate={rate} server_cpu_ms_per_append={:.3} cpu_ratio={:.2}",
                cpu * 1e3,
                cpu / base
            ),
        );
    }
}

#[tokio::main]
async fn main() {
    // The in-process server's log, on stderr, when asked for (`RUST_LOG=projector=info`).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(dir) = std::env::var_os(HERD_SERVE_ENV) {
        herd_server(dir.into()).await;
        return;
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |s: &str| args.is_empty() || args.iter().any(|a| a == s || a == "all");
    // The PostgreSQL scenarios: asked for by name or `pg`; by `all` only with a server given.
    let pg_given = std::env::var("BENCH_POSTGRES_URL").is_ok_and(|u| !u.is_empty());
    let wants_pg = |s: &str| {
        args.iter().any(|a| a == s || a == "pg")
            || (pg_given && (args.is_empty() || args.iter().any(|a| a == "all")))
    };
    let events = env_usize("BENCH_EVENTS", 200_000);
    let streams = env_usize("BENCH_STREAMS", 10_000);
    println!(
        "projector-bench: {} cores, {events} events over {streams} streams, load {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    if wants("wasm") {
        scenario_wasm().await;
    }
    let needs_template = [
        "catchup",
        "native",
        "sweep",
        "raw",
        "read",
        "catchup-poison",
        "catchup-python",
    ]
    .iter()
    .any(|s| wants(s));
    if needs_template {
        println!("\n## Catch-up on SQLite");
        let file = template(events, streams, &Poisons::new()).await;
        let full = Template::Sqlite(&file);
        catch_ups(&full, events, wants("catchup"), wants("native")).await;
        if wants("catchup-python") {
            scenario_catchup_python(&full, events).await;
        }
        if wants("raw") {
            scenario_raw(&Template::Sqlite(&file), events, streams).await;
        }
        if wants("read") {
            scenario_read(&Template::Sqlite(&file), events).await;
        }
        if wants("catchup-poison") {
            // The clean log is the template every catch-up reads.
            scenario_catchup_poison(&full, events, streams).await;
        }
        if wants("sweep") {
            let small_events = env_usize("BENCH_SWEEP_SMALL_EVENTS", 20_000).min(events);
            let small_streams = streams.min(small_events / 10).max(1);
            let small_file = template(small_events, small_streams, &Poisons::new()).await;
            let small = Template::Sqlite(&small_file);
            scenario_sweep((&small, small_events), (&full, events)).await;
            remove_template(&small_file);
        }
        remove_template(&file);
    }
    if wants("isolate-loop") {
        scenario_isolate_loop(streams).await;
    }
    let live_secs = env_usize("BENCH_LIVE_SECS", 20) as u64;
    let live_rate = env_usize("BENCH_LIVE_RATE", 2_000);
    if wants("live") {
        println!("\n## Live latency");
        let url = format!("sqlite://{}", tempdir("live").join("p.db").display());
        scenario_live("", open(&url).await, live_secs, live_rate).await;
    }
    if wants("ryw") {
        println!("\n## Read-your-writes (seed scenario over HTTP)");
        scenario_ryw("", None).await;
    }
    if wants("ryw-herd") {
        println!("\n## Waiting reads against appends (server in its own process)");
        scenario_ryw_herd().await;
    }
    if wants("live-sweep") {
        println!("\n## Live sweep on SQLite (HTTP, 64 writers)");
        scenario_live_sweep("", RunDb::Sqlite).await;
    }
    if wants("append-batching") {
        println!("\n## Append batching on SQLite (HTTP)");
        scenario_append_batching("", RunDb::Sqlite).await;
    }
    // Kafka: by name only (`kafka` for the three), as the bench starts a broker of its own.
    let wants_kafka = |s: &str| args.iter().any(|a| a == s || a == "kafka");
    if args.iter().any(|a| a == "kafka-consume") {
        println!("\n## kafka-consume (bare consumer + decode, the ceiling of kafka-catchup)");
        kafka::consume().await;
    }
    if wants_kafka("kafka-catchup") {
        println!("\n## Kafka catch-up into SQLite");
        kafka::catchup().await;
    }
    if wants_kafka("kafka-live") {
        println!("\n## Kafka live: produce ack -> queryable");
        kafka::live().await;
    }
    if wants_kafka("kafka-ryw") {
        println!("\n## Kafka read-your-writes (banking seed)");
        kafka::ryw().await;
    }
    if wants("observer") {
        println!("\n## Observer: one webhook per event to a local receiver (SQLite)");
        observer::observer().await;
    }
    if wants("swap") {
        println!("\n## Plugin swaps and a rebuild under live load on SQLite (HTTP)");
        scenario_swap("", RunDb::Sqlite).await;
    }

    let (pg_catchup, pg_native) = (wants_pg("pg-catchup"), wants_pg("pg-native"));
    let (pg_live, pg_ryw) = (wants_pg("pg-live"), wants_pg("pg-ryw"));
    let (pg_read, pg_raw) = (wants_pg("pg-read"), wants_pg("pg-raw"));
    let (pg_sweep, pg_batching) = (wants_pg("pg-live-sweep"), wants_pg("pg-append-batching"));
    let pg_swap = wants_pg("pg-swap");
    if pg_catchup
        || pg_native
        || pg_live
        || pg_ryw
        || pg_read
        || pg_raw
        || pg_sweep
        || pg_batching
        || pg_swap
    {
        let cluster = PgCluster::start();
        cluster.describe().await;
        if pg_catchup || pg_native || pg_read || pg_raw {
            println!("\n## Catch-up on PostgreSQL");
            let name = pg_template(&cluster, events, streams).await;
            let full = Template::Postgres {
                cluster: &cluster,
                name: name.clone(),
            };
            catch_ups(&full, events, pg_catchup, pg_native).await;
            if pg_raw {
                scenario_raw(&full, events, streams).await;
            }
            if pg_read {
                scenario_read(&full, events).await;
            }
            cluster.drop_database(&name).await;
        }
        if pg_live {
            println!("\n## Live latency on PostgreSQL");
            let name = cluster.create(None).await;
            let db = open(&cluster.url(&name)).await;
            scenario_live("pg-", db, live_secs, live_rate).await;
            cluster.drop_database(&name).await;
        }
        if pg_ryw {
            println!("\n## Read-your-writes on PostgreSQL (seed scenario over HTTP)");
            let name = cluster.create(None).await;
            scenario_ryw("pg-", Some(cluster.url(&name))).await;
            cluster.drop_database(&name).await;
        }
        if pg_sweep {
            println!("\n## Live sweep on PostgreSQL (HTTP, 64 writers)");
            scenario_live_sweep("pg-", RunDb::Postgres(&cluster)).await;
        }
        if pg_batching {
            println!("\n## Append batching on PostgreSQL (HTTP)");
            scenario_append_batching("pg-", RunDb::Postgres(&cluster)).await;
        }
        if pg_swap {
            println!("\n## Plugin swaps and a rebuild under live load on PostgreSQL (HTTP)");
            scenario_swap("pg-", RunDb::Postgres(&cluster)).await;
        }
    }
}
