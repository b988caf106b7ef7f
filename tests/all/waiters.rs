//! Waiting reads in numbers (issue 17, item 5): reads that wait for stream versions nobody is
//! appending must not get in the way of appends, and each must still answer when its version
//! comes, whether this server appended it or another writer did.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::support::{eventually, on_both_stores, plugin_set, Api, Backend, Server};

/// How many reads wait at once.
const READS: usize = 300;

/// How many reads wait for a version to be appended.
async fn waiting(api: &Api) -> Result<u64, String> {
    Ok(api.gauge("projector_reads_waiting_for_append").await? as u64)
}

/// `READS` reads, read `i` waiting for `herd-{i}@1` (the account opened by `owner-{i}`).
fn wait_for_herd(api: &Api) -> JoinSet<(usize, u16, Value)> {
    let mut reads = JoinSet::new();
    for i in 0..READS {
        let api = api.clone();
        reads.spawn(async move {
            let (status, body) = api
                .get(&format!(
                    "/projections/account-balance/accounts/herd-{i}?wait_for=herd-{i}@1&timeout_ms=60000"
                ))
                .await;
            (i, status, body)
        });
    }
    reads
}

/// Every read answers with the account its version opened.
async fn all_answer(mut reads: JoinSet<(usize, u16, Value)>) {
    let mut answered = 0;
    while let Some(read) = reads.join_next().await {
        let (i, status, body) = read.unwrap();
        assert_eq!(status, 200, "herd-{i}: {body}");
        assert_eq!(
            body["document"]["owner"],
            format!("owner-{i}"),
            "herd-{i}: {body}"
        );
        answered += 1;
    }
    assert_eq!(answered, READS);
}

async fn all_waiting(api: &Api) {
    eventually(Duration::from_secs(30), || async {
        match waiting(api).await? {
            n if n == READS as u64 => Ok(()),
            n => Err(format!("{n} reads waiting, not {READS}")),
        }
    })
    .await;
}

on_both_stores! {
    /// With hundreds of reads waiting on streams nobody appends to, appends and other reads go
    /// on; each waiting read answers when its version is appended, one by one or in a batch;
    /// a read of a version never appended times out with 504; no read is left registered.
    async fn many_waiting_reads_each_answer_when_their_version_is_appended(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        let reads = wait_for_herd(&api);
        all_waiting(&api).await;

        api.open_account("writer", "w").await;
        for n in 2..=30u64 {
            let (version, _) = api.append("writer", "Deposited", json!({"amount": 1})).await;
            assert_eq!(version, n);
        }
        let (status, body) = api
            .get("/projections/account-balance/accounts/writer?wait_for=writer@30&timeout_ms=20000")
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["document"]["balance"], 29);
        let (status, body) = api
            .get("/projections/account-balance/accounts/never?wait_for=never@1&timeout_ms=300")
            .await;
        assert_eq!(status, 504, "{body}");
        assert_eq!(body["error"]["code"], "wait_timeout", "{body}");
        // None of the waiting reads was answered by the appends of other streams.
        assert_eq!(waiting(&api).await, Ok(READS as u64));

        for i in 0..READS / 2 {
            api.open_account(&format!("herd-{i}"), &format!("owner-{i}")).await;
        }
        let batch: Vec<Value> = (READS / 2..READS)
            .map(|i| json!({"stream": format!("herd-{i}"), "stream_type": "Account",
                "type": "AccountOpened", "payload": {"owner": format!("owner-{i}"), "currency": "EUR"}}))
            .collect();
        let (status, body) = api.post("/events", &json!({ "events": batch })).await;
        assert_eq!(status, 201, "{body}");
        all_answer(reads).await;
        assert_eq!(waiting(&api).await, Ok(0));
    }

    /// The versions waited for are written into the outbox by another writer (not through
    /// this server's appends): the reads are answered from the outbox when its head moves.
    async fn reads_waiting_for_another_writers_events_are_answered(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        let reads = wait_for_herd(&api);
        all_waiting(&api).await;
        write_directly(&backend, &server, 0..READS).await;
        all_answer(reads).await;
        assert_eq!(waiting(&api).await, Ok(0));
    }
}

