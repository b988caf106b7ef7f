//! What only PostgreSQL has: an outbox other processes write in their own transactions
//! (committing out of order), notifications, several instances on one database, a database
//! that restarts under a running host.

use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

use crate::support::{
    create_database, eventually, plugin_set, repo_root, tempdir, Api, Backend, Server,
};

fn url(backend: &Backend) -> String {
    backend.url().expect("a PostgreSQL backend").to_owned()
}

/// Runs `sql` with the `psql` client, as another process writing the outbox would.
fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qc", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One outbox row for the `Seq` fixture (which fails on any out-of-order version).
async fn insert_seq(conn: &mut PgConnection, stream: &str, version: u64) {
    sqlx::query(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, version) \
         VALUES (gen_random_uuid(), 'T', $1, 'Seq', '{}', $2)",
    )
    .bind(stream)
    .bind(version as i64)
    .execute(conn)
    .await
    .unwrap();
}

async fn seq_doc(api: &Api, stream: &str, wait: &str) -> (u16, Value) {
    api.get(&format!(
        "/projections/misbehave/out/seq-{stream}?{wait}&timeout_ms=20000"
    ))
    .await
}

#[tokio::test]
async fn a_row_committed_late_is_seen_after_the_rows_that_committed_before_it() {
    let backend = Backend::postgres().await;
    let server = Server::on(&backend, &plugin_set(&[], &["misbehave"]));
    let api = server.api();
    let url = url(&backend);
    let mut t0 = PgConnection::connect(&url).await.unwrap();
    let mut t1 = PgConnection::connect(&url).await.unwrap();
    let mut t2 = PgConnection::connect(&url).await.unwrap();

    // T0 takes its transaction id before T1 does, and commits after T2 (T1 still open).
    sqlx::query("BEGIN").execute(&mut t0).await.unwrap();
    insert_seq(&mut t0, "marker", 1).await;
    sqlx::query("BEGIN").execute(&mut t1).await.unwrap();
    insert_seq(&mut t1, "slow", 1).await;
    // T2 starts after T1 and commits first: with a sequence it would take the lower id...
    insert_seq(&mut t2, "fast", 1).await;
    // ...and a reader would pass it while T1 is open. Here it must wait for T1. T0's row
    // sorts below T1's, so it is readable once T0 commits, after T2 did: once the
    // projection has applied it, it has read the outbox as it stood with T2's row committed,
    // and must have stopped short of that row.
    sqlx::query("COMMIT").execute(&mut t0).await.unwrap();
    let (status, body) = seq_doc(&api, "marker", "wait_for=marker@1").await;
    assert_eq!(
        status, 200,
        "T0's row was not applied while T1 was open: {body}"
    );
    let (status, body) = api
        .get("/projections/misbehave/out/seq-fast?timeout_ms=0")
        .await;
    assert_eq!(
        status, 404,
        "T2's row was applied while T1 was open: {body}"
    );
    sqlx::query("COMMIT").execute(&mut t1).await.unwrap();
    for stream in ["slow", "fast"] {
        let (status, body) = seq_doc(&api, stream, &format!("wait_for={stream}@1")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["document"], json!({"count": 1, "last_version": 1}));
    }
}

