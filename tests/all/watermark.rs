//! The PostgreSQL outbox's watermark: which open transactions hold projections back (only those
//! that can still write this database's outbox), and how a hold shows (metric, `GET
//! /projections`, `/readyz`).

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

use crate::support::{
    create_database, eventually, plugin_set, postgres_admin_url, tempdir, Api, Backend, Server,
};

fn url(backend: &Backend) -> String {
    backend.url().expect("a PostgreSQL backend").to_owned()
}

/// Opens a transaction on `conn` that has written to a table of its own (so it holds a
/// transaction id) and returns that id.
async fn hold_an_xid(conn: &mut PgConnection) -> u64 {
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS side_table (n int)")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    let xid: String = sqlx::query_scalar(
        "INSERT INTO side_table VALUES (1) RETURNING pg_current_xact_id()::text",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    xid.parse().unwrap()
}

/// The `xid` of the transaction `GET /projections` names as holding the watermark.
async fn named_holder(api: &Api) -> Result<u64, String> {
    let (_, body) = api.get("/projections").await;
    body["watermark"]["holder"]["xid"]
        .as_u64()
        .ok_or_else(|| format!("no holder named: {body}"))
}

#[tokio::test]
async fn an_open_transaction_in_another_database_does_not_delay_projections() {
    let admin = postgres_admin_url();
    let backend = Backend::postgres().await;
    let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
    let api = server.api();
    // Another application's database on the same cluster, with a transaction left open.
    let other = create_database(&admin).await;
    let mut elsewhere = PgConnection::connect(&other).await.unwrap();
    let xid = hold_an_xid(&mut elsewhere).await;

    api.open_account("acct-1", "ann").await;
    let (status, body) = api
        .get("/projections/account-balance/accounts/acct-1?wait_for=acct-1@1&timeout_ms=3000")
        .await;
    assert_eq!(
        status, 200,
        "transaction {xid} in another database held the projection: {body}"
    );
    // Nothing is reported held either (a commit of projector's own may hold it for a moment).
    eventually(Duration::from_secs(20), || async {
        let held = api.gauge("projector_watermark_held_seconds").await?;
        if held == 0.0 {
            Ok(())
        } else {
            Err(format!(
                "held {held} s while another database's transaction is open"
            ))
        }
    })
    .await;
    sqlx::query("COMMIT").execute(&mut elsewhere).await.unwrap();
}

/// A transaction of the outbox's database that took its id writing elsewhere (here, a table of
/// its own) may insert an outbox row at any later moment, below the rows committed meanwhile:
/// it holds the watermark from the moment it has an id, and nothing is read past it.
#[tokio::test]
async fn a_transaction_that_writes_the_outbox_late_holds_the_watermark_and_nothing_is_skipped() {
    let backend = Backend::postgres().await;
    let server = Server::on(&backend, &plugin_set(&[], &["misbehave"]));
    let api = server.api();
    let url = url(&backend);
    let mut t0 = PgConnection::connect(&url).await.unwrap();
    let mut t1 = PgConnection::connect(&url).await.unwrap();
    let mut t2 = PgConnection::connect(&url).await.unwrap();
    let insert = "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, version) \
                  VALUES (gen_random_uuid(), 'T', $1, 'Seq', '{}', $2) RETURNING position";

    // T0 takes the oldest id (its marker row says when the reader has looked); T1 takes the
    // next writing to another table, and inserts into the outbox only at the end; T2 commits
    // version 2 of the stream T1 will write version 1 of.
    sqlx::query("BEGIN").execute(&mut t0).await.unwrap();
    sqlx::query(insert)
        .bind("marker")
        .bind(1i64)
        .execute(&mut t0)
        .await
        .unwrap();
    let t1_xid = hold_an_xid(&mut t1).await;
    let v2: i64 = sqlx::query_scalar(insert)
        .bind("late")
        .bind(2i64)
        .fetch_one(&mut t2)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut t0).await.unwrap();
    let (status, body) = api
        .get("/projections/misbehave/out/seq-marker?wait_for=marker@1&timeout_ms=20000")
        .await;
    assert_eq!(status, 200, "T0's row was not applied: {body}");
    // The reader has looked with T2's row committed, and must have stopped before it.
    let projection = api.projection("misbehave").await;
    let checkpoint = projection["checkpoint"].as_u64().unwrap();
    assert!(
        checkpoint < v2 as u64,
        "the reader passed T2's row (position {v2}) while T1 ({t1_xid}) was open: {projection}"
    );
    let v1: i64 = sqlx::query_scalar(insert)
        .bind("late")
        .bind(1i64)
        .fetch_one(&mut t1)
        .await
        .unwrap();
    assert!(v1 < v2, "T1's row sorts before T2's");
    sqlx::query("COMMIT").execute(&mut t1).await.unwrap();
    // Version 1 (committed last) reaches the plugin before version 2: the fixture fails on
    // any other order.
    let (status, body) = api
        .get("/projections/misbehave/out/seq-late?wait_for=late@2&timeout_ms=20000")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["document"], json!({"count": 2, "last_version": 2}));
    let projection = api.projection("misbehave").await;
    assert_eq!(projection["status"], "running", "{projection}");
    assert_eq!(projection["dead_letters"]["open"], 0, "{projection}");
}