/// Opens the accounts `herd-{i}` by inserting outbox rows as an application would, in one
/// transaction.
async fn write_directly(backend: &Backend, server: &Server, accounts: std::ops::Range<usize>) {
    match backend {
        Backend::Sqlite => {
            let url = format!(
                "sqlite://{}",
                server.data_dir.join("projector.db").display()
            );
            let db = sqlx::SqlitePool::connect(&url).await.unwrap();
            let mut tx = db.begin().await.unwrap();
            for i in accounts {
                sqlx::query(
                    "INSERT INTO outbox (id, stream, stream_type, event_type, version, payload, headers, timestamp_ms) \
                     VALUES (?, ?, 'Account', 'AccountOpened', 1, ?, '[]', 0)",
                )
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(format!("herd-{i}"))
                .bind(json!({"owner": format!("owner-{i}"), "currency": "EUR"}).to_string())
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
            db.close().await;
        }
        Backend::Postgres { url } => {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            let mut tx = conn.begin().await.unwrap();
            for i in accounts {
                sqlx::query(
                    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, version) \
                     VALUES (gen_random_uuid(), 'Account', $1, 'AccountOpened', $2::jsonb, 1)",
                )
                .bind(format!("herd-{i}"))
                .bind(json!({"owner": format!("owner-{i}"), "currency": "EUR"}).to_string())
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
        }
    }
}

/// An outbox whose stream column is a uuid: a stream may be asked for in another spelling
/// than the one stored, so the events of others are matched by looking the awaited versions
/// up in the column's own type (one statement for all of them), not by their text.
#[tokio::test]
async fn reads_on_a_uuid_stream_column_match_in_the_columns_type() {
    let url = crate::support::create_database(&crate::support::postgres_admin_url()).await;
    let mut conn = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&url).await.unwrap()
    };
    sqlx::raw_sql(
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
         aggregateid uuid NOT NULL, type text NOT NULL, payload jsonb, version bigint, \
         UNIQUE (aggregateid, version))",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let backend = Backend::Postgres { url };
    let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
    let api = server.api();
    let streams: Vec<uuid::Uuid> = (0..20).map(|_| uuid::Uuid::new_v4()).collect();
    let mut reads = JoinSet::new();
    for (i, stream) in streams.iter().enumerate() {
        let api = api.clone();
        // Asked in capitals; stored (and keyed in the read model) in lower case.
        let (asked, key) = (stream.to_string().to_uppercase(), stream.to_string());
        reads.spawn(async move {
            let (status, body) = api
                .get(&format!(
                    "/projections/account-balance/accounts/{key}?wait_for={asked}@1&timeout_ms=60000"
                ))
                .await;
            (i, status, body)
        });
    }
    eventually(Duration::from_secs(30), || async {
        match waiting(&api).await? {
            20 => Ok(()),
            n => Err(format!("{n} reads waiting, not 20")),
        }
    })
    .await;
    let mut tx = {
        use sqlx::Connection;
        conn.begin().await.unwrap()
    };
    for (i, stream) in streams.iter().enumerate() {
        sqlx::query(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, version) \
             VALUES (gen_random_uuid(), 'Account', $1::uuid, 'AccountOpened', $2::jsonb, 1)",
        )
        .bind(stream.to_string())
        .bind(json!({"owner": format!("owner-{i}"), "currency": "EUR"}).to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    while let Some(read) = reads.join_next().await {
        let (i, status, body) = read.unwrap();
        assert_eq!(status, 200, "read {i}: {body}");
        assert_eq!(
            body["document"]["owner"],
            format!("owner-{i}"),
            "read {i}: {body}"
        );
    }
}