/// 100 rounds of 20 writers, each in its own transaction with random pauses before and after
/// its inserts, so commits land in every order relative to the ids they took; a small batch
/// size makes the runner read between them. The `Seq` fixture fails on a missing, repeated or
/// out-of-order version.
#[tokio::test]
async fn twenty_writers_committing_out_of_order_for_100_rounds_lose_and_repeat_nothing() {
    const WRITERS: usize = 20;
    const ROUNDS: usize = 100;
    let backend = Backend::postgres().await;
    let server = Server::start_on(
        &backend,
        &plugin_set(&[], &["misbehave"]),
        &tempdir("ooo"),
        &[("PROJECTOR_RUNNER__MAX_BATCH_EVENTS", "7")],
    );
    let api = server.api();
    let url = url(&backend);
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ w as u64);
                let mut conn = PgConnection::connect(&url).await.unwrap();
                let stream = format!("w{w}");
                let mut version = 0;
                for _ in 0..ROUNDS {
                    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
                    tokio::time::sleep(Duration::from_micros(u64::from(rng.next_u32() % 3000)))
                        .await;
                    for _ in 0..1 + rng.next_u32() % 3 {
                        version += 1;
                        insert_seq(&mut conn, &stream, version).await;
                    }
                    tokio::time::sleep(Duration::from_micros(u64::from(rng.next_u32() % 6000)))
                        .await;
                    sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
                }
                (stream, version)
            })
        })
        .collect();
    let mut expected = Vec::new();
    for writer in writers {
        expected.push(writer.await.unwrap());
    }
    let mut total = 0;
    for (stream, version) in &expected {
        let (status, body) = seq_doc(&api, stream, &format!("wait_for={stream}@{version}")).await;
        assert_eq!(status, 200, "{stream}: {body}");
        assert_eq!(
            body["document"],
            json!({"count": version, "last_version": version}),
            "{stream}"
        );
        total += version;
    }
    let projection = api.projection("misbehave").await;
    assert_eq!(projection["status"], "running", "{projection}");
    println!(
        "{total} rows from {WRITERS} writers over {ROUNDS} rounds, all applied once, in order"
    );
}

#[tokio::test]
async fn rows_inserted_with_psql_are_projected_by_notification() {
    let backend = Backend::postgres().await;
    // Polling once a minute: only the notification can deliver within the test.
    let server = Server::start_on(
        &backend,
        &plugin_set(&[], &["misbehave"]),
        &tempdir("notify"),
        &[("PROJECTOR_OUTBOX__POLL_INTERVAL_MS", "60000")],
    );
    let api = server.api();
    psql(
        &url(&backend),
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, version) \
         VALUES (gen_random_uuid(), 'T', 'p-1', 'Seq', '{}', 1)",
    );
    let start = Instant::now();
    let (status, body) = seq_doc(&api, "p-1", "wait_for=p-1@1").await;
    assert_eq!(status, 200, "{body}");
    println!("queryable {:?} after psql returned", start.elapsed());
}

#[tokio::test]
async fn rows_inserted_with_psql_without_a_notification_are_found_by_the_poll() {
    let backend = Backend::postgres().await;
    let server = Server::start_on(
        &backend,
        &plugin_set(&[], &["misbehave"]),
        &tempdir("poll"),
        &[
            ("PROJECTOR_OUTBOX__NOTIFY_TRIGGER", "false"),
            ("PROJECTOR_OUTBOX__POLL_INTERVAL_MS", "300"),
        ],
    );
    let api = server.api();
    let url = url(&backend);
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let triggers: Vec<String> = sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'outbox'::regclass AND NOT tgisinternal",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(triggers, ["projector_position"], "no notify trigger");
    psql(
        &url,
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, version) \
         VALUES (gen_random_uuid(), 'T', 'q-1', 'Seq', '{}', 1)",
    );
    let (status, body) = seq_doc(&api, "q-1", "wait_for=q-1@1").await;
    assert_eq!(status, 200, "{body}");
}