#[tokio::test]
async fn a_held_watermark_shows_in_the_metric_the_projections_and_readyz_and_clears_after() {
    let backend = Backend::postgres().await;
    let server = Server::start_on(
        &backend,
        &plugin_set(&["account-balance"], &[]),
        &tempdir("held"),
        &[("PROJECTOR_OUTBOX__WATERMARK_WARN_MS", "300")],
    );
    let api = server.api();
    let mut holding = PgConnection::connect(&url(&backend)).await.unwrap();
    let xid = hold_an_xid(&mut holding).await;
    api.open_account("acct-1", "ann").await;

    let held = eventually(Duration::from_secs(20), || async {
        let held = api.gauge("projector_watermark_held_seconds").await?;
        let named = named_holder(&api).await?;
        if held > 0.0 && named == xid {
            Ok(held)
        } else {
            Err(format!("held {held} s, holder {named}, expected {xid}"))
        }
    })
    .await;
    println!("held {held} s by {xid}");
    let (_, body) = api.get("/projections").await;
    let holder = &body["watermark"]["holder"];
    assert!(holder["pid"].as_i64().is_some(), "{body}");
    assert!(holder["age_seconds"].as_f64().is_some(), "{body}");
    assert_eq!(
        holder["database"],
        Value::String(db_name(&backend)),
        "{body}"
    );
    // Past the threshold, /readyz names the holder.
    let readyz = eventually(Duration::from_secs(20), || async {
        match api.get("/readyz").await {
            (503, body) => Ok(body),
            (status, body) => Err(format!("{status}: {body}")),
        }
    })
    .await;
    assert!(readyz.to_string().contains(&xid.to_string()), "{readyz}");
    // And the log warns, naming it.
    let log = server.data_dir.join("server.log");
    eventually(Duration::from_secs(20), || async {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        if log.contains(&format!("holder_xid={xid}")) {
            Ok(())
        } else {
            Err(format!("the log does not name the holder:\n{log}"))
        }
    })
    .await;

    sqlx::query("COMMIT").execute(&mut holding).await.unwrap();
    let (status, body) = api
        .get("/projections/account-balance/accounts/acct-1?wait_for=acct-1@1&timeout_ms=20000")
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(20), || async {
        let held = api.gauge("projector_watermark_held_seconds").await?;
        let (status, body) = api.get("/readyz").await;
        if held == 0.0 && status == 200 {
            Ok(())
        } else {
            Err(format!("held {held} s; /readyz {status}: {body}"))
        }
    })
    .await;
}

fn db_name(backend: &Backend) -> String {
    url(backend).rsplit('/').next().unwrap().to_owned()
}

/// projector connected as a plain role (no superuser, no `pg_read_all_stats`): another role's
/// sessions hide their details, but not their transaction ids or databases, so the narrow rule
/// still applies and the holder is still named (its details marked hidden).
#[tokio::test]
async fn a_reader_without_stats_privileges_still_narrows_the_watermark_and_names_the_holder() {
    let admin = postgres_admin_url();
    let backend = Backend::postgres().await;
    let db = db_name(&backend);
    let role = format!("r_{}", uuid::Uuid::new_v4().simple());
    let mut su = PgConnection::connect(&url(&backend)).await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'pw'; ALTER DATABASE {db} OWNER TO {role};"
    ))
    .execute(&mut su)
    .await
    .unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    let (scheme, host) = base.split_once("://").unwrap();
    let host = host.rsplit('@').next().unwrap();
    let as_role = Backend::Postgres {
        url: format!("{scheme}://{role}:pw@{host}/{db}"),
    };
    let server = Server::start_on(
        &as_role,
        &plugin_set(&["account-balance"], &[]),
        &tempdir("plain-role"),
        &[("PROJECTOR_OUTBOX__WATERMARK_WARN_MS", "300")],
    );
    let api = server.api();

    // Another database's open transaction: no delay.
    let other = create_database(&admin).await;
    let mut elsewhere = PgConnection::connect(&other).await.unwrap();
    hold_an_xid(&mut elsewhere).await;
    api.open_account("acct-1", "ann").await;
    let (status, body) = api
        .get("/projections/account-balance/accounts/acct-1?wait_for=acct-1@1&timeout_ms=3000")
        .await;
    assert_eq!(status, 200, "held by another database: {body}");

    // A superuser's open transaction in this database: held, and named.
    let xid = hold_an_xid(&mut su).await;
    api.append("acct-1", "Deposited", json!({"amount": 5}))
        .await;
    let holder = eventually(Duration::from_secs(20), || async {
        let (_, body) = api.get("/projections").await;
        let holder = body["watermark"]["holder"].clone();
        if holder["xid"].as_u64() == Some(xid) {
            Ok(holder)
        } else {
            Err(format!("expected {xid} named: {body}"))
        }
    })
    .await;
    assert_eq!(holder["details_hidden"], true, "{holder}");
    sqlx::query("COMMIT").execute(&mut su).await.unwrap();
    sqlx::query("COMMIT").execute(&mut elsewhere).await.unwrap();
    let (status, body) = api
        .get("/projections/account-balance/accounts/acct-1?wait_for=acct-1@2&timeout_ms=20000")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["document"]["balance"], 5, "{body}");
    let log = std::fs::read_to_string(server.data_dir.join("server.log")).unwrap();
    assert!(
        log.contains("pg_read_all_stats"),
        "no hint to grant pg_read_all_stats:\n{log}"
    );
}
