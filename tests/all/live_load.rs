//! Appends under load: concurrent requests share group commits, each with its own answer;
//! a crash in the middle of them keeps exactly what was acknowledged.

use std::collections::{BTreeMap, BTreeSet};

use std::time::Duration;

use serde_json::json;

use crate::support::{
    eventually, on_both_stores, outbox_rows, plugin_set, tempdir, Api, OutboxRow, Server,
};

/// Every stream's versions are 1, 2, 3... in position order.
fn assert_streams_in_order(rows: &[OutboxRow]) {
    let mut next: BTreeMap<&str, i64> = BTreeMap::new();
    for row in rows {
        let expected = next.entry(row.stream.as_str()).or_insert(1);
        assert_eq!(
            row.version, *expected,
            "stream {} out of order: {rows:?}",
            row.stream
        );
        *expected += 1;
    }
}

async fn deposit(api: &Api, id: &str, stream: &str, expected: Option<u64>) -> u16 {
    let mut event = json!({"id": id, "stream": stream, "stream_type": "Account",
                           "type": "Deposited", "payload": {"amount": 1}});
    if let Some(v) = expected {
        event["expected_version"] = v.into();
    }
    api.post("/events", &event).await.0
}

on_both_stores! {
    /// 64 requests race for 8 streams, each expecting version 1: on each stream exactly one
    /// wins; 64 more without expectations, sent at the same time, all land.
    async fn stale_expected_versions_refuse_only_their_own_requests(backend) {
        let server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        for s in 0..8 {
            api.open_account(&format!("race-{s}"), "o").await;
        }
        let mut requests = tokio::task::JoinSet::new();
        for n in 0..128 {
            let api = api.clone();
            requests.spawn(async move {
                let id = uuid::Uuid::new_v4().to_string();
                let status = match n % 2 {
                    0 => deposit(&api, &id, &format!("race-{}", n / 2 % 8), Some(1)).await,
                    _ => deposit(&api, &id, &format!("free-{n}"), None).await,
                };
                (n, id, status)
            });
        }
        let answers = requests.join_all().await;
        let mut accepted = BTreeSet::new();
        let mut wins: BTreeMap<u64, u32> = BTreeMap::new();
        for (n, id, status) in &answers {
            match (n % 2, status) {
                (0, 201) => *wins.entry(n / 2 % 8).or_default() += 1,
                (0, 409) => continue,
                (1, 201) => {}
                (_, other) => panic!("request {n} answered {other}"),
            }
            accepted.insert(id.clone());
        }
        assert_eq!(wins, (0..8).map(|s| (s, 1)).collect::<BTreeMap<_, _>>());
        let rows = outbox_rows(&backend, &server.data_dir).await;
        let deposits: BTreeSet<String> = rows
            .iter()
            .filter(|r| r.version > 1 || r.stream.starts_with("free-"))
            .map(|r| r.id.clone())
            .collect();
        assert_eq!(deposits, accepted, "the outbox holds exactly the accepted events");
        assert_streams_in_order(&rows);
    }

    /// kill -9 while 32 writers append: everything acknowledged is in the outbox and in the
    /// read model after the restart; nothing refused is.
    async fn a_crash_during_group_commits_keeps_exactly_what_was_acknowledged(backend) {
        let mut server = Server::on(&backend, &plugin_set(&["account-balance"], &[]));
        let api = server.api();
        let accounts: Vec<String> = (0..16).map(|a| format!("acct-{a}")).collect();
        for account in &accounts {
            api.open_account(account, "o").await;
        }
        let (acked_tx, mut acked) = tokio::sync::mpsc::unbounded_channel();
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..32 {
            let (api, accounts, acked_tx) = (api.clone(), accounts.clone(), acked_tx.clone());
            writers.spawn(async move {
                for k in 0.. {
                    let id = uuid::Uuid::new_v4().to_string();
                    let stream = &accounts[(w + k) % accounts.len()];
                    // Every fifth expects a version the stream has passed: refused.
                    let stale = (k % 5 == 4).then_some(1);
                    let mut event = json!({"id": id, "stream": stream, "stream_type": "Account",
                                           "type": "Deposited", "payload": {"amount": 1}});
                    if let Some(v) = stale {
                        event["expected_version"] = v.into();
                    }
                    let sent = api
                        .http
                        .post(format!("{}/events", api.base))
                        .json(&event)
                        .send()
                        .await;
                    // No answer: the server died under this request; its fate is unknown.
                    let Ok(response) = sent else { return };
                    let status = response.status().as_u16();
                    if acked_tx.send((id, status)).is_err() {
                        return;
                    }
                }
            });
        }
        // Kill once a good number have been acknowledged.
        let mut answers = Vec::new();
        while answers.iter().filter(|(_, s)| *s == 201).count() < 300 {
            answers.push(acked.recv().await.unwrap());
        }
        server.kill();
        drop(acked_tx);
        writers.join_all().await;
        while let Ok(answer) = acked.try_recv() {
            answers.push(answer);
        }
        let refused: Vec<&(String, u16)> = answers.iter().filter(|(_, s)| *s != 201).collect();
        assert!(refused.iter().all(|(_, s)| *s == 409), "{refused:?}");
        assert!(!refused.is_empty(), "no stale request was refused");

        server.restart();
        let api = server.api();
        let rows = outbox_rows(&backend, &server.data_dir).await;
        let stored: BTreeSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        for (id, status) in &answers {
            match status {
                201 => assert!(stored.contains(id.as_str()), "acknowledged {id} was lost"),
                _ => assert!(!stored.contains(id.as_str()), "refused {id} was written"),
            }
        }
        assert_streams_in_order(&rows);
        // The read model is the outbox's: each account's deposits, counted.
        for account in &accounts {
            let version = rows.iter().filter(|r| &r.stream == account).count();
            let (status, doc) = api
                .get(&format!(
                    "/projections/account-balance/accounts/{account}?wait_for={account}@{version}&timeout_ms=30000"
                ))
                .await;
            assert_eq!(status, 200, "{doc}");
            assert_eq!(doc["document"]["tx_count"], version as u64 - 1, "{account}: {doc}");
            assert_eq!(doc["document"]["balance"], version as i64 - 1, "{account}: {doc}");
        }
    }

    /// A projection slower than the writers: once its lag passes the bound, appends are
    /// refused with 503 and Retry-After, and every acknowledged event is applied.
    async fn appends_above_capacity_are_refused_once_the_lag_bound_is_crossed(backend) {
        let server = Server::start_on(
            &backend,
            &plugin_set(&[], &["poison"]),
            &tempdir("data"),
            &[
                ("PROJECTOR_RUNNER__MAX_LAG_MS", "50"),
                ("PROJECTOR_RUNNER__REFUSE_LAG_MS", "150"),
                // One slow event a batch: the lag grows past the refusal bound while any
                // one event is applied, on a fast machine or a slow one.
                ("PROJECTOR_RUNNER__MAX_BATCH_EVENTS", "1"),
            ],
        );
        let api = server.api();
        // Caught up once (nothing to read): from now on its lag holds appends back.
        eventually(Duration::from_secs(10), || async {
            match api.projection("poison").await["status"] == "running" {
                true => Ok(()),
                false => Err("the projection never started".to_owned()),
            }
        })
        .await;
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..16 {
            let api = api.clone();
            writers.spawn(async move {
                let stream = format!("slow-{w}");
                let mut acknowledged = 0u64;
                let mut retry_after = None;
                // Until this writer is refused (or gives up).
                for _ in 0..2_000 {
                    let response = api
                        .http
                        .post(format!("{}/events", api.base))
                        // Each event keeps the plugin busy for a few hundred milliseconds.
                        .json(&json!({"stream": stream, "stream_type": "T", "type": "Slow",
                                      "payload": {"amount": 1, "spin": 400_000_000u64}}))
                        .send()
                        .await
                        .unwrap();
                    match response.status().as_u16() {
                        201 => acknowledged += 1,
                        503 => {
                            retry_after = response
                                .headers()
                                .get("retry-after")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let body: serde_json::Value = response.json().await.unwrap();
                            assert_eq!(body["error"]["code"], "lagging", "{body}");
                            break;
                        }
                        other => panic!("append answered {other}"),
                    }
                }
                (stream, acknowledged, retry_after)
            });
        }
        let results = writers.join_all().await;
        let refusals: Vec<&String> = results.iter().filter_map(|(_, _, r)| r.as_ref()).collect();
        assert!(!refusals.is_empty(), "no append was refused: {results:?}");
        for seconds in &refusals {
            assert!(seconds.parse::<u64>().unwrap() >= 1, "Retry-After: {seconds}");
        }
        // Nothing acknowledged is lost: each stream's document counts its accepted events.
        for (stream, acknowledged, _) in &results {
            if *acknowledged == 0 {
                continue;
            }
            let (status, doc) = api
                .get(&format!(
                    "/projections/poison/streams/{stream}?wait_for={stream}@{acknowledged}&timeout_ms=60000"
                ))
                .await;
            assert_eq!(status, 200, "{doc}");
            assert_eq!(doc["document"]["count"], *acknowledged, "{stream}: {doc}");
        }
    }
}