/// A team's existing Debezium outbox (no version, headers or timestamp columns, rows already
/// in it): projector adds its position column, numbers the existing rows, and projects them
/// and the rows that follow.
#[tokio::test]
async fn an_existing_debezium_outbox_is_adopted_as_it_is() {
    let url = create_database(&crate::support::postgres_admin_url()).await;
    psql(
        &url,
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL, \
         aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb); \
         INSERT INTO outbox VALUES \
         ('00000000-0000-4000-8000-000000000001', 'Account', 'acct-1', 'AccountOpened', '{\"owner\": \"ann\", \"currency\": \"EUR\"}'), \
         ('00000000-0000-4000-8000-000000000002', 'Account', 'acct-2', 'AccountOpened', '{\"owner\": \"bob\", \"currency\": \"EUR\"}');",
    );
    let backend = Backend::Postgres { url: url.clone() };
    let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
    let api = server.api();
    psql(
        &url,
        "INSERT INTO outbox VALUES (gen_random_uuid(), 'Account', 'acct-1', 'Deposited', '{\"amount\": 7}')",
    );
    // No versions here: wait on the position instead.
    let (status, body) = api.get("/projections/account-balance").await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = api
            .get("/projections/account-balance/accounts/acct-1")
            .await;
        if status == 200 && body["document"]["balance"] == 7 {
            break;
        }
        assert!(Instant::now() < deadline, "deposit never applied: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = api
        .get("/projections/account-balance/accounts/acct-2")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["document"]["owner"], "bob");
    // Appends without versions work; asking for one is refused with the reason.
    let (status, body) = api
        .post(
            "/events",
            &json!({"stream": "acct-2", "stream_type": "Account", "type": "Deposited",
                    "payload": {"amount": 1}, "expected_version": 1}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("version_column"), "{body}");
    // A stream id longer than the column takes is refused, not cut short.
    let (status, body) = api
        .post(
            "/events",
            &json!({"stream": "s".repeat(256), "stream_type": "Account", "type": "Deposited",
                    "payload": {"amount": 1}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("too long"), "{body}");
}

/// An outbox whose version column holds text cannot order versions (and one non-number would
/// fail every read): refused at start with the setting to change, before anything is read.
#[tokio::test]
async fn an_outbox_with_a_text_version_column_is_refused_with_the_setting_to_change() {
    use projector::config::{OutboxConfig, PostgresConfig};
    use projector::source::pg_outbox::PgOutbox;
    use projector::store::postgres::Postgres;

    let url = create_database(&crate::support::postgres_admin_url()).await;
    psql(
        &url,
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
         aggregateid text NOT NULL, type text NOT NULL, payload jsonb, version text); \
         INSERT INTO outbox VALUES (gen_random_uuid(), 'Account', 'acct-1', 'AccountOpened', \
         '{}', 'v1');",
    );
    let db = Postgres::open(&url, &PostgresConfig::default())
        .await
        .unwrap();
    let config = OutboxConfig::default();
    let err = PgOutbox::open(db.clone(), &config)
        .await
        .err()
        .expect("a text version column is refused");
    let message = err.to_string();
    assert!(
        message.contains("outbox.version_column") && message.contains("text"),
        "{message}"
    );
    // Pointed at no column, the same table runs without versions.
    let config = OutboxConfig {
        version_column: "no_such_column".into(),
        ..OutboxConfig::default()
    };
    let outbox = PgOutbox::open(db, &config).await.unwrap();
    let events = projector::source::Source::read(&outbox, 0, 10, 1 << 20)
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].version, 0);
}

/// Appends `n` deposits to `stream` through `api`, in requests of 50.
async fn deposit(api: &Api, stream: &str, n: usize) {
    for chunk in 0..n.div_ceil(50) {
        let events: Vec<Value> = (0..50.min(n - chunk * 50))
            .map(|_| json!({"stream": stream, "stream_type": "Account", "type": "Deposited", "payload": {"amount": 1}}))
            .collect();
        let (status, body) = api.post("/events", &json!({ "events": events })).await;
        assert_eq!(status, 201, "{body}");
    }
}

async fn wait_for_balance(api: &Api, stream: &str, balance: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = api
            .get(&format!(
                "/projections/account-balance/accounts/{stream}?wait_for={stream}@{}&timeout_ms=2000",
                balance + 1
            ))
            .await;
        if status == 200 {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{stream} never reached {balance}: {body}"
        );
    }
}

#[tokio::test]
async fn a_standby_instance_takes_over_when_the_active_one_is_killed() {
    let backend = Backend::postgres().await;
    let plugins = plugin_set(&["account-balance"], &[]);
    let mut a = Server::on(&backend, &plugins);
    let b = Server::on(&backend, &plugins);
    let (api_a, api_b) = (a.api(), b.api());
    api_a.open_account("acct-1", "ann").await;
    deposit(&api_a, "acct-1", 500).await;
    wait_for_balance(&api_a, "acct-1", 500).await;
    let status_a = api_a.projection("account-balance").await["status"].clone();
    let status_b = api_b.projection("account-balance").await["status"].clone();
    assert_eq!(
        (status_a.as_str(), status_b.as_str()),
        (Some("running"), Some("standby")),
        "one instance runs the projection, the other stands by"
    );
    // The standby follows the active one's checkpoint: reads that wait are answered there too.
    wait_for_balance(&api_b, "acct-1", 500).await;
    // Standing by tries the lease every 500 ms on one kept session, not a new connection
    // (a server process) each time.
    let url = backend.url().unwrap();
    let mut conn = PgConnection::connect(url).await.unwrap();
    // A session reaches `pg_stat_database` up to a second after it opens (this connection's
    // own, or one an instance opened just before): the window starts once the count holds
    // still, so it counts only what opens in it.
    let mut before = sessions(&mut conn).await;
    let settle = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let now = sessions(&mut conn).await;
        let still = now == before;
        before = now;
        if still || Instant::now() > settle {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let after = sessions(&mut conn).await;
    assert_eq!(
        after - before,
        0,
        "sessions opened while both instances idled for 2 s"
    );
    // The kept session dies (a restart, a dropped link): the next try opens a fresh one
    // without reporting an error.
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity a \
         WHERE datname = current_database() AND application_name = 'projector' \
         AND query LIKE '%pg_try_advisory_lock%' \
         AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory')",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(cut, [true], "the standby's kept session");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b_status = api_b.projection("account-balance").await;
    assert_eq!(b_status["status"], "standby", "{b_status}");
    assert_eq!(b_status["retrying"], Value::Null, "{b_status}");
    let log = std::fs::read_to_string(b.data_dir.join("server.log")).unwrap();
    assert!(
        !log.contains("cannot take the projection's lease"),
        "a dead kept session was reported instead of replaced:\n{log}"
    );
    conn.close().await.unwrap();

    // Appends keep coming through B while A dies mid-stream.
    let writer = {
        let api_b = api_b.clone();
        tokio::spawn(async move { deposit(&api_b, "acct-1", 1500).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.kill();
    let killed = Instant::now();
    while api_b.projection("account-balance").await["status"] != "running" {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the standby did not take over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("standby took over {:?} after the kill", killed.elapsed());
    writer.await.unwrap();
    let body = wait_for_balance(&api_b, "acct-1", 2000).await;
    assert_eq!(body["document"]["balance"], 2000, "{body}");
    assert_eq!(
        body["document"]["tx_count"], 2000,
        "each deposit applied once"
    );
}

/// Sessions ever opened on the connection's database (statistics read fresh).
async fn sessions(conn: &mut PgConnection) -> i64 {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

/// The test's own cluster, so stopping it leaves the other tests alone.
struct OwnCluster {
    dir: std::path::PathBuf,
}

impl OwnCluster {
    fn script(&self, command: &str) -> String {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/pg-test-cluster.sh"))
            .arg(command)
            .arg(&self.dir)
            .output()
            .expect("run pg-test-cluster.sh");
        assert!(
            out.status.success(),
            "pg-test-cluster.sh {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.script("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_database_restart_is_waited_out_and_loses_nothing() {
    let cluster = OwnCluster {
        dir: tempdir("own-pg"),
    };
    let admin = cluster.script("start");
    let backend = Backend::Postgres {
        url: create_database(&admin).await,
    };
    let server = Server::start_on(
        &backend,
        &plugin_set(&["account-balance"], &[]),
        &tempdir("db-restart"),
        &[
            ("PROJECTOR_RUNNER__MAX_BATCH_EVENTS", "100"),
            ("PROJECTOR_RUNNER__MAX_RETRY_BACKOFF_MS", "1000"),
        ],
    );
    let api = server.api();
    api.open_account("acct-1", "ann").await;
    deposit(&api, "acct-1", 3000).await;
    let (status, _) = api.get("/readyz").await;
    assert_eq!(status, 200);

    // Down for 10 s while the host streams.
    cluster.script("stop");
    let stopped = Instant::now();
    let mut saw_not_ready = false;
    while stopped.elapsed() < Duration::from_secs(10) {
        let (status, body) = api.get("/readyz").await;
        if status == 503 {
            assert!(body.to_string().contains("database"), "{body}");
            saw_not_ready = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(saw_not_ready, "/readyz never reported the outage");
    cluster.script("start");

    deposit(&api, "acct-1", 1000).await;
    let body = wait_for_balance(&api, "acct-1", 4000).await;
    assert_eq!(body["document"]["tx_count"], 4000, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(server.data_dir.join("server.log")).unwrap();
    assert!(log.contains("retrying"), "the outage is not in the log");
}

/// The lease's connection dies while the active instance is mid-catch-up (its pool stays up,
/// so it could go on committing): it must stop and stand by, the other instance takes over,
/// and the checkpoint fence keeps any late commit of the first from applying a batch twice.
#[tokio::test]
async fn an_instance_that_loses_its_lease_stands_by_and_nothing_is_applied_twice() {
    let backend = Backend::postgres().await;
    let url = url(&backend);
    let plugins = plugin_set(&["account-balance"], &[]);
    let env = [("PROJECTOR_RUNNER__MAX_BATCH_EVENTS", "50")];
    let writer = Server::on(&backend, &plugin_set(&[], &[]));
    let api_w = writer.api();
    api_w.open_account("acct-1", "ann").await;
    deposit(&api_w, "acct-1", 3000).await;
    let a = Server::start_on(&backend, &plugins, &tempdir("lease-a"), &env);
    let (api_a, mut status) = (a.api(), Value::Null);
    for _ in 0..500 {
        status = api_a.projection("account-balance").await["status"].clone();
        if status == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, "running");
    let b = Server::start_on(&backend, &plugins, &tempdir("lease-b"), &env);
    let api_b = b.api();
    // B and the writer (which runs what the catalog holds, once its poll has seen it) standing
    // by have each prepared the projection: the DDL lock they take meanwhile (an advisory
    // transaction lock) is released, and A's lease is the one advisory lock left.
    for (who, api) in [("B", &api_b), ("writer", &api_w)] {
        eventually(Duration::from_secs(30), || async {
            let (_, body) = api.get("/projections/account-balance").await;
            match body["status"].as_str() {
                Some("standby") => Ok(()),
                _ => Err(format!("{who}: {body}")),
            }
        })
        .await;
    }

    // Cut the session holding A's advisory lock (the only advisory lock in this database).
    let mut admin = PgConnection::connect(&url).await.unwrap();
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(cut, [true], "one lease session cut");
    let cut_at = Instant::now();
    // The writer was started without plugins, but every instance runs what the catalog
    // holds: B or the writer takes over.
    let taker = loop {
        let a_status = api_a.projection("account-balance").await["status"].clone();
        let b_status = api_b.projection("account-balance").await["status"].clone();
        // The writer runs the projection once its catalog poll has seen it (404 before).
        let w_status = api_w.get("/projections/account-balance").await.1["status"].clone();
        if a_status == "standby" && b_status == "running" {
            break &api_b;
        }
        if a_status == "standby" && w_status == "running" {
            break &api_w;
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(15),
            "no handover: a {a_status}, b {b_status}, writer {w_status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("handed over {:?} after the lease was cut", cut_at.elapsed());
    let body = wait_for_balance(taker, "acct-1", 3000).await;
    assert_eq!(
        body["document"]["tx_count"], 3000,
        "each deposit applied once"
    );
    let log = std::fs::read_to_string(a.data_dir.join("server.log")).unwrap();
    assert!(log.contains("lease connection lost"), "A did not notice");
}
